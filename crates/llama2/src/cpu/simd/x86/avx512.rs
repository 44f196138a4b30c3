//! AVX-512 kernels (F, BW, VL, VNNI, F16C): f32/f16/bf16 product tiles,
//! the Q8_0 product tile on `vpdpbusd`, activation quantization and the
//! small vector helpers attention uses. Every function here requires those
//! features; the dispatcher in `kernels.rs` only calls them through an
//! `Isa` that detected them at run time.
//!
//! Tiles compute `R` weight rows against `T` activation rows at once, so a
//! loaded weight vector serves `T` tokens and a loaded activation vector `R`
//! rows. Callers pass exactly `R` row pointers and `T` token pointers
//! (duplicating the last one to fill a partial tile).

// Tiles index register arrays by (row, token); iterator chains over
// several such arrays at once would hide the tile's shape.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::{bf16, f16};

/// A weight element type widened to f32 sixteen at a time.
pub trait Wide: Copy {
    /// Loads 16 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX-512F/BW/VL and F16C are available; `p..p + 16` is readable.
    unsafe fn load16(p: *const Self) -> __m512;
    /// Loads the first `n < 16` elements at `p` as f32, zeros elsewhere.
    ///
    /// # Safety
    /// As `load16`, for `p..p + n`.
    unsafe fn load_part(p: *const Self, n: usize) -> __m512;
}

fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

impl Wide for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load16(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load_part(p: *const f32, n: usize) -> __m512 {
        _mm512_maskz_loadu_ps(mask16(n), p)
    }
}

impl Wide for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load16(p: *const f16) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load_part(p: *const f16, n: usize) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask16(n), p as *const i16))
    }
}

impl Wide for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load16(p: *const bf16) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load_part(p: *const bf16, n: usize) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(mask16(n), p as *const i16);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

/// `out[r][t] = w[r] · x[t]` over `cols` elements.
///
/// # Safety
/// AVX-512F/BW/VL and F16C are available; every pointer has `cols` readable
/// elements.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn tile_f32<W: Wide, const R: usize, const T: usize>(
    w: [*const W; R],
    x: [*const f32; T],
    cols: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    let mut xv = [_mm512_setzero_ps(); T];
    let mut k = 0;
    while k + 16 <= cols {
        for t in 0..T {
            xv[t] = _mm512_loadu_ps(x[t].add(k));
        }
        for r in 0..R {
            let wv = W::load16(w[r].add(k));
            for t in 0..T {
                acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
        k += 16;
    }
    if k < cols {
        let n = cols - k;
        for t in 0..T {
            xv[t] = f32::load_part(x[t].add(k), n);
        }
        for r in 0..R {
            let wv = W::load_part(w[r].add(k), n);
            for t in 0..T {
                acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
    out
}

/// `a · b` for equal lengths.
///
/// # Safety
/// AVX-512F/BW/VL and F16C are available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    tile_f32::<f32, 1, 1>([a.as_ptr()], [b.as_ptr()], n)[0][0]
}

/// `y += a * x` for equal lengths.
///
/// # Safety
/// AVX-512F/BW/VL and F16C are available.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let av = _mm512_set1_ps(a);
    let (yp, xp) = (y.as_mut_ptr(), x.as_ptr());
    let mut k = 0;
    while k < n {
        let m = mask16((n - k).min(16));
        let yv = _mm512_maskz_loadu_ps(m, yp.add(k));
        let xv = _mm512_maskz_loadu_ps(m, xp.add(k));
        _mm512_mask_storeu_ps(yp.add(k), m, _mm512_fmadd_ps(av, xv, yv));
        k += 16;
    }
}

// ----------------------------------------------------------------------------
// Q8_0

/// Rounds half away from zero, as `f32::round`, lane by lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn round_away(y: __m512) -> __m512 {
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
    // `y - t` is exact: both have the same sign and exponent range.
    let frac = _mm512_abs_ps(_mm512_sub_ps(y, t));
    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
    let sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(i32::MIN));
    let one = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(_mm512_set1_ps(1.0)),
        sign,
    ));
    _mm512_mask_add_ps(t, up, t, one)
}

/// Quantizes one group whose length is a multiple of 16, exactly as
/// `kernels::quantize_row` does; returns (scale, sum of the int8 values).
///
/// # Safety
/// AVX-512F/BW/VL are available; `q.len() >= x.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_group16(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let n = x.len() / 16 * 16;
    let mut max = _mm512_setzero_ps();
    for k in (0..n).step_by(16) {
        max = _mm512_max_ps(max, _mm512_abs_ps(_mm512_loadu_ps(x.as_ptr().add(k))));
    }
    let max = _mm512_reduce_max_ps(max);
    let scale = max / 127.0;
    if max == 0.0 {
        q[..n].fill(0);
        return (scale, 0);
    }
    let sv = _mm512_set1_ps(scale);
    let mut sum = _mm512_setzero_si512();
    for k in (0..n).step_by(16) {
        // A true division, as the reference: an inverse would round differently.
        let y = _mm512_div_ps(_mm512_loadu_ps(x.as_ptr().add(k)), sv);
        let v = _mm512_cvttps_epi32(round_away(y));
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(
            q.as_mut_ptr().add(k) as *mut __m128i,
            _mm512_cvtepi32_epi8(v),
        );
    }
    (scale, _mm512_reduce_add_epi32(sum))
}

/// Sums lanes 0..8 and lanes 8..16 of each of 16 vectors (a transposing
/// add tree, 3 ops per level). Block `b` of result `h` holds those sums for
/// inputs `8h + 4(b / 2) ..+4`: the low half when `b` is even, else the high.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn reduce_halves(a: [__m512i; 16]) -> [__m512i; 2] {
    let mut b = [_mm512_setzero_si512(); 8];
    for i in 0..8 {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        b[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(x, y), _mm512_unpackhi_epi32(x, y));
    }
    let mut c = [_mm512_setzero_si512(); 4];
    for i in 0..4 {
        let (x, y) = (b[2 * i], b[2 * i + 1]);
        c[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(x, y), _mm512_unpackhi_epi64(x, y));
    }
    let mut d = [_mm512_setzero_si512(); 2];
    for i in 0..2 {
        let (x, y) = (c[2 * i], c[2 * i + 1]);
        d[i] = _mm512_add_epi32(
            _mm512_shuffle_i32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_i32x4::<0b11_01_11_01>(x, y),
        );
    }
    d
}

/// From `reduce_halves` output: lane `p` = the sum of input `p`'s lanes
/// 0..8 (`first`) or 8..16 (`second`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn halves(d: [__m512i; 2]) -> (__m512i, __m512i) {
    (
        _mm512_shuffle_i32x4::<0b10_00_10_00>(d[0], d[1]),
        _mm512_shuffle_i32x4::<0b11_01_11_01>(d[0], d[1]),
    )
}

/// Quantized activations as the Q8 tile reads them.
pub struct Q8Tokens<'a> {
    /// Values `[tokens][cols]`.
    pub xq: &'a [i8],
    /// Scales `[groups][tokens]`, token-minor so a tile loads them together.
    pub xs_t: &'a [f32],
    /// `128 * sum(group)` `[groups][tokens]`: what the unsigned weights add.
    pub xc_t: &'a [i32],
    /// Token count of the transposed arrays (a multiple of 4).
    pub tokens: usize,
}

/// One Q8_0 tile: rows `rows` (absolute indices) of a matrix with whole
/// groups of `gs` (32 or 64) per row, against tokens `t0..t0 + T`. Lane
/// `r * T + t` of the result is output (row r, token t), bit-identical to
/// `kernels::dot_q8`: each group's int32 dot is exact and the f32 terms are
/// added in group order.
///
/// `vpdpbusd` multiplies unsigned by signed bytes, so weights are biased by
/// 128 (xor 0x80) and the bias times the activation sum is subtracted.
///
/// # Safety
/// AVX-512F/BW/VL/VNNI are available; rows and tokens are in range of
/// `wq`/`ws` and `x`; `T` is 1 or 4 and `R * T == 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile_q8<const R: usize, const T: usize>(
    wq: &[i8],
    ws: &[f32],
    cols: usize,
    gs: usize,
    rows: [usize; R],
    x: &Q8Tokens,
    t0: usize,
) -> [f32; 16] {
    let groups = cols / gs;
    let bias = _mm512_set1_epi8(i8::MIN);
    let mut row_offsets = [0i32; 16];
    for (p, o) in row_offsets.iter_mut().enumerate() {
        *o = ((rows[p / T] - rows[0]) * groups) as i32;
    }
    let ws_index = _mm512_loadu_si512(row_offsets.as_ptr() as *const __m512i);
    let ws0 = ws.as_ptr().add(rows[0] * groups);
    let mut f = _mm512_setzero_ps();
    let mut xv = [_mm512_setzero_si512(); T];
    let mut k = 0;
    while k < cols {
        let m = if cols - k >= 64 {
            u64::MAX
        } else {
            (1u64 << (cols - k)) - 1
        };
        for t in 0..T {
            xv[t] = _mm512_maskz_loadu_epi8(m, x.xq.as_ptr().add((t0 + t) * cols + k));
        }
        let mut acc = [_mm512_setzero_si512(); 16];
        for r in 0..R {
            let w = _mm512_maskz_loadu_epi8(m, wq.as_ptr().add(rows[r] * cols + k));
            let wu = _mm512_xor_si512(w, bias);
            for t in 0..T {
                acc[r * T + t] = _mm512_dpbusd_epi32(acc[r * T + t], wu, xv[t]);
            }
        }
        let (first, second) = halves(reduce_halves(acc));
        if gs == 64 {
            let g = k / 64;
            f = add_group::<T>(
                f,
                _mm512_add_epi32(first, second),
                ws_index,
                ws0.add(g),
                x,
                g,
                t0,
            );
        } else {
            let g = k / 32;
            f = add_group::<T>(f, first, ws_index, ws0.add(g), x, g, t0);
            if k + 32 < cols {
                f = add_group::<T>(f, second, ws_index, ws0.add(g + 1), x, g + 1, t0);
            }
        }
        k += 64;
    }
    let mut out = [0f32; 16];
    _mm512_storeu_ps(out.as_mut_ptr(), f);
    out
}

/// `f + (dot - bias) * w_scale * x_scale` per lane, for group `g`: the f32
/// term of the reference, with the same two roundings per product.
///
/// # Safety
/// AVX-512F/BW/VL are available; `ws_g` plus each index is a scale of group
/// `g`; `t0 + T` tokens are in range of `x`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn add_group<const T: usize>(
    f: __m512,
    ints: __m512i,
    ws_index: __m512i,
    ws_g: *const f32,
    x: &Q8Tokens,
    g: usize,
    t0: usize,
) -> __m512 {
    let (xs, xc) = token_lanes::<T>(x, g, t0);
    let ws = _mm512_i32gather_ps::<4>(ws_index, ws_g);
    let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(ints, xc));
    _mm512_add_ps(f, _mm512_mul_ps(_mm512_mul_ps(dot, ws), xs))
}

/// Activation scales and bias corrections of group `g` for the lanes of a
/// tile: token `t0 + (p % T)` for lane `p`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn token_lanes<const T: usize>(x: &Q8Tokens, g: usize, t0: usize) -> (__m512, __m512i) {
    let at = g * x.tokens + t0;
    if T == 1 {
        (_mm512_set1_ps(x.xs_t[at]), _mm512_set1_epi32(x.xc_t[at]))
    } else {
        (
            _mm512_broadcast_f32x4(_mm_loadu_ps(x.xs_t.as_ptr().add(at))),
            _mm512_broadcast_i32x4(_mm_loadu_si128(x.xc_t.as_ptr().add(at) as *const __m128i)),
        )
    }
}
