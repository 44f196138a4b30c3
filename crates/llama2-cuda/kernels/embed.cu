// Token embedding lookup: out[r] = table[token of row r], widened to f32.
// Tokens come from the step buffer so a recorded graph serves every token.
// Grid: (ceil(D / blockDim), rows).

extern "C" __global__ void embed_f32(float* out, const float* table, const int* step, int d) {
    pdl_wait();
    pdl_launch();
    int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i >= d) return;
    out[(size_t)r * d + i] = table[(size_t)STEP_TOKEN(step, r) * d + i];
}

extern "C" __global__ void embed_f16(float* out, const u16* table, const int* step, int d) {
    pdl_wait();
    pdl_launch();
    int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i >= d) return;
    out[(size_t)r * d + i] = f16_to_f32(table[(size_t)STEP_TOKEN(step, r) * d + i]);
}

extern "C" __global__ void embed_bf16(float* out, const u16* table, const int* step, int d) {
    pdl_wait();
    pdl_launch();
    int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i >= d) return;
    out[(size_t)r * d + i] = bf16_to_f32(table[(size_t)STEP_TOKEN(step, r) * d + i]);
}

// Q8_0 groups run over the flattened table, so the scale index is global.
extern "C" __global__ void embed_q8(float* out, const signed char* q, const float* scales,
                                    int gs, const int* step, int d) {
    pdl_wait();
    pdl_launch();
    int i = blockIdx.x * blockDim.x + threadIdx.x, r = blockIdx.y;
    if (i >= d) return;
    size_t e = (size_t)STEP_TOKEN(step, r) * d + i;
    out[(size_t)r * d + i] = (float)q[e] * scales[e / gs];
}
