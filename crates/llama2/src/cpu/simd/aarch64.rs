//! aarch64 kernels: Advanced SIMD (NEON) versions of the f32 dot product,
//! `axpy`, the f32-weight product (register tiles of several rows) and the
//! Q8_0 product (int8 multiplies widened to 16 and 32 bits). Half-precision
//! weights, rows that straddle Q8 groups, and the remaining element-wise
//! ops use the scalar loops at this level. On x86 machines these kernels
//! are built and tested under qemu by `scripts/test-aarch64.sh`.

use std::arch::aarch64::*;
use std::ops::Range;

use super::super::kernels::{sweep, Isa, KvRows, Level, Q8Acts, Rows, TokenBlocks, WeightRows};

pub fn supported(level: Level) -> bool {
    match level {
        Level::Scalar => true,
        Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        _ => false,
    }
}

/// `R` weight rows against `T` activation rows of `cols` values, four lanes
/// at a time. Each (row, token) pair has its own accumulator, reduced across
/// lanes and then given the tail in index order, so a pair's result is the
/// same whatever the tile's shape (a batch equals one token at a time).
///
/// # Safety
/// NEON is available; every pointer has `cols` readable elements.
#[target_feature(enable = "neon")]
unsafe fn tile_f32<const R: usize, const T: usize>(
    w: [*const f32; R],
    x: [*const f32; T],
    cols: usize,
) -> [[f32; T]; R] {
    let mut acc = [[vdupq_n_f32(0.0); T]; R];
    let mut k = 0;
    while k + 4 <= cols {
        let xv: [float32x4_t; T] = std::array::from_fn(|t| vld1q_f32(x[t].add(k)));
        for r in 0..R {
            let wv = vld1q_f32(w[r].add(k));
            for t in 0..T {
                acc[r][t] = vfmaq_f32(acc[r][t], wv, xv[t]);
            }
        }
        k += 4;
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            let mut sum = vaddvq_f32(acc[r][t]);
            for j in k..cols {
                sum += *w[r].add(j) * *x[t].add(j);
            }
            out[r][t] = sum;
        }
    }
    out
}

/// `a · b` over the first `n` elements, eight lanes at a time in two
/// accumulators (attention's short head-size dot products are latency-bound).
///
/// # Safety
/// NEON is available; `a` and `b` have `n` readable elements.
#[target_feature(enable = "neon")]
unsafe fn dot_n(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut acc = [vdupq_n_f32(0.0); 2];
    let mut k = 0;
    while k + 8 <= n {
        acc[0] = vfmaq_f32(acc[0], vld1q_f32(a.add(k)), vld1q_f32(b.add(k)));
        acc[1] = vfmaq_f32(acc[1], vld1q_f32(a.add(k + 4)), vld1q_f32(b.add(k + 4)));
        k += 8;
    }
    let mut sum = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
    while k < n {
        sum += *a.add(k) * *b.add(k);
        k += 1;
    }
    sum
}

pub fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> Option<f32> {
    if isa.level() != Level::Neon {
        return None;
    }
    // SAFETY: an `Isa` only holds a level `supported` confirmed; both
    // slices have at least `min` elements.
    Some(unsafe { dot_n(a.as_ptr(), b.as_ptr(), a.len().min(b.len())) })
}

pub fn axpy(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) -> bool {
    if isa.level() != Level::Neon {
        return false;
    }
    let n = y.len().min(x.len());
    let split = n / 4 * 4;
    for (yc, xc) in y[..split]
        .chunks_exact_mut(4)
        .zip(x[..split].chunks_exact(4))
    {
        // SAFETY: NEON was confirmed; each chunk holds exactly 4 elements.
        unsafe {
            let v = vfmaq_n_f32(vld1q_f32(yc.as_ptr()), vld1q_f32(xc.as_ptr()), a);
            vst1q_f32(yc.as_mut_ptr(), v);
        }
    }
    for (o, &v) in y[split..n].iter_mut().zip(&x[split..n]) {
        *o += a * v;
    }
    true
}

pub fn attention_scores(_: Isa, _: &mut [f32], _: Rows, _: KvRows, _: f32) -> bool {
    false
}

pub fn weighted_sum(_: Isa, _: &mut [f32], _: &[f32], _: KvRows) -> bool {
    false
}

pub fn softmax(_: Isa, _: &mut [f32]) -> bool {
    false
}

pub fn attends_by_blocks(_: Isa, _: usize, _: usize) -> bool {
    false
}

pub fn attention_block_queries(_: Isa) -> usize {
    super::super::kernels::TOKEN_BLOCK
}

pub fn dot_lanes(_: Isa) -> usize {
    8
}

pub fn scores_by_block(_: Isa, _: &mut [f32], _: &[f32], _: Rows) -> bool {
    false
}

pub fn softmax_by_block(_: Isa, _: &mut [f32], _: usize, _: f32) -> bool {
    false
}

pub fn silu_mul(_: Isa, _: &mut [f32], _: &[f32]) -> bool {
    false
}

pub fn sigmoid(_: Isa, _: &mut [f32]) -> bool {
    false
}

pub fn log_sum_exp(_: Isa, _: &[f32]) -> Option<f32> {
    None
}

pub fn exp_shifted(_: Isa, _: &mut [f32], _: f32, _: f32) -> bool {
    false
}

pub fn quantize_group(_: Isa, _: &[f32], _: &mut [i8]) -> Option<(f32, i32)> {
    None
}

/// The f32-weight product over `rows`: decoding runs eight rows per tile
/// (eight accumulator chains, each weight row streamed once), batches four
/// rows by four tokens so each loaded weight vector serves four tokens.
#[allow(clippy::too_many_arguments)]
pub fn f32_rows(
    isa: Isa,
    w: WeightRows,
    (x, _): (&[f32], Option<&TokenBlocks>),
    (cols, n): (usize, usize),
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) -> bool {
    let (Level::Neon, WeightRows::F32(d)) = (isa.level(), w) else {
        return false;
    };
    assert!(d.len() >= rows.end * cols && x.len() >= n * cols);
    let (wp, xp) = (d.as_ptr(), x.as_ptr());
    // SAFETY (each tile below): NEON was confirmed; `sweep` gives rows
    // below `rows.end` and tokens below `n`, checked against `d` and `x`.
    let row = |j: usize| wp.wrapping_add(j * cols);
    let token = |t: usize| xp.wrapping_add(t * cols);
    if n == 1 {
        sweep::<8, 1>(rows, n, out, ld, |j, t| unsafe {
            tile_f32(j.map(row), t.map(token), cols)
        });
    } else {
        sweep::<4, 4>(rows, n, out, ld, |j, t| unsafe {
            tile_f32(j.map(row), t.map(token), cols)
        });
    }
    true
}

/// Rows of a Q8_0 matrix whose rows start on group boundaries, against
/// quantized activations, `R` rows per tile: per group, int8 products
/// widened to 16 bits, pairwise-added into 32-bit lanes, then one
/// `val += ival * w_scale * x_scale` in group order, exactly as
/// `kernels::dot_q8` does, so results are bit-identical to it.
///
/// # Safety
/// NEON is available; each `w[r]` has `groups * gs` values and `ws[r]`
/// `groups` scales, `xq` and `xs` likewise; `gs` is a multiple of 16.
#[target_feature(enable = "neon")]
unsafe fn tile_q8<const R: usize>(
    w: [*const i8; R],
    ws: [*const f32; R],
    (xq, xs): (*const i8, *const f32),
    groups: usize,
    gs: usize,
) -> [f32; R] {
    let mut val = [0f32; R];
    for g in 0..groups {
        let mut acc = [vdupq_n_s32(0); R];
        for k in (g * gs..(g + 1) * gs).step_by(16) {
            let x = vld1q_s8(xq.add(k));
            for r in 0..R {
                let wv = vld1q_s8(w[r].add(k));
                acc[r] = vpadalq_s16(acc[r], vmull_s8(vget_low_s8(wv), vget_low_s8(x)));
                acc[r] = vpadalq_s16(acc[r], vmull_high_s8(wv, x));
            }
        }
        let x_scale = *xs.add(g);
        for r in 0..R {
            val[r] += vaddvq_s32(acc[r]) as f32 * *ws[r].add(g) * x_scale;
        }
    }
    val
}

/// The Q8_0 product over `rows`, four rows per tile, when groups are whole
/// multiples of 16 values and rows start on group boundaries; other shapes
/// (and other levels) return false for the scalar loop.
pub fn q8_rows(
    isa: Isa,
    wq: &[i8],
    ws: &[f32],
    acts: &Q8Acts,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) -> bool {
    let (cols, gs, n) = (acts.cols, acts.gs, acts.n);
    if isa.level() != Level::Neon || !gs.is_multiple_of(16) || !cols.is_multiple_of(gs) {
        return false;
    }
    let groups = cols / gs;
    assert!(wq.len() >= rows.end * cols && ws.len() >= rows.end * groups);
    assert!(acts.xq.len() >= n * cols && acts.xs.len() >= n * groups);
    let (wp, sp) = (wq.as_ptr(), ws.as_ptr());
    let (xq, xs) = (acts.xq.as_ptr(), acts.xs.as_ptr());
    sweep::<4, 1>(rows, n, out, ld, |j, [t]| {
        let x = (xq.wrapping_add(t * cols), xs.wrapping_add(t * groups));
        let w = j.map(|j| wp.wrapping_add(j * cols));
        let s = j.map(|j| sp.wrapping_add(j * groups));
        // SAFETY: NEON was confirmed; `sweep` gives rows below `rows.end`
        // and tokens below `n`, checked against the slices above, and `gs`
        // is a multiple of 16 dividing `cols`.
        unsafe { tile_q8(w, s, x, groups, gs) }.map(|v| [v])
    });
    true
}

pub fn takes_token_blocks(_: Isa, _: usize) -> bool {
    false
}

pub fn batch_tile_rows(_: Isa, _: usize) -> Option<usize> {
    None
}

pub fn triangle_product_add(_: Isa, _: &[f32], _: Rows, _: &mut [f32], _: usize) -> bool {
    false
}

pub fn pack_token_block(_: Isa, _: &[f32], _: (usize, usize, usize), _: &mut [f32]) -> bool {
    false
}

#[allow(clippy::too_many_arguments)]
pub fn f32_columns(
    _: Isa,
    _: (&[f32], usize),
    _: &TokenBlocks,
    _: (usize, usize),
    _: Range<usize>,
    _: &mut [f32],
    _: usize,
) -> bool {
    false
}

pub fn q8_bytes(_: Isa) -> Option<super::super::packed::Q8Bytes> {
    None
}

pub fn q8_packed_rows(
    _: Isa,
    _: &super::super::packed::PackedQ8,
    _: &Q8Acts,
    _: Range<usize>,
    _: &mut [f32],
    _: usize,
) -> bool {
    false
}
