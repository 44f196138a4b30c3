// Building weights on the device: seeded random fill (synthetic models) and
// storage-type conversion of f32 matrices to f16, bf16 and Q8_0, so large
// models never need a converted copy on the host.

// splitmix64 of (seed, index): a counter-based generator, so every element
// is computed independently and the result does not depend on the launch.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [-scale, scale) from the top 24 bits of the hash.
__device__ __forceinline__ float random_value(unsigned long long seed, unsigned long long i,
                                              float scale) {
    unsigned long long h = mix64(seed ^ (i * 0x9E3779B97F4A7C15ull));
    float u = (float)(h >> 40) * (1.0f / 16777216.0f);
    return (u * 2.0f - 1.0f) * scale;
}

extern "C" __global__ void random_f32(float* out, unsigned long long n,
                                      unsigned long long seed, float scale) {
    pdl_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = random_value(seed, i, scale);
    }
}

extern "C" __global__ void convert_f16(u16* out, const float* in, unsigned long long n) {
    pdl_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = f32_to_f16(in[i]);
    }
}

extern "C" __global__ void convert_bf16(u16* out, const float* in, unsigned long long n) {
    pdl_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = f32_to_bf16(in[i]);
    }
}

// Q8_0 weights as quant.rs makes them: one thread per group of `gs` values of
// the flattened matrix, scale = max|w| / 127, q = round half to even.
extern "C" __global__ void convert_q8(signed char* q, float* scales, const float* in,
                                      unsigned long long groups, int gs) {
    pdl_wait();
    for (unsigned long long g = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
         g < groups; g += (unsigned long long)gridDim.x * blockDim.x) {
        const float* v = in + g * gs;
        float m = 0.0f;
        for (int k = 0; k < gs; k++) m = fmaxf(m, fabsf(v[k]));
        float scale = m / 127.0f;
        scales[g] = scale;
        for (int k = 0; k < gs; k++) {
            q[g * gs + k] = scale == 0.0f ? 0 : (signed char)rintf(v[k] / scale);
        }
    }
}

// Q8_0 weights back to f16 (q * scale of the value's group in the flattened
// matrix), for prefill products on tensor cores. One thread per value.
extern "C" __global__ void dequantize_q8_f16(u16* out, const signed char* q, const float* scales,
                                             unsigned long long n, int gs) {
    pdl_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        out[i] = f32_to_f16((float)q[i] * scales[i / gs]);
    }
}
