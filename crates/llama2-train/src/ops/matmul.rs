//! `y = x @ W^T`, the linear layer of model.py (`nn.Linear`, no bias), and
//! both of its gradients: three products of the same kind (`gemm.rs`),
//! with the operands seen transposed where the math wants them so.

use super::gemm::{gemm_nt, View};
use super::{for_overwrite, isa};

/// `y[n][m] = sum_k x[n][k] * w[m][k]`: `x` `[N][K]`, `w` `[M][K]` ->
/// `y` `[N][M]`, in a buffer from `for_overwrite` (the product writes all
/// of it), which the caller may `recycle`.
pub fn matmul_forward(x: &[f32], w: &[f32], k: usize, m: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut y = for_overwrite(n * m);
    gemm_nt(
        isa(),
        View::rows(w, k),
        View::rows(x, k),
        (m, n, k),
        &mut y,
        false,
    );
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
    // dx[t][i] = sum_j w[j][i] * dy[t][j]: `a` is W^T, `b` is dy.
    gemm_nt(
        isa(),
        View::transposed(w, k),
        View::rows(dy, m),
        (k, n, m),
        dx,
        true,
    );
    // dw[j][i] = sum_t x[t][i] * dy[t][j]: `a` is x^T, `b` is dy^T.
    gemm_nt(
        isa(),
        View::transposed(x, k),
        View::transposed(dy, m),
        (k, m, n),
        dw,
        true,
    );
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
