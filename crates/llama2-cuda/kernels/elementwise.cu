// Element-wise ops on f32 activations: the SwiGLU gate and the residual add.

extern "C" __global__ void silu_mul_f32(float* gate, const float* up, int n) {
    pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float g = gate[i];
        gate[i] = g * (1.0f / (1.0f + expf(-g))) * up[i];
    }
}

extern "C" __global__ void add_f32(float* x, const float* y, int n) {
    pdl_wait();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        x[i] += y[i];
    }
}
