//! Mean cross-entropy of the logits against the targets, as model.py's
//! `F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)`,
//! and its gradient `(softmax - onehot) / count`. Rows run in parallel,
//! with the inference library's vector softmax.

use llama2::cpu::kernels;
use rayon::prelude::*;

use super::isa;

/// Targets equal to this are skipped (model.py's `ignore_index`).
pub const IGNORE_INDEX: i32 = -1;

/// The mean over rows whose target is not `IGNORE_INDEX` of
/// `logsumexp(logits[n]) - logits[n][targets[n]]`: `logits` `[N][V]`,
/// `targets` `[N]` (each `< V` or ignored, checked by the caller). Summed in
/// f64 so the mean does not depend on N's rounding. No counted rows: 0.
pub fn cross_entropy_forward(logits: &[f32], targets: &[i32], vocab: usize) -> f32 {
    let count = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
    if count == 0 {
        return 0.0;
    }
    let sum: f64 = logits
        .par_chunks_exact(vocab)
        .zip(targets)
        .filter(|(_, &t)| t != IGNORE_INDEX)
        .map(|(row, &t)| row_loss(row, t as usize))
        .sum();
    (sum / count as f64) as f32
}

/// `-log softmax(row)[t]` as `logsumexp(row) - row[t]`: two vector passes
/// over the row and no stores, where a copy of the row and its whole
/// softmax cost 2-3% of a stories15M-shaped step. A confidently wrong row
/// keeps its large loss, as no probability underflows on the way.
fn row_loss(row: &[f32], t: usize) -> f64 {
    kernels::log_sum_exp(isa(), row) as f64 - row[t] as f64
}

/// Turns `logits` `[N][V]` into the gradient of the mean loss with respect
/// to them, in place (the logits are the largest activation, and nothing
/// needs them after this): `(softmax(logits[n]) - onehot(targets[n])) /
/// count`, zero for ignored rows.
pub fn cross_entropy_backward(logits: &mut [f32], targets: &[i32], vocab: usize) {
    let count = targets
        .iter()
        .filter(|&&t| t != IGNORE_INDEX)
        .count()
        .max(1);
    let scale = 1.0 / count as f32;
    logits
        .par_chunks_exact_mut(vocab)
        .zip(targets)
        .for_each(|(row, &t)| {
            if t == IGNORE_INDEX {
                row.fill(0.0);
                return;
            }
            kernels::softmax(isa(), row);
            row.iter_mut().for_each(|d| *d *= scale);
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
        cross_entropy_backward(&mut grad, &targets, vocab);
        let numeric = numeric_grad(&logits, 1e-2, |l| {
            cross_entropy_forward(l, &targets, vocab) as f64
        });
        assert_grad_close("dlogits", &grad, &numeric, 2e-3);
    }

    #[test]
    fn a_confidently_wrong_row_keeps_its_large_loss() {
        // softmax(row)[0] = e^-200 underflows f32; the loss is still 200.
        let loss = cross_entropy_forward(&[0.0, 200.0], &[0], 2);
        assert!((loss - 200.0).abs() < 1e-3, "{loss}");
    }

    #[test]
    fn uniform_logits_give_log_vocab() {
        let loss = cross_entropy_forward(&[0.0; 8], &[1, 2], 4);
        assert!((loss - 4f32.ln()).abs() < 1e-6, "{loss}");
    }
}
