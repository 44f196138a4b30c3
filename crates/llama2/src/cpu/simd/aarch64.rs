//! aarch64 kernels: Advanced SIMD (NEON) versions of the f32 dot product,
//! `axpy` and the f32-weight product. Half-precision and Q8_0 products use
//! the scalar loops at this level for now.

use std::arch::aarch64::*;
use std::ops::Range;

use super::super::kernels::{sweep, Isa, Level, Q8Acts, Rows, WeightRows};

pub fn supported(level: Level) -> bool {
    match level {
        Level::Scalar => true,
        Level::Neon => std::arch::is_aarch64_feature_detected!("neon"),
        _ => false,
    }
}

/// `a · b` over the first `n` elements, four lanes at a time.
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

pub fn attention_scores(_: Isa, _: &mut [f32], _: Rows, _: Rows, _: f32) -> bool {
    false
}

pub fn weighted_sum(_: Isa, _: &mut [f32], _: &[f32], _: Rows) -> bool {
    false
}

pub fn softmax(_: Isa, _: &mut [f32]) -> bool {
    false
}

pub fn silu_mul(_: Isa, _: &mut [f32], _: &[f32]) -> bool {
    false
}

pub fn quantize_group(_: Isa, _: &[f32], _: &mut [i8]) -> Option<(f32, i32)> {
    None
}

#[allow(clippy::too_many_arguments)]
pub fn f32_rows(
    isa: Isa,
    w: WeightRows,
    cols: usize,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) -> bool {
    let (Level::Neon, WeightRows::F32(d)) = (isa.level(), w) else {
        return false;
    };
    assert!(d.len() >= rows.end * cols && x.len() >= n * cols);
    let (wp, xp) = (d.as_ptr(), x.as_ptr());
    sweep::<1, 1>(rows, n, out, ld, |j, t| {
        // SAFETY: NEON was confirmed; `sweep` gives rows below `rows.end`
        // and tokens below `n`, checked against `d` and `x` above.
        [[unsafe { dot_n(wp.add(j[0] * cols), xp.add(t[0] * cols), cols) }]]
    });
    true
}

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

pub fn packs_q8(_: Isa) -> bool {
    false
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
