//! Mean cross-entropy of the logits against the targets, as model.py's
//! `F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)`,
//! and its gradient `(softmax - onehot) / count`. Rows run in parallel,
//! with the inference library's vector kernels: the forward's log-sum-exp
//! per row is kept, so the backward's softmax is one exponential pass.

use llama2::cpu::kernels;
use rayon::prelude::*;

use super::isa;

/// Targets equal to this are skipped (model.py's `ignore_index`).
pub const IGNORE_INDEX: i32 = -1;

/// The loss of a batch and what its backward needs.
pub struct Loss {
    /// The mean over rows whose target is not `IGNORE_INDEX` of
    /// `logsumexp(logits[n]) - logits[n][targets[n]]`; 0 with no counted
    /// rows.
    pub mean: f32,
    /// `logsumexp(logits[n])` per row `[N]`.
    pub log_sum_exp: Vec<f32>,
}

/// The mean cross-entropy of `logits` `[N][V]` against `targets` `[N]`
/// (each `< V` or ignored, checked by the caller), keeping each row's
/// log-sum-exp for the backward. Each row's loss is `logsumexp(row) -
/// row[t]`: two vector passes over the row and no stores, so a confidently
/// wrong row keeps its large loss, as no probability underflows on the
/// way. Summed in f64 so the mean does not depend on N's rounding.
pub fn cross_entropy_forward(logits: &[f32], targets: &[i32], vocab: usize) -> Loss {
    let log_sum_exp: Vec<f32> = logits
        .par_chunks_exact(vocab)
        .map(|row| kernels::log_sum_exp(isa(), row))
        .collect();
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    let sum: f64 = logits
        .chunks_exact(vocab)
        .zip(targets)
        .zip(&log_sum_exp)
        .filter(|((_, &t), _)| t != IGNORE_INDEX)
        .map(|((row, &t), &lse)| lse as f64 - row[t as usize] as f64)
        .sum();
    let mean = if count == 0 {
        0.0
    } else {
        (sum / count as f64) as f32
    };
    Loss { mean, log_sum_exp }
}

/// Turns `logits` `[N][V]` into the gradient of the mean loss with respect
/// to them, in place (the logits are the largest activation, and nothing
/// needs them after this): `(softmax(logits[n]) - onehot(targets[n])) /
/// count`, zero for ignored rows. The softmax is `e^(x - logsumexp)` from
/// the forward's `log_sum_exp` `[N]`: one pass a row, where a softmax of
/// its own would find the row's maximum and sum again and divide.
pub fn cross_entropy_backward(
    logits: &mut [f32],
    log_sum_exp: &[f32],
    targets: &[i32],
    vocab: usize,
) {
    let count = targets
        .iter()
        .filter(|&&t| t != IGNORE_INDEX)
        .count()
        .max(1);
    let scale = 1.0 / count as f32;
    logits
        .par_chunks_exact_mut(vocab)
        .zip(targets)
        .zip(log_sum_exp)
        .for_each(|((row, &t), &lse)| {
            if t == IGNORE_INDEX {
                row.fill(0.0);
                return;
            }
            kernels::exp_shifted(isa(), row, lse, scale);
            row[t as usize] -= scale;
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    #[test]
    fn backward_matches_finite_differences() {
        let vocab = 7;
        let targets = [3, IGNORE_INDEX, 0, 6];
        let logits = random(targets.len() * vocab, 1, 3.0);
        let mut grad = logits.clone();
        let lse = cross_entropy_forward(&logits, &targets, vocab).log_sum_exp;
        cross_entropy_backward(&mut grad, &lse, &targets, vocab);
        let numeric = numeric_grad(&logits, 1e-2, |l| {
            cross_entropy_forward(l, &targets, vocab).mean as f64
        });
        assert_grad_close("dlogits", &grad, &numeric, 2e-3);
    }

    #[test]
    fn a_confidently_wrong_row_keeps_its_large_loss() {
        // softmax(row)[0] = e^-200 underflows f32; the loss is still 200.
        let loss = cross_entropy_forward(&[0.0, 200.0], &[0], 2).mean;
        assert!((loss - 200.0).abs() < 1e-3, "{loss}");
    }

    #[test]
    fn uniform_logits_give_log_vocab() {
        let loss = cross_entropy_forward(&[0.0; 8], &[1, 2], 4).mean;
        assert!((loss - 4f32.ln()).abs() < 1e-6, "{loss}");
    }
}
