// The fp32 decode "wall": how many tokens per second this machine could
// decode if a step did nothing but its matrix-vector products. It maps a
// llama2.c version 0 checkpoint (the file the engines are timed on) and, per
// step, multiplies every layer's wq, wk, wv, wo, w1, w2, w3 and then the
// classifier with a fixed vector: the same bytes, in the same order, that one
// decoded token streams. No attention, norms or sampling, and no dependence
// between products, so nothing but memory traffic limits it.
//
// Used by scripts/bench-reference.py as the "products only" column:
//   gcc -O3 -march=native -fopenmp products-only.c -o products-only
//   OMP_NUM_THREADS=2 ./products-only model_v0.bin 256 [mapped]
// prints "products-only tok/s: N". The weights are read from a copy in
// transparent huge pages, as llama2's CPU backend reads them (its `arena`);
// `mapped` reads them from the file's map in place, as llama2.c does.

#include <fcntl.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>

// Rows per scheduled tile.
#define TILE 16
// Tiles per scheduled chunk: enough chunks that both threads stay busy.
#define CHUNK 4

typedef struct {
    const float *w; // [rows][cols]
    int rows, cols;
} Matrix;

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

// out[r] = w[r] . x for rows r0..r0+n, one row after the other, so each
// thread's share of a matrix is one sequential stream, as our decode reads
// it (rows side by side, as interleaved streams, were up to 1.3x slower on
// a Zen 4). Explicit AVX-512 or AVX2 where the compiler targets it, plain C
// elsewhere; compile with -mno-avx512f on an AVX-512 machine to time the
// AVX2 wall there.
static void tile(const Matrix *m, int r0, int n, const float *x, float *out) {
    for (int r = 0; r < n; r++) {
        const float *w = m->w + (size_t)(r0 + r) * m->cols;
        int k = 0;
        float sum = 0;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (; k + 16 <= m->cols; k += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), acc);
        sum = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 acc = _mm256_setzero_ps();
        for (; k + 8 <= m->cols; k += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc);
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
        sum = _mm_cvtss_f32(s4);
#endif
        for (; k < m->cols; k++)
            sum += w[k] * x[k];
        out[r0 + r] = sum;
    }
}

// Inside a parallel region: all threads share the tiles of one product.
static void product(const Matrix *m, const float *x, float *out) {
    int tiles = (m->rows + TILE - 1) / TILE;
#pragma omp for schedule(dynamic, CHUNK)
    for (int t = 0; t < tiles; t++) {
        int r0 = t * TILE;
        int n = m->rows - r0 < TILE ? m->rows - r0 : TILE;
        tile(m, r0, n, x, out);
    }
}

// A copy of `size` bytes at `src` in anonymous memory that asks Linux for
// 2 MiB pages (elsewhere the advice is left out and the copy has small ones).
static const int32_t *huge_page_copy(const void *src, size_t size) {
    void *copy = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (copy == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
#ifdef MADV_HUGEPAGE
    madvise(copy, size, MADV_HUGEPAGE);
#endif
    memcpy(copy, src, size);
    return copy;
}

int main(int argc, char **argv) {
    if (argc != 3 && !(argc == 4 && strcmp(argv[3], "mapped") == 0)) {
        fprintf(stderr, "usage: %s CHECKPOINT_V0 STEPS [mapped]\n", argv[0]);
        return 2;
    }
    int fd = open(argv[1], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size < 28) {
        fprintf(stderr, "cannot read %s\n", argv[1]);
        return 1;
    }
    const int32_t *h = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (h == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    if (argc == 3)
        h = huge_page_copy(h, st.st_size);
    // Version 0 header: dim, hidden_dim, n_layers, n_heads, n_kv_heads,
    // vocab_size (negative: separate classifier), seq_len.
    int d = h[0], hd = h[1], L = h[2], heads = h[3], kv_heads = h[4];
    int shared = h[5] > 0, V = abs(h[5]), S = h[6];
    if (d <= 0 || hd <= 0 || L <= 0 || heads <= 0 || kv_heads <= 0 || d % heads) {
        fprintf(stderr, "%s: not a version 0 checkpoint\n", argv[1]);
        return 1;
    }
    int kv = d / heads * kv_heads, hs = d / heads;
    const float *p = (const float *)(h + 7);
    const float *embedding = p;
    p += (size_t)V * d + (size_t)L * d; // embedding, rms_att
    Matrix *m = calloc((size_t)L * 7 + 1, sizeof(Matrix));
    int sizes[7][2] = {{d, d}, {kv, d}, {kv, d}, {d, d}, {hd, d}, {d, hd}, {hd, d}};
    const float *start[7];
    // Stored as all layers' wq, then all wk, wv, wo, rms_ffn, w1, w2, w3.
    for (int i = 0; i < 7; i++) {
        if (i == 4)
            p += (size_t)L * d; // rms_ffn
        start[i] = p;
        p += (size_t)L * sizes[i][0] * sizes[i][1];
    }
    for (int l = 0; l < L; l++)
        for (int i = 0; i < 7; i++)
            m[l * 7 + i] = (Matrix){start[i] + (size_t)l * sizes[i][0] * sizes[i][1],
                                    sizes[i][0], sizes[i][1]};
    p += d + (size_t)S * hs; // rms_final, freq_cis_real and _imag
    m[L * 7] = (Matrix){shared ? embedding : p, V, d};
    if ((const char *)(shared ? p : p + (size_t)V * d) > (const char *)h + st.st_size) {
        fprintf(stderr, "%s: shorter than its header says\n", argv[1]);
        return 1;
    }
    int steps = atoi(argv[2]), widest = V > hd ? V : hd;
    widest = widest > d ? widest : d;
    float *x = malloc(sizeof(float) * widest), *out = malloc(sizeof(float) * widest);
    for (int i = 0; i < widest; i++)
        x[i] = 1.0f / (1 + i % 7);
    double t0 = 0;
    // One untimed step first: page the weights in.
#pragma omp parallel
    for (int s = 0; s <= steps; s++) {
#pragma omp single
        if (s == 1)
            t0 = seconds();
        for (int i = 0; i < L * 7 + 1; i++)
            product(&m[i], x, out);
    }
    double secs = seconds() - t0;
    printf("products-only tok/s: %.2f (checksum %g)\n", steps / secs, out[0]);
    return 0;
}
