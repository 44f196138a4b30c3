// Causal multi-head attention over the KV cache [L][S][KV], in f32 or f16.
// Positions come from the step buffer (pos0 + row), so one recorded graph
// serves every position: the grid covers all heads and rows (and for
// decoding, chunks of positions up to the cache's length), and each block
// loops over however many cached positions it sees.

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
                                              int head_size, const float* freqs) {
    int i = 2 * (blockIdx.x * blockDim.x + threadIdx.x), r = blockIdx.y;
    if (!rope_pair(q, k, step, d, kv, head_size, freqs, i, r) || i >= kv) return;
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

// Scores of positions [t0, t1) against the query in shared memory `qs`
// [hs], scaled and softmaxed over that range in `att` [t1 - t0] as in
// reference::attention (left unnormalized: exp(s - m)); returns their sum
// and sets `m` to their max. One thread per position.
template <typename C>
__device__ __forceinline__ float attention_scores(float* att, float& m, const float* qs,
                                                  const C* kc, size_t off, int kv, int hs, int t0,
                                                  int t1, float* scratch) {
    int tid = threadIdx.x;
    bool vec = hs % 4 == 0 && kv % 4 == 0;
    float scale = sqrtf((float)hs);
    for (int t = t0 + tid; t < t1; t += blockDim.x) {
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
        att[t - t0] = s / scale;
    }
    __syncthreads();

    m = NEG_INF;
    for (int t = tid; t < t1 - t0; t += blockDim.x) m = fmaxf(m, att[t]);
    m = block_max(m, scratch);
    float sum = 0.0f;
    for (int t = tid; t < t1 - t0; t += blockDim.x) {
        float e = expf(att[t] - m);
        att[t] = e;
        sum += e;
    }
    return block_sum(sum, scratch);
}

// dst[i] = sum over t in [t0, t1) of att[t - t0] / norm * v[t][i], for the
// hs values of one head. `part` is shared scratch of 4 * blockDim floats.
// Each thread sums 4 dimensions (1 when hs or KV is not a multiple of 4) of
// every blockDim / (hs / 4)-th position, then the groups' sums are added.
template <typename C>
__device__ __forceinline__ void attention_values(float* dst, const float* att, float norm,
                                                 const C* vc, size_t off, int kv, int hs, int t0,
                                                 int t1, float* part) {
    int tid = threadIdx.x;
    bool vec = hs % 4 == 0 && kv % 4 == 0;
    int width = vec ? 4 : 1, per = hs / width;
    if (per <= (int)blockDim.x) {
        int groups = blockDim.x / per, g = tid / per, c = (tid % per) * width;
        if (g < groups) {
            float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
            for (int t = t0 + g; t < t1; t += groups) {
                float w = att[t - t0] / norm;
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
            dst[i] = o;
        }
    } else {
        for (int i = tid; i < hs; i += blockDim.x) {
            float acc = 0.0f;
            for (int t = t0; t < t1; t++) {
                acc += (att[t - t0] / norm) * cache_get(vc, off + (size_t)t * kv + i);
            }
            dst[i] = acc;
        }
    }
}

// One block per (head, row) over all of the row's positions. Dynamic shared
// memory: q [hs], partial sums [4 * blockDim], scores [seq_len].
template <typename C>
__device__ __forceinline__ void attention_block(float* out, const float* q, const C* kc,
                                                const C* vc, const int* step, size_t layer_off,
                                                int d, int kv, int hs, int kv_group) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    int h = blockIdx.x, r = blockIdx.y;
    int pos = STEP_POS0(step) + r;
    float* qs = smem;
    float* part = smem + hs;
    float* att = part + 4 * blockDim.x;
    const float* qh = q + (size_t)r * d + (size_t)h * hs;
    for (int i = threadIdx.x; i < hs; i += blockDim.x) qs[i] = qh[i];
    __syncthreads();
    size_t off = layer_off + (size_t)(h / kv_group) * hs;
    float m;
    float sum = attention_scores(att, m, qs, kc, off, kv, hs, 0, pos + 1, scratch);
    pdl_launch();
    attention_values(out + (size_t)r * d + (size_t)h * hs, att, sum, vc, off, kv, hs, 0, pos + 1,
                     part);
}

// Decoding (one row), split over positions as in flash-decoding, so short
// models with few heads still fill the GPU: block (h, c) takes positions
// [c * chunk, (c + 1) * chunk) of head h up to pos0 and writes its
// unnormalized value sum, max and exp sum to `partial` [heads][chunks][hs + 2];
// the last of a head's blocks to finish (counted in `done` [heads], reset
// by that block) rescales the chunks to their common max and writes the
// head's output. Blocks past pos0 exit at once. Dynamic shared memory: q
// [hs], partial sums [4 * blockDim], scores [chunk].
template <typename C>
__device__ __forceinline__ void attention_split(float* out, const float* q, const C* kc,
                                                const C* vc, const int* step, size_t layer_off,
                                                int kv, int hs, int kv_group, float* partial,
                                                unsigned int* done, int chunk) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    __shared__ bool last;
    int h = blockIdx.x, c = blockIdx.y, tid = threadIdx.x;
    int pos = STEP_POS0(step);
    int t0 = c * chunk;
    if (t0 > pos) return;
    int t1 = min(t0 + chunk, pos + 1), chunks = pos / chunk + 1;
    float* qs = smem;
    float* part = smem + hs;
    float* att = part + 4 * blockDim.x;
    const float* qh = q + (size_t)h * hs;
    for (int i = tid; i < hs; i += blockDim.x) qs[i] = qh[i];
    __syncthreads();
    size_t off = layer_off + (size_t)(h / kv_group) * hs;
    float m;
    float sum = attention_scores(att, m, qs, kc, off, kv, hs, t0, t1, scratch);
    float* mine = partial + ((size_t)h * gridDim.y + c) * (hs + 2);
    attention_values(mine, att, 1.0f, vc, off, kv, hs, t0, t1, part);
    if (tid == 0) {
        mine[hs] = m;
        mine[hs + 1] = sum;
    }
    // Publish this chunk, then count it; the block that counts last combines.
    __threadfence();
    __syncthreads();
    if (tid == 0) last = atomicAdd(done + h, 1u) == (unsigned int)chunks - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    pdl_launch();
    const volatile float* ph = partial + (size_t)h * gridDim.y * (hs + 2);
    float mx = NEG_INF;
    for (int k = 0; k < chunks; k++) mx = fmaxf(mx, ph[k * (hs + 2) + hs]);
    float total = 0.0f;
    for (int k = 0; k < chunks; k++) {
        total += ph[k * (hs + 2) + hs + 1] * expf(ph[k * (hs + 2) + hs] - mx);
    }
    for (int i = tid; i < hs; i += blockDim.x) {
        float o = 0.0f;
        for (int k = 0; k < chunks; k++) {
            o += ph[k * (hs + 2) + i] * expf(ph[k * (hs + 2) + hs] - mx);
        }
        out[(size_t)h * hs + i] = o / total;
    }
    if (tid == 0) done[h] = 0;
}

extern "C" __global__ void kv_store_f32(float* kc, float* vc, const float* k, const float* v,
                                        const int* step, unsigned long long layer_off, int kv,
                                        int rows) {
    pdl_wait();
    kv_store<float>(kc, vc, k, v, step, layer_off, kv, rows);
}

extern "C" __global__ void kv_store_f16(u16* kc, u16* vc, const float* k, const float* v,
                                        const int* step, unsigned long long layer_off, int kv,
                                        int rows) {
    pdl_wait();
    kv_store<u16>(kc, vc, k, v, step, layer_off, kv, rows);
}

extern "C" __global__ void rope_kv_store_f32(float* kc, float* vc, float* q, float* k,
                                             const float* v, const int* step,
                                             unsigned long long layer_off, int d, int kv,
                                             int head_size, const float* freqs) {
    pdl_wait();
    pdl_launch();
    rope_kv_store<float>(kc, vc, q, k, v, step, layer_off, d, kv, head_size, freqs);
}

extern "C" __global__ void rope_kv_store_f16(u16* kc, u16* vc, float* q, float* k,
                                             const float* v, const int* step,
                                             unsigned long long layer_off, int d, int kv,
                                             int head_size, const float* freqs) {
    pdl_wait();
    pdl_launch();
    rope_kv_store<u16>(kc, vc, q, k, v, step, layer_off, d, kv, head_size, freqs);
}

extern "C" __global__ void attention_f32(float* out, const float* q, const float* kc,
                                         const float* vc, const int* step,
                                         unsigned long long layer_off, int d, int kv, int hs,
                                         int kv_group) {
    pdl_wait();
    attention_block<float>(out, q, kc, vc, step, layer_off, d, kv, hs, kv_group);
}

extern "C" __global__ void attention_f16(float* out, const float* q, const u16* kc,
                                         const u16* vc, const int* step,
                                         unsigned long long layer_off, int d, int kv, int hs,
                                         int kv_group) {
    pdl_wait();
    attention_block<u16>(out, q, kc, vc, step, layer_off, d, kv, hs, kv_group);
}

extern "C" __global__ void attention_split_f32(float* out, const float* q, const float* kc,
                                               const float* vc, const int* step,
                                               unsigned long long layer_off, int kv, int hs,
                                               int kv_group, float* partial, unsigned int* done,
                                               int chunk) {
    pdl_wait();
    attention_split<float>(out, q, kc, vc, step, layer_off, kv, hs, kv_group, partial, done,
                           chunk);
}

extern "C" __global__ void attention_split_f16(float* out, const float* q, const u16* kc,
                                               const u16* vc, const int* step,
                                               unsigned long long layer_off, int kv, int hs,
                                               int kv_group, float* partial, unsigned int* done,
                                               int chunk) {
    pdl_wait();
    attention_split<u16>(out, q, kc, vc, step, layer_off, kv, hs, kv_group, partial, done,
                         chunk);
}
