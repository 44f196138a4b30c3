//! One-row products (decoding): the `matvec_*` kernels of
//! `kernels/matvec.cu`, one warp per weight row. One launch multiplies up to
//! three matrices that share the input row (QKV, w1/w3), can fold in the
//! RMS norm that produces that row, and ends in an epilogue: a plain store,
//! the residual add, or the SwiGLU gate. The fused `Backend` ops are built
//! from these launches.

use cudarc::driver::CudaSlice;
use llama2::Result;

use super::weights::{CudaMatrix, Weights};
use super::CudaBackend;
use crate::device::{int, Arg};

/// Threads per block of the decode matvec kernels: 4 warps, one weight row
/// (or SwiGLU row pair) each; small blocks spread small matrices over more SMs.
const MATVEC_THREADS: u32 = 128;
/// Matrices one `matvec_*` launch takes.
const MAX_MATRICES: usize = 3;

/// `(matrix, output)` pairs of a product sharing one input, output `[rows][n]`
/// for a matrix of n rows.
pub(super) type Outs<'a, 'b> = [(&'a CudaMatrix, &'b mut CudaSlice<f32>)];

/// The kernel of a one-launch decode product.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum MatvecKernel {
    /// `matvec_f32`, `matvec_f16` or `matvec_bf16`.
    Float(&'static str),
    /// `matvec_q8`, for Q8 groups of `gs` = 16, 32 or 64 within rows.
    Q8 { gs: usize },
}

/// The activation row a decode product reads.
#[derive(Clone, Copy)]
pub(super) enum Row<'a> {
    /// x `[cols]` as it is.
    Plain(&'a CudaSlice<f32>),
    /// rmsnorm(x) * weight, x and weight `[cols]`: the norm is folded into
    /// the product (for Q8, into the activation quantization).
    Normed {
        x: &'a CudaSlice<f32>,
        weight: &'a CudaSlice<f32>,
    },
}

/// What a decode product does with each output's dot product (the
/// kernels' `mode`).
pub(super) enum Epilogue<'a> {
    /// `out_m[j] = w_m[j] · x` for every matrix.
    Store,
    /// One matrix: `out[j] = w[j] · x`, then `residual[j] += out[j]`
    /// (residual `[n]`).
    Residual(&'a mut CudaSlice<f32>),
    /// Matrices (w1, w3) of one shape, outputs (gate, up):
    /// `up[j] = w3[j] · x`, `gate[j] = silu(w1[j] · x) * up[j]`.
    SwiGlu,
}

impl Epilogue<'_> {
    /// The kernels' MODE_PLAIN, MODE_RESIDUAL and MODE_SWIGLU.
    fn mode(&self) -> i32 {
        match self {
            Epilogue::Store => 0,
            Epilogue::Residual(_) => 1,
            Epilogue::SwiGlu => 2,
        }
    }
}

/// The kernel one launch can multiply all of `mats` with: at most three
/// matrices of one storage type (and Q8 group size), with equal column
/// counts. `None` when they need separate launches, or when a Q8 matrix's
/// groups fit only the generic kernel.
pub(super) fn one_launch<'a>(
    mats: impl IntoIterator<Item = &'a CudaMatrix>,
) -> Option<MatvecKernel> {
    let mut mats = mats.into_iter();
    let first = mats.next()?;
    let kernel = kernel_for(first)?;
    let mut count = 1;
    for m in mats {
        count += 1;
        if kernel_for(m) != Some(kernel) || m.cols != first.cols {
            return None;
        }
    }
    (count <= MAX_MATRICES).then_some(kernel)
}

/// The matvec kernel for one matrix, if one fits its layout.
fn kernel_for(m: &CudaMatrix) -> Option<MatvecKernel> {
    match &m.data {
        Weights::F32(_) => Some(MatvecKernel::Float("matvec_f32")),
        Weights::F16(_) => Some(MatvecKernel::Float("matvec_f16")),
        Weights::BF16(_) => Some(MatvecKernel::Float("matvec_bf16")),
        Weights::Q8 { gs, .. } => (matches!(gs, 16 | 32 | 64) && m.cols.is_multiple_of(*gs))
            .then_some(MatvecKernel::Q8 { gs: *gs }),
    }
}

impl CudaBackend {
    /// `out_m = w_m · row` for every pair of `outs` in one launch of
    /// `kernel` (from `one_launch` over the same matrices), ending in
    /// `epilogue`.
    pub(super) fn matvec(
        &mut self,
        kernel: MatvecKernel,
        row: Row,
        outs: &mut Outs,
        epilogue: Epilogue,
    ) -> Result<()> {
        let cols = outs[0].0.cols;
        let mut args = Vec::with_capacity(20);
        for m in 0..MAX_MATRICES {
            args.extend(self.matrix_args(kernel, outs.get(m))?);
        }
        args.extend(self.row_args(kernel, row, cols)?);
        let residual = match &epilogue {
            Epilogue::Residual(res) => self.dev.ptr(&**res),
            _ => Arg::Ptr(0),
        };
        args.extend([residual, Arg::I32(epilogue.mode())]);
        if let MatvecKernel::Float(_) = kernel {
            // The float kernels fold the norm in themselves: its weights, or
            // null, and its epsilon.
            args.push(match row {
                Row::Normed { weight, .. } => self.dev.ptr(weight),
                Row::Plain(_) => Arg::Ptr(0),
            });
            args.push(Arg::F32(self.norm_eps));
        }
        // One warp per output row; the SwiGLU pair shares a warp.
        let warps = match epilogue {
            Epilogue::SwiGlu => outs[0].0.rows,
            _ => outs.iter().map(|(w, _)| w.rows).sum(),
        };
        let blocks = warps.div_ceil((MATVEC_THREADS / 32) as usize) as u32;
        let name = match kernel {
            MatvecKernel::Float(name) => name,
            MatvecKernel::Q8 { .. } => "matvec_q8",
        };
        self.dev.launch(name, (blocks, 1), MATVEC_THREADS, 0, &args)
    }

    /// One matrix's arguments: weights (Q8: and scales), output, row count;
    /// null pointers and 0 rows for an unused slot.
    fn matrix_args(
        &self,
        kernel: MatvecKernel,
        pair: Option<&(&CudaMatrix, &mut CudaSlice<f32>)>,
    ) -> Result<Vec<Arg>> {
        let q8 = matches!(kernel, MatvecKernel::Q8 { .. });
        let Some((w, out)) = pair else {
            let null = Arg::Ptr(0);
            return Ok(if q8 {
                vec![null, null, null, Arg::I32(0)]
            } else {
                vec![null, null, Arg::I32(0)]
            });
        };
        let (values, scales) = w.args(&self.dev);
        let mut args = vec![values];
        args.extend(scales);
        args.extend([self.dev.ptr(&**out), int(w.rows)?]);
        Ok(args)
    }

    /// The input row's arguments, after quantizing it for Q8: float
    /// kernels take x and cols (the norm weights go last, after the
    /// epilogue), `matvec_q8` the quantized row, its scales, cols and gs.
    fn row_args(&mut self, kernel: MatvecKernel, row: Row, cols: usize) -> Result<Vec<Arg>> {
        match (kernel, row) {
            (MatvecKernel::Float(_), Row::Plain(x) | Row::Normed { x, .. }) => {
                Ok(vec![self.dev.ptr(x), int(cols)?])
            }
            (MatvecKernel::Q8 { gs }, Row::Plain(x)) => {
                self.quantize(x, 1, cols, gs)?;
                self.quantized_row_args(cols, gs)
            }
            (MatvecKernel::Q8 { gs }, Row::Normed { x, weight }) => {
                self.norm_quantize(x, weight, cols, gs)?;
                self.quantized_row_args(cols, gs)
            }
        }
    }

    fn quantized_row_args(&self, cols: usize, gs: usize) -> Result<Vec<Arg>> {
        Ok(vec![
            self.dev.ptr(&self.xq),
            self.dev.ptr(&self.xs),
            int(cols)?,
            int(gs)?,
        ])
    }
}
