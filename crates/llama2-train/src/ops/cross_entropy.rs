//! Mean cross-entropy of the logits against the targets, as model.py's
//! `F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1)`,
//! and its gradient `(softmax - onehot) / count`.

/// Targets equal to this are skipped (model.py's `ignore_index`).
pub const IGNORE_INDEX: i32 = -1;

/// The mean over rows whose target is not `IGNORE_INDEX` of
/// `logsumexp(logits[n]) - logits[n][targets[n]]`: `logits` `[N][V]`,
/// `targets` `[N]` (each `< V` or ignored, checked by the caller). Summed in
/// f64 so the mean does not depend on N's rounding. No counted rows: 0.
pub fn cross_entropy_forward(logits: &[f32], targets: &[i32], vocab: usize) -> f32 {
    let mut sum = 0f64;
    let mut count = 0usize;
    for (row, &t) in logits.chunks_exact(vocab).zip(targets) {
        if t == IGNORE_INDEX {
            continue;
        }
        let (max, total) = exp_sum(row);
        sum += (max + total.ln()) as f64 - row[t as usize] as f64;
        count += 1;
    }
    if count == 0 {
        0.0
    } else {
        (sum / count as f64) as f32
    }
}

/// The gradient `[N][V]` of the mean loss with respect to the logits:
/// `(softmax(logits[n]) - onehot(targets[n])) / count`, zero for ignored
/// rows.
pub fn cross_entropy_backward(logits: &[f32], targets: &[i32], vocab: usize) -> Vec<f32> {
    let count = targets
        .iter()
        .filter(|&&t| t != IGNORE_INDEX)
        .count()
        .max(1);
    let scale = 1.0 / count as f32;
    let mut dlogits = vec![0f32; logits.len()];
    for ((drow, row), &t) in dlogits
        .chunks_exact_mut(vocab)
        .zip(logits.chunks_exact(vocab))
        .zip(targets)
    {
        if t == IGNORE_INDEX {
            continue;
        }
        let (max, total) = exp_sum(row);
        for (d, &v) in drow.iter_mut().zip(row) {
            *d = (v - max).exp() / total * scale;
        }
        drow[t as usize] -= scale;
    }
    dlogits
}

/// A row's maximum and `sum(exp(row - max))`: softmax's two reductions,
/// shifted so that no exponential overflows.
fn exp_sum(row: &[f32]) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (max, row.iter().map(|&v| (v - max).exp()).sum())
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
        let grad = cross_entropy_backward(&logits, &targets, vocab);
        let numeric = numeric_grad(&logits, 1e-2, |l| {
            cross_entropy_forward(l, &targets, vocab) as f64
        });
        assert_grad_close("dlogits", &grad, &numeric, 2e-3);
    }

    #[test]
    fn uniform_logits_give_log_vocab() {
        let loss = cross_entropy_forward(&[0.0; 8], &[1, 2], 4);
        assert!((loss - 4f32.ln()).abs() < 1e-6, "{loss}");
    }
}
