// Shared device helpers for every kernel file: storage-type conversions,
// warp and block reductions, and the layout of the per-step parameter buffer.
// The program is compiled without CUDA headers (no cuda_fp16.h), so half and
// bfloat16 values travel as raw 16-bit patterns converted with PTX.

typedef unsigned short u16;

// -infinity without math.h, which NVRTC programs do not include.
#define NEG_INF __int_as_float(0xff800000)

// The step buffer every position-dependent kernel reads, so a recorded CUDA
// graph can be replayed for any position: step[0] = pos0, step[1 + r] =
// token of batch row r.
#define STEP_POS0(step) ((step)[0])
#define STEP_TOKEN(step, r) ((step)[1 + (r)])

// Programmatic dependent launch (sm_90+). Every kernel calls `pdl_wait`
// before touching global memory: with the launch attribute set (device.rs)
// a kernel may be started while the previous one drains, and the wait
// blocks until that kernel has finished and its writes are visible (without
// the attribute it returns at once). `pdl_launch` lets the next kernel start
// launching early; it is called once a block's main work is done.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even, NaN kept quiet: what half::bf16::from_f32 does.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// Streams a 16-byte chunk of weights past L1: each weight is read once per
// step, so caching it would only evict the activations.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

// Max over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = (blockDim.x + 31) >> 5;
    v = lane < warps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}
