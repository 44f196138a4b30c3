//! Batched products for prompt prefill through cuBLAS: f32 weights by SGEMM,
//! f16 and bf16 weights by GemmEx on tensor cores (activations rounded to
//! the weight's type, f32 accumulation and output); Q8 weights arrive here
//! dequantized to f16. Decoding never comes here: single rows use the
//! bandwidth-bound matvec kernels.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{result, sys, CudaBlas};
use cudarc::driver::CudaStream;
use llama2::{Error, Result};

/// The weight storage types cuBLAS multiplies for us.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum GemmType {
    F32,
    F16,
    BF16,
}

/// A cuBLAS handle bound to the backend's stream.
pub struct Gemm {
    blas: CudaBlas,
}

impl Gemm {
    /// A handle on `stream`, or an error when cuBLAS is missing.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        if !crate::libs::cublas_present() {
            return Err(Error::Backend(
                "cuBLAS (libcublas.so.13) was not found".into(),
            ));
        }
        let blas = CudaBlas::new(stream)
            .map_err(|e| Error::Backend(format!("cuBLAS initialization failed: {e:?}")))?;
        Ok(Gemm { blas })
    }

    /// `out[r][j] = w[j] · x[r]` for `rows` rows: in cuBLAS's column-major
    /// terms C (n_out x rows) = W^T (W stored cols x n_out) * X (cols x rows).
    /// `w` and `x` hold values of type `ty`; `out` is f32.
    ///
    /// # Safety
    /// `w`, `x` and `out` must be live device addresses of at least
    /// n_out * cols, rows * cols and rows * n_out elements.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        ty: GemmType,
        w: u64,
        x: u64,
        out: u64,
        n_out: usize,
        cols: usize,
        rows: usize,
    ) -> Result<()> {
        let (m, n, k) = (n_out as i32, rows as i32, cols as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let op_t = sys::cublasOperation_t::CUBLAS_OP_T;
        let op_n = sys::cublasOperation_t::CUBLAS_OP_N;
        let handle = *self.blas.handle();
        let status = match ty {
            GemmType::F32 => result::sgemm(
                handle,
                op_t,
                op_n,
                m,
                n,
                k,
                &alpha,
                w as *const f32,
                k,
                x as *const f32,
                k,
                &beta,
                out as *mut f32,
                m,
            ),
            GemmType::F16 | GemmType::BF16 => {
                let dt = if ty == GemmType::F16 {
                    sys::cudaDataType::CUDA_R_16F
                } else {
                    sys::cudaDataType::CUDA_R_16BF
                };
                result::gemm_ex(
                    handle,
                    op_t,
                    op_n,
                    m,
                    n,
                    k,
                    &alpha as *const f32 as *const c_void,
                    w as *const c_void,
                    dt,
                    k,
                    x as *const c_void,
                    dt,
                    k,
                    &beta as *const f32 as *const c_void,
                    out as *mut c_void,
                    sys::cudaDataType::CUDA_R_32F,
                    m,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        };
        status.map_err(|e| Error::Backend(format!("cuBLAS GEMM failed: {e:?}")))
    }
}
