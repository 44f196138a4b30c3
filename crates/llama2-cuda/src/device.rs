//! The GPU as the backend sees it: a context, one stream (not the legacy
//! default stream, which cannot be captured into a graph), the compiled
//! kernels by name, pinned host staging memory, and the small helpers every
//! op uses to allocate, copy and launch. On sm_90+ every launch is a
//! programmatic dependent launch (see `pdl_wait` in `kernels/common.cu`), so
//! a kernel starts while the previous one drains, in graphs too.

use std::collections::HashMap;
use std::sync::Arc;

use std::cell::Cell;
use std::ffi::c_void;

use cudarc::driver::{
    result as driver, sys, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;
use llama2::{Error, Result};

/// Every kernel the backend launches; all are looked up at start so a
/// missing one is an error at load time, not mid-generation.
const KERNELS: [&str; 33] = [
    "random_f32",
    "convert_f16",
    "convert_bf16",
    "convert_q8",
    "embed_f32",
    "embed_f16",
    "embed_bf16",
    "embed_q8",
    "rmsnorm_f32",
    "silu_mul_f32",
    "add_f32",
    "rope_f32",
    "matvec_f32",
    "matvec_f16",
    "matvec_bf16",
    "matmul_f32",
    "matmul_f16",
    "matmul_bf16",
    "quantize_q8",
    "quantize_q8_f16",
    "matvec_q8",
    "matmul_q8",
    "matvec_q8_generic",
    "kv_store_f32",
    "kv_store_f16",
    "rope_kv_store_f32",
    "rope_kv_store_f16",
    "attention_f32",
    "attention_f16",
    "attention_split_f32",
    "attention_split_f16",
    "rmsnorm_quantize_q8",
    "dequantize_q8_f16",
];

/// One kernel argument, held by value until the launch has read it.
#[derive(Clone, Copy)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U64(u64),
    F32(f32),
}

/// Wraps any cudarc failure as a backend error saying what was attempted.
pub fn cuda_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::Backend(format!("CUDA {what} failed: {e}"))
}

/// An `int` kernel argument; sizes that do not fit are a backend error.
pub fn int(v: usize) -> Result<Arg> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| Error::Backend(format!("size {v} exceeds the kernels' 32-bit index range")))
}

/// Opens device 0 after checking the driver library is present (cudarc
/// panics otherwise).
pub fn open_context() -> Result<Arc<CudaContext>> {
    if !crate::libs::driver_present() {
        return Err(Error::Backend(crate::NO_DRIVER.into()));
    }
    let ctx = CudaContext::new(0).map_err(cuda_err("device 0 initialization"))?;
    // SAFETY: the backend uses a single stream, so cudarc's per-buffer events
    // (which would also be recorded into captured graphs) are not needed.
    unsafe { ctx.disable_event_tracking() };
    Ok(ctx)
}

/// The device with its stream and kernels.
pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// Whether launches carry the programmatic-dependent-launch attribute
    /// (sm_90+, unless LLAMA2_CUDA_PDL=0; cleared after a refused launch).
    pdl: Cell<bool>,
}

impl Device {
    /// Opens device 0 and loads the kernels (compiled or from the cache).
    pub fn open() -> Result<Self> {
        let ctx = open_context()?;
        let stream = ctx.new_stream().map_err(cuda_err("stream creation"))?;
        let cc = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability query"))?;
        let image = crate::compile::kernels_for(cc)?;
        let module = ctx
            .load_module(Ptx::from_binary(image))
            .map_err(cuda_err("kernel module load"))?;
        let mut funcs = HashMap::new();
        for name in KERNELS {
            let f = module
                .load_function(name)
                .map_err(|e| Error::Backend(format!("kernel {name} is missing: {e}")))?;
            funcs.insert(name, f);
        }
        let pdl = cc.0 >= 9 && std::env::var("LLAMA2_CUDA_PDL").map_or(true, |v| v != "0");
        Ok(Device {
            ctx,
            stream,
            funcs,
            pdl: Cell::new(pdl),
        })
    }

    /// A zeroed device array of `len` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len.max(1))
            .map_err(|e| Error::Backend(format!("cannot allocate {len} values on the GPU: {e}")))
    }

    /// A device copy of `data`.
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(data)
            .map_err(cuda_err("host-to-device copy"))
    }

    /// The raw address of `s`, for a kernel argument.
    pub fn ptr<T>(&self, s: &CudaSlice<T>) -> Arg {
        Arg::Ptr(self.addr(s))
    }

    /// The raw address of `s`, for library calls.
    pub fn addr<T>(&self, s: &CudaSlice<T>) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// Launches kernel `name` on the stream.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32),
        block: u32,
        shared: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| Error::Backend(format!("kernel {name} was not loaded")))?;
        // Each argument by value, then the array of their addresses that
        // cuLaunchKernelEx reads.
        let mut values: Vec<[u8; 8]> = args
            .iter()
            .map(|a| {
                let mut slot = [0u8; 8];
                match *a {
                    Arg::Ptr(p) | Arg::U64(p) => slot = p.to_ne_bytes(),
                    Arg::I32(v) => slot[..4].copy_from_slice(&v.to_ne_bytes()),
                    Arg::F32(v) => slot[..4].copy_from_slice(&v.to_ne_bytes()),
                }
                slot
            })
            .collect();
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr() as *mut c_void)
            .collect();
        // SAFETY: the union is plain data; zero is a valid pattern for it.
        let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let mut cfg = sys::CUlaunchConfig {
            gridDimX: grid.0.max(1),
            gridDimY: grid.1.max(1),
            gridDimZ: 1,
            blockDimX: block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: shared,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: u32::from(self.pdl.get()),
        };
        // SAFETY: every kernel in KERNELS is launched only from backend.rs,
        // whose call sites pass the argument list of that kernel's signature
        // in order, with device addresses of live allocations sized as the
        // kernel indexes them (shape comments on each buffer). Each argument
        // is read from the start of its 8-byte slot, and the driver copies the arguments
        // before cuLaunchKernelEx returns. Every kernel calls pdl_wait before
        // touching memory, so the PDL attribute keeps stream order.
        let launch = |cfg: &sys::CUlaunchConfig, params: &mut Vec<*mut c_void>| unsafe {
            sys::cuLaunchKernelEx(
                cfg,
                f.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()
        };
        let mut result = launch(&cfg, &mut params);
        if result.is_err() && self.pdl.get() {
            // A driver that refuses the attribute: launch plainly from now on.
            self.pdl.set(false);
            cfg.numAttrs = 0;
            result = launch(&cfg, &mut params);
        }
        result.map_err(|e| Error::Backend(format!("kernel {name} failed to launch: {e}")))
    }

    /// A grid-stride launch over `n` elements.
    pub fn launch_1d(&self, name: &str, n: usize, args: &[Arg]) -> Result<()> {
        let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
        self.launch(name, (blocks, 1), 256, 0, args)
    }
}

/// Page-locked host memory of `len` values of `T`, for copies the DMA engine
/// does without a staging step. Zeroed on allocation.
pub struct Pinned<T: Copy> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the buffer is owned memory like a Vec's; nothing ties it to a thread.
unsafe impl<T: Copy + Send> Send for Pinned<T> {}

impl<T: Copy + ValidAsZeroBits> Pinned<T> {
    /// Allocates `len` (at least 1) zeroed values; needs a current context
    /// (any `Device` method has set one on this thread).
    pub fn new(len: usize) -> Result<Self> {
        let len = len.max(1);
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: plain cuMemHostAlloc (no flags: cached, readable by the
        // host at full speed); the result is checked before use.
        let ptr = unsafe { driver::malloc_host(bytes, 0) }
            .map_err(|e| Error::Backend(format!("cannot pin {bytes} bytes of host memory: {e}")))?
            as *mut T;
        // SAFETY: ptr is a fresh allocation of `bytes` bytes, and all-zero
        // bytes are a valid T (ValidAsZeroBits).
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
        Ok(Pinned { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The values. Callers must not touch them while an asynchronous copy
    /// from or to them is queued.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: ptr holds len initialized values (zeroed at allocation) and
        // is owned by self, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Copy> Drop for Pinned<T> {
    fn drop(&mut self) {
        // SAFETY: ptr came from cuMemHostAlloc and is freed once; the backend
        // synchronizes its stream before dropping or replacing a buffer a
        // copy may still use.
        unsafe {
            let _ = driver::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::KERNELS;

    /// A kernel defined but not listed cannot be launched ("not loaded"),
    /// and one listed but not defined fails every load: the two must agree.
    /// Kernels are defined directly, or by a macro whose parameter is
    /// `name`, instantiated at the start of a line as `MACRO(kernel, ...)`.
    #[test]
    fn kernel_list_matches_the_source() {
        let src = crate::compile::kernel_source();
        let direct = src
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .filter_map(|rest| rest.split('(').next())
            .map(str::trim)
            .filter(|name| *name != "name");
        let by_macro = src.lines().filter_map(|line| {
            let (head, rest) = line.split_once('(')?;
            let is_macro =
                !head.is_empty() && head.bytes().all(|b| b.is_ascii_uppercase() || b == b'_');
            is_macro.then(|| rest.split(',').next().unwrap_or("").trim())
        });
        let defined: BTreeSet<&str> = direct.chain(by_macro).collect();
        let listed: BTreeSet<&str> = KERNELS.into_iter().collect();
        assert_eq!(defined, listed);
    }
}
