//! llama2-cuda: the CUDA backend of llama2-rs. The transformer itself is
//! `llama2::Transformer`, written once over the `Backend` trait; this crate
//! implements the trait's ops as NVRTC-compiled kernels (`kernels/*.cu`).
//!
//! | file          | owns                                                        |
//! |---------------|-------------------------------------------------------------|
//! | `libs.rs`     | finding libcuda / libnvrtc / libcublas without panicking     |
//! | `compile.rs`  | joining the kernel files, NVRTC compile, the on-disk cache   |
//! | `device.rs`   | context, stream, kernel lookup, allocation and launch helpers |
//! | `gemm.rs`     | cuBLAS GEMMs for batched prefill (f32, f16, bf16; Q8 as f16) |
//! | `backend.rs`  | `CudaBackend`: the `Backend` ops, CUDA-graph decode steps; its |
//! |               | submodules hold weights, products, quantization, attention  |
//!
//! Everything is loaded at run time (cudarc's dynamic loading), so the crate
//! builds and the binary runs on machines without CUDA; there every entry
//! point returns an error instead.

mod backend;
mod compile;
mod device;
mod gemm;
mod libs;

use std::time::Instant;

use llama2::{Config, DType, Error, KvDtype, LanguageModel, ModelWeights, Result, Transformer};

pub use backend::{CudaBackend, CudaKvCache, CudaMatrix};
pub use compile::{compile, kernel_source, nvrtc_version, Compiled};

const NO_DRIVER: &str =
    "no NVIDIA driver library (libcuda.so.1) was found, so this machine cannot run CUDA";
const NO_NVRTC: &str = "the NVIDIA runtime compiler (libnvrtc.so.13) was not found: install the \
     CUDA 13 toolkit or pip's nvidia-cuda-nvrtc, or set LLAMA2_NVRTC_DIR to its lib folder";

/// Loads `weights` onto the GPU. `dtype` converts every matrix (Q8 with the
/// group size `quant::group_size_for(cols)`); `None` keeps the file's types.
/// `kv` is the KV cache's type; `None`: f16 for f16/bf16 weights, else f32.
pub fn load_model(
    weights: &ModelWeights,
    dtype: Option<DType>,
    kv: Option<KvDtype>,
) -> Result<Box<dyn LanguageModel>> {
    let effective = dtype.unwrap_or(weights.token_embedding.dtype());
    let backend = CudaBackend::new(dtype, kv_f16(effective, kv))?;
    Ok(Box::new(Transformer::new(backend, weights)?))
}

/// A model of `config`'s shape with random weights generated on the GPU in
/// `dtype` (benchmarks: no file, no host copy); `kv` as for `load_model`.
pub fn synthetic_model(
    config: &Config,
    dtype: DType,
    kv: Option<KvDtype>,
    seed: u64,
) -> Result<Box<dyn LanguageModel>> {
    let backend = CudaBackend::new(Some(dtype), kv_f16(dtype, kv))?;
    Ok(Box::new(Transformer::synthetic(backend, config, seed)?))
}

/// Whether the KV cache is f16: as asked, else when the weights are 16-bit.
fn kv_f16(weights: DType, kv: Option<KvDtype>) -> bool {
    match kv {
        Some(kv) => kv == KvDtype::F16,
        None => matches!(weights, DType::F16 | DType::BF16),
    }
}

/// `None` when a CUDA GPU is usable, else one sentence saying why not.
pub fn unavailable_reason() -> Option<String> {
    std::panic::catch_unwind(probe)
        .unwrap_or_else(|_| Some("the CUDA libraries failed to load".into()))
}

fn probe() -> Option<String> {
    if !libs::driver_present() {
        return Some(NO_DRIVER.into());
    }
    if let Err(e) = cudarc::driver::result::init() {
        return Some(format!("the NVIDIA driver failed to initialize: {e}"));
    }
    match cudarc::driver::result::device::get_count() {
        Ok(0) => return Some("the NVIDIA driver reports no CUDA device".into()),
        Err(e) => return Some(format!("cannot count CUDA devices: {e}")),
        Ok(_) => {}
    }
    if !libs::nvrtc_present() {
        return Some(NO_NVRTC.into());
    }
    None
}

/// One line about device 0, e.g. "NVIDIA H100 80GB HBM3, sm_90, 79 GiB,
/// driver 13.0".
pub fn device_info() -> Result<String> {
    let ctx = device::open_context()?;
    let name = ctx.name().map_err(device::cuda_err("device name query"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(device::cuda_err("compute capability query"))?;
    let mem = ctx.total_mem().map_err(device::cuda_err("memory query"))?;
    let mut version = 0;
    // SAFETY: the driver is loaded (open_context checked); the pointer is to a local.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    Ok(format!(
        "{name}, sm_{major}{minor}, {} GiB, driver {}.{}",
        mem >> 30,
        version / 1000,
        version % 1000 / 10
    ))
}

/// Device-to-device copy bandwidth in GB/s (bytes read plus bytes written
/// per second, best of a few 1 GiB copies): the practical peak a
/// bandwidth-bound decode step can reach.
pub fn copy_bandwidth_gbs() -> Result<f64> {
    let ctx = device::open_context()?;
    let stream = ctx
        .new_stream()
        .map_err(device::cuda_err("stream creation"))?;
    let n = 1usize << 30;
    let src = stream
        .alloc_zeros::<u8>(n)
        .map_err(device::cuda_err("1 GiB allocation"))?;
    let mut dst = stream
        .alloc_zeros::<u8>(n)
        .map_err(device::cuda_err("1 GiB allocation"))?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        stream.synchronize().map_err(device::cuda_err("copy"))?;
        let t = Instant::now();
        stream
            .memcpy_dtod(&src, &mut dst)
            .map_err(device::cuda_err("copy"))?;
        stream.synchronize().map_err(device::cuda_err("copy"))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    if best <= 0.0 {
        return Err(Error::Backend("copy timing failed".into()));
    }
    Ok(2.0 * n as f64 / best / 1e9)
}
