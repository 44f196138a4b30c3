//! Products one matrix at a time: batched prompt rows (prefill) through
//! cuBLAS or the built-in `matmul_*` kernels, and whatever one `matvec`
//! launch cannot take (Q8 groups that only the generic kernel handles,
//! matrices of mixed types). The shared input is quantized or rounded to
//! half precision once per call, not once per matrix.
//!
//! Batched Q8 products with cuBLAS dequantize the matrix to an f16 scratch
//! copy and run GemmEx on tensor cores on activations quantized as runq
//! does and written back as f16(q * scale): runq's W8A8 terms, each factor
//! rounded only to f16. Without cuBLAS they take the dp4a `matmul_q8`
//! kernel, W8A8 exactly.

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
    /// What `x16` holds of x.
    half: Option<Half>,
}

/// A half-precision copy of the activations in `x16`.
#[derive(Clone, Copy, PartialEq)]
enum Half {
    /// x rounded to f16 or bf16.
    Rounded(GemmType),
    /// x quantized in groups of this size, as f16(q * scale).
    Q8(usize),
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
        if self.gemm_ready() {
            let weights = w.values_addr(&self.dev);
            return self.gemm(ty, weights, x, rows, w, out, prepared, Half::Rounded(ty));
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

    /// Whether cuBLAS is there, starting it on first use.
    fn gemm_ready(&mut self) -> bool {
        if !self.gemm_tried {
            self.gemm_tried = true;
            self.gemm = Gemm::new(self.dev.stream.clone()).ok();
        }
        self.gemm.is_some()
    }

    /// `out[r] = w · x[r]` through cuBLAS, with w's values at `weights` in
    /// type `ty` (f16/bf16: x is made into `half` in `x16` first). Needs
    /// `gemm_ready`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &mut self,
        ty: GemmType,
        weights: u64,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        out: &mut CudaSlice<f32>,
        prepared: &mut Prepared,
        half: Half,
    ) -> Result<()> {
        let xin = match ty {
            GemmType::F32 => self.dev.addr(x),
            GemmType::F16 | GemmType::BF16 => {
                if prepared.half != Some(half) {
                    match half {
                        Half::Rounded(ty) => self.round_to_half(x, rows * w.cols, ty)?,
                        Half::Q8(gs) => self.quantize_to_f16(x, rows, w.cols, gs)?,
                    }
                    prepared.half = Some(half);
                }
                self.dev.addr(&self.x16)
            }
        };
        let gemm = self
            .gemm
            .as_ref()
            .ok_or_else(|| Error::Backend("cuBLAS is not available".into()))?;
        // SAFETY: `weights` holds w.rows * w.cols values of `ty`, x (or its
        // rounded copy) rows * cols, out rows * w.rows (the model's buffer
        // shapes).
        unsafe { gemm.run(ty, weights, xin, self.dev.addr(out), w.rows, w.cols, rows) }
    }

    /// Q8 matrix `w` (groups of `gs`) dequantized to f16 into `w16`; returns
    /// the copy's address.
    fn dequantize_to_f16(&mut self, w: &CudaMatrix, gs: usize) -> Result<u64> {
        let n = w.rows * w.cols;
        if self.w16.len() < n {
            self.w16 = self.dev.zeros(n)?;
        }
        let (values, scales) = w.args(&self.dev);
        let scales = scales.expect("Q8 matrices have scales");
        let args = [
            self.dev.ptr(&self.w16),
            values,
            scales,
            Arg::U64(n as u64),
            int(gs)?,
        ];
        self.dev.launch_1d("dequantize_q8_f16", n, &args)?;
        Ok(self.dev.addr(&self.w16))
    }

    /// The first `n` values of x rounded to f16 or bf16 into `x16`.
    fn round_to_half(&mut self, x: &CudaSlice<f32>, n: usize, ty: GemmType) -> Result<()> {
        self.reserve_x16(n)?;
        let kernel = if ty == GemmType::F16 {
            "convert_f16"
        } else {
            "convert_bf16"
        };
        let args = [self.dev.ptr(&self.x16), self.dev.ptr(x), Arg::U64(n as u64)];
        self.dev.launch_1d(kernel, n, &args)
    }

    /// x `[rows][cols]` quantized in groups of `gs` exactly as `quantize`
    /// does, written to `x16` as f16(q * scale).
    fn quantize_to_f16(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        gs: usize,
    ) -> Result<()> {
        self.reserve_x16(rows * cols)?;
        let args = [
            self.dev.ptr(&self.x16),
            self.dev.ptr(x),
            int(rows)?,
            int(cols)?,
            int(gs)?,
        ];
        self.launch_per_group("quantize_q8_f16", &args, rows, cols, gs)
    }

    /// Grows `x16` to at least `n` values.
    fn reserve_x16(&mut self, n: usize) -> Result<()> {
        if self.x16.len() < n {
            self.x16 = self.dev.zeros(n)?;
        }
        Ok(())
    }

    /// The Q8 product: batches through cuBLAS on a dequantized copy where
    /// it is there; else W8A8, x quantized in the weight's groups (once per
    /// call and group size), then int8 dots: `matmul_q8` for batches, the
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
        if rows > 1 && self.gemm_ready() {
            let weights = self.dequantize_to_f16(w, gs)?;
            return self.gemm(
                GemmType::F16,
                weights,
                x,
                rows,
                w,
                out,
                prepared,
                Half::Q8(gs),
            );
        }
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
