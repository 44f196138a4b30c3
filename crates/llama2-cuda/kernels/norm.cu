// RMS normalization, one block per row: out = x / sqrt(mean(x^2) + eps) * w,
// with the same operation order as reference::rmsnorm.

extern "C" __global__ void rmsnorm_f32(float* out, const float* x, const float* w, int d,
                                       float eps) {
    pdl_wait();
    pdl_launch();
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* outr = out + (size_t)blockIdx.x * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    ss = ss / (float)d + eps;
    float inv = 1.0f / sqrtf(ss);
    for (int i = threadIdx.x; i < d; i += blockDim.x) outr[i] = w[i] * (inv * xr[i]);
}
