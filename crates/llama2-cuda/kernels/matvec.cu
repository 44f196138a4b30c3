// Weight-times-activation products: out[r][j] = w[j] . x[r]. One warp per
// weight row streams the row once in 16-byte chunks and applies it to R batch
// rows at a time (R = 1 for decoding, 8 for prefill); partial sums meet in a
// warp shuffle. Grid: (ceil(n_out / warps per block), ceil(rows / R)).
// Rows whose byte length is not a multiple of 16 take a scalar loop instead.

// How each storage type turns a 16-byte chunk into a dot product with x.
struct F32W {
    typedef float T;
    enum { N = 4 };
    static __device__ __forceinline__ float dot(uint4 w, const float* x) {
        float4 a = *(const float4*)x;
        return __uint_as_float(w.x) * a.x + __uint_as_float(w.y) * a.y +
               __uint_as_float(w.z) * a.z + __uint_as_float(w.w) * a.w;
    }
    static __device__ __forceinline__ float one(const T* w, int i) { return w[i]; }
};

// Eight 16-bit values against eight activations, via `widen`.
template <float (*widen)(u16)>
__device__ __forceinline__ float dot_half8(uint4 w, const float* x) {
    float4 a = *(const float4*)x;
    float4 b = *(const float4*)(x + 4);
    return widen(w.x & 0xffff) * a.x + widen(w.x >> 16) * a.y + widen(w.y & 0xffff) * a.z +
           widen(w.y >> 16) * a.w + widen(w.z & 0xffff) * b.x + widen(w.z >> 16) * b.y +
           widen(w.w & 0xffff) * b.z + widen(w.w >> 16) * b.w;
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

#define MATVEC(name, E, R)                                                                   \
    extern "C" __global__ void name(float* out, const E::T* w, const float* x, int n_out,    \
                                    int cols, int rows) {                                    \
        matvec_rows<E, R>(out, w, x, n_out, cols, rows);                                     \
    }

MATVEC(matvec_f32, F32W, 1)
MATVEC(matvec_f16, F16W, 1)
MATVEC(matvec_bf16, BF16W, 1)
MATVEC(matmul_f32, F32W, 8)
MATVEC(matmul_f16, F16W, 8)
MATVEC(matmul_bf16, BF16W, 8)

// ----------------------------------------------------------------------------
// Q8_0: runq's W8A8 product. Activations are quantized at run time in groups
// of the weight's group size (rounding half away from zero), then each output
// sums, over groups, int32 dot * w_scale * x_scale.

// One thread per (row, group) of x [rows][cols]; a final partial group gets
// its own scale. xs is [rows][ceil(cols / gs)].
extern "C" __global__ void quantize_q8(signed char* xq, float* xs, const float* x, int rows,
                                       int cols, int gs) {
    int groups = (cols + gs - 1) / gs;
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * groups) return;
    int r = t / groups, g = t % groups;
    int start = g * gs, end = min(start + gs, cols);
    const float* xr = x + (size_t)r * cols;
    float m = 0.0f;
    for (int k = start; k < end; k++) m = fmaxf(m, fabsf(xr[k]));
    float scale = m / 127.0f;
    xs[t] = scale;
    for (int k = start; k < end; k++) {
        float v = m == 0.0f ? 0.0f : fminf(fmaxf(roundf(xr[k] / scale), -128.0f), 127.0f);
        xq[(size_t)r * cols + k] = (signed char)v;
    }
}

// Four int8 pairs of two 16-byte chunks.
__device__ __forceinline__ int dot_i8x16(uint4 a, uint4 b) {
    int s = __dp4a((int)a.x, (int)b.x, 0);
    s = __dp4a((int)a.y, (int)b.y, s);
    s = __dp4a((int)a.z, (int)b.z, s);
    return __dp4a((int)a.w, (int)b.w, s);
}

// The fast case: gs in {16, 32, 64} and rows made of whole groups. Lane i
// takes 16-byte chunk i; the L = gs / 16 lanes of a group add their integer
// sums exactly with shuffles before one of them scales the group's total.
template <int R>
__device__ __forceinline__ void matvec_q8_rows(float* out, const signed char* wq, const float* ws,
                                               const signed char* xq, const float* xs, int n_out,
                                               int cols, int gs, int rows) {
    int lane = threadIdx.x & 31;
    int j = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int r0 = blockIdx.y * R;
    if (j >= n_out) return;
    int nr = min(R, rows - r0);
    int nv = cols >> 4, lanes = gs >> 4, gpr = cols / gs;
    const uint4* wv = (const uint4*)(wq + (size_t)j * cols);
    const float* wsr = ws + (size_t)j * gpr;
    float acc[R];
#pragma unroll
    for (int rr = 0; rr < R; rr++) acc[rr] = 0.0f;
#pragma unroll 2
    for (int base = 0; base < nv; base += 32) {
        int i = base + lane;
        bool ok = i < nv;
        uint4 wc = ok ? load_stream(wv + i) : make_uint4(0, 0, 0, 0);
        float wscale = ok ? wsr[i / lanes] : 0.0f;
#pragma unroll
        for (int rr = 0; rr < R; rr++) {
            if (rr >= nr) continue;
            size_t xrow = (size_t)(r0 + rr);
            int s = ok ? dot_i8x16(wc, *(const uint4*)(xq + xrow * cols + i * 16)) : 0;
            for (int o = 1; o < lanes; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (ok && (lane & (lanes - 1)) == 0) {
                acc[rr] += (float)s * wscale * xs[xrow * gpr + i / lanes];
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

extern "C" __global__ void matvec_q8(float* out, const signed char* wq, const float* ws,
                                     const signed char* xq, const float* xs, int n_out, int cols,
                                     int gs, int rows) {
    matvec_q8_rows<1>(out, wq, ws, xq, xs, n_out, cols, gs, rows);
}

extern "C" __global__ void matmul_q8(float* out, const signed char* wq, const float* ws,
                                     const signed char* xq, const float* xs, int n_out, int cols,
                                     int gs, int rows) {
    matvec_q8_rows<8>(out, wq, ws, xq, xs, n_out, cols, gs, rows);
}

// Any other layout (small groups, groups straddling rows): one thread per
// output, the exact loop of cpu::kernels::dot_q8, one term per stretch of
// elements sharing a weight group and an activation group. Slow, but only
// tiny or unusual models land here.
extern "C" __global__ void matvec_q8_generic(float* out, const signed char* wq, const float* ws,
                                             const signed char* xq, const float* xs, int n_out,
                                             int cols, int gs, int rows) {
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
