// Weight-times-activation products: out[r][j] = w[j] . x[r].
//
// Decoding (one activation row): `matvec_*` kernels, one warp per weight row
// (two for the SwiGLU pair), each lane streaming 16-byte chunks of the row
// with several loads issued before any is used, so enough bytes are in
// flight to keep HBM busy. One launch serves up to three matrices sharing
// the input (QKV, w1/w3), and an epilogue `mode` fuses the op that follows:
//   MODE_PLAIN   out_m[j] = w_m[j] . x                  (grid over n0+n1+n2 rows)
//   MODE_RESIDUAL out0[j] = w0[j] . x; res[j] += out0[j] (wo, w2 + residual add)
//   MODE_SWIGLU  out1[j] = w1[j] . x; out0[j] = silu(w0[j] . x) * out1[j]
//                                                        (w1, w3 + SwiGLU gate)
// The float kernels can also fold in the RMS norm that precedes the product
// (argument g); Q8 products fold it into the activation quantization
// (`rmsnorm_quantize_q8`) instead.
// Prefill without cuBLAS: `matmul_*` kernels, one warp per weight row applied
// to R = 8 batch rows at a time; grid (ceil(n_out / warps), ceil(rows / R)).
// Rows whose byte length is not a multiple of 16 take a scalar loop instead.

#define MODE_PLAIN 0
#define MODE_RESIDUAL 1
#define MODE_SWIGLU 2

// 16-byte chunks each lane loads before using any (per matrix row).
#define MV_UNROLL 8

// How each storage type turns a 16-byte chunk into a dot product with x.
struct F32W {
    typedef float T;
    enum { N = 4 };
    static __device__ __forceinline__ float dot(uint4 w, const float* x) {
        return __uint_as_float(w.x) * x[0] + __uint_as_float(w.y) * x[1] +
               __uint_as_float(w.z) * x[2] + __uint_as_float(w.w) * x[3];
    }
    static __device__ __forceinline__ float one(const T* w, int i) { return w[i]; }
};

// Eight 16-bit values against eight activations, via `widen`.
template <float (*widen)(u16)>
__device__ __forceinline__ float dot_half8(uint4 w, const float* x) {
    return widen(w.x & 0xffff) * x[0] + widen(w.x >> 16) * x[1] + widen(w.y & 0xffff) * x[2] +
           widen(w.y >> 16) * x[3] + widen(w.z & 0xffff) * x[4] + widen(w.z >> 16) * x[5] +
           widen(w.w & 0xffff) * x[6] + widen(w.w >> 16) * x[7];
}

struct F16W {
    typedef u16 T;
    enum { N = 8 };
    static __device__ __forceinline__ float dot(uint4 w, const float* x) {
        return dot_half8<f16_to_f32>(w, x);
    }
    static __device__ __forceinline__ float one(const T* w, int i) { return f16_to_f32(w[i]); }
};

struct BF16W {
    typedef u16 T;
    enum { N = 8 };
    static __device__ __forceinline__ float dot(uint4 w, const float* x) {
        return dot_half8<bf16_to_f32>(w, x);
    }
    static __device__ __forceinline__ float one(const T* w, int i) { return bf16_to_f32(w[i]); }
};

template <class E, int R>
__device__ __forceinline__ void matvec_rows(float* out, const typename E::T* w, const float* x,
                                            int n_out, int cols, int rows) {
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int r0 = blockIdx.y * R;
    if (j >= n_out) return;
    int nr = min(R, rows - r0);
    const typename E::T* wr = w + (size_t)j * cols;
    const float* xr = x + (size_t)r0 * cols;
    float acc[R];
#pragma unroll
    for (int rr = 0; rr < R; rr++) acc[rr] = 0.0f;
    if (cols % E::N == 0) {
        const uint4* wv = (const uint4*)wr;
        int nv = cols / E::N;
#pragma unroll 4
        for (int i = lane; i < nv; i += 32) {
            uint4 wc = load_stream(wv + i);
#pragma unroll
            for (int rr = 0; rr < R; rr++) {
                if (rr < nr) acc[rr] += E::dot(wc, xr + (size_t)rr * cols + i * E::N);
            }
        }
    } else {
        for (int i = lane; i < cols; i += 32) {
            float wf = E::one(wr, i);
#pragma unroll
            for (int rr = 0; rr < R; rr++) {
                if (rr < nr) acc[rr] += wf * xr[(size_t)rr * cols + i];
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < R; rr++) {
        if (rr < nr) {
            float s = warp_sum(acc[rr]);
            if (lane == 0) out[(size_t)(r0 + rr) * n_out + j] = s;
        }
    }
}

#define MATMUL(name, E, R)                                                                   \
    extern "C" __global__ void name(float* out, const E::T* w, const float* x, int n_out,    \
                                    int cols, int rows) {                                    \
        pdl_wait();                                                                          \
        matvec_rows<E, R>(out, w, x, n_out, cols, rows);                                     \
    }

MATMUL(matmul_f32, F32W, 8)
MATMUL(matmul_f16, F16W, 8)
MATMUL(matmul_bf16, BF16W, 8)

// The epilogue of one output row: `a` = w0[j] . x, `b` = w1[j] . x (SwiGLU).
__device__ __forceinline__ void mv_store(float* o0, float* o1, float* res, int mode, int j,
                                         float a, float b) {
    if (mode == MODE_SWIGLU) {
        o1[j] = b;
        o0[j] = a * (1.0f / (1.0f + expf(-a))) * b;
    } else {
        o0[j] = a;
        if (mode == MODE_RESIDUAL) res[j] += a;
    }
}

// E::N activations from x[i..]: with NORM, multiplied by the norm weights
// g[i..] and their squares added to `ss`.
template <class E, bool NORM>
__device__ __forceinline__ void mv_load_x(float* xv, const float* x, const float* g, int i,
                                          float& ss) {
#pragma unroll
    for (int k = 0; k < E::N; k += 4) {
        float4 a = *(const float4*)(x + i + k);
        xv[k] = a.x;
        xv[k + 1] = a.y;
        xv[k + 2] = a.z;
        xv[k + 3] = a.w;
        if (NORM) {
            float4 b = *(const float4*)(g + i + k);
            ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
            xv[k] *= b.x;
            xv[k + 1] *= b.y;
            xv[k + 2] *= b.z;
            xv[k + 3] *= b.w;
        }
    }
}

// Dots of P weight rows with x, summed over the warp (every lane gets them).
// With NORM, x is the un-normalized row and g the RMS norm weights: the dots
// are taken with x * g and scaled by 1 / rms(x) at the end, which equals the
// product with rmsnorm(x) up to float rounding.
template <class E, int P, bool NORM>
__device__ __forceinline__ void mv_dots(const typename E::T* const* wr, const float* x,
                                        const float* g, float eps, int cols, float* acc) {
    const int U = MV_UNROLL / P;
    int lane = threadIdx.x & 31;
    float ss = 0.0f;
#pragma unroll
    for (int p = 0; p < P; p++) acc[p] = 0.0f;
    if (cols % E::N == 0) {
        int nv = cols / E::N;
        for (int base = lane; base < nv; base += 32 * U) {
            uint4 wc[P][U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = base + 32 * u;
#pragma unroll
                for (int p = 0; p < P; p++) {
                    wc[p][u] = i < nv ? load_stream((const uint4*)wr[p] + i) : make_uint4(0, 0, 0, 0);
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = base + 32 * u;
                if (i < nv) {
                    float xv[E::N];
                    mv_load_x<E, NORM>(xv, x, g, i * E::N, ss);
#pragma unroll
                    for (int p = 0; p < P; p++) acc[p] += E::dot(wc[p][u], xv);
                }
            }
        }
    } else {
        for (int i = lane; i < cols; i += 32) {
            float xi = x[i];
            if (NORM) {
                ss += xi * xi;
                xi *= g[i];
            }
#pragma unroll
            for (int p = 0; p < P; p++) acc[p] += E::one(wr[p], i) * xi;
        }
    }
    pdl_launch();
#pragma unroll
    for (int p = 0; p < P; p++) acc[p] = warp_sum(acc[p]);
    if (NORM) {
        float inv = 1.0f / sqrtf(warp_sum(ss) / (float)cols + eps);
#pragma unroll
        for (int p = 0; p < P; p++) acc[p] *= inv;
    }
}

// One warp per output row; see the top of the file for the modes.
template <class E, bool NORM>
__device__ __forceinline__ void matvec_multi(const typename E::T* w0, float* o0, int n0,
                                             const typename E::T* w1, float* o1, int n1,
                                             const typename E::T* w2, float* o2, int n2,
                                             const float* x, int cols, float* res, int mode,
                                             const float* g, float eps) {
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bool lead = (threadIdx.x & 31) == 0;
    if (mode == MODE_SWIGLU) {
        if (j >= n0) return;
        const typename E::T* wr[2] = {w0 + (size_t)j * cols, w1 + (size_t)j * cols};
        float acc[2];
        mv_dots<E, 2, NORM>(wr, x, g, eps, cols, acc);
        if (lead) mv_store(o0, o1, res, mode, j, acc[0], acc[1]);
        return;
    }
    const typename E::T* w = w0;
    float* o = o0;
    if (j >= n0) {
        j -= n0;
        w = w1;
        o = o1;
        if (j >= n1) {
            j -= n1;
            w = w2;
            o = o2;
            if (j >= n2) return;
        }
    }
    const typename E::T* wr[1] = {w + (size_t)j * cols};
    float acc[1];
    mv_dots<E, 1, NORM>(wr, x, g, eps, cols, acc);
    if (lead) mv_store(o, o, res, mode, j, acc[0], 0.0f);
}

// `g`: the RMS norm weights [cols] folded into the product (x is then the
// un-normalized row), or null for a plain product; `eps`: the norm's epsilon.
#define MATVEC(name, E)                                                                       \
    extern "C" __global__ void name(const E::T* w0, float* o0, int n0, const E::T* w1,        \
                                    float* o1, int n1, const E::T* w2, float* o2, int n2,     \
                                    const float* x, int cols, float* res, int mode,           \
                                    const float* g, float eps) {                              \
        pdl_wait();                                                                           \
        if (g) {                                                                              \
            matvec_multi<E, true>(w0, o0, n0, w1, o1, n1, w2, o2, n2, x, cols, res, mode, g,  \
                                  eps);                                                       \
        } else {                                                                              \
            matvec_multi<E, false>(w0, o0, n0, w1, o1, n1, w2, o2, n2, x, cols, res, mode, g, \
                                   eps);                                                      \
        }                                                                                     \
    }

MATVEC(matvec_f32, F32W)
MATVEC(matvec_f16, F16W)
MATVEC(matvec_bf16, BF16W)

// ----------------------------------------------------------------------------
// Q8_0: runq's W8A8 product. Activations are quantized at run time in groups
// of the weight's group size (rounding half away from zero), then each output
// sums, over groups, int32 dot * w_scale * x_scale.

// One warp per (row, group) of x [rows][cols], lanes striding over the
// group; a final partial group gets its own scale. HALF = false writes q to
// xq [rows][cols] and the scales to xs [rows][ceil(cols / gs)]; HALF = true
// writes f16(q * scale) to x16 [rows][cols] instead, the activations that
// tensor-core prefill multiplies (W8A8's values, each rounded only to f16).
template <bool HALF>
__device__ __forceinline__ void quantize_q8_warp(signed char* xq, float* xs, u16* x16,
                                                 const float* x, int rows, int cols, int gs) {
    int groups = (cols + gs - 1) / gs, lane = threadIdx.x & 31;
    int t = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (t >= rows * groups) return;
    int r = t / groups, g = t % groups;
    int start = g * gs, end = min(start + gs, cols);
    const float* xr = x + (size_t)r * cols;
    float m = 0.0f;
    for (int k = start + lane; k < end; k += 32) m = fmaxf(m, fabsf(xr[k]));
    m = warp_max(m);
    float scale = m / 127.0f;
    if (!HALF && lane == 0) xs[t] = scale;
    for (int k = start + lane; k < end; k += 32) {
        float v = m == 0.0f ? 0.0f : fminf(fmaxf(roundf(xr[k] / scale), -128.0f), 127.0f);
        if (HALF) {
            x16[(size_t)r * cols + k] = f32_to_f16(v * scale);
        } else {
            xq[(size_t)r * cols + k] = (signed char)v;
        }
    }
}

extern "C" __global__ void quantize_q8(signed char* xq, float* xs, const float* x, int rows,
                                       int cols, int gs) {
    pdl_wait();
    quantize_q8_warp<false>(xq, xs, nullptr, x, rows, cols, gs);
}

extern "C" __global__ void quantize_q8_f16(u16* x16, const float* x, int rows, int cols, int gs) {
    pdl_wait();
    quantize_q8_warp<true>(nullptr, nullptr, x16, x, rows, cols, gs);
}

// The RMS norm fused with quantize_q8 for one row per block (1024 threads):
// the block sums x^2, then each warp quantizes whole groups of
// w[k] * (inv * x[k]), the exact values rmsnorm_f32 would have written.
extern "C" __global__ void rmsnorm_quantize_q8(signed char* xq, float* xs, const float* x,
                                               const float* w, int cols, int gs, float eps) {
    pdl_wait();
    __shared__ float scratch[32];
    int groups = (cols + gs - 1) / gs, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* xr = x + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    pdl_launch();
    float inv = 1.0f / sqrtf(ss / (float)cols + eps);
    for (int g = warp; g < groups; g += blockDim.x >> 5) {
        int start = g * gs, end = min(start + gs, cols);
        float m = 0.0f;
        for (int k = start + lane; k < end; k += 32) m = fmaxf(m, fabsf(w[k] * (inv * xr[k])));
        m = warp_max(m);
        float scale = m / 127.0f;
        if (lane == 0) xs[(size_t)blockIdx.x * groups + g] = scale;
        for (int k = start + lane; k < end; k += 32) {
            float y = w[k] * (inv * xr[k]);
            float v = m == 0.0f ? 0.0f : fminf(fmaxf(roundf(y / scale), -128.0f), 127.0f);
            xq[(size_t)blockIdx.x * cols + k] = (signed char)v;
        }
    }
}

// Four int8 pairs of two 16-byte chunks.
__device__ __forceinline__ int dot_i8x16(uint4 a, uint4 b) {
    int s = __dp4a((int)a.x, (int)b.x, 0);
    s = __dp4a((int)a.y, (int)b.y, s);
    s = __dp4a((int)a.z, (int)b.z, s);
    return __dp4a((int)a.w, (int)b.w, s);
}

// The fast case: gs in {16, 32, 64} and rows made of whole groups. Lane l
// takes 16-byte chunks l, l + 32, ... of the row (coalesced); a chunk lies in
// one group (shift = log2(gs / 16)), so its exact int32 dot is scaled by the
// group's two scales and added to the lane's float sum, with no shuffles
// until the final warp sum. (Adding a group's halves in float instead of
// int32 first changes only float rounding.)

// Dots of P weight rows (wq, ws per row) with the quantized x.
template <int P>
__device__ __forceinline__ void q8_dots(const signed char* const* wq, const float* const* ws,
                                        const signed char* xq, const float* xs, int cols,
                                        int shift, float* acc) {
    const int U = MV_UNROLL / P;
    int lane = threadIdx.x & 31, nv = cols >> 4;
#pragma unroll
    for (int p = 0; p < P; p++) acc[p] = 0.0f;
    for (int base = lane; base < nv; base += 32 * U) {
        uint4 wc[P][U];
        float sc[P][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = base + 32 * u;
#pragma unroll
            for (int p = 0; p < P; p++) {
                bool ok = i < nv;
                wc[p][u] = ok ? load_stream((const uint4*)wq[p] + i) : make_uint4(0, 0, 0, 0);
                sc[p][u] = ok ? __ldg(ws[p] + (i >> shift)) : 0.0f;
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = base + 32 * u;
            if (i < nv) {
                uint4 xc = *(const uint4*)(xq + i * 16);
                float xscale = xs[i >> shift];
#pragma unroll
                for (int p = 0; p < P; p++) {
                    acc[p] += (float)dot_i8x16(wc[p][u], xc) * (sc[p][u] * xscale);
                }
            }
        }
    }
    pdl_launch();
#pragma unroll
    for (int p = 0; p < P; p++) acc[p] = warp_sum(acc[p]);
}

// Decoding, fast case: the `matvec_*` layout and modes above; ws_m holds
// matrix m's scales [n_m * cols / gs].
extern "C" __global__ void matvec_q8(const signed char* w0, const float* s0, float* o0, int n0,
                                     const signed char* w1, const float* s1, float* o1, int n1,
                                     const signed char* w2, const float* s2, float* o2, int n2,
                                     const signed char* xq, const float* xs, int cols, int gs,
                                     float* res, int mode) {
    pdl_wait();
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    bool lead = (threadIdx.x & 31) == 0;
    int shift = gs == 16 ? 0 : (gs == 32 ? 1 : 2), gpr = cols / gs;
    if (mode == MODE_SWIGLU) {
        if (j >= n0) return;
        const signed char* wr[2] = {w0 + (size_t)j * cols, w1 + (size_t)j * cols};
        const float* sr[2] = {s0 + (size_t)j * gpr, s1 + (size_t)j * gpr};
        float acc[2];
        q8_dots<2>(wr, sr, xq, xs, cols, shift, acc);
        if (lead) mv_store(o0, o1, res, mode, j, acc[0], acc[1]);
        return;
    }
    const signed char* w = w0;
    const float* s = s0;
    float* o = o0;
    if (j >= n0) {
        j -= n0;
        w = w1;
        s = s1;
        o = o1;
        if (j >= n1) {
            j -= n1;
            w = w2;
            s = s2;
            o = o2;
            if (j >= n2) return;
        }
    }
    const signed char* wr[1] = {w + (size_t)j * cols};
    const float* sr[1] = {s + (size_t)j * gpr};
    float acc[1];
    q8_dots<1>(wr, sr, xq, xs, cols, shift, acc);
    if (lead) mv_store(o, o, res, mode, j, acc[0], 0.0f);
}

// Prefill, fast case: one warp per weight row applied to 8 batch rows, each
// weight chunk loaded once and dotted with every row's activations.
extern "C" __global__ void matmul_q8(float* out, const signed char* wq, const float* ws,
                                     const signed char* xq, const float* xs, int n_out, int cols,
                                     int gs, int rows) {
    pdl_wait();
    const int R = 8;
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int r0 = blockIdx.y * R;
    if (j >= n_out) return;
    int nr = min(R, rows - r0);
    int nv = cols >> 4, shift = gs == 16 ? 0 : (gs == 32 ? 1 : 2), gpr = cols / gs;
    const uint4* wv = (const uint4*)(wq + (size_t)j * cols);
    const float* wsr = ws + (size_t)j * gpr;
    float acc[R];
#pragma unroll
    for (int rr = 0; rr < R; rr++) acc[rr] = 0.0f;
    for (int i = lane; i < nv; i += 32) {
        uint4 wc = load_stream(wv + i);
        float wscale = wsr[i >> shift];
#pragma unroll
        for (int rr = 0; rr < R; rr++) {
            if (rr < nr) {
                size_t xrow = (size_t)(r0 + rr);
                int s = dot_i8x16(wc, *(const uint4*)(xq + xrow * cols + i * 16));
                acc[rr] += (float)s * (wscale * xs[xrow * gpr + (i >> shift)]);
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < R; rr++) {
        if (rr < nr) {
            float s = warp_sum(acc[rr]);
            if (lane == 0) out[(size_t)(r0 + rr) * n_out + j] = s;
        }
    }
}
// Any other layout (small groups, groups straddling rows): one thread per
// output, the exact loop of cpu::kernels::dot_q8, one term per stretch of
// elements sharing a weight group and an activation group. Slow, but only
// tiny or unusual models land here.
extern "C" __global__ void matvec_q8_generic(float* out, const signed char* wq, const float* ws,
                                             const signed char* xq, const float* xs, int n_out,
                                             int cols, int gs, int rows) {
    pdl_wait();
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_out * rows) return;
    int r = t / n_out, j = t % n_out;
    int xgroups = (cols + gs - 1) / gs;
    size_t start = (size_t)j * cols;
    const signed char* xr = xq + (size_t)r * cols;
    float val = 0.0f;
    int k = 0;
    while (k < cols) {
        size_t e = start + k;
        int end = min(min(k + gs - (int)(e % gs), k + gs - k % gs), cols);
        int ival = 0;
        for (int m = k; m < end; m++) ival += (int)xr[m] * (int)wq[start + m];
        val += (float)ival * ws[e / gs] * xs[(size_t)r * xgroups + k / gs];
        k = end;
    }
    out[(size_t)r * n_out + j] = val;
}
