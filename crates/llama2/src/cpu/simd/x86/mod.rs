//! x86-64 kernels: AMX, AVX-512 (with VNNI) and AVX2 levels, detected at
//! run time. This file maps an `Isa` and a weight type to the right tile and
//! sweeps the tile over a range of weight rows; the tiles themselves live in
//! `amx.rs`, `avx512.rs` and `avx2.rs`. The AMX level is the AVX-512 level
//! with batched packed Q8_0 products on the tile unit. Every op has a
//! kernel at each level, so forcing a narrower level times that level's
//! whole forward pass.

mod amx;
mod avx2;
mod avx512;

use std::arch::x86_64::__m512;
use std::ops::Range;

use half::{bf16, f16};

use super::super::kernels::{
    sweep, Isa, KvRows, Level, Q8Acts, Rows, TokenBlocks, WeightRows, TOKEN_BLOCK,
};
use super::super::packed::{PackedQ8, Q8Bytes, BLOCK_ROWS};

/// Quantized activations as the Q8 tiles read them.
pub struct Q8Tokens<'a> {
    /// Values `[tokens][cols]`.
    pub xq: &'a [i8],
    /// Scales `[groups][tokens]`, token-minor so a tile loads them together.
    pub xs_t: &'a [f32],
    /// `128 * sum(group)` `[groups][tokens]`: what AVX-512's unsigned
    /// weights add.
    pub xc_t: &'a [i32],
    /// Token count of the transposed arrays (a multiple of 4).
    pub tokens: usize,
}

/// Whether this CPU runs `level`'s kernels. AVX-512 here means F, BW, VL and
/// VNNI together (Ice Lake and later, Zen 4); older AVX-512 parts use AVX2.
pub fn supported(level: Level) -> bool {
    match level {
        Level::Scalar => true,
        Level::Avx2 => {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        Level::AvxVnni => supported(Level::Avx2) && is_x86_feature_detected!("avxvnni"),
        Level::Avx512 => {
            supported(Level::Avx2)
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        Level::Amx => supported(Level::Avx512) && amx::available(),
        Level::Neon => false,
    }
}

/// Whether `isa` runs the AVX-512 kernels (AMX implies them).
fn wide(isa: Isa) -> bool {
    matches!(isa.level(), Level::Avx512 | Level::Amx)
}

/// The level whose float kernels `isa` runs: AMX runs AVX-512's, AVX-VNNI
/// AVX2's (the two add int8 products only).
fn float_level(isa: Isa) -> Level {
    match isa.level() {
        Level::Amx => Level::Avx512,
        Level::AvxVnni => Level::Avx2,
        level => level,
    }
}

pub fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> Option<f32> {
    match float_level(isa) {
        // SAFETY: an `Isa` only holds a level `supported` confirmed; `Amx`
        // includes `Avx512` and `AvxVnni` includes `Avx2`.
        Level::Avx512 => Some(unsafe { avx512::dot_f32(a, b) }),
        // SAFETY: as above.
        Level::Avx2 => Some(unsafe { avx2::dot_f32(a, b) }),
        _ => None,
    }
}

pub fn axpy(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) -> bool {
    match float_level(isa) {
        // SAFETY: an `Isa` only holds a level `supported` confirmed; `Amx`
        // includes `Avx512` and `AvxVnni` includes `Avx2`.
        Level::Avx512 => unsafe { avx512::axpy(y, a, x) },
        // SAFETY: as above.
        Level::Avx2 => unsafe { avx2::axpy(y, a, x) },
        _ => return false,
    }
    true
}

/// A level's f32 product tile (`R` rows against `T` tokens), so that the
/// loops around it are written once. Implementations are `inline(always)`
/// wrappers of the level's `#[target_feature]` tile, called only from
/// functions compiled with those features, into which they inline.
trait F32Tiles {
    /// `out[r][t] = w[r] · x[t]` over `cols` values.
    ///
    /// # Safety
    /// The level's features are available; every pointer has `cols`
    /// readable values.
    unsafe fn tile<W: KvElement, const R: usize, const T: usize>(
        w: [*const W; R],
        x: [*const f32; T],
        cols: usize,
    ) -> [[f32; T]; R];
}

/// What a KV cache stores (f32 or f16), loadable by both levels' tiles.
pub trait KvElement: avx2::Wide + avx512::Wide {}

impl KvElement for f32 {}
impl KvElement for f16 {}

/// How many rows ahead of the one it reads a pass over a head's cached
/// keys or values asks for its lines. A head's slice of a cache row is a
/// few lines every `KV` values, a stride the hardware prefetchers do not
/// follow, and once many sequences decode together their caches no longer
/// stay in L2 between steps: without it the loads' stalls were half of
/// the attention time of 16 stories15M sequences on a Zen 4 EPYC.
const PREFETCH_ROWS: usize = 16;

/// Asks the caches for the lines of rows `rows` of `(base, stride, len)`
/// (`len` elements each, `stride` apart) ahead of their use. Prefetches
/// never fault, so the addresses need not be in bounds.
#[inline(always)]
fn prefetch_rows<T>((base, stride, len): (*const T, usize, usize), rows: Range<usize>) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let bytes = len * std::mem::size_of::<T>();
    if bytes == 0 {
        return;
    }
    for r in rows {
        let row = base.wrapping_add(r * stride) as *const i8;
        let mut at = 0;
        while at < bytes {
            // SAFETY: a prefetch is a hint that reads nothing architecturally;
            // SSE, which it needs, is part of x86-64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(at)) };
            at += 64;
        }
        // The row's last line, when it does not start on a line.
        // SAFETY: as above.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(bytes - 1)) };
    }
}

/// Attention scores of one head for `T` queries: `att[t * n + j] =
/// (queries.row(t) · keys.row(j)) / scale` for the `n` keys, `R` keys per
/// tile so each loaded key serves all `T` queries. Bit-identical to one
/// `dot_f32` per (query, key): each pair has its own chain and reduction.
///
/// # Safety
/// `L`'s features are available; `queries` has `T` rows of the keys'
/// length and `att` holds `T * n` values.
#[inline(always)]
unsafe fn scores_by_tiles<L: F32Tiles, W: KvElement, const R: usize, const T: usize>(
    att: &mut [f32],
    queries: Rows,
    keys: Rows<W>,
    scale: f32,
) {
    let (hs, n) = (keys.width(), keys.count());
    let q = std::array::from_fn(|t| queries.row(t).as_ptr());
    let (kp, stride) = (keys.data().as_ptr(), keys.stride());
    let mut j = 0;
    while j + R <= n {
        let ahead = j + PREFETCH_ROWS;
        prefetch_rows((kp, stride, hs), ahead..(ahead + R).min(n));
        let v = L::tile::<W, R, T>(std::array::from_fn(|r| kp.add((j + r) * stride)), q, hs);
        for (r, row) in v.iter().enumerate() {
            for (t, &s) in row.iter().enumerate() {
                *att.get_unchecked_mut(t * n + j + r) = s;
            }
        }
        j += R;
    }
    while j < n {
        let v = L::tile::<W, 1, T>([kp.add(j * stride)], q, hs);
        for (t, &s) in v[0].iter().enumerate() {
            *att.get_unchecked_mut(t * n + j) = s;
        }
        j += 1;
    }
    // The same true divisions, in one pass the compiler vectorizes (one
    // scalar `divss` per score cost a Zen 3 about as long as its dot).
    for a in att[..T * n].iter_mut() {
        *a /= scale;
    }
}

/// Attention scores of one head for a block of up to four queries into
/// `att` `[queries][keys]`.
pub fn attention_scores(
    isa: Isa,
    att: &mut [f32],
    queries: Rows,
    keys: KvRows,
    scale: f32,
) -> bool {
    match keys {
        KvRows::F32(keys) => scores_of(isa, att, queries, keys, scale),
        KvRows::F16(keys) => scores_of(isa, att, queries, keys, scale),
    }
}

fn scores_of<W: KvElement>(
    isa: Isa,
    att: &mut [f32],
    queries: Rows,
    keys: Rows<W>,
    scale: f32,
) -> bool {
    if isa.level() == Level::Scalar {
        return false;
    }
    assert_eq!(att.len(), queries.count() * keys.count());
    assert_eq!(queries.width(), keys.width());
    if wide(isa) {
        // SAFETY: AVX-512 was confirmed (the `Isa`); `Rows` guarantees its
        // rows are in bounds and `att` was sized above. The widest tile
        // that stays in 32 registers: 8 keys for up to 3 queries, 4 for 4.
        unsafe {
            match queries.count() {
                1 => avx512::attention_scores::<W, 8, 1>(att, queries, keys, scale),
                2 => avx512::attention_scores::<W, 8, 2>(att, queries, keys, scale),
                3 => avx512::attention_scores::<W, 8, 3>(att, queries, keys, scale),
                4 => avx512::attention_scores::<W, 4, 4>(att, queries, keys, scale),
                _ => return false,
            }
        }
    } else {
        // SAFETY: AVX2/FMA/F16C were confirmed (the `Isa`); as above. The
        // widest tiles for 16 registers.
        unsafe {
            match queries.count() {
                1 => avx2::attention_scores::<W, 8, 1>(att, queries, keys, scale),
                2 => avx2::attention_scores::<W, 4, 2>(att, queries, keys, scale),
                3 => avx2::attention_scores::<W, 3, 3>(att, queries, keys, scale),
                4 => avx2::attention_scores::<W, 2, 4>(att, queries, keys, scale),
                _ => return false,
            }
        }
    }
    true
}

/// Weighted sums of value rows for a block of up to four queries: `out`
/// `[queries][hs]` from `att` `[queries][keys]`.
pub fn weighted_sum(isa: Isa, out: &mut [f32], att: &[f32], values: KvRows) -> bool {
    match values {
        KvRows::F32(values) => sum_of(isa, out, att, values),
        KvRows::F16(values) => sum_of(isa, out, att, values),
    }
}

fn sum_of<W: KvElement>(isa: Isa, out: &mut [f32], att: &[f32], values: Rows<W>) -> bool {
    if isa.level() == Level::Scalar || values.width() == 0 {
        return false;
    }
    let queries = out.len() / values.width();
    assert!(out.len() == queries * values.width() && att.len() == queries * values.count());
    let wide = wide(isa);
    // SAFETY: the level was confirmed (the `Isa`: AVX-512 when `wide`, AVX2
    // otherwise); `Rows` guarantees its rows are in bounds and `out` and
    // `att` were sized above.
    unsafe {
        match (queries, wide) {
            // `whole_passes` counts AVX2's vectors of 8: 6 of them are 3 of
            // AVX-512's.
            (1, true) => match whole_passes(values.width(), [8, 6, 4]) {
                6 => avx512::weighted_sum::<W, 1, 3>(out, att, values),
                4 => avx512::weighted_sum::<W, 1, 2>(out, att, values),
                _ => avx512::weighted_sum::<W, 1, 4>(out, att, values),
            },
            (2, true) => avx512::weighted_sum::<W, 2, 4>(out, att, values),
            (3, true) => avx512::weighted_sum::<W, 3, 4>(out, att, values),
            (4, true) => avx512::weighted_sum::<W, 4, 4>(out, att, values),
            (1, false) => match whole_passes(values.width(), [8, 6, 4]) {
                6 => avx2::weighted_sum::<W, 1, 6>(out, att, values),
                4 => avx2::weighted_sum::<W, 1, 4>(out, att, values),
                _ => avx2::weighted_sum::<W, 1, 8>(out, att, values),
            },
            (2, false) => match whole_passes(values.width(), [4, 3, 2]) {
                3 => avx2::weighted_sum::<W, 2, 3>(out, att, values),
                2 => avx2::weighted_sum::<W, 2, 2>(out, att, values),
                _ => avx2::weighted_sum::<W, 2, 4>(out, att, values),
            },
            (3, false) => avx2::weighted_sum::<W, 3, 2>(out, att, values),
            (4, false) => avx2::weighted_sum::<W, 4, 2>(out, att, values),
            _ => return false,
        }
    }
    true
}

/// The first of `vectors` (widest first, for one pass of an AVX2 value
/// sum) whose passes cover a head of `hs` values exactly, so no pass ends
/// in masked loads: a 48-value head (stories15M) in 8-vector passes took
/// 8 masked loads per key, and the masks spilled; the widest otherwise.
fn whole_passes(hs: usize, vectors: [usize; 3]) -> usize {
    let fits = vectors.into_iter().find(|v| hs.is_multiple_of(8 * v));
    fits.unwrap_or(vectors[0])
}

/// `kernels::triangle_product_add` at the AVX-512 or AVX2 level.
pub fn triangle_product_add(isa: Isa, tri: &[f32], a: Rows, out: &mut [f32], ld: usize) -> bool {
    if a.width() == 0 || a.count() == 0 {
        return false;
    }
    // SAFETY (both): the level was confirmed (the `Isa`); the caller
    // asserted the triangle's and `out`'s sizes, and `Rows` its rows.
    match float_level(isa) {
        Level::Avx512 => unsafe { avx512::triangle_product_add(tri, a, out, ld) },
        Level::Avx2 => unsafe { avx2::triangle_product_add(tri, a, out, ld) },
        _ => return false,
    }
    true
}

/// In-place softmax with vector exponentials.
pub fn softmax(isa: Isa, x: &mut [f32]) -> bool {
    if x.is_empty() {
        return false;
    }
    match float_level(isa) {
        // SAFETY: AVX-512 was confirmed (the `Isa`; `Amx` includes it).
        Level::Avx512 => unsafe { avx512::softmax(x) },
        // SAFETY: AVX2/FMA/F16C were confirmed (the `Isa`).
        Level::Avx2 => unsafe { avx2::softmax(x) },
        _ => return false,
    }
    true
}

/// Block attention runs at the AVX2 and AVX-512 levels, from as many
/// queries as the batch tiles take, for heads of whole groups of 8 (AVX2)
/// or 16 (AVX-512), whose dot products `scores_by_lanes` reproduces.
pub fn attends_by_blocks(isa: Isa, queries: usize, hs: usize) -> bool {
    scores_by_lanes_fit(isa, hs) && queries >= OUTER_TOKENS
}

/// Queries a block of block attention takes at most: the width of the
/// level's batch tile (two token blocks at AVX-512, one at AVX2).
pub fn attention_block_queries(isa: Isa) -> usize {
    match float_level(isa) {
        Level::Avx512 => 2 * TOKEN_BLOCK,
        _ => TOKEN_BLOCK,
    }
}

/// Lane sums the level's `dot_f32` keeps before its horizontal sum: 16 at
/// AVX-512, 8 at AVX2 (and for the levels without a vector dot product,
/// whose block scores round as AVX2's).
pub fn dot_lanes(isa: Isa) -> usize {
    match float_level(isa) {
        Level::Avx512 => 16,
        _ => 8,
    }
}

/// Whether the level's `scores_by_lanes` serves `isa` for heads of `hs`
/// values: whole vectors of the level's dot product.
fn scores_by_lanes_fit(isa: Isa, hs: usize) -> bool {
    match float_level(isa) {
        Level::Avx2 => hs > 0 && hs.is_multiple_of(8),
        Level::Avx512 => hs > 0 && hs.is_multiple_of(16),
        _ => false,
    }
}

/// `kernels::scores_by_block` two keys against the 16 queries at a time
/// (the level's `scores_by_lanes`), for heads that fit it.
pub fn scores_by_block(isa: Isa, att: &mut [f32], queries: &[f32], keys: Rows) -> bool {
    let (n, hs) = (keys.count(), keys.width());
    if !scores_by_lanes_fit(isa, hs) {
        return false;
    }
    let wide = float_level(isa) == Level::Avx512;
    for j0 in (0..n).step_by(2) {
        let rows = (n - j0).min(2);
        // A partial tile repeats its last key; those results are dropped.
        let w: [*const f32; 2] = std::array::from_fn(|r| keys.row(j0 + r.min(rows - 1)).as_ptr());
        // SAFETY: the level was confirmed (the `Isa`: AVX-512 when `wide`,
        // AVX2/FMA/F16C otherwise); each key row has `hs` values (`Rows`),
        // a multiple of the level's width (`scores_by_lanes_fit`), and
        // `queries` `hs * 16` (the caller asserted it).
        let v = unsafe {
            match wide {
                true => avx512::scores_by_lanes::<2>(w, queries.as_ptr(), hs),
                false => avx2::scores_by_lanes::<2>(w, queries.as_ptr(), hs),
            }
        };
        for (r, scores) in v.iter().take(rows).enumerate() {
            att[(j0 + r) * TOKEN_BLOCK..][..TOKEN_BLOCK].copy_from_slice(scores);
        }
    }
    true
}

/// `kernels::softmax_by_block` sixteen lanes a key (one AVX-512 vector, two
/// AVX2 ones).
pub fn softmax_by_block(isa: Isa, att: &mut [f32], first: usize, scale: f32) -> bool {
    match float_level(isa) {
        // SAFETY: AVX-512 was confirmed (the `Isa`); `att` holds whole rows
        // of 16 (the caller asserted it).
        Level::Avx512 => unsafe { avx512::softmax_by_block(att, first, scale) },
        // SAFETY: AVX2/FMA/F16C were confirmed (the `Isa`); as above.
        Level::Avx2 => unsafe { avx2::softmax_by_block(att, first, scale) },
        _ => return false,
    }
    true
}

/// `max + ln(sum of e^(x - max))` with vector exponentials.
pub fn log_sum_exp(isa: Isa, x: &[f32]) -> Option<f32> {
    if x.is_empty() {
        return None;
    }
    match float_level(isa) {
        // SAFETY: AVX-512 was confirmed (the `Isa`; `Amx` includes it).
        Level::Avx512 => Some(unsafe { avx512::log_sum_exp(x) }),
        // SAFETY: AVX2/FMA/F16C were confirmed (the `Isa`).
        Level::Avx2 => Some(unsafe { avx2::log_sum_exp(x) }),
        _ => None,
    }
}

/// `x = e^(x - shift) * scale` with vector exponentials.
pub fn exp_shifted(isa: Isa, x: &mut [f32], shift: f32, scale: f32) -> bool {
    match float_level(isa) {
        // SAFETY: AVX-512 was confirmed (the `Isa`; `Amx` includes it).
        Level::Avx512 => unsafe { avx512::exp_shifted(x, shift, scale) },
        // SAFETY: AVX2/FMA/F16C were confirmed (the `Isa`).
        Level::Avx2 => unsafe { avx2::exp_shifted(x, shift, scale) },
        _ => return false,
    }
    true
}

/// `x = sigmoid(x)` with vector exponentials.
pub fn sigmoid(isa: Isa, x: &mut [f32]) -> bool {
    match float_level(isa) {
        // SAFETY: AVX-512 was confirmed (the `Isa`; `Amx` includes it).
        Level::Avx512 => unsafe { avx512::sigmoid(x) },
        // SAFETY: AVX2/FMA/F16C were confirmed (the `Isa`).
        Level::Avx2 => unsafe { avx2::sigmoid(x) },
        _ => return false,
    }
    true
}

/// `gate = silu(gate) * up` with vector exponentials (equal lengths).
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) -> bool {
    assert!(up.len() >= gate.len());
    match float_level(isa) {
        // SAFETY: AVX-512 was confirmed (the `Isa`); `up` is long enough.
        Level::Avx512 => unsafe { avx512::silu_mul(gate, up) },
        // SAFETY: AVX2/FMA/F16C were confirmed (the `Isa`); as above.
        Level::Avx2 => unsafe { avx2::silu_mul(gate, up) },
        _ => return false,
    }
    true
}

/// Quantizes a group whose length is a multiple of the level's vector
/// (16 values, or 8 for AVX2); `None` when this level has no vector
/// version for it.
pub fn quantize_group(isa: Isa, x: &[f32], q: &mut [i8]) -> Option<(f32, i32)> {
    if q.len() < x.len() {
        return None;
    }
    match float_level(isa) {
        // SAFETY: the level was confirmed by `supported`; `q` is long enough.
        Level::Avx512 if x.len().is_multiple_of(16) => {
            Some(unsafe { avx512::quantize_group16(x, q) })
        }
        // SAFETY: as above.
        Level::Avx2 | Level::Avx512 if x.len().is_multiple_of(8) => {
            Some(unsafe { avx2::quantize_group8(x, q) })
        }
        _ => None,
    }
}

/// `out[t * ld + j - rows.start] = w[j] · x[t]` for `j` in `rows`.
#[allow(clippy::too_many_arguments)]
pub fn f32_rows(
    isa: Isa,
    w: WeightRows,
    (x, blocks): (&[f32], Option<&TokenBlocks>),
    (cols, n): (usize, usize),
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) -> bool {
    assert!(w.len() >= rows.end * cols);
    // Batches in token blocks are read from the blocks only.
    let blocked = blocks.is_some() && takes_token_blocks(isa, n);
    assert!(blocked || x.len() >= n * cols);
    match (float_level(isa), w) {
        (Level::Avx512, WeightRows::F32(d)) => {
            rows512::<f32>(d, cols, (x, blocks), n, rows, (out, ld))
        }
        (Level::Avx512, WeightRows::F16(d)) => {
            rows512::<f16>(d, cols, (x, blocks), n, rows, (out, ld))
        }
        (Level::Avx512, WeightRows::BF16(d)) => {
            rows512::<bf16>(d, cols, (x, blocks), n, rows, (out, ld))
        }
        (Level::Avx2, WeightRows::F32(d)) => {
            rows256::<f32>(d, cols, (x, blocks), n, rows, (out, ld))
        }
        (Level::Avx2, WeightRows::F16(d)) => {
            rows256::<f16>(d, cols, (x, blocks), n, rows, (out, ld))
        }
        (Level::Avx2, WeightRows::BF16(d)) => {
            rows256::<bf16>(d, cols, (x, blocks), n, rows, (out, ld))
        }
        _ => return false,
    }
    true
}

/// Decoding reads each weight row once for one token, one row after the
/// other: the matrix is then a single sequential stream, which the
/// hardware prefetchers follow best, and the out-of-order core overlaps
/// the next rows' independent chains. Tiles of 8 or 16 rows read as many
/// interleaved streams instead, and on a Zen 4 EPYC (2 threads) decoded
/// 1.2-1.25x slower from memory (stories15M, 42M and 110M f32) and 1.7-2x
/// slower from L3 (stories15M f16, 30 MB); the AVX2 level's 8-row tiles
/// 1.4-1.5x slower on stories15M and 42M. Batches of `OUTER_TOKENS` or
/// more run as outer products (`rows_outer`), smaller ones in 4x4 tiles:
/// each loaded weight vector serves four tokens.
fn rows512<W: avx512::Wide + avx2::Wide>(
    w: &[W],
    cols: usize,
    (x, blocks): (&[f32], Option<&TokenBlocks>),
    n: usize,
    rows: Range<usize>,
    (out, ld): (&mut [f32], usize),
) {
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    // SAFETY (each tile below): AVX-512 was confirmed (caller's `Isa`);
    // `sweep` gives rows below `rows.end` and tokens below `n`, which
    // `f32_rows` checked lie inside `w` and `x`.
    if n >= OUTER_TOKENS {
        // SAFETY: AVX-512 was confirmed (caller's `Isa`); `rows_outer`
        // passes pointers with `cols` values and blocks of `cols * 16`.
        let tile =
            |w, xt, cols| unsafe { avx512::tile_f32_batch::<_, AVX512_BATCH_ROWS, 2>(w, xt, cols) };
        // SAFETY: AVX-512 was confirmed (caller's `Isa`).
        let store = |v: &_, out: &mut _, ld, at| unsafe { store512(v, out, ld, at) };
        rows_outer(w, (x, blocks), (cols, n), rows, (out, ld), (tile, store));
    } else if n == 1 {
        sweep::<1, 1>(rows, n, out, ld, |j, t| unsafe {
            tile512(wp, xp, cols, j, t)
        })
    } else {
        sweep::<4, 4>(rows, n, out, ld, |j, t| unsafe {
            tile512(wp, xp, cols, j, t)
        })
    }
}

/// The AVX-512 tile over weight rows `j` and tokens `t` (rows of `cols`
/// values at `wp` and `xp`).
///
/// # Safety
/// AVX-512 is available; every row in `j` and token in `t` lies inside the
/// weights and activations.
unsafe fn tile512<W: avx512::Wide, const R: usize, const T: usize>(
    wp: *const W,
    xp: *const f32,
    cols: usize,
    j: [usize; R],
    t: [usize; T],
) -> [[f32; T]; R] {
    avx512::tile_f32(
        j.map(|j| wp.add(j * cols)),
        t.map(|t| xp.add(t * cols)),
        cols,
    )
}

/// Tokens from which a batch takes the outer-product tiles: below, padding
/// the block of 16 costs more than the tiles save.
const OUTER_TOKENS: usize = 8;

/// Weight rows of the AVX-512 batch tile (by two token blocks).
const AVX512_BATCH_ROWS: usize = 12;
/// Weight rows of the AVX2 batch tile (by one token block).
const AVX2_BATCH_ROWS: usize = 6;

/// Whether `isa` multiplies `n`-token float batches from `TokenBlocks`.
pub fn takes_token_blocks(isa: Isa, n: usize) -> bool {
    matches!(float_level(isa), Level::Avx2 | Level::Avx512) && n >= OUTER_TOKENS
}

/// The weight rows of one outer-product tile of an `n`-token float batch
/// at `isa`'s level, `None` where batches do not run in such tiles.
pub fn batch_tile_rows(isa: Isa, n: usize) -> Option<usize> {
    if !takes_token_blocks(isa, n) {
        return None;
    }
    Some(match float_level(isa) {
        Level::Avx512 => AVX512_BATCH_ROWS,
        _ => AVX2_BATCH_ROWS,
    })
}

thread_local! {
    /// Per worker: a batch laid out in token blocks when the caller did not
    /// (tests, one-off products), and a tile's weight rows widened to f32.
    static BATCH_SCRATCH: std::cell::RefCell<(TokenBlocks, Vec<f32>)> = Default::default();
}

/// The AVX2 version of `rows512`, with tiles sized for 16 registers.
fn rows256<W: avx2::Wide>(
    w: &[W],
    cols: usize,
    (x, blocks): (&[f32], Option<&TokenBlocks>),
    n: usize,
    rows: Range<usize>,
    (out, ld): (&mut [f32], usize),
) {
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    if n >= OUTER_TOKENS {
        // SAFETY: AVX2/FMA/F16C were confirmed (caller's `Isa`);
        // `rows_outer` passes pointers with `cols` values and blocks of
        // `cols * 16`.
        let tile = |w, xt, cols| unsafe { avx2::tile_f32_batch::<_, AVX2_BATCH_ROWS>(w, xt, cols) };
        // SAFETY: AVX2 was confirmed (caller's `Isa`).
        let store = |v: &_, out: &mut _, ld, at| unsafe { store256(v, out, ld, at) };
        rows_outer(w, (x, blocks), (cols, n), rows, (out, ld), (tile, store));
    } else if n == 1 {
        // One row at a time, as `rows512` explains.
        sweep::<1, 1>(rows, n, out, ld, |j, t| {
            // SAFETY: AVX2/FMA/F16C were confirmed (caller's `Isa`); rows and
            // tokens are in range as checked by `f32_rows`.
            unsafe {
                avx2::tile_f32(
                    j.map(|j| wp.add(j * cols)),
                    t.map(|t| xp.add(t * cols)),
                    cols,
                )
            }
        })
    } else {
        sweep::<4, 2>(rows, n, out, ld, |j, t| {
            // SAFETY: as above.
            unsafe {
                avx2::tile_f32(
                    j.map(|j| wp.add(j * cols)),
                    t.map(|t| xp.add(t * cols)),
                    cols,
                )
            }
        })
    }
}

/// Where a batch tile (`tile_f32_batch` of a level) reads value `k` of its
/// weight row `r`: `R` row pointers, or one matrix stored by columns.
pub trait TileWeights<const R: usize>: Copy {
    /// # Safety
    /// `r < R` and `k` below the tile's `cols`, inside what the caller
    /// promised the tile.
    unsafe fn at(self, r: usize, k: usize) -> *const f32;
}

impl<const R: usize> TileWeights<R> for [*const f32; R] {
    #[inline(always)]
    unsafe fn at(self, r: usize, k: usize) -> *const f32 {
        self[r].add(k)
    }
}

/// A matrix stored by columns: row `r`'s value `k` at `base + r + k * ld`,
/// so one step's `R` broadcasts read adjacent values.
#[derive(Clone, Copy)]
pub struct ByColumns {
    pub base: *const f32,
    pub ld: usize,
}

impl<const R: usize> TileWeights<R> for ByColumns {
    #[inline(always)]
    unsafe fn at(self, r: usize, k: usize) -> *const f32 {
        self.base.add(k * self.ld + r)
    }
}

/// A batch of float products as outer-product tiles (`tile_f32_batch` of
/// the level: `R` weight rows by `B` token blocks) over the batch in token
/// blocks (`blocks`, or laid out here when the caller did not): each tile
/// of rows (widened to f32 first when stored as f16 or bf16) sweeps every
/// block while its rows stay in L1. Partial tiles repeat their last row or
/// block, whose results are dropped; whole tiles go through `store`
/// (`store_full_tile` or a level's vector version of it).
fn rows_outer<W: avx2::Wide, const R: usize, const B: usize>(
    w: &[W],
    (x, blocks): (&[f32], Option<&TokenBlocks>),
    (cols, n): (usize, usize),
    rows: Range<usize>,
    (out, ld): (&mut [f32], usize),
    (tile, store): (
        impl Fn([*const f32; R], [*const f32; B], usize) -> [[[f32; TOKEN_BLOCK]; B]; R],
        impl Fn(&[[[f32; TOKEN_BLOCK]; B]; R], &mut [f32], usize, (usize, usize)),
    ),
) {
    BATCH_SCRATCH.with_borrow_mut(|(own, wide)| {
        let x = blocks.unwrap_or_else(|| {
            own.pack(x, n, cols);
            own
        });
        if !W::IS_F32 {
            wide.resize(R * cols, 0.0);
        }
        for j0 in rows.clone().step_by(R) {
            let js: [usize; R] = std::array::from_fn(|r| (j0 + r).min(rows.end - 1));
            let ptrs: [*const f32; R] = if W::IS_F32 {
                // `W` is f32 (`IS_F32`), so this is the same pointer type.
                js.map(|j| w[j * cols..].as_ptr() as *const f32)
            } else {
                for (r, &j) in js.iter().enumerate() {
                    // SAFETY: the caller's level includes AVX2/FMA/F16C; row
                    // `j` is below `rows.end`, inside `w` (checked by
                    // `f32_rows`), and `wide` holds `R` rows.
                    unsafe { avx2::widen_row(w[j * cols..].as_ptr(), cols, &mut wide[r * cols..]) }
                }
                std::array::from_fn(|r| wide[r * cols..].as_ptr())
            };
            let at = (j0 - rows.start, (rows.end - j0).min(R));
            sweep_blocks(ptrs, (x, n, cols), at, (out, ld), (&tile, &store));
        }
    })
}

/// One row tile of `rows_outer` or `columns_outer` (weights `w`) against
/// every block of `x` (`n` tokens of `cols` values), `B` blocks a tile.
/// Its results go to `out` from column `col`, for its first `rows_left`
/// rows: whole tiles through `store`, partial ones through
/// `store_tile_part`.
fn sweep_blocks<Wt: Copy, const R: usize, const B: usize>(
    w: Wt,
    (x, n, cols): (&TokenBlocks, usize, usize),
    (col, rows_left): (usize, usize),
    (out, ld): (&mut [f32], usize),
    (tile, store): (
        &impl Fn(Wt, [*const f32; B], usize) -> [[[f32; TOKEN_BLOCK]; B]; R],
        &impl Fn(&[[[f32; TOKEN_BLOCK]; B]; R], &mut [f32], usize, (usize, usize)),
    ),
) {
    let nb = n.div_ceil(TOKEN_BLOCK);
    for b0 in (0..nb).step_by(B) {
        let xt = std::array::from_fn(|i| x.block((b0 + i).min(nb - 1)).as_ptr());
        let v = tile(w, xt, cols);
        if rows_left == R && (b0 + B) * TOKEN_BLOCK <= n {
            store(&v, out, ld, (col, b0 * TOKEN_BLOCK));
        } else {
            store_tile_part(&v, (out, ld), (col, rows_left), (b0, n));
        }
    }
}

/// Stores a whole AVX-512 float tile (12 rows by 2 blocks) token by token
/// at `(col, t0)` of `out`, `ld` apart per token, through the register
/// transpose; panics if it does not lie inside `out`.
///
/// # Safety
/// AVX-512F is available.
unsafe fn store512(
    v: &[[[f32; TOKEN_BLOCK]; 2]; AVX512_BATCH_ROWS],
    out: &mut [f32],
    ld: usize,
    (col, t0): (usize, usize),
) {
    assert!((t0 + 2 * TOKEN_BLOCK - 1) * ld + col + AVX512_BATCH_ROWS <= out.len());
    // SAFETY: AVX-512 is available (the caller's promise); the last
    // position written is inside `out`, as asserted.
    unsafe {
        avx512::store_tile_by_token::<AVX512_BATCH_ROWS, 2>(v, out.as_mut_ptr(), ld, (col, t0))
    }
}

/// `store512` for the AVX2 tile (6 rows by 1 block).
///
/// # Safety
/// AVX2 is available.
unsafe fn store256(
    v: &[[[f32; TOKEN_BLOCK]; 1]; AVX2_BATCH_ROWS],
    out: &mut [f32],
    ld: usize,
    (col, t0): (usize, usize),
) {
    assert!((t0 + TOKEN_BLOCK - 1) * ld + col + AVX2_BATCH_ROWS <= out.len());
    // SAFETY: AVX2 is available (the caller's promise); the last position
    // written is inside `out`, as asserted.
    unsafe { avx2::store_tile_by_token(v, out.as_mut_ptr(), ld, (col, t0)) }
}

/// Stores the part of a tile inside the output: its first `rows_left`
/// rows (from output column `col`) and its tokens below `n` (the tile's
/// first block is `b0`).
fn store_tile_part<const R: usize, const B: usize>(
    v: &[[[f32; TOKEN_BLOCK]; B]; R],
    (out, ld): (&mut [f32], usize),
    (col, rows_left): (usize, usize),
    (b0, n): (usize, usize),
) {
    for (r, row) in v.iter().enumerate().take(rows_left) {
        for (i, lanes) in row.iter().enumerate() {
            let t0 = (b0 + i) * TOKEN_BLOCK;
            for (t, &value) in lanes.iter().enumerate().take(n.saturating_sub(t0)) {
                out[(t0 + t) * ld + col + r] = value;
            }
        }
    }
}

/// One block of `TokenBlocks` from up to 16 rows `stride` apart, through
/// register transposes at the AVX2 and AVX-512 levels; `false` elsewhere.
pub fn pack_token_block(
    isa: Isa,
    x: &[f32],
    (stride, tokens, cols): (usize, usize, usize),
    block: &mut [f32],
) -> bool {
    let level = float_level(isa);
    if !matches!(level, Level::Avx2 | Level::Avx512) {
        return false;
    }
    assert!(tokens <= TOKEN_BLOCK && block.len() >= cols * TOKEN_BLOCK);
    assert!(tokens == 0 || (tokens - 1) * stride + cols <= x.len());
    // SAFETY: the level was confirmed (the `Isa`); the bounds were asserted.
    unsafe {
        if level == Level::Avx512 {
            avx512::pack_token_block(x, stride, tokens, cols, block)
        } else {
            avx2::pack_token_block(x, stride, tokens, cols, block)
        }
    };
    true
}

/// `out[t * ld + j - rows.start] = sum over k of w[j + k * w_ld] * x(t, k)`
/// for `j` in `rows`: a batch in token blocks against a float matrix
/// stored by columns (the transpose of a row-major one), read in place by
/// the level's by-columns tile. Partial row tiles read a copy of their
/// rows, so no tile reads past `w`.
#[allow(clippy::too_many_arguments)]
pub fn f32_columns(
    isa: Isa,
    (w, w_ld): (&[f32], usize),
    x: &TokenBlocks,
    (cols, n): (usize, usize),
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) -> bool {
    if !takes_token_blocks(isa, n) || cols == 0 || rows.is_empty() {
        return false;
    }
    assert!(x.n == n && x.cols == cols && rows.end <= w_ld);
    assert!((cols - 1) * w_ld + rows.end <= w.len());
    match float_level(isa) {
        Level::Avx512 => {
            // SAFETY: AVX-512 was confirmed (caller's `Isa`); `columns_outer`
            // passes pointers to `R` rows by `cols` columns inside `w` (or
            // its copy) and blocks of `cols * 16`.
            let tile = |w, xt, cols| unsafe {
                avx512::tile_f32_batch::<_, AVX512_BATCH_ROWS, 2>(w, xt, cols)
            };
            // SAFETY: AVX-512 was confirmed (caller's `Isa`).
            let store = |v: &_, out: &mut _, ld, at| unsafe { store512(v, out, ld, at) };
            columns_outer((w, w_ld), x, (cols, n), rows, (out, ld), (tile, store));
        }
        Level::Avx2 => {
            // SAFETY: AVX2/FMA/F16C were confirmed (caller's `Isa`); as above.
            let tile =
                |w, xt, cols| unsafe { avx2::tile_f32_batch::<_, AVX2_BATCH_ROWS>(w, xt, cols) };
            // SAFETY: AVX2 was confirmed (caller's `Isa`).
            let store = |v: &_, out: &mut _, ld, at| unsafe { store256(v, out, ld, at) };
            columns_outer((w, w_ld), x, (cols, n), rows, (out, ld), (tile, store));
        }
        _ => return false,
    }
    true
}

/// `rows_outer` for a matrix stored by columns (`f32_columns`).
fn columns_outer<const R: usize, const B: usize>(
    (w, w_ld): (&[f32], usize),
    x: &TokenBlocks,
    (cols, n): (usize, usize),
    rows: Range<usize>,
    (out, ld): (&mut [f32], usize),
    (tile, store): (
        impl Fn(ByColumns, [*const f32; B], usize) -> [[[f32; TOKEN_BLOCK]; B]; R],
        impl Fn(&[[[f32; TOKEN_BLOCK]; B]; R], &mut [f32], usize, (usize, usize)),
    ),
) {
    let mut edge = Vec::new();
    for j0 in rows.clone().step_by(R) {
        let rows_left = (rows.end - j0).min(R);
        let weights = if rows_left == R {
            ByColumns {
                base: w[j0..].as_ptr(),
                ld: w_ld,
            }
        } else {
            edge.clear();
            for k in 0..cols {
                edge.extend((0..R).map(|r| w[(j0 + r).min(rows.end - 1) + k * w_ld]));
            }
            ByColumns {
                base: edge.as_ptr(),
                ld: R,
            }
        };
        let at = (j0 - rows.start, rows_left);
        sweep_blocks(weights, (x, n, cols), at, (out, ld), (&tile, &store));
    }
}

/// Unpacked Q8_0 products run the scalar loop: at the AVX-512 level the
/// backend repacks Q8_0 matrices (`q8_packed_rows`) whenever their groups
/// allow it, and the rest have groups straddling rows.
pub fn q8_rows(
    _: Isa,
    _: &[i8],
    _: &[f32],
    _: &Q8Acts,
    _: Range<usize>,
    _: &mut [f32],
    _: usize,
) -> bool {
    false
}

/// How `isa`'s kernel for `PackedQ8` matrices wants the bytes, if it has
/// one (so uploads pack).
pub fn q8_bytes(isa: Isa) -> Option<Q8Bytes> {
    match isa.level() {
        Level::Avx512 | Level::Amx | Level::AvxVnni => Some(Q8Bytes::Offset),
        Level::Avx2 => Some(Q8Bytes::Signed),
        _ => None,
    }
}

/// The product over rows `rows` of a packed Q8_0 matrix: whole blocks are
/// computed, rows outside `rows` dropped. Decoding runs one block (16 rows)
/// per tile, so each thread reads its share of the matrix as one linear
/// stream: from the arena's huge pages that decodes stories42M/110M
/// 1.17-1.19x faster than eight blocks side by side (eight streams) on a
/// Zen 4 EPYC, and stories15M, whose weights stay in the L3, as fast (from
/// 4 KiB pages eight streams had been 5-10% faster). Batches run three
/// blocks by four tokens. Results go to `out[t * ld + j - rows.start]`.
pub fn q8_packed_rows(
    isa: Isa,
    w: &PackedQ8,
    acts: &Q8Acts,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) -> bool {
    if q8_bytes(isa) != Some(w.bytes) {
        return false;
    }
    let (cols, gs, n) = (w.cols, w.gs, acts.n);
    assert!(
        acts.tokens.is_multiple_of(4) && acts.tokens >= n && acts.xq.len() >= acts.tokens * cols
    );
    assert!(w.q.len() >= w.rows.div_ceil(BLOCK_ROWS) * BLOCK_ROWS * cols);
    let x = Q8Tokens {
        xq: &acts.xq,
        xs_t: &acts.xs_t,
        xc_t: &acts.xc_t,
        tokens: acts.tokens,
    };
    let blocks = rows.start / BLOCK_ROWS..rows.end.div_ceil(BLOCK_ROWS);
    assert!(rows.is_empty() || out.len() >= (n - 1) * ld + rows.len());
    if float_level(isa) == Level::Avx2 {
        let vnni = isa.level() == Level::AvxVnni;
        q8_packed_rows256(w, &x, (rows, n, vnni), out, ld);
        return true;
    }
    let out_p = out.as_mut_ptr();
    let store = |b0: usize, t0: usize, v: &[__m512], t_step: usize| {
        let tile = avx512::BlockTile { b0, t0, t_step };
        // SAFETY: AVX-512F was confirmed (caller's `Isa`); the stores land
        // on `out[t * ld + j - rows.start]` for rows `j` in `rows` and tokens
        // `t < n`, inside `out` as asserted above.
        unsafe { avx512::store_blocks(out_p, ld, (rows.clone(), n), tile, v) }
    };
    let mut b = blocks.start;
    let amx_step = amx::k_step(gs).filter(|_| isa.level() == Level::Amx && n > 1);
    if let Some(kk) = amx_step {
        assert!(acts.tokens.is_multiple_of(amx::TILE_TOKENS));
        // SAFETY: the `Amx` level means the OS granted the tile state;
        // `kk` comes from `k_step`.
        unsafe { amx::configure(kk) };
        let mut ints: amx::TileInts = [[[[0; 16 * amx::TILE_TOKENS]; 2]; 2]; amx::GROUP_CHUNK];
        while b < blocks.end {
            let (q, s) = w.block(b);
            let two = b + 2 <= blocks.end;
            for t0 in (0..n).step_by(2 * amx::TILE_TOKENS) {
                let t2 = t0 + amx::TILE_TOKENS < n;
                let dims = (cols, gs, kk);
                // SAFETY: tiles configured for `kk` above; AVX-512 comes
                // with `Amx`; blocks `b..b + 2` (or `b`) exist; tokens up to
                // `t0 + 32` (or `t0 + 16`) exist because `acts.tokens` is a
                // multiple of 16 at least `n`.
                let v = unsafe {
                    match (two, t2) {
                        (true, true) => amx::tile_q8::<2, 2>(q, s, dims, &x, t0, &mut ints),
                        (true, false) => amx::tile_q8::<2, 1>(q, s, dims, &x, t0, &mut ints),
                        (false, true) => amx::tile_q8::<1, 2>(q, s, dims, &x, t0, &mut ints),
                        (false, false) => amx::tile_q8::<1, 1>(q, s, dims, &x, t0, &mut ints),
                    }
                };
                store(b, t0, v.as_flattened(), 32);
            }
            b += if two { 2 } else { 1 };
        }
        // SAFETY: as for `configure`.
        unsafe { amx::release() };
    } else if n == 1 {
        for b in blocks {
            let (q, s) = w.block(b);
            // SAFETY: AVX-512 with VNNI was confirmed (caller's `Isa`);
            // block `b` exists; token 0 exists.
            let v = unsafe { avx512::tile_q8_packed::<1, 1>(q, s, cols, gs, &x, 0) };
            store(b, 0, v.as_flattened(), 1);
        }
    } else {
        while b < blocks.end {
            let (q, s) = w.block(b);
            let step = (blocks.end - b).min(BATCH_BLOCKS);
            for t0 in (0..n).step_by(4) {
                // SAFETY: AVX-512 with VNNI was confirmed; blocks `b..b +
                // step` exist; tokens `t0..t0 + 4` exist since `acts.tokens`
                // is a multiple of 4 at least `n`.
                unsafe {
                    match step {
                        3 => {
                            let v = avx512::tile_q8_packed::<3, 4>(q, s, cols, gs, &x, t0);
                            store(b, t0, v.as_flattened(), 4);
                        }
                        2 => {
                            let v = avx512::tile_q8_packed::<2, 4>(q, s, cols, gs, &x, t0);
                            store(b, t0, v.as_flattened(), 4);
                        }
                        _ => {
                            let v = avx512::tile_q8_packed::<1, 4>(q, s, cols, gs, &x, t0);
                            store(b, t0, v.as_flattened(), 4);
                        }
                    }
                }
            }
            b += step;
        }
    }
    true
}

/// Blocks of 16 rows an AVX-512 int8 batch tile takes against four tokens:
/// three keep 12 float sums and 12 int32 sums in registers with the four
/// tokens' activations, where two loaded each token's four bytes for only
/// eight `vpdpbusd`.
const BATCH_BLOCKS: usize = 3;

/// The 256-bit part of `q8_packed_rows` (AVX2 on signed bytes, AVX-VNNI on
/// offset ones when `vnni`; the caller checked the bytes match the level):
/// decoding runs one block per tile, one linear stream per thread as at
/// AVX-512 (from huge pages 1.16x faster than four blocks side by side on
/// stories110M, forced to AVX2 on a Zen 4; from 4 KiB pages four had been
/// 6% faster than two on a Zen 3); batches one block by four tokens, as
/// many as 16 registers hold.
fn q8_packed_rows256(
    w: &PackedQ8,
    x: &Q8Tokens,
    (rows, n, vnni): (Range<usize>, usize, bool),
    out: &mut [f32],
    ld: usize,
) {
    let dims = (w.cols, w.gs);
    let blocks = rows.start / BLOCK_ROWS..rows.end.div_ceil(BLOCK_ROWS);
    let mut store = |b0: usize, t0: usize, v: &[[f32; BLOCK_ROWS]], t_step: usize| {
        store_block_rows(out, ld, (rows.clone(), n), (b0, t0, t_step), v)
    };
    for b in blocks {
        let (q, s) = w.block(b);
        if n == 1 {
            // SAFETY: AVX2 was confirmed (caller's `Isa`), and AVX-VNNI
            // when `vnni`; the bytes are as that tile wants them (the `Isa`
            // packed them); block `b` exists; token 0 exists.
            let v = unsafe { tile256::<1>(vnni, q, s, dims, x, 0) };
            store(b, 0, &v, 1);
            continue;
        }
        for t0 in (0..n).step_by(4) {
            // SAFETY: as for one token; tokens `t0..t0 + 4` exist since
            // `x.tokens` is a multiple of 4 at least `n`.
            let v = unsafe { tile256::<4>(vnni, q, s, dims, x, t0) };
            store(b, t0, &v, 4);
        }
    }
}

/// The 256-bit packed Q8 tile for the level: AVX-VNNI's on offset bytes
/// (`vnni`) or the AVX2 sign trick's on signed ones.
///
/// # Safety
/// As `avx2::tile_q8_packed`, with AVX-VNNI available and offset bytes
/// when `vnni`.
unsafe fn tile256<const T: usize>(
    vnni: bool,
    q: *const u8,
    s: *const f32,
    dims: (usize, usize),
    x: &Q8Tokens,
    t0: usize,
) -> [[f32; BLOCK_ROWS]; T] {
    if vnni {
        avx2::tile_q8_vnni::<T>(q, s, dims, x, t0)
    } else {
        avx2::tile_q8_packed::<T>(q, s, dims, x, t0)
    }
}

/// Stores a tile's results: `v[i]` holds the 16 rows of block `b0 + i /
/// t_step` for token `t0 + i % t_step`, written to `out[t * ld + j -
/// rows.start]` for the rows `j` in `rows` and tokens `t < n` (the rest of
/// the tile is dropped).
fn store_block_rows(
    out: &mut [f32],
    ld: usize,
    (rows, n): (Range<usize>, usize),
    (b0, t0, t_step): (usize, usize, usize),
    v: &[[f32; BLOCK_ROWS]],
) {
    for (i, v) in v.iter().enumerate() {
        let (b, t) = (b0 + i / t_step, t0 + i % t_step);
        let first = (b * BLOCK_ROWS).max(rows.start);
        let last = ((b + 1) * BLOCK_ROWS).min(rows.end);
        if t < n && first < last {
            let dst = &mut out[t * ld + first - rows.start..][..last - first];
            dst.copy_from_slice(&v[first - b * BLOCK_ROWS..last - b * BLOCK_ROWS]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores a tile that lies wholly inside the output, token by token:
    /// the reference for the levels' register-transposing stores.
    fn store_full_tile<const R: usize, const B: usize>(
        v: &[[[f32; TOKEN_BLOCK]; B]; R],
        out: &mut [f32],
        ld: usize,
        (col, t0): (usize, usize),
    ) {
        for i in 0..B {
            for t in 0..TOKEN_BLOCK {
                let dst = &mut out[(t0 + i * TOKEN_BLOCK + t) * ld + col..][..R];
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = v[r][i][t];
                }
            }
        }
    }

    /// A tile of distinct values, stored by `store` and by the reference
    /// into outputs with room around it: the two must agree everywhere.
    fn assert_store_matches<const R: usize, const B: usize>(
        what: &str,
        store: impl Fn(&[[[f32; TOKEN_BLOCK]; B]; R], &mut [f32], usize, (usize, usize)),
    ) {
        let (ld, col, t0) = (37, 5, 3);
        let v: [[[f32; TOKEN_BLOCK]; B]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|b| std::array::from_fn(|t| (r * 1000 + b * 100 + t) as f32))
        });
        let (mut got, mut want) = (vec![-1.0; 64 * ld], vec![-1.0; 64 * ld]);
        store(&v, &mut got, ld, (col, t0));
        store_full_tile(&v, &mut want, ld, (col, t0));
        assert_eq!(got, want, "{what}");
    }

    #[test]
    fn tile_stores_match_the_reference() {
        if supported(Level::Avx2) {
            // SAFETY: AVX2 was detected.
            assert_store_matches("AVX2 tile store", |v, out, ld, at| unsafe {
                store256(v, out, ld, at)
            });
        }
        if supported(Level::Avx512) {
            // SAFETY: AVX-512 was detected.
            assert_store_matches("AVX-512 tile store", |v, out, ld, at| unsafe {
                store512(v, out, ld, at)
            });
        }
    }
}
