//! AVX-512 kernels (F, BW, VL, VNNI, F16C): f32/f16/bf16 product tiles,
//! the packed Q8_0 product tile on `vpdpbusd`, activation quantization and the
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

/// Attention scores of one head: `att[t] = (q · keys[t * stride..][..hs]) /
/// scale` for every `t`, eight keys per tile. Bit-identical to one
/// `dot_f32` per key (each key has its own chain and reduction).
///
/// # Safety
/// AVX-512F/BW/VL and F16C are available; `keys` holds `att.len()` rows of
/// `stride` with `q.len() <= stride` (the last row may end after `hs`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn attention_scores(
    att: &mut [f32],
    q: &[f32],
    keys: &[f32],
    stride: usize,
    scale: f32,
) {
    let (hs, n) = (q.len(), att.len());
    let (qp, kp) = (q.as_ptr(), keys.as_ptr());
    let mut t = 0;
    while t + 8 <= n {
        let v = tile_f32::<f32, 8, 1>(std::array::from_fn(|r| kp.add((t + r) * stride)), [qp], hs);
        for r in 0..8 {
            att[t + r] = v[r][0] / scale;
        }
        t += 8;
    }
    while t < n {
        att[t] = tile_f32::<f32, 1, 1>([kp.add(t * stride)], [qp], hs)[0][0] / scale;
        t += 1;
    }
}

/// `out = sum over t of att[t] * values[t * stride..][..out.len()]`, in `t`
/// order with the sums held in registers 64 values at a time: the same
/// fused multiply-adds in the same order as one `axpy` per key on a zeroed
/// `out`, so bit-identical to it.
///
/// # Safety
/// AVX-512F/BW/VL are available; `values` holds `att.len()` rows of
/// `stride` with `out.len() <= stride`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub unsafe fn weighted_sum(out: &mut [f32], att: &[f32], values: &[f32], stride: usize) {
    let hs = out.len();
    let vp = values.as_ptr();
    let mut k = 0;
    while k < hs {
        let m: [__mmask16; 4] = std::array::from_fn(|i| {
            let left = hs.saturating_sub(k + 16 * i);
            mask16(left.min(16))
        });
        let mut acc = [_mm512_setzero_ps(); 4];
        for (t, &a) in att.iter().enumerate() {
            let av = _mm512_set1_ps(a);
            // Masked-off lanes are never read; `wrapping_add` keeps the
            // address arithmetic defined when they run past `values`.
            let row = vp.wrapping_add(t * stride + k);
            for i in 0..4 {
                let v = _mm512_maskz_loadu_ps(m[i], row.wrapping_add(16 * i));
                acc[i] = _mm512_fmadd_ps(av, v, acc[i]);
            }
        }
        for i in 0..4 {
            _mm512_mask_storeu_ps(out.as_mut_ptr().wrapping_add(k + 16 * i), m[i], acc[i]);
        }
        k += 64;
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

/// A tile over the packed Q8_0 layout (`cpu::packed`): `B` consecutive
/// blocks of 16 rows against tokens `t0..t0 + T`. Result `[b][t]` holds the
/// 16 rows of block `b` for token `t0 + t`, bit-identical to
/// `kernels::dot_q8`: each lane's group dot is exact in int32, and the f32
/// terms are formed and added in group order as the reference does.
///
/// # Safety
/// AVX-512F/BW/VL/VNNI are available; `q` and `s` point at block `b0` of a
/// packed matrix with `cols` columns in groups of `gs` (a multiple of 4
/// dividing `cols`) and `B` blocks from there exist; tokens `t0..t0 + T`
/// are in range of `x`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn tile_q8_packed<const B: usize, const T: usize>(
    q: *const u8,
    s: *const f32,
    cols: usize,
    gs: usize,
    x: &Q8Tokens,
    t0: usize,
) -> [[__m512; T]; B] {
    let groups = cols / gs;
    let xq = x.xq.as_ptr();
    let mut f = [[_mm512_setzero_ps(); T]; B];
    for g in 0..groups {
        let (mut k, end) = (g * gs, (g + 1) * gs);
        let mut a = [[_mm512_setzero_si512(); T]; B];
        // One token has one chain per block: a second set of accumulators
        // for alternate columns hides `vpdpbusd` latency.
        let mut a2 = [[_mm512_setzero_si512(); T]; B];
        if T == 1 {
            while k + 8 <= end {
                let (x0, x1) = (token4(xq, t0 * cols + k), token4(xq, t0 * cols + k + 4));
                for b in 0..B {
                    let wb = q.add(b * cols * 16 + k * 16);
                    a[b][0] = _mm512_dpbusd_epi32(a[b][0], _mm512_loadu_si512(wb as *const _), x0);
                    a2[b][0] = _mm512_dpbusd_epi32(
                        a2[b][0],
                        _mm512_loadu_si512(wb.add(64) as *const _),
                        x1,
                    );
                }
                k += 8;
            }
        }
        while k < end {
            let mut xv = [_mm512_setzero_si512(); T];
            for t in 0..T {
                xv[t] = token4(xq, (t0 + t) * cols + k);
            }
            for b in 0..B {
                let w = _mm512_loadu_si512(q.add(b * cols * 16 + k * 16) as *const _);
                for t in 0..T {
                    a[b][t] = _mm512_dpbusd_epi32(a[b][t], w, xv[t]);
                }
            }
            k += 4;
        }
        for t in 0..T {
            let at = g * x.tokens + t0 + t;
            let xs = _mm512_set1_ps(x.xs_t[at]);
            let xc = _mm512_set1_epi32(x.xc_t[at]);
            for b in 0..B {
                let ws = _mm512_loadu_ps(s.add((b * groups + g) * 16));
                let ints = _mm512_sub_epi32(_mm512_add_epi32(a[b][t], a2[b][t]), xc);
                let term = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ints), ws), xs);
                f[b][t] = _mm512_add_ps(f[b][t], term);
            }
        }
    }
    f
}

/// Stores lanes `lanes` (within `0..16`) of `v` contiguously at `dst`;
/// other lanes are not written.
///
/// # Safety
/// AVX-512F is available; `dst..dst + lanes.len()` is writable.
#[inline]
#[target_feature(enable = "avx512f")]
pub unsafe fn store_lanes(dst: *mut f32, v: __m512, lanes: std::ops::Range<usize>) {
    if lanes.start == 0 && lanes.end == 16 {
        _mm512_storeu_ps(dst, v);
    } else {
        // Masked-off lanes are never accessed, so the base may lie before
        // `dst`'s allocation; `wrapping_sub` keeps the arithmetic defined.
        let m = mask16(lanes.end) & !mask16(lanes.start);
        _mm512_mask_storeu_ps(dst.wrapping_sub(lanes.start), m, v);
    }
}

/// Four activation bytes at `xq + at` broadcast to every 32-bit lane.
///
/// # Safety
/// AVX-512F is available; `xq + at .. + 4` is readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn token4(xq: *const i8, at: usize) -> __m512i {
    _mm512_set1_epi32(std::ptr::read_unaligned(xq.add(at) as *const i32))
}
