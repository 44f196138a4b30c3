//! Residual connection: `y = a + b`. Its backward hands the output gradient
//! unchanged to both branches; the model adds the branch's gradient to the
//! skip path's. Both element-wise loops run on the pool.

use rayon::prelude::*;

use super::CHUNK;

/// `y = a + b`, element-wise, both `[N][D]`.
pub fn residual_forward(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.par_iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `da = dy`, `db = dy`: `dy` `[N][D]` -> both `[N][D]`.
pub fn residual_backward(dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    (dy.to_vec(), dy.to_vec())
}

/// `acc += x`, element-wise: how a gradient reaching one tensor by two
/// paths is summed.
pub fn accumulate(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(acc, x)| acc.iter_mut().zip(x).for_each(|(a, &v)| *a += v));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    #[test]
    fn backward_matches_finite_differences() {
        let a = random(6, 1, 1.0);
        let b = random(6, 2, 1.0);
        let probe = random(6, 3, 1.0);
        let (da, db) = residual_backward(&probe);
        let na = numeric_grad(&a, 1e-2, |a| probe_loss(&residual_forward(a, &b), &probe));
        let nb = numeric_grad(&b, 1e-2, |b| probe_loss(&residual_forward(&a, b), &probe));
        assert_grad_close("da", &da, &na, 1e-4);
        assert_grad_close("db", &db, &nb, 1e-4);
    }
}
