//! Causal grouped-query attention, as model.py's `Attention` after RoPE:
//! query head `h` attends with key/value head `h / (Hq / Hkv)` (model.py's
//! `repeat_kv` repeats each kv head for consecutive query heads), scores
//! `q · k / sqrt(hs)`, softmax over positions `0..=t`, then the weighted
//! sum of values. Sequences of the batch run in parallel.
//!
//! A head runs in one of two forms. Heads of 16 values or more go by
//! blocks of 32 queries, each block's scores, output and gradients as
//! products of the batch tiles (`gemm.rs`'s layouts); narrower ones
//! (stories260K's 8) go position by position, along the transposed keys
//! and values, where a tile's reduction over `hs` would be too short to
//! pay for its stores. On a Zen 4 the block form made a stories15M step
//! (heads of 48) 4-5% faster and a heads-of-32 shape 8%, left heads of 16
//! even and made stories260K's 10% slower.
//!
//! Only the causal half of the probabilities exists: row `t` of a head has
//! the `t + 1` entries for positions `0..=t`, rows stored one after the
//! other (`kernels::triangle_row` gives where a row starts, and with `T`
//! a whole head's size), which halves the largest activation training
//! keeps.

use std::ops::Range;

use llama2::cpu::kernels::{self, triangle_row, Rows, TokenBlocks, TOKEN_BLOCK};
use rayon::prelude::*;

use super::gemm::View;
use super::{for_overwrite, isa, zeroed};

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
/// which the backward needs, both from `for_overwrite`.
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    forward_as(q, k, v, s, by_blocks(s.head_size))
}

/// `attention_forward` by query blocks or by positions, as `blocks` says.
fn forward_as(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttentionShape,
    blocks: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (qw, kw, t_len) = (s.q_width(), s.kv_width(), s.seq_len);
    // Both forms write every value of both.
    let mut out = for_overwrite(q.len());
    let mut probs = for_overwrite(s.probs_len());
    let sequences = out
        .par_chunks_mut(t_len * qw)
        .zip(probs.par_chunks_mut(s.probs_per_sequence()))
        .zip(
            q.par_chunks(t_len * qw)
                .zip(k.par_chunks(t_len * kw).zip(v.par_chunks(t_len * kw))),
        );
    sequences
        .for_each(|((out, probs), (q, (k, v)))| sequence_forward(out, probs, (q, k, v), s, blocks));
    (out, probs)
}

/// One sequence of `attention_forward`: `out` `[T][Hq * hs]`, `probs`
/// `[Hq][triangle_row(T)]`, `q` `[T][Hq * hs]`, `k` and `v` `[T][Hkv * hs]`.
/// Each head runs by query blocks when `blocks`, else position by
/// position.
fn sequence_forward(
    out: &mut [f32],
    probs: &mut [f32],
    (q, k, v): (&[f32], &[f32], &[f32]),
    s: AttentionShape,
    blocks: bool,
) {
    let (hs, t_len) = (s.head_size, s.seq_len);
    // Both forms read the head's keys transposed, `[hs][T]`.
    let mut kt = vec![0f32; hs * t_len];
    let mut form = HeadForm::new(s, blocks);
    for (h, head_probs) in probs.chunks_exact_mut(triangle_row(t_len)).enumerate() {
        if h == 0 || s.kv_offset(h) != s.kv_offset(h - 1) {
            transpose_head(k, s, h, &mut kt);
            if let HeadForm::Positions { vt } = &mut form {
                transpose_head(v, s, h, vt);
            }
        }
        let head = Head { s, h, q, kt: &kt };
        match &mut form {
            HeadForm::Blocks(scratch) => head.forward_by_blocks(scratch, v, head_probs, out),
            HeadForm::Positions { vt } => head.forward_by_positions(vt, head_probs, out),
        }
    }
}

/// Whether heads of `hs` values attend by query blocks through the batch
/// tiles: their reduction over `hs` must be long enough to pay for a
/// tile's stores (stories260K's heads of 8 ran slower so).
fn by_blocks(hs: usize) -> bool {
    hs >= MIN_BLOCK_HEAD && kernels::takes_token_blocks(isa(), QUERY_BLOCK)
}

/// Narrowest head attended by query blocks.
const MIN_BLOCK_HEAD: usize = 16;

/// Queries attended together in the block form: two token blocks, the
/// width of the AVX-512 batch tile (16 would leave half of each empty).
const QUERY_BLOCK: usize = 2 * TOKEN_BLOCK;

/// How one sequence's heads run, with each form's buffers.
enum HeadForm {
    /// By query blocks, as batch products.
    Blocks(BlockScratch),
    /// Position by position, with the head's values transposed `[hs][T]`.
    Positions { vt: Vec<f32> },
}

impl HeadForm {
    fn new(s: AttentionShape, blocks: bool) -> Self {
        if blocks {
            HeadForm::Blocks(BlockScratch::default())
        } else {
            HeadForm::Positions {
                vt: vec![0f32; s.head_size * s.seq_len],
            }
        }
    }
}

/// The block form's buffers for one query block.
#[derive(Default)]
struct BlockScratch {
    /// The block's queries (or output gradients) in token blocks, `hs`
    /// columns.
    x: TokenBlocks,
    /// Its scores, then probabilities (or their gradients), row-major
    /// `[queries][keys]`, the keys `0..` the block's last position.
    rows: Vec<f32>,
    /// `rows` laid out in token blocks, `keys` columns.
    blocks: TokenBlocks,
}

/// Query head `h` of one sequence, with its kv head's keys transposed.
struct Head<'a> {
    s: AttentionShape,
    h: usize,
    /// `[T][Hq * hs]`.
    q: &'a [f32],
    /// `[hs][T]`; not filled in for the block form's backward, which reads
    /// the keys in place.
    kt: &'a [f32],
}

impl Head<'_> {
    /// The softmax scale, `1 / sqrt(hs)`.
    fn scale(&self) -> f32 {
        1.0 / (self.s.head_size as f32).sqrt()
    }

    /// Where this head's values start in a token's `[Hq * hs]` row.
    fn column(&self) -> usize {
        self.h * self.s.head_size
    }

    /// The query blocks `t0..t1` of the sequence.
    fn query_blocks(&self) -> impl Iterator<Item = Range<usize>> {
        let t_len = self.s.seq_len;
        (0..t_len)
            .step_by(QUERY_BLOCK)
            .map(move |t0| t0..(t0 + QUERY_BLOCK).min(t_len))
    }

    /// The head's output by query blocks: per block of queries `t0..t1`,
    /// the scores against keys `0..t1` as one product with the transposed
    /// keys, the causal softmax of each row (kept in `probs`), and the
    /// output as one product of the probabilities with the values, read in
    /// place as a matrix stored by columns.
    fn forward_by_blocks(
        &self,
        sc: &mut BlockScratch,
        v: &[f32],
        probs: &mut [f32],
        out: &mut [f32],
    ) {
        let (s, isa) = (self.s, isa());
        let (hs, qw, col) = (s.head_size, s.q_width(), self.column());
        let values = (&v[s.kv_offset(self.h)..], s.kv_width());
        for block in self.query_blocks() {
            let (t0, keys) = (block.start, block.end);
            View::rows(self.q, qw).pack_blocks(isa, block.clone(), col..col + hs, &mut sc.x);
            let scale = self.scale();
            sc.x.data.iter_mut().for_each(|v| *v *= scale);
            sc.rows.resize(block.len() * keys, 0.0);
            kernels::float_product_by_columns(
                isa,
                (self.kt, s.seq_len),
                &sc.x,
                0..keys,
                &mut sc.rows,
                keys,
            );
            for (i, row) in sc.rows.chunks_exact_mut(keys).enumerate() {
                let (seen, later) = row.split_at_mut(t0 + i + 1);
                kernels::softmax(isa, seen);
                later.fill(0.0);
                probs[triangle_row(t0 + i)..][..seen.len()].copy_from_slice(seen);
            }
            View::rows(&sc.rows, keys).pack_blocks(isa, 0..block.len(), 0..keys, &mut sc.blocks);
            let out = &mut out[t0 * qw + col..];
            kernels::float_product_by_columns(isa, values, &sc.blocks, 0..hs, out, qw);
        }
    }

    /// The head's output position by position. Heads are narrow (8 values
    /// in stories260K), so the vector work runs along positions: with the
    /// keys and values transposed to `[hs][T]`, one query's scores are a
    /// weighted sum of the `hs` key rows over positions `0..=t` (one pass,
    /// sums in registers), and its output the `hs` dot products of its
    /// probabilities with the value rows.
    fn forward_by_positions(&self, vt: &[f32], probs: &mut [f32], out: &mut [f32]) {
        let (s, isa) = (self.s, isa());
        let (hs, qw, t_len, col) = (s.head_size, s.q_width(), s.seq_len, self.column());
        let scale = self.scale();
        let mut scaled_q = vec![0f32; hs];
        for t in 0..t_len {
            let n = t + 1;
            let (keys, values) = (
                Rows::new(self.kt, t_len, n, hs),
                Rows::new(vt, t_len, n, hs),
            );
            let p = &mut probs[triangle_row(t)..][..n];
            let qt = &self.q[t * qw + col..][..hs];
            scaled_q
                .iter_mut()
                .zip(qt)
                .for_each(|(c, &qd)| *c = qd * scale);
            kernels::weighted_sum(isa, p, &scaled_q, keys);
            kernels::softmax(isa, p);
            dots(&mut out[t * qw + col..][..hs], p, values);
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
    backward_as(dout, (q, k, v), probs, s, by_blocks(s.head_size))
}

/// `attention_backward` by query blocks or by positions, as `blocks` says.
fn backward_as(
    dout: &[f32],
    (q, k, v): (&[f32], &[f32], &[f32]),
    probs: &[f32],
    s: AttentionShape,
    blocks: bool,
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
            let g = SequenceGrads { dq, dk, dv };
            sequence_backward(g, dout, (q, k, v), probs, s, blocks)
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
/// `sequence_forward`: per head, the score gradients and `dq` (by query
/// blocks or by positions, as the forward ran), then the key and value
/// gradients, gathered transposed (`[hs][T]`), as two triangle products
/// before they are added back.
fn sequence_backward(
    g: SequenceGrads,
    dout: &[f32],
    (q, k, v): (&[f32], &[f32], &[f32]),
    probs: &[f32],
    s: AttentionShape,
    blocks: bool,
) {
    let (hs, t_len) = (s.head_size, s.seq_len);
    let [mut kt, mut vt, mut dkt, mut dvt] = [(); 4].map(|_| vec![0f32; hs * t_len]);
    // dS of one head, laid out as its probabilities.
    let mut dscores = vec![0f32; triangle_row(t_len)];
    let mut scratch = blocks.then(BlockScratch::default);
    for (h, head_probs) in probs.chunks_exact(triangle_row(t_len)).enumerate() {
        // The block form reads the keys in place.
        if !blocks {
            transpose_head(k, s, h, &mut kt);
        }
        transpose_head(v, s, h, &mut vt);
        dkt.fill(0.0);
        dvt.fill(0.0);
        let head = Head { s, h, q, kt: &kt };
        let grads = (&mut dscores[..], &mut *g.dq);
        match &mut scratch {
            Some(sc) => head.score_grads_by_blocks(sc, (dout, &vt, k), head_probs, grads),
            None => head.score_grads_by_positions((dout, &vt), head_probs, grads),
        }
        // dv^T += dout^T P and dk^T += q^T dS: one sweep of each triangle.
        let (dout_h, q_h) = (head_rows(dout, s, h), head_rows(q, s, h));
        kernels::triangle_product_add(isa(), head_probs, dout_h, &mut dvt, t_len);
        kernels::triangle_product_add(isa(), &dscores, q_h, &mut dkt, t_len);
        add_head(&dkt, s, h, g.dk);
        add_head(&dvt, s, h, g.dv);
    }
}

impl Head<'_> {
    /// `dP = dout · v` and from it `dS` (`softmax_grad`) into `dscores`
    /// (laid out as `probs`), and `dq = dS k`, by query blocks as
    /// `forward_by_blocks` runs: `dP` as one product with the transposed
    /// values `vt` `[hs][T]`, `dq` as one with the keys read in place.
    fn score_grads_by_blocks(
        &self,
        sc: &mut BlockScratch,
        (dout, vt, k): (&[f32], &[f32], &[f32]),
        probs: &[f32],
        (dscores, dq): (&mut [f32], &mut [f32]),
    ) {
        let (s, isa) = (self.s, isa());
        let (hs, qw, col) = (s.head_size, s.q_width(), self.column());
        let keys_by_columns = (&k[s.kv_offset(self.h)..], s.kv_width());
        for block in self.query_blocks() {
            let (t0, keys) = (block.start, block.end);
            View::rows(dout, qw).pack_blocks(isa, block.clone(), col..col + hs, &mut sc.x);
            sc.rows.resize(block.len() * keys, 0.0);
            kernels::float_product_by_columns(
                isa,
                (vt, s.seq_len),
                &sc.x,
                0..keys,
                &mut sc.rows,
                keys,
            );
            for (i, row) in sc.rows.chunks_exact_mut(keys).enumerate() {
                let t = t0 + i;
                let (seen, later) = row.split_at_mut(t + 1);
                softmax_grad(seen, &probs[triangle_row(t)..][..t + 1], self.scale());
                later.fill(0.0);
                dscores[triangle_row(t)..][..t + 1].copy_from_slice(seen);
            }
            View::rows(&sc.rows, keys).pack_blocks(isa, 0..block.len(), 0..keys, &mut sc.blocks);
            let dq = &mut dq[t0 * qw + col..];
            kernels::float_product_by_columns(isa, keys_by_columns, &sc.blocks, 0..hs, dq, qw);
        }
    }

    /// `score_grads_by_blocks` position by position: per query, a weighted
    /// sum of the transposed value rows (`dP`) and dot products with the
    /// transposed key rows (`dq`).
    fn score_grads_by_positions(
        &self,
        (dout, vt): (&[f32], &[f32]),
        probs: &[f32],
        (dscores, dq): (&mut [f32], &mut [f32]),
    ) {
        let (s, isa) = (self.s, isa());
        let (hs, qw, t_len, col) = (s.head_size, s.q_width(), s.seq_len, self.column());
        for t in 0..t_len {
            let n = t + 1;
            let (keys, values) = (
                Rows::new(self.kt, t_len, n, hs),
                Rows::new(vt, t_len, n, hs),
            );
            let ds = &mut dscores[triangle_row(t)..][..n];
            kernels::weighted_sum(isa, ds, &dout[t * qw + col..][..hs], values);
            softmax_grad(ds, &probs[triangle_row(t)..][..n], self.scale());
            dots(&mut dq[t * qw + col..][..hs], ds, keys);
        }
    }
}

/// The softmax backward of one query's row, in place: `dp` (the gradient
/// of its probabilities `p`) becomes that of its scaled scores, `p * (dp -
/// p · dp) * scale`.
fn softmax_grad(dp: &mut [f32], p: &[f32], scale: f32) {
    let weighted = dot(p, dp);
    for (d, &a) in dp.iter_mut().zip(p) {
        *d = a * (*d - weighted) * scale;
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
    fn query_blocks_match_positions() {
        // Two whole query blocks and a short one, heads wide enough for the
        // block form, grouped kv heads.
        let s = AttentionShape {
            batch: 2,
            seq_len: 2 * QUERY_BLOCK + 6,
            n_heads: 4,
            n_kv_heads: 2,
            head_size: 16,
        };
        let rows = s.batch * s.seq_len;
        let q = random(rows * s.q_width(), 8, 1.0);
        let k = random(rows * s.kv_width(), 9, 1.0);
        let v = random(rows * s.kv_width(), 10, 1.0);
        let dout = random(q.len(), 11, 1.0);
        let run = |blocks| {
            let (out, probs) = forward_as(&q, &k, &v, s, blocks);
            let (dq, dk, dv) = backward_as(&dout, (&q, &k, &v), &probs, s, blocks);
            [out, probs, dq, dk, dv]
        };
        let (by_blocks, by_positions) = (run(true), run(false));
        let names = ["out", "probs", "dq", "dk", "dv"];
        for ((name, got), want) in names.iter().zip(&by_blocks).zip(&by_positions) {
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{name}: first mismatch at {i}: blocks {g}, positions {w}"
                );
            }
        }
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
