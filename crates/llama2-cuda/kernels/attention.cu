// Causal multi-head attention over the KV cache [L][S][KV], in f32 or f16.
// Positions come from the step buffer (pos0 + row), so one recorded graph
// serves every position: the grid covers all heads and rows, and each block
// loops over however many cached positions its row sees.

__device__ __forceinline__ float cache_get(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float cache_get(const u16* p, size_t i) { return f16_to_f32(p[i]); }
__device__ __forceinline__ void cache_put(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void cache_put(u16* p, size_t i, float v) { p[i] = f32_to_f16(v); }

// Stores k and v [rows][KV] at positions pos0 + r of the layer starting at
// element `layer_off`. One thread per value.
template <typename C>
__device__ __forceinline__ void kv_store(C* kc, C* vc, const float* k, const float* v,
                                         const int* step, size_t layer_off, int kv, int rows) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= rows * kv) return;
    int r = t / kv, i = t % kv;
    size_t at = layer_off + (size_t)(STEP_POS0(step) + r) * kv + i;
    cache_put(kc, at, k[t]);
    cache_put(vc, at, v[t]);
}

// Rope of q [rows][D] and k [rows][KV] (as rope_f32) fused with the store
// of k and v into the cache (as kv_store): one thread per rotated pair.
// Grid: (ceil(D / 2 / blockDim), rows).
template <typename C>
__device__ __forceinline__ void rope_kv_store(C* kc, C* vc, float* q, float* k, const float* v,
                                              const int* step, size_t layer_off, int d, int kv,
                                              int head_size) {
    int i = 2 * (blockIdx.x * blockDim.x + threadIdx.x), r = blockIdx.y;
    if (!rope_pair(q, k, step, d, kv, head_size, i, r) || i >= kv) return;
    size_t at = layer_off + (size_t)(STEP_POS0(step) + r) * kv + i;
    size_t t = (size_t)r * kv + i;
    cache_put(kc, at, k[t]);
    cache_put(kc, at + 1, k[t + 1]);
    cache_put(vc, at, v[t]);
    cache_put(vc, at + 1, v[t + 1]);
}

// Four consecutive cache values from element i (a multiple of 4).
__device__ __forceinline__ float4 cache_get4(const float* p, size_t i) {
    return *(const float4*)(p + i);
}
__device__ __forceinline__ float4 cache_get4(const u16* p, size_t i) {
    uint2 h = *(const uint2*)(p + i);
    return make_float4(f16_to_f32(h.x & 0xffff), f16_to_f32(h.x >> 16), f16_to_f32(h.y & 0xffff),
                       f16_to_f32(h.y >> 16));
}

// One block per (head, row). Dynamic shared memory: q [hs], partial sums
// [4 * blockDim], scores [seq_len]. One thread per cached position computes
// its score; scores are scaled and softmaxed in place as in
// reference::attention; the weighted sum of values gives each thread 4
// dimensions (1 when hs or KV is not a multiple of 4) of every
// blockDim / (hs / 4)-th position, and the groups' partial sums are added.
template <typename C>
__device__ __forceinline__ void attention_block(float* out, const float* q, const C* kc,
                                                const C* vc, const int* step, size_t layer_off,
                                                int d, int kv, int hs, int kv_group) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    int h = blockIdx.x, r = blockIdx.y, tid = threadIdx.x;
    int pos = STEP_POS0(step) + r;
    bool vec = hs % 4 == 0 && kv % 4 == 0;
    float* qs = smem;
    float* part = smem + hs;
    float* att = part + 4 * blockDim.x;
    const float* qh = q + (size_t)r * d + (size_t)h * hs;
    for (int i = tid; i < hs; i += blockDim.x) qs[i] = qh[i];
    __syncthreads();

    size_t off = layer_off + (size_t)(h / kv_group) * hs;
    float scale = sqrtf((float)hs);
    for (int t = tid; t <= pos; t += blockDim.x) {
        size_t kt = off + (size_t)t * kv;
        float s = 0.0f;
        if (vec) {
#pragma unroll 4
            for (int i = 0; i < hs; i += 4) {
                float4 k4 = cache_get4(kc, kt + i);
                s += qs[i] * k4.x + qs[i + 1] * k4.y + qs[i + 2] * k4.z + qs[i + 3] * k4.w;
            }
        } else {
            for (int i = 0; i < hs; i++) s += qs[i] * cache_get(kc, kt + i);
        }
        att[t] = s / scale;
    }
    __syncthreads();

    float m = NEG_INF;
    for (int t = tid; t <= pos; t += blockDim.x) m = fmaxf(m, att[t]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int t = tid; t <= pos; t += blockDim.x) {
        float e = expf(att[t] - m);
        att[t] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);

    float* outh = out + (size_t)r * d + (size_t)h * hs;
    int width = vec ? 4 : 1, per = hs / width;
    if (per <= (int)blockDim.x) {
        int groups = blockDim.x / per, g = tid / per, c = (tid % per) * width;
        if (g < groups) {
            float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
            for (int t = g; t <= pos; t += groups) {
                float w = att[t] / sum;
                size_t vt = off + (size_t)t * kv + c;
                if (vec) {
                    float4 v4 = cache_get4(vc, vt);
                    acc.x += w * v4.x;
                    acc.y += w * v4.y;
                    acc.z += w * v4.z;
                    acc.w += w * v4.w;
                } else {
                    acc.x += w * cache_get(vc, vt);
                }
            }
            float* pg = part + g * hs + c;
            pg[0] = acc.x;
            if (vec) {
                pg[1] = acc.y;
                pg[2] = acc.z;
                pg[3] = acc.w;
            }
        }
        __syncthreads();
        for (int i = tid; i < hs; i += blockDim.x) {
            float o = 0.0f;
            for (int gg = 0; gg < groups; gg++) o += part[gg * hs + i];
            outh[i] = o;
        }
    } else {
        for (int i = tid; i < hs; i += blockDim.x) {
            float acc = 0.0f;
            for (int t = 0; t <= pos; t++) {
                acc += (att[t] / sum) * cache_get(vc, off + (size_t)t * kv + i);
            }
            outh[i] = acc;
        }
    }
}

extern "C" __global__ void kv_store_f32(float* kc, float* vc, const float* k, const float* v,
                                        const int* step, unsigned long long layer_off, int kv,
                                        int rows) {
    kv_store<float>(kc, vc, k, v, step, layer_off, kv, rows);
}

extern "C" __global__ void kv_store_f16(u16* kc, u16* vc, const float* k, const float* v,
                                        const int* step, unsigned long long layer_off, int kv,
                                        int rows) {
    kv_store<u16>(kc, vc, k, v, step, layer_off, kv, rows);
}

extern "C" __global__ void rope_kv_store_f32(float* kc, float* vc, float* q, float* k,
                                             const float* v, const int* step,
                                             unsigned long long layer_off, int d, int kv,
                                             int head_size) {
    rope_kv_store<float>(kc, vc, q, k, v, step, layer_off, d, kv, head_size);
}

extern "C" __global__ void rope_kv_store_f16(u16* kc, u16* vc, float* q, float* k,
                                             const float* v, const int* step,
                                             unsigned long long layer_off, int d, int kv,
                                             int head_size) {
    rope_kv_store<u16>(kc, vc, q, k, v, step, layer_off, d, kv, head_size);
}

extern "C" __global__ void attention_f32(float* out, const float* q, const float* kc,
                                         const float* vc, const int* step,
                                         unsigned long long layer_off, int d, int kv, int hs,
                                         int kv_group) {
    attention_block<float>(out, q, kc, vc, step, layer_off, d, kv, hs, kv_group);
}

extern "C" __global__ void attention_f16(float* out, const float* q, const u16* kc,
                                         const u16* vc, const int* step,
                                         unsigned long long layer_off, int d, int kv, int hs,
                                         int kv_group) {
    attention_block<u16>(out, q, kc, vc, step, layer_off, d, kv, hs, kv_group);
}
