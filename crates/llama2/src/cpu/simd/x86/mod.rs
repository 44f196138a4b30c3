//! x86-64 kernels: AVX-512 (with VNNI) and AVX2 levels, detected at run
//! time. This file maps an `Isa` and a weight type to the right tile and
//! sweeps the tile over a range of weight rows; the tiles themselves live in
//! `avx512.rs` and `avx2.rs`.

mod avx2;
mod avx512;

use std::ops::Range;

use half::{bf16, f16};

use super::super::kernels::{sweep, Isa, Level, Q8Acts, WeightRows};

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
        Level::Avx512 => {
            supported(Level::Avx2)
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        }
        Level::Neon => false,
    }
}

pub fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> Option<f32> {
    match isa.level() {
        // SAFETY: an `Isa` only holds a level `supported` confirmed.
        Level::Avx512 => Some(unsafe { avx512::dot_f32(a, b) }),
        // SAFETY: as above.
        Level::Avx2 => Some(unsafe { avx2::dot_f32(a, b) }),
        _ => None,
    }
}

pub fn axpy(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) -> bool {
    match isa.level() {
        // SAFETY: an `Isa` only holds a level `supported` confirmed.
        Level::Avx512 => unsafe { avx512::axpy(y, a, x) },
        // SAFETY: as above.
        Level::Avx2 => unsafe { avx2::axpy(y, a, x) },
        _ => return false,
    }
    true
}

/// Quantizes a group whose length is a multiple of 16; `None` when this
/// level has no vector version.
pub fn quantize_group(isa: Isa, x: &[f32], q: &mut [i8]) -> Option<(f32, i32)> {
    if isa.level() != Level::Avx512 || !x.len().is_multiple_of(16) || q.len() < x.len() {
        return None;
    }
    // SAFETY: the level was confirmed by `supported`; `q` is long enough.
    Some(unsafe { avx512::quantize_group16(x, q) })
}

/// `out_t[(j - rows.start) * n + t] = w[j] · x[t]` for `j` in `rows`.
pub fn f32_rows(
    isa: Isa,
    w: WeightRows,
    cols: usize,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    out_t: &mut [f32],
) -> bool {
    assert!(w.len() >= rows.end * cols && x.len() >= n * cols);
    match (isa.level(), w) {
        (Level::Avx512, WeightRows::F32(d)) => rows512::<f32>(d, cols, x, n, rows, out_t),
        (Level::Avx512, WeightRows::F16(d)) => rows512::<f16>(d, cols, x, n, rows, out_t),
        (Level::Avx512, WeightRows::BF16(d)) => rows512::<bf16>(d, cols, x, n, rows, out_t),
        (Level::Avx2, WeightRows::F32(d)) => rows256::<f32>(d, cols, x, n, rows, out_t),
        (Level::Avx2, WeightRows::F16(d)) => rows256::<f16>(d, cols, x, n, rows, out_t),
        (Level::Avx2, WeightRows::BF16(d)) => rows256::<bf16>(d, cols, x, n, rows, out_t),
        _ => return false,
    }
    true
}

/// Decoding reads each weight row for one token: eight rows per pass keep
/// eight FMA chains busy. Batches use 4x4 tiles: each loaded weight vector
/// serves four tokens.
fn rows512<W: avx512::Wide>(
    w: &[W],
    cols: usize,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    out_t: &mut [f32],
) {
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    if n == 1 {
        sweep::<8, 1>(rows, n, out_t, |j, t| {
            // SAFETY: AVX-512 was confirmed (caller's `Isa`); `sweep` gives
            // rows below `rows.end` and tokens below `n`, which `f32_rows`
            // checked lie inside `w` and `x`.
            unsafe {
                avx512::tile_f32(
                    j.map(|j| wp.add(j * cols)),
                    t.map(|t| xp.add(t * cols)),
                    cols,
                )
            }
        })
    } else {
        sweep::<4, 4>(rows, n, out_t, |j, t| {
            // SAFETY: as above.
            unsafe {
                avx512::tile_f32(
                    j.map(|j| wp.add(j * cols)),
                    t.map(|t| xp.add(t * cols)),
                    cols,
                )
            }
        })
    }
}

/// The AVX2 version of `rows512`, with tiles sized for 16 registers.
fn rows256<W: avx2::Wide>(
    w: &[W],
    cols: usize,
    x: &[f32],
    n: usize,
    rows: Range<usize>,
    out_t: &mut [f32],
) {
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    if n == 1 {
        sweep::<8, 1>(rows, n, out_t, |j, t| {
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
        sweep::<4, 2>(rows, n, out_t, |j, t| {
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

/// The Q8_0 product over `rows` with VNNI tiles; `false` (scalar) for other
/// levels, group sizes other than 32 and 64, or groups straddling rows.
pub fn q8_rows(
    isa: Isa,
    wq: &[i8],
    ws: &[f32],
    acts: &Q8Acts,
    rows: Range<usize>,
    out_t: &mut [f32],
) -> bool {
    let (cols, gs) = (acts.cols, acts.gs);
    if isa.level() != Level::Avx512 || !(gs == 32 || gs == 64) || !cols.is_multiple_of(gs) {
        return false;
    }
    assert!(wq.len() >= rows.end * cols && ws.len() >= rows.end * cols / gs);
    assert!(acts.xq.len() >= acts.tokens * cols && acts.tokens.is_multiple_of(4));
    let x = avx512::Q8Tokens {
        xq: &acts.xq,
        xs_t: &acts.xs_t,
        xc_t: &acts.xc_t,
        tokens: acts.tokens,
    };
    if acts.n == 1 {
        sweep::<16, 1>(rows, 1, out_t, |j, t| {
            // SAFETY: AVX-512 with VNNI was confirmed (caller's `Isa`); rows
            // are below `rows.end`, checked against `wq` and `ws` above.
            let lanes = unsafe { avx512::tile_q8::<16, 1>(wq, ws, cols, gs, j, &x, t[0]) };
            lanes.map(|v| [v])
        })
    } else {
        sweep::<4, 4>(rows, acts.n, out_t, |j, t| {
            // SAFETY: as above; tokens `t[0]..t[0] + 4` exist because
            // `sweep` starts tiles at multiples of 4 and `acts.tokens` is
            // padded to a multiple of 4.
            let l = unsafe { avx512::tile_q8::<4, 4>(wq, ws, cols, gs, j, &x, t[0]) };
            [0, 1, 2, 3].map(|r| [l[4 * r], l[4 * r + 1], l[4 * r + 2], l[4 * r + 3]])
        })
    }
    true
}
