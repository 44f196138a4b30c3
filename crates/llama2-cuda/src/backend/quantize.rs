//! Run-time quantization of f32 activations to Q8_0, the input side of the
//! W8A8 products (runq's arithmetic): into the backend's `xq` / `xs`
//! scratch, optionally with the RMS norm that produces the activations
//! folded in.

use cudarc::driver::CudaSlice;
use llama2::Result;

use super::CudaBackend;
use crate::device::{int, Arg};

/// Threads of the fused RMS norm + Q8 quantization (one block per row).
const NORM_QUANTIZE_THREADS: u32 = 1024;
/// Warps per block of the per-group quantize kernels (one warp per group).
const QUANTIZE_WARPS: usize = 8;

impl CudaBackend {
    /// Quantizes x `[rows][cols]` in groups of `gs` into the Q8 scratch.
    pub(super) fn quantize(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        cols: usize,
        gs: usize,
    ) -> Result<()> {
        self.reserve_q8(rows, cols, gs)?;
        let args = [
            self.dev.ptr(&self.xq),
            self.dev.ptr(&self.xs),
            self.dev.ptr(x),
            int(rows)?,
            int(cols)?,
            int(gs)?,
        ];
        self.launch_per_group("quantize_q8", &args, rows, cols, gs)
    }

    /// Launches a quantize kernel with one warp per group of `gs` values of
    /// x `[rows][cols]` (`quantize_q8`, `quantize_q8_f16`).
    pub(super) fn launch_per_group(
        &self,
        kernel: &str,
        args: &[Arg],
        rows: usize,
        cols: usize,
        gs: usize,
    ) -> Result<()> {
        let groups = rows * cols.div_ceil(gs);
        let blocks = groups.div_ceil(QUANTIZE_WARPS) as u32;
        let threads = (32 * QUANTIZE_WARPS) as u32;
        self.dev.launch(kernel, (blocks, 1), threads, 0, args)
    }

    /// Quantizes rmsnorm(x) * weight of one row (x and weight `[cols]`) in
    /// groups of `gs` into the Q8 scratch, in one launch: bit-identical to
    /// `rmsnorm_f32` followed by `quantize_q8`.
    pub(super) fn norm_quantize(
        &mut self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        cols: usize,
        gs: usize,
    ) -> Result<()> {
        self.reserve_q8(1, cols, gs)?;
        let args = [
            self.dev.ptr(&self.xq),
            self.dev.ptr(&self.xs),
            self.dev.ptr(x),
            self.dev.ptr(weight),
            int(cols)?,
            int(gs)?,
            Arg::F32(self.norm_eps),
        ];
        self.dev.launch(
            "rmsnorm_quantize_q8",
            (1, 1),
            NORM_QUANTIZE_THREADS,
            0,
            &args,
        )
    }

    /// Grows the Q8 scratch to hold `[rows][cols]` in groups of `gs`. A
    /// recorded graph holds the old addresses, so it is dropped.
    fn reserve_q8(&mut self, rows: usize, cols: usize, gs: usize) -> Result<()> {
        let (nq, ns) = (rows * cols, rows * cols.div_ceil(gs));
        if self.xq.len() < nq || self.xs.len() < ns {
            self.xq = self.dev.zeros(nq.max(self.xq.len()))?;
            self.xs = self.dev.zeros(ns.max(self.xs.len()))?;
            self.forget_graph();
        }
        Ok(())
    }
}
