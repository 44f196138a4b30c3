//! Causal grouped-query attention, as model.py's `Attention` after RoPE:
//! query head `h` attends with key/value head `h / (Hq / Hkv)` (model.py's
//! `repeat_kv` repeats each kv head for consecutive query heads), scores
//! `q · k / sqrt(hs)`, softmax over positions `0..=t`, then the weighted
//! sum of values. Sequences of the batch run in parallel.

use rayon::prelude::*;

/// The sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Sequences in the batch (B).
    pub batch: usize,
    /// Positions per sequence (T).
    pub seq_len: usize,
    /// Query heads (Hq).
    pub n_heads: usize,
    /// Key/value heads (Hkv), dividing Hq.
    pub n_kv_heads: usize,
    /// Width of one head (hs).
    pub head_size: usize,
}

impl AttentionShape {
    /// Width of one token's queries (`Hq * hs`).
    fn q_width(&self) -> usize {
        self.n_heads * self.head_size
    }

    /// Width of one token's keys or values (`Hkv * hs`).
    fn kv_width(&self) -> usize {
        self.n_kv_heads * self.head_size
    }

    /// Offset within a token's keys of the kv head that query head `h` uses.
    fn kv_offset(&self, h: usize) -> usize {
        (h / (self.n_heads / self.n_kv_heads)) * self.head_size
    }

    /// Entries of one sequence's attention probabilities (`Hq * T * T`).
    fn probs_per_sequence(&self) -> usize {
        self.n_heads * self.seq_len * self.seq_len
    }
}

/// `q` `[B][T][Hq * hs]`, `k` and `v` `[B][T][Hkv * hs]` -> the attention
/// output `[B][T][Hq * hs]` and the probabilities `[B][Hq][T][T]` (zero
/// above the diagonal), which the backward needs.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    let (qw, kw, t_len) = (s.q_width(), s.kv_width(), s.seq_len);
    let mut out = vec![0f32; q.len()];
    let mut probs = vec![0f32; s.batch * s.probs_per_sequence()];
    let sequences = out
        .par_chunks_mut(t_len * qw)
        .zip(probs.par_chunks_mut(s.probs_per_sequence()))
        .zip(
            q.par_chunks(t_len * qw)
                .zip(k.par_chunks(t_len * kw).zip(v.par_chunks(t_len * kw))),
        );
    sequences.for_each(|((out, probs), (q, (k, v)))| sequence_forward(out, probs, q, k, v, s));
    (out, probs)
}

/// One sequence of `attention_forward`: `out` `[T][Hq * hs]`, `probs`
/// `[Hq][T][T]`, `q` `[T][Hq * hs]`, `k` and `v` `[T][Hkv * hs]`.
fn sequence_forward(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) {
    let (hs, qw, kw, t_len) = (s.head_size, s.q_width(), s.kv_width(), s.seq_len);
    let scale = 1.0 / (hs as f32).sqrt();
    for h in 0..s.n_heads {
        let kv = s.kv_offset(h);
        for t in 0..t_len {
            let qt = &q[t * qw + h * hs..][..hs];
            let p = &mut probs[(h * t_len + t) * t_len..][..t + 1];
            for (u, score) in p.iter_mut().enumerate() {
                *score = dot(qt, &k[u * kw + kv..][..hs]) * scale;
            }
            softmax(p);
            let ot = &mut out[t * qw + h * hs..][..hs];
            for (u, &a) in p.iter().enumerate() {
                axpy(ot, a, &v[u * kw + kv..][..hs]);
            }
        }
    }
}

/// Gradients of attention given `dout` `[B][T][Hq * hs]` and the forward's
/// inputs and `probs`. With `P` the probabilities and `dP = dout · v`:
/// `dv += P^T dout`; the softmax backward `dS = P * (dP - sum(P * dP))`;
/// `dq = dS k / sqrt(hs)`, `dk += dS^T q / sqrt(hs)` (query heads sharing a
/// kv head add into it). Returns `(dq, dk, dv)` shaped as `q`, `k`, `v`.
pub fn attention_backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    s: AttentionShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (qw, kw, t_len) = (s.q_width(), s.kv_width(), s.seq_len);
    let mut dq = vec![0f32; q.len()];
    let mut dk = vec![0f32; k.len()];
    let mut dv = vec![0f32; v.len()];
    let grads = dq.par_chunks_mut(t_len * qw).zip(
        dk.par_chunks_mut(t_len * kw)
            .zip(dv.par_chunks_mut(t_len * kw)),
    );
    let inputs = dout
        .par_chunks(t_len * qw)
        .zip(q.par_chunks(t_len * qw))
        .zip(
            k.par_chunks(t_len * kw)
                .zip(v.par_chunks(t_len * kw))
                .zip(probs.par_chunks(s.probs_per_sequence())),
        );
    grads
        .zip(inputs)
        .for_each(|((dq, (dk, dv)), ((dout, q), ((k, v), probs)))| {
            sequence_backward(SequenceGrads { dq, dk, dv }, dout, q, k, v, probs, s)
        });
    (dq, dk, dv)
}

/// One sequence's gradient buffers: `dq` `[T][Hq * hs]`, `dk`, `dv`
/// `[T][Hkv * hs]`.
struct SequenceGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// One sequence of `attention_backward`, shapes as `sequence_forward`.
fn sequence_backward(
    g: SequenceGrads,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    s: AttentionShape,
) {
    let (hs, qw, kw, t_len) = (s.head_size, s.q_width(), s.kv_width(), s.seq_len);
    let scale = 1.0 / (hs as f32).sqrt();
    // dS of one row of scores, `[t + 1]`, reused across rows.
    let mut dscore = vec![0f32; t_len];
    for h in 0..s.n_heads {
        let kv = s.kv_offset(h);
        for t in 0..t_len {
            let p = &probs[(h * t_len + t) * t_len..][..t + 1];
            let dot_t = &dout[t * qw + h * hs..][..hs];
            let ds = &mut dscore[..t + 1];
            for (u, d) in ds.iter_mut().enumerate() {
                *d = dot(dot_t, &v[u * kw + kv..][..hs]);
                axpy(&mut g.dv[u * kw + kv..][..hs], p[u], dot_t);
            }
            let weighted: f32 = p.iter().zip(ds.iter()).map(|(a, b)| a * b).sum();
            for (d, &a) in ds.iter_mut().zip(p) {
                *d = a * (*d - weighted) * scale;
            }
            let qt = &q[t * qw + h * hs..][..hs];
            let dqt = &mut g.dq[t * qw + h * hs..][..hs];
            for (u, &d) in ds.iter().enumerate() {
                axpy(dqt, d, &k[u * kw + kv..][..hs]);
                axpy(&mut g.dk[u * kw + kv..][..hs], d, qt);
            }
        }
    }
}

/// In-place softmax of one row of scores.
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// `a · b` in f32.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `acc += alpha * x`.
fn axpy(acc: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += alpha * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    const SHAPE: AttentionShape = AttentionShape {
        batch: 2,
        seq_len: 4,
        n_heads: 4,
        n_kv_heads: 2,
        head_size: 4,
    };

    #[test]
    fn backward_matches_finite_differences() {
        let s = SHAPE;
        let rows = s.batch * s.seq_len;
        let q = random(rows * s.q_width(), 1, 1.0);
        let k = random(rows * s.kv_width(), 2, 1.0);
        let v = random(rows * s.kv_width(), 3, 1.0);
        let probe = random(q.len(), 4, 1.0);
        let (_, probs) = attention_forward(&q, &k, &v, s);
        let (dq, dk, dv) = attention_backward(&probe, &q, &k, &v, &probs, s);
        let loss =
            |q: &[f32], k: &[f32], v: &[f32]| probe_loss(&attention_forward(q, k, v, s).0, &probe);
        assert_grad_close(
            "dq",
            &dq,
            &numeric_grad(&q, 1e-2, |q| loss(q, &k, &v)),
            1e-3,
        );
        assert_grad_close(
            "dk",
            &dk,
            &numeric_grad(&k, 1e-2, |k| loss(&q, k, &v)),
            1e-3,
        );
        assert_grad_close(
            "dv",
            &dv,
            &numeric_grad(&v, 1e-2, |v| loss(&q, &k, v)),
            1e-3,
        );
    }

    #[test]
    fn forward_matches_the_inference_engine() {
        // One sequence through llama2's reference attention, position by
        // position over a cache of the keys and values so far.
        let s = AttentionShape { batch: 1, ..SHAPE };
        let c = llama2::Config::from_header(16, 32, 1, 4, 2, 10, 4, true).unwrap();
        let q = random(s.seq_len * s.q_width(), 5, 1.0);
        let k = random(s.seq_len * s.kv_width(), 6, 1.0);
        let v = random(s.seq_len * s.kv_width(), 7, 1.0);
        let (out, _) = attention_forward(&q, &k, &v, s);
        for t in 0..s.seq_len {
            let mut want = vec![0f32; s.q_width()];
            let qt = &q[t * s.q_width()..][..s.q_width()];
            llama2::cpu::reference::attention(&mut want, qt, &k, &v, t, &c);
            for (g, w) in out[t * s.q_width()..][..s.q_width()].iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5, "position {t}: {g} vs {w}");
            }
        }
    }
}
