//! AVX2 + FMA + F16C kernels: the f32/f16/bf16 product tile and the small
//! vector helpers, for x86 CPUs without the AVX-512 set. Q8_0 products fall
//! back to the scalar loops at this level. Every function requires those
//! features; the dispatcher only calls them through an `Isa` that detected
//! them at run time.

// Tiles index register arrays by (row, token); iterator chains over
// several such arrays at once would hide the tile's shape.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::{bf16, f16};

/// A weight element type widened to f32 eight at a time.
pub trait Wide: Copy {
    /// Loads 8 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `p..p + 8` is readable.
    unsafe fn load8(p: *const Self) -> __m256;
    /// Element `i` at `p` as f32, for the scalar tail.
    ///
    /// # Safety
    /// `p + i` is readable.
    unsafe fn get(p: *const Self, i: usize) -> f32;
}

impl Wide for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline]
    unsafe fn get(p: *const f32, i: usize) -> f32 {
        *p.add(i)
    }
}

impl Wide for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline]
    unsafe fn get(p: *const f16, i: usize) -> f32 {
        (*p.add(i)).to_f32()
    }
}

impl Wide for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
    #[inline]
    unsafe fn get(p: *const bf16, i: usize) -> f32 {
        (*p.add(i)).to_f32()
    }
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// `out[r][t] = w[r] · x[t]` over `cols` elements.
///
/// # Safety
/// AVX2, FMA and F16C are available; every pointer has `cols` readable
/// elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_f32<W: Wide, const R: usize, const T: usize>(
    w: [*const W; R],
    x: [*const f32; T],
    cols: usize,
) -> [[f32; T]; R] {
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut xv = [_mm256_setzero_ps(); T];
    let mut k = 0;
    while k + 8 <= cols {
        for t in 0..T {
            xv[t] = _mm256_loadu_ps(x[t].add(k));
        }
        for r in 0..R {
            let wv = W::load8(w[r].add(k));
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
        k += 8;
    }
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]);
        }
    }
    for i in k..cols {
        for r in 0..R {
            let wv = W::get(w[r], i);
            for t in 0..T {
                out[r][t] += wv * *x[t].add(i);
            }
        }
    }
    out
}

/// `a · b` for equal lengths.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    tile_f32::<f32, 1, 1>([a.as_ptr()], [b.as_ptr()], n)[0][0]
}

/// `y += a * x` for equal lengths.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let av = _mm256_set1_ps(a);
    let mut k = 0;
    while k + 8 <= n {
        let yv = _mm256_loadu_ps(y.as_ptr().add(k));
        let xv = _mm256_loadu_ps(x.as_ptr().add(k));
        _mm256_storeu_ps(y.as_mut_ptr().add(k), _mm256_fmadd_ps(av, xv, yv));
        k += 8;
    }
    for i in k..n {
        y[i] += a * x[i];
    }
}
