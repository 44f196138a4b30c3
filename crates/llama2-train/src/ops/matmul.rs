//! `y = x @ W^T`, the linear layer of model.py (`nn.Linear`, no bias), and
//! both of its gradients. Rows of the output are computed in parallel; the
//! dot products and `axpy`s are the inference library's SIMD kernels at the
//! widest level this CPU runs (or `LLAMA2_ISA`'s).

use std::sync::OnceLock;

use llama2::cpu::kernels::{self, Isa};
use rayon::prelude::*;

/// The kernels' level, chosen once: `LLAMA2_ISA` when it names one this
/// CPU runs, else the widest.
fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| Isa::configured().unwrap_or_else(|_| Isa::best()))
}

/// Rows below this many multiply-adds run on one thread: rayon's overhead
/// would outweigh the work.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// `y[n][m] = sum_k x[n][k] * w[m][k]`: `x` `[N][K]`, `w` `[M][K]` ->
/// `y` `[N][M]`.
pub fn matmul_forward(x: &[f32], w: &[f32], k: usize, m: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut y = vec![0f32; n * m];
    let row = |(yr, xr): (&mut [f32], &[f32])| {
        for (out, wr) in yr.iter_mut().zip(w.chunks_exact(k)) {
            *out = dot(xr, wr);
        }
    };
    if n * m * k < PARALLEL_MIN_WORK {
        y.chunks_mut(m).zip(x.chunks_exact(k)).for_each(row);
    } else {
        y.par_chunks_mut(m).zip(x.par_chunks(k)).for_each(row);
    }
    y
}

/// Both gradients of `y = x @ W^T`, given `dy` `[N][M]`:
/// `dx += dy @ W` (`[N][K]`) and `dw += dy^T @ x` (`[M][K]`). Both are
/// added to, since a matrix's input often feeds several products (q, k and
/// v share theirs) and the tied embedding is used twice.
pub fn matmul_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    k: usize,
    m: usize,
    dx: &mut [f32],
    dw: &mut [f32],
) {
    let n = x.len() / k;
    let input_row = |(dxr, dyr): (&mut [f32], &[f32])| {
        for (&g, wr) in dyr.iter().zip(w.chunks_exact(k)) {
            axpy(dxr, g, wr);
        }
    };
    let weight_row = |(j, dwr): (usize, &mut [f32])| {
        for (dyr, xr) in dy.chunks_exact(m).zip(x.chunks_exact(k)) {
            axpy(dwr, dyr[j], xr);
        }
    };
    if n * m * k < PARALLEL_MIN_WORK {
        dx.chunks_mut(k).zip(dy.chunks_exact(m)).for_each(input_row);
        dw.chunks_mut(k).enumerate().for_each(weight_row);
    } else {
        dx.par_chunks_mut(k)
            .zip(dy.par_chunks(m))
            .for_each(input_row);
        dw.par_chunks_mut(k).enumerate().for_each(weight_row);
    }
}

/// `a · b` in f32.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    kernels::dot_f32(isa(), a, b)
}

/// `acc += alpha * x`.
fn axpy(acc: &mut [f32], alpha: f32, x: &[f32]) {
    kernels::axpy(isa(), acc, alpha, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    fn check(n: usize, k: usize, m: usize) {
        let x = random(n * k, 1, 1.0);
        let w = random(m * k, 2, 1.0);
        let probe = random(n * m, 3, 1.0);
        let (mut dx, mut dw) = (vec![0f32; n * k], vec![0f32; m * k]);
        matmul_backward(&probe, &x, &w, k, m, &mut dx, &mut dw);
        let nx = numeric_grad(&x, 1e-2, |x| {
            probe_loss(&matmul_forward(x, &w, k, m), &probe)
        });
        let nw = numeric_grad(&w, 1e-2, |w| {
            probe_loss(&matmul_forward(&x, w, k, m), &probe)
        });
        assert_grad_close("dx", &dx, &nx, 1e-3);
        assert_grad_close("dw", &dw, &nw, 1e-3);
    }

    #[test]
    fn backward_matches_finite_differences() {
        check(3, 4, 5);
    }

    #[test]
    fn parallel_path_matches_finite_differences() {
        check(40, 32, 30);
    }

    #[test]
    fn forward_is_x_times_w_transposed() {
        // x = [[1, 2]], w = [[3, 4], [5, 6]]: y = [[11, 17]].
        assert_eq!(
            matmul_forward(&[1.0, 2.0], &[3.0, 4.0, 5.0, 6.0], 2, 2),
            [11.0, 17.0]
        );
    }
}
