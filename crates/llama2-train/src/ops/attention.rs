//! Causal grouped-query attention, as model.py's `Attention` after RoPE:
//! query head `h` attends with key/value head `h / (Hq / Hkv)` (model.py's
//! `repeat_kv` repeats each kv head for consecutive query heads), scores
//! `q · k / sqrt(hs)`, softmax over positions `0..=t`, then the weighted
//! sum of values. Sequences of the batch run in parallel.
//!
//! Only the causal half of the probabilities exists: row `t` of a head has
//! the `t + 1` entries for positions `0..=t`, rows stored one after the
//! other (`kernels::triangle_row` gives where a row starts, and with `T`
//! a whole head's size), which halves the largest activation training
//! keeps.

use llama2::cpu::kernels::{self, triangle_row, Rows};
use rayon::prelude::*;

use super::{isa, zeroed};

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

    /// Entries of one sequence's attention probabilities (`Hq` triangles
    /// of `T` rows).
    fn probs_per_sequence(&self) -> usize {
        self.n_heads * triangle_row(self.seq_len)
    }

    /// Entries of the probabilities of a whole batch.
    pub fn probs_len(&self) -> usize {
        self.batch * self.probs_per_sequence()
    }
}

/// `q` `[B][T][Hq * hs]`, `k` and `v` `[B][T][Hkv * hs]` -> the attention
/// output `[B][T][Hq * hs]` and the probabilities `[B][Hq][triangle_row(T)]`,
/// which the backward needs.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    let (qw, kw, t_len) = (s.q_width(), s.kv_width(), s.seq_len);
    let mut out = zeroed(q.len());
    let mut probs = zeroed(s.probs_len());
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
/// `[Hq][triangle_row(T)]`, `q` `[T][Hq * hs]`, `k` and `v` `[T][Hkv * hs]`.
///
/// Heads are narrow (8 values in stories260K), so the vector work runs
/// along positions instead: with a head's keys and values transposed to
/// `[hs][T]`, one query's scores are a weighted sum of the `hs` key rows
/// over positions `0..=t` (one pass, sums in registers), and its output
/// the `hs` dot products of its probabilities with the value rows.
fn sequence_forward(
    out: &mut [f32],
    probs: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) {
    let (hs, qw, t_len) = (s.head_size, s.q_width(), s.seq_len);
    let scale = 1.0 / (hs as f32).sqrt();
    let (mut kt, mut vt) = (vec![0f32; hs * t_len], vec![0f32; hs * t_len]);
    let mut scaled_q = vec![0f32; hs];
    for (h, head_probs) in probs.chunks_exact_mut(triangle_row(t_len)).enumerate() {
        if h == 0 || s.kv_offset(h) != s.kv_offset(h - 1) {
            transpose_head(k, s, h, &mut kt);
            transpose_head(v, s, h, &mut vt);
        }
        for t in 0..t_len {
            let n = t + 1;
            let (keys, values) = (Rows::new(&kt, t_len, n, hs), Rows::new(&vt, t_len, n, hs));
            let p = &mut head_probs[triangle_row(t)..][..n];
            let qt = &q[t * qw + h * hs..][..hs];
            scaled_q
                .iter_mut()
                .zip(qt)
                .for_each(|(c, &qd)| *c = qd * scale);
            kernels::weighted_sum(isa(), p, &scaled_q, keys);
            kernels::softmax(isa(), p);
            let ot = &mut out[t * qw + h * hs..][..hs];
            dots(ot, p, values);
        }
    }
}

/// Query head `h`'s columns of `x` `[T][Hq * hs]` as `T` rows.
fn head_rows(x: &[f32], s: AttentionShape, h: usize) -> Rows<'_> {
    Rows::new(&x[h * s.head_size..], s.q_width(), s.head_size, s.seq_len)
}

/// Copies kv head `s.kv_offset(h)` of `x` `[T][Hkv * hs]` into `out`
/// `[hs][T]`.
fn transpose_head(x: &[f32], s: AttentionShape, h: usize, out: &mut [f32]) {
    let (hs, kw, t_len, kv) = (s.head_size, s.kv_width(), s.seq_len, s.kv_offset(h));
    for (t, row) in x.chunks_exact(kw).enumerate() {
        for (d, &val) in row[kv..kv + hs].iter().enumerate() {
            out[d * t_len + t] = val;
        }
    }
}

/// Adds `g` `[hs][T]` into kv head `s.kv_offset(h)` of `dx` `[T][Hkv * hs]`.
fn add_head(g: &[f32], s: AttentionShape, h: usize, dx: &mut [f32]) {
    let (hs, kw, t_len, kv) = (s.head_size, s.kv_width(), s.seq_len, s.kv_offset(h));
    for (t, row) in dx.chunks_exact_mut(kw).enumerate() {
        for (d, val) in row[kv..kv + hs].iter_mut().enumerate() {
            *val += g[d * t_len + t];
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
    let mut dq = zeroed(q.len());
    let mut dk = zeroed(k.len());
    let mut dv = zeroed(v.len());
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

/// One sequence of `attention_backward`, shapes and layout as
/// `sequence_forward`: per query, a weighted sum of the head's transposed
/// value rows (`dP`) and dot products with its key rows (`dq`); then per
/// head the key and value gradients, gathered transposed (`[hs][T]`), as
/// two triangle products before they are added back.
fn sequence_backward(
    g: SequenceGrads,
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    s: AttentionShape,
) {
    let (hs, qw, t_len) = (s.head_size, s.q_width(), s.seq_len);
    let scale = 1.0 / (hs as f32).sqrt();
    let [mut kt, mut vt, mut dkt, mut dvt] = [(); 4].map(|_| vec![0f32; hs * t_len]);
    // dS of one head, laid out as its probabilities.
    let mut dscores = vec![0f32; triangle_row(t_len)];
    for (h, head_probs) in probs.chunks_exact(triangle_row(t_len)).enumerate() {
        transpose_head(k, s, h, &mut kt);
        transpose_head(v, s, h, &mut vt);
        dkt.fill(0.0);
        dvt.fill(0.0);
        for t in 0..t_len {
            let n = t + 1;
            let (keys, values) = (Rows::new(&kt, t_len, n, hs), Rows::new(&vt, t_len, n, hs));
            let p = &head_probs[triangle_row(t)..][..n];
            let dot_t = &dout[t * qw + h * hs..][..hs];
            let ds = &mut dscores[triangle_row(t)..][..n];
            kernels::weighted_sum(isa(), ds, dot_t, values);
            let weighted = dot(p, ds);
            for (d, &a) in ds.iter_mut().zip(p) {
                *d = a * (*d - weighted) * scale;
            }
            dots(&mut g.dq[t * qw + h * hs..][..hs], ds, keys);
        }
        // dv^T += dout^T P and dk^T += q^T dS: one sweep of each triangle.
        let (dout_h, q_h) = (head_rows(dout, s, h), head_rows(q, s, h));
        kernels::triangle_product_add(isa(), head_probs, dout_h, &mut dvt, t_len);
        kernels::triangle_product_add(isa(), &dscores, q_h, &mut dkt, t_len);
        add_head(&dkt, s, h, g.dk);
        add_head(&dvt, s, h, g.dv);
    }
}

/// `out[d] = a · rows.row(d)` for every row: the library's score kernel
/// for one query (`a`) at scale 1, which shares each loaded piece of `a`
/// among several rows.
fn dots(out: &mut [f32], a: &[f32], rows: Rows) {
    let one = Rows::new(a, a.len(), a.len(), 1);
    kernels::attention_scores(isa(), out, one, rows, 1.0);
}

/// `a · b` at the kernels' level.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    kernels::dot_f32(isa(), a, b)
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
