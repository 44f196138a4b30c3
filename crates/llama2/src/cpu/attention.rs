//! The CPU backend's attention half: each sequence's KV cache, laid out
//! head by head so each KV head's keys and values are contiguous runs, and
//! rotary embedding plus causal attention for a batch of segments (one
//! sequence's prompt, or one row per running sequence of a server). A
//! batch's attention is split into (segment, block of queries, heads)
//! tasks that run across the team: a single row's heads a thread's share
//! per task, or all of them when many sequences decode together, each KV
//! head's run read once for the query heads that share it; blocks of a
//! prompt's queries (16 at AVX2, 32 at AVX-512) one head per task, as
//! whole-block products where the level has them
//! (`kernels::attends_by_blocks`), else blocks of up to four in dot form.
//!
//! Both forms round every value as decoding one token does, so a prompt's
//! attention is the same bits however it is batched: an int8 model's
//! prompt logits are the same fed at once or one token at a time (its
//! products are exact integer sums; the golden tests hold it to that).
//!
//! A cache stores f32, or f16 when asked (`KvDtype`): half the bytes per
//! position, rounded once as they are stored. Decode reads f16 rows
//! directly (the dot-form kernels widen them in registers); a prompt block
//! widens its head's rows into scratch once for all its queries.
//!
//! It is deliberately not a shared page table: each sequence reserves
//! address space for its whole context and the operating system commits
//! pages only as positions are written (`Store`), so a cache costs the
//! memory of its positions, never moves, and every head's run has a fixed
//! place the kernels stream from.

use bytemuck::Pod;
use half::f16;
use half::slice::HalfFloatSliceExt;
use memmap2::MmapMut;

use super::kernels::{self, Isa, KvRows, Rows, TokenBlocks, TOKEN_BLOCK};
use super::team::Team;
use super::{grow_to, PARALLEL_WORK};
use crate::backend::{KvDtype, Segment};
use crate::config::Config;
use crate::error::{Error, Result};

/// Queries of one head scored together in dot form, so each key and value
/// row is loaded once per block (the vector kernels' widest).
const QUERY_BLOCK: usize = 4;
/// Decoded rows per thread from which each row's attention is one task of
/// all its heads rather than one task per thread's share of them: a row's
/// runs are then read by one core, and there are a thread's share fewer
/// tasks (stories15M q8, 16 sequences on Zen 4, when positions still held
/// their heads side by side: +10% per step). With fewer rows the shares
/// keep the threads even.
const WHOLE_ROWS_PER_THREAD: usize = 4;
/// Positions the server counts KV memory in: a cache's memory grows as
/// its positions fill pages (a 4 KiB page holds 16 positions of a head of
/// 64 f32 values).
pub const KV_BLOCK: usize = 16;

/// The values of one sequence's cache, all layers, in the cache's storage
/// type: `[L][keys, values][KV heads][seq_len][hs]`. Each head's keys (and
/// values) are one contiguous run of the whole context, so a decoded row's
/// attention streams every head it takes from its own run: with heads side
/// by side in each position (`[positions][KV]`), two threads sharing a row's
/// heads each read 1 KiB of every 2 KiB, and that pattern streamed at about
/// two thirds of the bandwidth of contiguous runs on a Zen 3 EPYC (a
/// stories42M decode at position 255 attended 1.35-1.5x faster laid out by
/// heads).
///
/// The runs are reserved for the whole context in one anonymous map, which
/// the operating system backs with memory only as positions are written:
/// a sequence holds the pages its positions fill (16 positions of 64 f32
/// values to a 4 KiB page), not its context, and never moves as it grows.
struct Store<T> {
    map: MmapMut,
    _type: std::marker::PhantomData<T>,
}

impl<T: Pod> Store<T> {
    fn new(values: usize) -> Result<Self> {
        // A map cannot be empty: a cache of no values still holds one.
        let bytes = values.max(1) * std::mem::size_of::<T>();
        let map = MmapMut::map_anon(bytes).map_err(|e| {
            Error::Backend(format!(
                "cannot reserve {bytes} bytes of address space for a KV cache: {e}"
            ))
        })?;
        Ok(Store {
            map,
            _type: std::marker::PhantomData,
        })
    }

    fn values(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[..])
    }

    fn values_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[..])
    }
}

/// A cache's store in its storage type.
enum Values {
    F32(Store<f32>),
    F16(Store<f16>),
}

/// The key and value caches of one sequence, all layers.
pub struct CpuKvCache {
    values: Values,
    layout: Layout,
}

/// Where a cache's values lie in its store.
#[derive(Clone, Copy)]
struct Layout {
    kv: usize,
    hs: usize,
    /// The model's context: no cache grows past it.
    seq_len: usize,
}

impl Layout {
    /// Where KV head `h`'s run of keys (`which` 0) or values (1) of `layer`
    /// starts.
    fn run(&self, layer: usize, which: usize, h: usize) -> usize {
        ((layer * 2 + which) * (self.kv / self.hs) + h) * self.seq_len * self.hs
    }

    /// Puts `k` and `v` `[rows][KV]` at positions `pos0..` of `layer` in
    /// `store`, each head's part of a row into its run; `put` converts.
    fn scatter<T>(
        &self,
        store: &mut [T],
        (layer, pos0): (usize, usize),
        (k, v): (&[f32], &[f32]),
        put: fn(&mut [T], &[f32]),
    ) {
        let (kv, hs) = (self.kv, self.hs);
        for (which, rows) in [k, v].into_iter().enumerate() {
            for (r, row) in rows.chunks_exact(kv).enumerate() {
                for (h, part) in row.chunks_exact(hs).enumerate() {
                    let at = self.run(layer, which, h) + (pos0 + r) * hs;
                    put(&mut store[at..at + hs], part);
                }
            }
        }
    }
}

impl CpuKvCache {
    /// Caches in `dtype` for the whole context, refused up front when the
    /// whole context's would not fit in memory (every cache may grow that
    /// far). Only address space is taken until positions are stored, so
    /// there is nothing to size by the positions a caller expects.
    pub(super) fn new(c: &Config, dtype: KvDtype) -> Result<Self> {
        c.check_kv_cache_fits()?;
        let values = 2 * c.n_layers * c.seq_len * c.kv_dim();
        let values = match dtype {
            KvDtype::F32 => Values::F32(Store::new(values)?),
            KvDtype::F16 => Values::F16(Store::new(values)?),
        };
        let layout = Layout {
            kv: c.kv_dim(),
            hs: c.head_size(),
            seq_len: c.seq_len,
        };
        Ok(CpuKvCache { values, layout })
    }

    /// Stores `k` and `v` `[rows][KV]` at `pos0..` of `layer`.
    fn store(&mut self, layer: usize, pos0: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let l = self.layout;
        let end = pos0 + k.len() / l.kv;
        if end > l.seq_len {
            return Err(Error::Backend(format!(
                "attention at position {} past the context of {}",
                end - 1,
                l.seq_len
            )));
        }
        let at = (layer, pos0);
        match &mut self.values {
            Values::F32(s) => l.scatter(s.values_mut(), at, (k, v), |d, s| d.copy_from_slice(s)),
            Values::F16(s) => l.scatter(s.values_mut(), at, (k, v), |d, s| {
                d.convert_from_f32_slice(s)
            }),
        }
        Ok(())
    }

    /// KV head `h`'s keys and values of `layer` at positions `0..n`.
    fn head(&self, layer: usize, h: usize, n: usize) -> (KvRows<'_>, KvRows<'_>) {
        let l = self.layout;
        let runs = (l.run(layer, 0, h), l.run(layer, 1, h));
        match &self.values {
            Values::F32(s) => runs_from(s.values(), runs, l.hs, n),
            Values::F16(s) => runs_from(s.values(), runs, l.hs, n),
        }
    }
}

/// The first `n` rows of `hs` values of the runs starting at `k` and `v`
/// in `all`.
fn runs_from<'a, T>(
    all: &'a [T],
    (k, v): (usize, usize),
    hs: usize,
    n: usize,
) -> (KvRows<'a>, KvRows<'a>)
where
    Rows<'a, T>: Into<KvRows<'a>>,
{
    let rows = |at: usize| Rows::new(&all[at..], hs, hs, n).into();
    (rows(k), rows(v))
}

// ----------------------------------------------------------------------------
// Rotary embedding

/// Rotary factors `(cos, sin)` `[position][head_size / 2]` for the positions
/// seen so far: the same values for every layer, head and sequence, so
/// computed once instead of a `powf` and `sin_cos` per pair and layer.
#[derive(Default)]
pub(super) struct RopeTable {
    factors: Vec<(f32, f32)>,
    /// The prepared model's rotary frequencies `[head_size / 2]`.
    freqs: Vec<f32>,
}

impl RopeTable {
    pub(super) fn new(freqs: Vec<f32>) -> Self {
        RopeTable {
            factors: Vec::new(),
            freqs,
        }
    }

    /// Rotates the rows of `q` `[rows][D]` and `k` `[rows][KV]` of every
    /// segment by their positions.
    pub(super) fn apply(
        &mut self,
        (q, k): (&mut [f32], &mut [f32]),
        segments: &[Segment],
        c: &Config,
    ) -> Result<()> {
        let (d, kv, half) = (c.dim, c.kv_dim(), c.head_size() / 2);
        if self.freqs.len() != half {
            return Err(Error::Backend(format!(
                "rope for head size {} on a backend prepared for {}",
                c.head_size(),
                2 * self.freqs.len()
            )));
        }
        let end = segments.iter().map(|s| s.pos0 + s.rows.len()).max();
        self.extend_to(end.unwrap_or(0), half);
        for s in segments {
            for (i, r) in s.rows.clone().enumerate() {
                let f = &self.factors[(s.pos0 + i) * half..][..half];
                rotate(&mut q[r * d..(r + 1) * d], f);
                rotate(&mut k[r * kv..(r + 1) * kv], f);
            }
        }
        Ok(())
    }

    fn extend_to(&mut self, positions: usize, half: usize) {
        let have = self.factors.len() / half.max(1);
        for pos in have..positions {
            // The factors exactly as `reference::rope` computes them.
            self.factors.extend(self.freqs.iter().map(|&freq| {
                let (fci, fcr) = (pos as f32 * freq).sin_cos();
                (fcr, fci)
            }));
        }
    }
}

/// Rotates each pair `(v[i], v[i + 1])` of every head of one token by the
/// factors `f` `[head_size / 2]`, as `reference::rope` does.
fn rotate(v: &mut [f32], f: &[(f32, f32)]) {
    for head in v.chunks_exact_mut(2 * f.len()) {
        for (p, &(fcr, fci)) in head.chunks_exact_mut(2).zip(f) {
            let (v0, v1) = (p[0], p[1]);
            p[0] = v0 * fcr - v1 * fci;
            p[1] = v0 * fci + v1 * fcr;
        }
    }
}

// ----------------------------------------------------------------------------
// Attention

/// One task of a batch's attention: some heads (one of a prompt's block,
/// a thread's share or all of a single row) of a block of consecutive
/// rows of one segment, at most
/// `kernels::attention_block_queries` attended by blocks or `QUERY_BLOCK`
/// in dot form.
#[derive(Clone)]
struct Task {
    segment: usize,
    rows: std::ops::Range<usize>,  // rows of the batch
    heads: std::ops::Range<usize>, // query heads
}

/// What attention reads, shared by all of a batch's tasks.
pub(super) struct Inputs<'a> {
    pub q: &'a [f32], // [rows][D]
    pub k: &'a [f32], // [rows][KV]
    pub v: &'a [f32], // [rows][KV]
}

/// Stores each segment's keys and values in its cache, then computes
/// causal attention of every row over its own sequence's positions
/// `0..=pos` into `out` `[rows][D]`. `scratch` is reused between calls.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(
    (team, threads, isa): (&Team, usize, Isa),
    scratch: &mut Vec<f32>,
    out: &mut [f32],
    inputs: Inputs<'_>,
    caches: &mut [&mut CpuKvCache],
    layer: usize,
    segments: &[Segment],
    c: &Config,
) -> Result<()> {
    let (d, kv, hs) = (c.dim, c.kv_dim(), c.head_size());
    for (s, cache) in segments.iter().zip(caches.iter_mut()) {
        let rows = s.rows.start * kv..s.rows.end * kv;
        cache.store(layer, s.pos0, &inputs.k[rows.clone()], &inputs.v[rows])?;
    }
    let tasks = tasks(segments, (c.n_heads, c.kv_group(), hs), isa, threads);
    let span = segments.iter().map(|s| s.pos0 + s.rows.len()).max();
    let span = span.unwrap_or(0);
    let work: usize = segments
        .iter()
        .map(|s| s.rows.len() * (s.pos0 + s.rows.len()))
        .sum::<usize>()
        * c.n_heads
        * hs
        * 2;
    // Each task's outputs `[heads][rows][hs]` (a block of one head, or one
    // row of some or all heads), then its scores: `[QUERY_BLOCK][span]` in dot
    // form, reused head after head, or a row's `[heads][span]`.
    let out_len = kernels::attention_block_queries(isa).max(c.n_heads) * hs;
    let task_len = out_len + QUERY_BLOCK.max(c.n_heads) * span;
    let scratch = grow_to(scratch, tasks.len() * task_len);
    let caches = &*caches;
    let scale = (hs as f32).sqrt();
    let attend_head = |(segment, rows, head): (usize, std::ops::Range<usize>, usize),
                       (o, att): (&mut [f32], &mut [f32])| {
        let seg = &segments[segment];
        // Keys the block's last query sees; earlier queries get zero
        // weight on the later ones, which keeps the sums exactly as if
        // they were not there.
        let first = seg.pos0 + rows.start - seg.rows.start;
        let n = first + rows.len();
        let queries = Rows::new(&inputs.q[rows.start * d + head * hs..], d, hs, rows.len());
        let (keys, values) = caches[segment].head(layer, head / c.kv_group(), n);
        if rows.len() > QUERY_BLOCK {
            attend_block(isa, o, (queries, keys, values), first, scale);
        } else {
            attend_dots(isa, (o, att), (queries, keys, values), first, scale);
        }
    };
    // Heads `heads` (whole KV groups) of one row: each KV head's run of
    // keys and values read once for the query heads that share it, up to
    // `QUERY_BLOCK` at a time, scored over all `n` positions.
    let attend_row = |(segment, row): (usize, usize),
                      heads: std::ops::Range<usize>,
                      (o, att): (&mut [f32], &mut [f32])| {
        let seg = &segments[segment];
        let n = seg.pos0 + row - seg.rows.start + 1;
        let group = c.kv_group();
        let mut h = heads.start;
        while h < heads.end {
            let count = (group - h % group).min(QUERY_BLOCK).min(heads.end - h);
            let (keys, values) = caches[segment].head(layer, h / group, n);
            let queries = Rows::new(&inputs.q[row * d + h * hs..], hs, hs, count);
            let att = &mut att[..count * n];
            kernels::attention_scores(isa, att, queries, keys, scale);
            for att in att.chunks_exact_mut(n) {
                kernels::softmax(isa, att);
            }
            let o = &mut o[(h - heads.start) * hs..][..count * hs];
            kernels::weighted_sum(isa, o, att, values);
            h += count;
        }
    };
    let run = |i: usize, s: &mut [f32]| {
        let Task {
            segment,
            rows,
            heads,
        } = tasks[i].clone();
        let (o, att) = s.split_at_mut(out_len);
        if rows.len() == 1 {
            return attend_row((segment, rows.start), heads, (o, att));
        }
        for (head, o) in heads.zip(o.chunks_exact_mut(rows.len() * hs)) {
            attend_head((segment, rows.clone(), head), (o, &mut *att));
        }
    };
    if work < PARALLEL_WORK || threads == 1 {
        for (i, s) in scratch.chunks_mut(task_len).enumerate() {
            run(i, s);
        }
    } else {
        team.for_each_chunk(scratch, task_len, run);
    }
    for (t, s) in tasks.iter().zip(scratch.chunks(task_len)) {
        let per_head = s[..out_len].chunks_exact(t.rows.len() * hs);
        for (head, outs) in t.heads.clone().zip(per_head) {
            for (r, o) in t.rows.clone().zip(outs.chunks_exact(hs)) {
                out[r * d + head * hs..][..hs].copy_from_slice(o);
            }
        }
    }
    Ok(())
}

thread_local! {
    /// Per worker, for `attend_block`: its queries in token blocks
    /// `[blocks][hs][TOKEN_BLOCK]`, and its scores, then probabilities, as
    /// token blocks whose columns are the keys `[blocks][keys][TOKEN_BLOCK]`.
    static BLOCK_SCRATCH: std::cell::RefCell<(Vec<f32>, TokenBlocks)> = Default::default();
    /// Per worker, for `attend_block` over an f16 cache: the head's keys and
    /// values widened to f32 `[keys][hs]` each. A block of 16 or 32 queries
    /// shares the one conversion.
    static WIDE_KV: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = Default::default();
}

/// One head's attention for a block of up to
/// `kernels::attention_block_queries` queries, the first at position
/// `first`, over the keys and values of positions `0..first + queries`,
/// into `out` `[queries][hs]`: per token block of 16 queries the scores as
/// a batch product and the causal softmax down each query's lane, then
/// the weighted sum of the values as one batch product over all of them.
fn attend_block(
    isa: Isa,
    out: &mut [f32],
    (queries, keys, values): (Rows, KvRows, KvRows),
    first: usize,
    scale: f32,
) {
    WIDE_KV.with_borrow_mut(|(wk, wv)| {
        keys.as_f32(wk, |keys| {
            values.as_f32(wv, |values| {
                attend_block_f32(isa, out, (queries, keys, values), first, scale)
            })
        })
    })
}

/// `attend_block` over f32 keys and values.
fn attend_block_f32(
    isa: Isa,
    out: &mut [f32],
    (queries, keys, values): (Rows, Rows, Rows),
    first: usize,
    scale: f32,
) {
    let (hs, count, n) = (queries.width(), queries.count(), keys.count());
    let blocks = count.div_ceil(TOKEN_BLOCK);
    BLOCK_SCRATCH.with_borrow_mut(|(q, probs)| {
        let q = grow_to(q, blocks * hs * TOKEN_BLOCK);
        (probs.n, probs.cols) = (count, n);
        let att = grow_to(&mut probs.data, blocks * n * TOKEN_BLOCK);
        let block_queries = q.chunks_exact_mut(hs * TOKEN_BLOCK);
        for (b, (q, att)) in block_queries
            .zip(att.chunks_exact_mut(n * TOKEN_BLOCK))
            .enumerate()
        {
            let t0 = b * TOKEN_BLOCK;
            let rows = &queries.data()[t0 * queries.stride()..];
            let layout = (queries.stride(), (count - t0).min(TOKEN_BLOCK), hs);
            kernels::pack_token_block(isa, rows, layout, q);
            kernels::scores_by_block(isa, att, q, keys);
            kernels::softmax_by_block(isa, att, first + t0, scale);
        }
        let values_by_columns = (values.data(), values.stride());
        kernels::float_product_by_columns(isa, values_by_columns, probs, 0..hs, out, hs);
    })
}

/// `attend_block` for up to `QUERY_BLOCK` queries in dot form, their
/// scores `[queries][keys]` in `att`.
fn attend_dots(
    isa: Isa,
    (out, att): (&mut [f32], &mut [f32]),
    (queries, keys, values): (Rows, KvRows, KvRows),
    first: usize,
    scale: f32,
) {
    let n = keys.count();
    let att = &mut att[..queries.count() * n];
    kernels::attention_scores(isa, att, queries, keys, scale);
    for (r, att) in att.chunks_exact_mut(n).enumerate() {
        let (seen, later) = att.split_at_mut(first + r + 1);
        kernels::softmax(isa, seen);
        later.fill(0.0);
    }
    kernels::weighted_sum(isa, out, att, values);
}

/// The tasks of a batch, those that see the most keys first so the cheap
/// ones even out the end. A single row's heads go in `threads` shares of
/// whole KV groups (all of them with enough decoded rows); a block of a
/// prompt's queries takes one head.
fn tasks(
    segments: &[Segment],
    (heads, group, hs): (usize, usize, usize),
    isa: Isa,
    threads: usize,
) -> Vec<Task> {
    let decoded = segments.iter().filter(|s| s.rows.len() == 1).count();
    let whole_rows = decoded >= WHOLE_ROWS_PER_THREAD * threads;
    let share = heads.div_ceil(threads.max(1)).next_multiple_of(group);
    let mut blocks: Vec<(usize, usize, std::ops::Range<usize>)> = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        let mut start = s.rows.start;
        while start < s.rows.end {
            let left = (s.rows.end - start).min(kernels::attention_block_queries(isa));
            let size = match kernels::attends_by_blocks(isa, left, hs) {
                true => left,
                false => left.min(QUERY_BLOCK),
            };
            let rows = start..start + size;
            let seen = s.pos0 + rows.end - s.rows.start;
            blocks.push((seen, i, rows.clone()));
            start = rows.end;
        }
    }
    blocks.sort_by_key(|b| std::cmp::Reverse(b.0));
    blocks
        .into_iter()
        .flat_map(|(_, segment, rows)| {
            let step = match (rows.len(), whole_rows) {
                (1, true) => heads,
                (1, false) => share,
                _ => 1,
            };
            (0..heads).step_by(step).map(move |head| Task {
                segment,
                rows: rows.clone(),
                heads: head..(head + step).min(heads),
            })
        })
        .collect()
}
