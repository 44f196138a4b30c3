//! Products one matrix at a time: batched prompt rows (prefill) through
//! cuBLAS or the built-in `matmul_*` kernels, and whatever one `matvec`
//! launch cannot take (Q8 groups that only the generic kernel handles,
//! matrices of mixed types). The shared input is quantized or rounded to
//! half precision once per call, not once per matrix.

use cudarc::driver::CudaSlice;
use llama2::{Error, Result};

use super::matvec::{one_launch, Epilogue, Outs, Row};
use super::weights::{CudaMatrix, Weights};
use super::CudaBackend;
use crate::device::{int, Arg};
use crate::gemm::{Gemm, GemmType};

/// Threads per block of the batched matmul kernels: 8 warps, one weight row each.
const MATMUL_THREADS: u32 = 256;
/// Batch rows the `matmul_*` kernels apply each weight chunk to.
const MATMUL_ROWS: usize = 8;
/// Threads per block of `matvec_q8_generic` (one thread per output).
const GENERIC_THREADS: usize = 128;

/// What the products of one call have already made of their shared input.
#[derive(Default)]
struct Prepared {
    /// The group size x is quantized with in the Q8 scratch.
    q8_gs: Option<usize>,
    /// The type x is rounded to in `x16`.
    half: Option<GemmType>,
}

impl CudaBackend {
    /// `out[r] = w · x[r]` for `rows` rows of x `[rows][cols]` and each pair
    /// of `outs`, one matrix after the other.
    pub(super) fn products(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        outs: &mut Outs,
    ) -> Result<()> {
        let mut prepared = Prepared::default();
        for (w, out) in outs.iter_mut() {
            self.product(x, rows, w, out, &mut prepared)?;
        }
        Ok(())
    }

    /// `out[r] = w · x[r]` for one matrix.
    fn product(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        out: &mut CudaSlice<f32>,
        prepared: &mut Prepared,
    ) -> Result<()> {
        if rows == 1 {
            if let Some(kernel) = one_launch([w]) {
                return self.matvec(kernel, Row::Plain(x), &mut [(w, out)], Epilogue::Store);
            }
        }
        let ty = match &w.data {
            Weights::F32(_) => GemmType::F32,
            Weights::F16(_) => GemmType::F16,
            Weights::BF16(_) => GemmType::BF16,
            Weights::Q8 { gs, .. } => return self.product_q8(x, rows, w, *gs, out, prepared),
        };
        if self.gemm_product(ty, x, rows, w, out, prepared)? {
            return Ok(());
        }
        let kernel = match ty {
            GemmType::F32 => "matmul_f32",
            GemmType::F16 => "matmul_f16",
            GemmType::BF16 => "matmul_bf16",
        };
        let args = [
            self.dev.ptr(out),
            w.args(&self.dev).0,
            self.dev.ptr(x),
            int(w.rows)?,
            int(w.cols)?,
            int(rows)?,
        ];
        self.dev
            .launch(kernel, matmul_grid(w, rows), MATMUL_THREADS, 0, &args)
    }

    /// The product through cuBLAS (f16/bf16: x rounded to `x16` first);
    /// false when cuBLAS is unavailable.
    fn gemm_product(
        &mut self,
        ty: GemmType,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        out: &mut CudaSlice<f32>,
        prepared: &mut Prepared,
    ) -> Result<bool> {
        if !self.gemm_tried {
            self.gemm_tried = true;
            self.gemm = Gemm::new(self.dev.stream.clone()).ok();
        }
        if self.gemm.is_none() {
            return Ok(false);
        }
        let xin = match ty {
            GemmType::F32 => self.dev.addr(x),
            GemmType::F16 | GemmType::BF16 => {
                if prepared.half != Some(ty) {
                    self.round_to_half(x, rows * w.cols, ty)?;
                    prepared.half = Some(ty);
                }
                self.dev.addr(&self.x16)
            }
        };
        let Arg::Ptr(weights) = w.args(&self.dev).0 else {
            return Err(Error::Backend("weight argument is not an address".into()));
        };
        let gemm = self.gemm.as_ref().expect("checked above");
        // SAFETY: the weights hold w.rows * w.cols values, x (or its rounded
        // copy) rows * cols, out rows * w.rows (the model's buffer shapes).
        unsafe { gemm.run(ty, weights, xin, self.dev.addr(out), w.rows, w.cols, rows) }?;
        Ok(true)
    }

    /// The first `n` values of x rounded to f16 or bf16 into `x16`.
    fn round_to_half(&mut self, x: &CudaSlice<f32>, n: usize, ty: GemmType) -> Result<()> {
        if self.x16.len() < n {
            self.x16 = self.dev.zeros(n)?;
        }
        let kernel = if ty == GemmType::F16 {
            "convert_f16"
        } else {
            "convert_bf16"
        };
        let args = [self.dev.ptr(&self.x16), self.dev.ptr(x), Arg::U64(n as u64)];
        self.dev.launch_1d(kernel, n, &args)
    }

    /// The W8A8 product: x quantized in the weight's groups (once per call
    /// and group size), then int8 dots: `matmul_q8` for batches, the
    /// generic kernel for groups the fast kernels cannot take.
    fn product_q8(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        gs: usize,
        out: &mut CudaSlice<f32>,
        prepared: &mut Prepared,
    ) -> Result<()> {
        if prepared.q8_gs != Some(gs) {
            self.quantize(x, rows, w.cols, gs)?;
            prepared.q8_gs = Some(gs);
        }
        let (values, scales) = w.args(&self.dev);
        let scales = scales.expect("Q8 matrices have scales");
        let args = [
            self.dev.ptr(out),
            values,
            scales,
            self.dev.ptr(&self.xq),
            self.dev.ptr(&self.xs),
            int(w.rows)?,
            int(w.cols)?,
            int(gs)?,
            int(rows)?,
        ];
        if one_launch([w]).is_none() {
            let blocks = (w.rows * rows).div_ceil(GENERIC_THREADS) as u32;
            let threads = GENERIC_THREADS as u32;
            return self
                .dev
                .launch("matvec_q8_generic", (blocks, 1), threads, 0, &args);
        }
        self.dev
            .launch("matmul_q8", matmul_grid(w, rows), MATMUL_THREADS, 0, &args)
    }
}

/// The grid of the `matmul_*` kernels: one warp per weight row, one block
/// row per MATMUL_ROWS batch rows.
fn matmul_grid(w: &CudaMatrix, rows: usize) -> (u32, u32) {
    let warps = (MATMUL_THREADS / 32) as usize;
    (
        w.rows.div_ceil(warps) as u32,
        rows.div_ceil(MATMUL_ROWS) as u32,
    )
}
