//! RMSNorm, as model.py's `RMSNorm`: `y = x / sqrt(mean(x^2) + eps) * w`
//! per row, and its backward, both in parallel over blocks of rows.

use rayon::prelude::*;

use super::{for_overwrite, zeroed, ROWS_PER_TASK};

/// Normalizes each row of `x` `[N][D]` with gain `w` `[D]`. Returns
/// `y` `[N][D]` (from `for_overwrite`) and each row's `1 / sqrt(mean(x^2) + eps)` `[N]`, which the
/// backward needs.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let (mut y, mut inv_rms) = (for_overwrite(x.len()), vec![0f32; x.len() / d]);
    let block = ROWS_PER_TASK * d;
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .zip(inv_rms.par_chunks_mut(ROWS_PER_TASK))
        .for_each(|((y, x), inv_rms)| {
            for ((yr, xr), r) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(inv_rms) {
                let mean_square = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
                *r = 1.0 / (mean_square + eps).sqrt();
                for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * *r * g;
                }
            }
        });
    (y, inv_rms)
}

/// Gradients of RMSNorm, given `dy` `[N][D]`, the forward's `x` `[N][D]`,
/// gain `w` `[D]` and `inv_rms` `[N]`. With `r` the row's inverse RMS and
/// `u = w * dy`: `dx = r * u - x * r^3 * (u · x) / D`, and
/// `dw += sum over rows of dy * x * r`, summed per block of rows and then
/// over the blocks in order (the same sum on any number of threads).
/// Returns `dx` `[N][D]`.
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    inv_rms: &[f32],
    dw: &mut [f32],
) -> Vec<f32> {
    let d = w.len();
    let mut dx = zeroed(x.len());
    let block = ROWS_PER_TASK * d;
    let dw_parts: Vec<Vec<f32>> = dx
        .par_chunks_mut(block)
        .zip(dy.par_chunks(block))
        .zip(x.par_chunks(block).zip(inv_rms.par_chunks(ROWS_PER_TASK)))
        .map(|((dx, dy), (x, inv_rms))| {
            let mut dw = vec![0f32; d];
            let rows = dx.chunks_exact_mut(d).zip(dy.chunks_exact(d));
            for ((dxr, dyr), (xr, &r)) in rows.zip(x.chunks_exact(d).zip(inv_rms)) {
                let u_dot_x: f32 = dyr.iter().zip(w).zip(xr).map(|((g, w), x)| g * w * x).sum();
                let coef = r * r * r * u_dot_x / d as f32;
                for i in 0..d {
                    dxr[i] = r * w[i] * dyr[i] - xr[i] * coef;
                    dw[i] += dyr[i] * xr[i] * r;
                }
            }
            dw
        })
        .collect();
    for part in dw_parts {
        dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    #[test]
    fn backward_matches_finite_differences() {
        let (n, d, eps) = (3, 8, 1e-5);
        let x = random(n * d, 1, 1.0);
        let w = random(d, 2, 1.0);
        let probe = random(n * d, 3, 1.0);
        let (_, inv_rms) = rmsnorm_forward(&x, &w, eps);
        let mut dw = vec![0f32; d];
        let dx = rmsnorm_backward(&probe, &x, &w, &inv_rms, &mut dw);
        let nx = numeric_grad(&x, 1e-2, |x| {
            probe_loss(&rmsnorm_forward(x, &w, eps).0, &probe)
        });
        let nw = numeric_grad(&w, 1e-2, |w| {
            probe_loss(&rmsnorm_forward(&x, w, eps).0, &probe)
        });
        assert_grad_close("dx", &dx, &nx, 1e-3);
        assert_grad_close("dw", &dw, &nw, 1e-3);
    }

    #[test]
    fn forward_matches_the_inference_engine() {
        let (x, w) = (random(16, 4, 2.0), random(16, 5, 1.0));
        let mut want = vec![0f32; 16];
        llama2::cpu::reference::rmsnorm(&mut want, &x, &w, 1e-5);
        let (got, _) = rmsnorm_forward(&x, &w, 1e-5);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    fn blocks_of_rows_give_each_row_its_own_result() {
        // More rows than one parallel block: every row (and the summed `dw`)
        // is what the row alone gives.
        let (n, d, eps) = (2 * ROWS_PER_TASK + 5, 8, 1e-5);
        let (x, w, dy) = (
            random(n * d, 4, 1.0),
            random(d, 5, 1.0),
            random(n * d, 6, 1.0),
        );
        let (y, inv_rms) = rmsnorm_forward(&x, &w, eps);
        let mut dw = vec![0f32; d];
        let dx = rmsnorm_backward(&dy, &x, &w, &inv_rms, &mut dw);
        let mut dw_rows = vec![0f32; d];
        for (i, &r) in inv_rms.iter().enumerate() {
            let row = i * d..(i + 1) * d;
            let (yr, rr) = rmsnorm_forward(&x[row.clone()], &w, eps);
            assert_eq!((&y[row.clone()], r), (&yr[..], rr[0]), "row {i}");
            let dxr = rmsnorm_backward(&dy[row.clone()], &x[row.clone()], &w, &rr, &mut dw_rows);
            assert_eq!(&dx[row], &dxr[..], "row {i}");
        }
        for (a, b) in dw.iter().zip(&dw_rows) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "dw: {a} vs {b}");
        }
    }
}
