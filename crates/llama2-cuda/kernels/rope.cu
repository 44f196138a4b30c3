// Rotary position embedding of q [rows][D] and k [rows][KV], as
// reference::rope, one thread per rotated pair; freqs [head_size / 2] holds
// each pair's frequency (Config::rope_frequencies, computed on the host). Positions come from the step
// buffer (pos0 + row) so a recorded graph serves every position.
// Grid: (ceil(D / 2 / blockDim), rows). `rope_pair` is shared with the
// fused rope + KV store kernel in attention.cu.

// Rotates the pair at element i of q row r (and of k row r when i < kv) in
// place; returns false past the row's end.
__device__ __forceinline__ bool rope_pair(float* q, float* k, const int* step, int d, int kv,
                                          int head_size, const float* freqs, int i, int r) {
    if (i >= d) return false;
    int pos = STEP_POS0(step) + r;
    float freq = freqs[(i % head_size) / 2];
    float val = (float)pos * freq;
    float fci, fcr;
    sincosf(val, &fci, &fcr);
    float* qr = q + (size_t)r * d;
    float q0 = qr[i], q1 = qr[i + 1];
    qr[i] = q0 * fcr - q1 * fci;
    qr[i + 1] = q0 * fci + q1 * fcr;
    if (i < kv) {
        float* kr = k + (size_t)r * kv;
        float k0 = kr[i], k1 = kr[i + 1];
        kr[i] = k0 * fcr - k1 * fci;
        kr[i + 1] = k0 * fci + k1 * fcr;
    }
    return true;
}

extern "C" __global__ void rope_f32(float* q, float* k, const int* step, int d, int kv,
                                    int head_size, const float* freqs) {
    pdl_wait();
    rope_pair(q, k, step, d, kv, head_size, freqs, 2 * (blockIdx.x * blockDim.x + threadIdx.x),
              blockIdx.y);
}
