//! The element-wise half of model.py's `FeedForward`:
//! `g = silu(h1) * h3` with `h1 = x @ w1^T`, `h3 = x @ w3^T` (the products
//! and `w2` are `matmul`s). Both directions run in parallel chunks, their
//! exponentials in the library's vector kernels (a scalar `exp` per value
//! was 8% of a stories260K-shaped step on a Zen 3 EPYC).

use llama2::cpu::kernels;
use rayon::prelude::*;

use super::{copied, isa, zeroed, CHUNK};

/// `silu(x) = x * sigmoid(x)`, as model.py's `F.silu`.
#[cfg(test)]
fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `g = silu(h1) * h3`, element-wise: `h1`, `h3` `[N][H]` -> `g` `[N][H]`.
pub fn swiglu_forward(h1: &[f32], h3: &[f32]) -> Vec<f32> {
    let mut g = copied(h1);
    g.par_chunks_mut(CHUNK)
        .zip(h3.par_chunks(CHUNK))
        .for_each(|(g, h3)| kernels::silu_mul(isa(), g, h3));
    g
}

/// Gradients of `g = silu(h1) * h3` given `dg` `[N][H]`:
/// `dh1 = dg * h3 * silu'(h1)` with `silu'(a) = s * (1 + a * (1 - s))`,
/// `s = sigmoid(a)`; `dh3 = dg * silu(h1)`. Returns `(dh1, dh3)`, `[N][H]`.
pub fn swiglu_backward(dg: &[f32], h1: &[f32], h3: &[f32]) -> (Vec<f32>, Vec<f32>) {
    // `dh3` holds the sigmoid until each chunk's gradients replace it.
    let (mut dh1, mut dh3) = (zeroed(dg.len()), copied(h1));
    let grads = dh1.par_chunks_mut(CHUNK).zip(dh3.par_chunks_mut(CHUNK));
    let inputs = dg
        .par_chunks(CHUNK)
        .zip(h1.par_chunks(CHUNK).zip(h3.par_chunks(CHUNK)));
    grads.zip(inputs).for_each(|((dh1, dh3), (dg, (h1, h3)))| {
        kernels::sigmoid(isa(), dh3);
        for (((d1, d3), &g), (&a, &b)) in dh1
            .iter_mut()
            .zip(dh3.iter_mut())
            .zip(dg)
            .zip(h1.iter().zip(h3))
        {
            let s = *d3;
            *d1 = g * b * s * (1.0 + a * (1.0 - s));
            *d3 = g * a * s;
        }
    });
    (dh1, dh3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    #[test]
    fn backward_matches_finite_differences() {
        let h1 = random(24, 1, 3.0);
        let h3 = random(24, 2, 1.0);
        let probe = random(24, 3, 1.0);
        let (d1, d3) = swiglu_backward(&probe, &h1, &h3);
        let n1 = numeric_grad(&h1, 1e-2, |a| probe_loss(&swiglu_forward(a, &h3), &probe));
        let n3 = numeric_grad(&h3, 1e-2, |b| probe_loss(&swiglu_forward(&h1, b), &probe));
        assert_grad_close("dh1", &d1, &n1, 1e-3);
        assert_grad_close("dh3", &d3, &n3, 1e-3);
    }

    #[test]
    fn silu_matches_the_inference_engine() {
        for x in [-4.0f32, -0.5, 0.0, 0.7, 6.0] {
            assert!((silu(x) - llama2::cpu::reference::silu(x)).abs() <= 1e-6);
        }
    }
}
