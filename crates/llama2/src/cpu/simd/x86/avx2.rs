//! AVX2 + FMA + F16C kernels, for x86 CPUs without the AVX-512 set (every
//! AMD CPU before Zen 4, most Intel laptops and desktops): the f32/f16/bf16
//! product tiles, the packed Q8_0 product tile on `vpmaddubsw` (and on
//! AVX-VNNI's 256-bit `vpdpbusd` where the CPU has it), activation
//! quantization, and the vector helpers attention and the FFN use. Every
//! function requires those features; the dispatcher only calls them through
//! an `Isa` that detected them at run time (or was forced to this level on
//! a wider CPU, which also has them).

// Tiles index register arrays by (row, token); iterator chains over
// several such arrays at once would hide the tile's shape.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::super::super::kernels::{triangle_row, Rows};
use super::Q8Tokens;

/// A weight element type widened to f32 eight at a time.
pub trait Wide: Copy {
    /// Whether the elements are f32 already (rows can be read in place).
    const IS_F32: bool;
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
    /// The first `min(left, 8)` elements at `p` as f32, zeros after; reads
    /// nothing past them.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; those elements are readable.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_first(p: *const Self, left: usize) -> __m256 {
        let mut v = [0f32; 8];
        for (i, v) in v.iter_mut().enumerate().take(left) {
            *v = Self::get(p, i);
        }
        _mm256_loadu_ps(v.as_ptr())
    }
}

impl Wide for f32 {
    const IS_F32: bool = true;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_first(p: *const f32, left: usize) -> __m256 {
        _mm256_maskload_ps(p, lanes(left))
    }
    #[inline]
    unsafe fn get(p: *const f32, i: usize) -> f32 {
        *p.add(i)
    }
}

impl Wide for f16 {
    const IS_F32: bool = false;
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
    const IS_F32: bool = false;
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

/// Lane `i` of the result is `hsum(v[i])`, with the same additions in the
/// same order, but for eight vectors at once: 22 operations where eight
/// `hsum`s take 48 (a tile of 8 short dots, such as attention's 64-value
/// ones, spends about as long reducing as multiplying).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum8(v: [__m256; 8]) -> __m256 {
    // p[i] = [lo + hi of v[2i] | lo + hi of v[2i + 1]]: `hsum`'s first add.
    let p: [__m256; 4] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        )
    });
    // Lanes 0 + 2 and 1 + 3 of each sum: its second.
    let u: [__m256; 2] = std::array::from_fn(|i| {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(a, b),
            _mm256_shuffle_ps::<0xEE>(a, b),
        )
    });
    // The two halves of each: its third, leaving sums 0, 2, 4, 6, 1, 3, 5, 7.
    let f = _mm256_add_ps(
        _mm256_shuffle_ps::<0x88>(u[0], u[1]),
        _mm256_shuffle_ps::<0xDD>(u[0], u[1]),
    );
    _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
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
    if R * T == 8 {
        let sums = hsum8(std::array::from_fn(|i| acc[i / T][i % T]));
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
        for r in 0..R {
            for t in 0..T {
                out[r][t] = lanes[r * T + t];
            }
        }
    } else {
        for r in 0..R {
            for t in 0..T {
                out[r][t] = hsum(acc[r][t]);
            }
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

/// The batched f32 product tile: `R` weight rows against one block of 16
/// tokens of `TokenBlocks`' layout, as outer products: per column, each
/// row's weight is broadcast once and multiplied into both token vectors,
/// so the tile needs no horizontal sums and loads `R + 2` values per `2R`
/// multiply-adds (6 rows: 12 accumulators of the 16 registers). Result
/// `[r][0][t]`: row `r` for token `t` of the block. The weights are rows
/// (`[*const f32; R]`) or a matrix stored by columns (`super::ByColumns`).
///
/// # Safety
/// AVX2, FMA and F16C are available; `w` has `cols` readable values for
/// each of its `R` rows and `xt[0]` has `cols * 16`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_f32_batch<W: super::TileWeights<R>, const R: usize>(
    w: W,
    xt: [*const f32; 1],
    cols: usize,
) -> [[[f32; 16]; 1]; R] {
    let xt = xt[0];
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for k in 0..cols {
        let x0 = _mm256_loadu_ps(xt.add(k * 16));
        let x1 = _mm256_loadu_ps(xt.add(k * 16 + 8));
        for r in 0..R {
            let b = _mm256_broadcast_ss(&*w.at(r, k));
            acc[r][0] = _mm256_fmadd_ps(b, x0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(b, x1, acc[r][1]);
        }
    }
    let mut out = [[[0f32; 16]; 1]; R];
    for r in 0..R {
        _mm256_storeu_ps(out[r][0].as_mut_ptr(), acc[r][0]);
        _mm256_storeu_ps(out[r][0].as_mut_ptr().add(8), acc[r][1]);
    }
    out
}

/// Stores a whole 6-row `tile_f32_batch` result (6 rows by 16 tokens)
/// token by token: token `t0 + t`'s 6 results go to `out[(t0 + t) * ld +
/// col..][..6]`. Each half of the block is transposed in registers (8 x 8,
/// the two missing rows zero), so a token's results leave in two stores (4
/// values and 2) instead of 6 scalar ones (which were 4% of a stories42M
/// prefill on a Zen 3 EPYC). Masked stores are avoided: slow on AMD.
///
/// # Safety
/// AVX2 is available; every position written lies inside `out`'s
/// allocation at `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn store_tile_by_token(
    v: &[[[f32; 16]; 1]; 6],
    out: *mut f32,
    ld: usize,
    (col, t0): (usize, usize),
) {
    for half in 0..2 {
        let rows: [__m256; 8] = std::array::from_fn(|r| {
            if r < 6 {
                _mm256_loadu_ps(v[r][0].as_ptr().add(8 * half))
            } else {
                _mm256_setzero_ps()
            }
        });
        for (t, c) in transpose8(rows).iter().enumerate() {
            let dst = out.add((t0 + 8 * half + t) * ld + col);
            _mm_storeu_ps(dst, _mm256_castps256_ps128(*c));
            let high = _mm_castps_si128(_mm256_extractf128_ps::<1>(*c));
            _mm_storel_epi64(dst.add(4) as *mut __m128i, high);
        }
    }
}

/// `block[k * 16 + t] = x[t * stride + k]` for `t < tokens` and `k < cols`,
/// zero for `tokens <= t < 16`: up to 16 activation rows laid out as one
/// block of `TokenBlocks`, eight columns of eight tokens at a time through
/// `transpose8` (the scalar loop's strided reads were 3% of a stories42M
/// f32 prefill on a Zen 3 EPYC).
///
/// # Safety
/// AVX2 is available; `tokens <= 16`, `x` holds `(tokens - 1) * stride +
/// cols` values when `tokens > 0`, and `block` `cols * 16`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pack_token_block(
    x: &[f32],
    stride: usize,
    tokens: usize,
    cols: usize,
    block: &mut [f32],
) {
    let (xp, bp) = (x.as_ptr(), block.as_mut_ptr());
    for k0 in (0..cols).step_by(8) {
        let width = (cols - k0).min(8);
        let m = lanes(width);
        for half in 0..2 {
            let rows: [__m256; 8] = std::array::from_fn(|i| {
                let t = 8 * half + i;
                if t < tokens {
                    _mm256_maskload_ps(xp.add(t * stride + k0), m)
                } else {
                    _mm256_setzero_ps()
                }
            });
            for (c, v) in transpose8(rows).iter().enumerate().take(width) {
                _mm256_storeu_ps(bp.add((k0 + c) * 16 + 8 * half), *v);
            }
        }
    }
}

/// The transpose of eight rows of eight lanes: `out[i]` lane `r` is
/// `rows[r]` lane `i`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
    let t: [__m256; 8] = std::array::from_fn(|i| {
        let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_ps(a, b)
        } else {
            _mm256_unpackhi_ps(a, b)
        }
    });
    // s[4 * g + j]: lanes j and j + 4 of rows 4g..4g + 4.
    let s: [__m256; 8] = std::array::from_fn(|i| {
        let (g, j) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + j / 2], t[4 * g + 2 + j / 2]);
        if j % 2 == 0 {
            _mm256_shuffle_ps::<0x44>(a, b)
        } else {
            _mm256_shuffle_ps::<0xEE>(a, b)
        }
    });
    std::array::from_fn(|i| {
        if i < 4 {
            _mm256_permute2f128_ps::<0x20>(s[i], s[4 + i])
        } else {
            _mm256_permute2f128_ps::<0x31>(s[i - 4], s[i])
        }
    })
}

/// Row `p[..cols]` widened to f32 into `out`.
///
/// # Safety
/// AVX2, FMA and F16C are available; `p` has `cols` readable elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn widen_row<W: Wide>(p: *const W, cols: usize, out: &mut [f32]) {
    let mut k = 0;
    while k + 8 <= cols {
        _mm256_storeu_ps(out.as_mut_ptr().add(k), W::load8(p.add(k)));
        k += 8;
    }
    for i in k..cols {
        out[i] = W::get(p, i);
    }
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

/// Lanes `0..left.min(8)` set, for masked loads and stores of a row's end.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lanes(left: usize) -> __m256i {
    let n = left.min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// The 8 values at `p`, or its first `left` with zeros after when fewer
/// remain: whole vectors load unmasked, since a masked move costs several
/// times a plain one on AMD (a masked store in softmax's last pass was a
/// quarter of that pass on a Zen 3 EPYC). Without features of its own and
/// always inlined, so it becomes part of its AVX2 caller: as a
/// `#[target_feature]` function LLVM left it a call in a hot loop, which
/// spilled every accumulator around it.
///
/// # Safety
/// AVX2 is available (call it from AVX2 functions only); `p..p +
/// left.min(8)` is readable.
#[inline(always)]
unsafe fn load_upto(p: *const f32, left: usize) -> __m256 {
    if left >= 8 {
        _mm256_loadu_ps(p)
    } else {
        _mm256_maskload_ps(p, tail_lanes(left))
    }
}

/// Stores the first `left.min(8)` lanes of `v` at `p`, as `load_upto` reads.
///
/// # Safety
/// AVX2 is available; `p..p + left.min(8)` is writable.
#[inline(always)]
unsafe fn store_upto(p: *mut f32, left: usize, v: __m256) {
    if left >= 8 {
        _mm256_storeu_ps(p, v)
    } else {
        _mm256_maskstore_ps(p, tail_lanes(left), v)
    }
}

/// `lanes` for `left < 8`, always inlined as `load_upto` is.
///
/// # Safety
/// AVX2 is available (call it from AVX2 functions only).
#[inline(always)]
unsafe fn tail_lanes(left: usize) -> __m256i {
    let index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(left as i32), index)
}

/// `y += a * x` for equal lengths, with fused multiply-adds in every lane
/// (the end of a row too, masked), so `weighted_sum` equals one call per key.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    let n = y.len().min(x.len());
    let av = _mm256_set1_ps(a);
    let (yp, xp) = (y.as_mut_ptr(), x.as_ptr());
    let mut k = 0;
    while k < n {
        let (yv, xv) = (load_upto(yp.add(k), n - k), load_upto(xp.add(k), n - k));
        store_upto(yp.add(k), n - k, _mm256_fmadd_ps(av, xv, yv));
        k += 8;
    }
}

/// Attention scores of one head for `T` queries: `att[t * n + j] =
/// (queries.row(t) · keys.row(j)) / scale` for the `n` keys, `R` keys per
/// tile so each loaded key serves all `T` queries. Bit-identical to one
/// `dot_f32` per (query, key): each pair has its own chain and reduction.
///
/// # Safety
/// AVX2, FMA and F16C are available; `queries` has `T` rows of the keys'
/// length and `att` holds `T * n` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attention_scores<W: super::KvElement, const R: usize, const T: usize>(
    att: &mut [f32],
    queries: Rows,
    keys: Rows<W>,
    scale: f32,
) {
    super::scores_by_tiles::<Tiles256, W, R, T>(att, queries, keys, scale)
}

/// This level's f32 tile, for `scores_by_tiles`.
struct Tiles256;

impl super::F32Tiles for Tiles256 {
    #[inline(always)]
    unsafe fn tile<W: super::KvElement, const R: usize, const T: usize>(
        w: [*const W; R],
        x: [*const f32; T],
        cols: usize,
    ) -> [[f32; T]; R] {
        tile_f32::<W, R, T>(w, x, cols)
    }
}

/// For each of `T` queries: `out[t * hs..][..hs] = sum over j of
/// att[t * n + j] * values.row(j)`, in `j` order with the sums held in
/// registers `8 * V` values at a time, each loaded value row serving all
/// `T` queries. The same fused multiply-adds in the same order as one
/// `axpy` per key on a zeroed output, so bit-identical to it. Each sum is
/// a chain of dependent multiply-adds, so the `T * V` chains of a pass are
/// what keeps the FMA units busy: one query wants `V = 8` (a 64-value head
/// in one pass, 8 chains; with 2 chains a pass ran at a quarter of the
/// FMA throughput, 16% of a stories42M decode on a Zen 3 EPYC).
///
/// # Safety
/// AVX2, FMA and F16C are available; `out` holds `T * hs` values and `att`
/// `T * n`, for the `n` rows of `hs` values in `values`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn weighted_sum<W: Wide, const T: usize, const V: usize>(
    out: &mut [f32],
    att: &[f32],
    values: Rows<W>,
) {
    let (hs, n) = (values.width(), values.count());
    let (vp, stride) = (values.data().as_ptr(), values.stride());
    let mut k = 0;
    while k < hs {
        let m: [__m256i; V] = std::array::from_fn(|i| lanes(hs.saturating_sub(k + 8 * i)));
        // Whole passes load without masks (a masked load costs more on AMD).
        let whole = k + 8 * V <= hs;
        let width = (8 * V).min(hs - k);
        let mut acc = [[_mm256_setzero_ps(); V]; T];
        for j in 0..n {
            let ahead = j + super::PREFETCH_ROWS;
            if ahead < n {
                super::prefetch_rows((vp.wrapping_add(k), stride, width), ahead..ahead + 1);
            }
            // Lanes past the row are never read; `wrapping_add` keeps the
            // address arithmetic defined when they run past `values`.
            let row = vp.wrapping_add(j * stride + k);
            let v: [__m256; V] = std::array::from_fn(|i| {
                if whole {
                    W::load8(row.add(8 * i))
                } else {
                    W::load_first(row.wrapping_add(8 * i), hs.saturating_sub(k + 8 * i))
                }
            });
            for t in 0..T {
                let a = _mm256_set1_ps(*att.get_unchecked(t * n + j));
                for i in 0..V {
                    acc[t][i] = _mm256_fmadd_ps(a, v[i], acc[t][i]);
                }
            }
        }
        for t in 0..T {
            let o = out.as_mut_ptr().add(t * hs + k);
            for i in 0..V {
                if whole {
                    _mm256_storeu_ps(o.add(8 * i), acc[t][i]);
                } else {
                    _mm256_maskstore_ps(o.wrapping_add(8 * i), m[i], acc[t][i]);
                }
            }
        }
        k += 8 * V;
    }
}

/// `e^x` lane by lane, within 2 ulp of `f32::exp` (NaN stays NaN): `x = n
/// ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` from its Taylor series to `r^7`,
/// times `2^n` as two powers of two that are each normal numbers, so that
/// results below the normal range round once, to subnormals and zero, as
/// `exp`'s do.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp8(x: __m256) -> __m256 {
    // Beyond ±104, e^x is 0 or infinite in f32; clamping keeps `n` within
    // ±151, whose halves are normal exponents. `max`/`min` return their
    // second operand, `x`, when it is NaN.
    let x = _mm256_max_ps(_mm256_set1_ps(-104.0), x);
    let x = _mm256_min_ps(_mm256_set1_ps(104.0), x);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // ln 2 in two parts: `n * LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    const INV_FACT: [f32; 8] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let mut p = _mm256_set1_ps(INV_FACT[7]);
    for &c in INV_FACT[..7].iter().rev() {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let n = _mm256_cvtps_epi32(n);
    let (n1, bias) = (_mm256_srai_epi32::<1>(n), _mm256_set1_epi32(127));
    let pow2 = |k: __m256i| _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, bias)));
    // `p * 2^n1` is exact (a normal number); the second product rounds.
    _mm256_mul_ps(_mm256_mul_ps(p, pow2(n1)), pow2(_mm256_sub_epi32(n, n1)))
}

/// `kernels::triangle_product_add` eight columns of the triangle at a
/// time (the AVX-512 version's sweep in 256-bit registers).
///
/// # Safety
/// AVX2 and FMA are available; sizes as `avx512::triangle_product_add`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn triangle_product_add(tri: &[f32], a: Rows, out: &mut [f32], ld: usize) {
    const D: usize = 8;
    let (t_len, width, stride) = (a.count(), a.width(), a.stride());
    let (tp, ap, op) = (tri.as_ptr(), a.data().as_ptr(), out.as_mut_ptr());
    for j0 in (0..t_len).step_by(8) {
        for d0 in (0..width).step_by(D) {
            // Whole groups of `D` columns broadcast at fixed offsets; the
            // last, partial one repeats its last column (dropped below).
            let ds: [usize; D] = std::array::from_fn(|i| (d0 + i).min(width - 1));
            let whole = d0 + D <= width;
            let mut acc = [_mm256_setzero_ps(); D];
            for t in j0..t_len {
                let v = load_upto(tp.add(triangle_row(t) + j0), (t + 1 - j0).min(t_len - j0));
                let row = ap.add(t * stride);
                if whole {
                    let row = row.add(d0);
                    for i in 0..D {
                        acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*row.add(i)), v, acc[i]);
                    }
                } else {
                    for i in 0..D {
                        acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*row.add(ds[i])), v, acc[i]);
                    }
                }
            }
            for (i, &sum) in acc.iter().enumerate().take(width - d0) {
                let (o, left) = (op.add((d0 + i) * ld + j0), t_len - j0);
                store_upto(o, left, _mm256_add_ps(load_upto(o, left), sum));
            }
        }
    }
}

/// In-place softmax: maximum, `e^(x - max)` and their sum eight lanes at a
/// time, then a true division by the sum as the reference does.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn softmax(x: &mut [f32]) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let max = _mm256_set1_ps(max_of(x));
    let sum = _mm256_set1_ps(exp_sum::<true>(p, n, max));
    let mut k = 0;
    while k < n {
        let v = _mm256_div_ps(load_upto(p.add(k), n - k), sum);
        store_upto(p.add(k), n - k, v);
        k += 8;
    }
}

/// `max + ln(sum of e^(x - max))` over `x` (not empty), `max` its largest
/// value: `softmax`'s first two passes without its stores.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn log_sum_exp(x: &[f32]) -> f32 {
    let max = max_of(x);
    // `exp_sum` only writes through its pointer when it stores.
    let sum = exp_sum::<false>(x.as_ptr() as *mut f32, x.len(), _mm256_set1_ps(max));
    max + sum.ln()
}

/// `x = e^(x - shift) * scale`, eight lanes at a time.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn exp_shifted(x: &mut [f32], shift: f32, scale: f32) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let (shift, scale) = (_mm256_set1_ps(shift), _mm256_set1_ps(scale));
    let mut k = 0;
    while k + 8 <= n {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(k)), shift));
        _mm256_storeu_ps(p.add(k), _mm256_mul_ps(e, scale));
        k += 8;
    }
    if k < n {
        let e = exp8(_mm256_sub_ps(load_upto(p.add(k), n - k), shift));
        store_upto(p.add(k), n - k, _mm256_mul_ps(e, scale));
    }
}

/// The largest value of `x` (NaN when one is).
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn max_of(x: &[f32]) -> f32 {
    let (n, p) = (x.len(), x.as_ptr());
    // Plain index loops, as at the AVX-512 level (a cloned iterator kept
    // its state on the stack).
    let low = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut max = low;
    let mut k = 0;
    while k + 8 <= n {
        max = _mm256_max_ps(max, _mm256_loadu_ps(p.add(k)));
        k += 8;
    }
    if k < n {
        let m = lanes(n - k);
        let v = _mm256_blendv_ps(low, _mm256_maskload_ps(p.add(k), m), _mm256_castsi256_ps(m));
        max = _mm256_max_ps(max, v);
    }
    hmax(max)
}

/// The sum of `e^(x - max)` over the `n` values at `p`, storing each in
/// place of its `x` when `STORE`.
///
/// # Safety
/// AVX2, FMA and F16C are available; `p..p + n` is readable, and
/// writable when `STORE`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_sum<const STORE: bool>(p: *mut f32, n: usize, max: __m256) -> f32 {
    let mut sum = _mm256_setzero_ps();
    let mut k = 0;
    while k < n {
        let m = _mm256_castsi256_ps(lanes(n - k));
        let e = exp8(_mm256_sub_ps(load_upto(p.add(k), n - k), max));
        if STORE {
            store_upto(p.add(k), n - k, e);
        }
        sum = _mm256_add_ps(sum, _mm256_and_ps(e, m));
        k += 8;
    }
    hsum(sum)
}

/// `kernels::softmax_by_block`: a key's 16 lanes are two vectors, so each
/// query's maximum, exponentials and sum run down its lane with no
/// horizontal step, and round as `softmax` does on that query alone: the
/// exponentials are the same `exp8`, the sum is kept as eight lane sums
/// (key `j` into sum `j % 8`, as `exp_sum` adds a row's keys) added as
/// `hsum` adds them, and the division is a true one. Keys past `first`
/// are masked off in the lanes of the queries before them.
///
/// # Safety
/// AVX2, FMA and F16C are available; `att.len()` is a multiple of 16.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn softmax_by_block(att: &mut [f32], first: usize, scale: f32) {
    let (n, p) = (att.len() / 16, att.as_mut_ptr());
    let (scale, low) = (_mm256_set1_ps(scale), _mm256_set1_ps(f32::NEG_INFINITY));
    // One half (8 queries) at a time: its eight lane sums fill half the
    // registers.
    for h in 0..2 {
        let at = |j: usize| p.add(j * 16 + 8 * h);
        let mut max = low;
        for j in 0..n {
            // A true division: the scaled scores feed `exp`, which turns
            // a rounding of a large score into a large relative error.
            let mut s = _mm256_div_ps(_mm256_loadu_ps(at(j)), scale);
            if j > first {
                s = _mm256_blendv_ps(low, s, lanes_from(j - first, h));
            }
            _mm256_storeu_ps(at(j), s);
            max = _mm256_max_ps(max, s);
        }
        let mut sums = [_mm256_setzero_ps(); 8];
        for j0 in (0..n).step_by(8) {
            for (l, sum) in sums.iter_mut().enumerate().take(n - j0) {
                let j = j0 + l;
                let mut e = exp8(_mm256_sub_ps(_mm256_loadu_ps(at(j)), max));
                if j > first {
                    e = _mm256_and_ps(e, lanes_from(j - first, h));
                }
                _mm256_storeu_ps(at(j), e);
                *sum = _mm256_add_ps(*sum, e);
            }
        }
        let sum = hsum_tree(sums);
        for j in 0..n {
            _mm256_storeu_ps(at(j), _mm256_div_ps(_mm256_loadu_ps(at(j)), sum));
        }
    }
}

/// Lane by lane, `hsum`'s additions of eight values `v[0..8]`: `((v0 +
/// v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7))`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_tree(v: [__m256; 8]) -> __m256 {
    let add = |a, b| _mm256_add_ps(a, b);
    add(
        add(add(v[0], v[4]), add(v[2], v[6])),
        add(add(v[1], v[5]), add(v[3], v[7])),
    )
}

/// Attention scores of `R` keys against a block of 16 queries `q`
/// `[hs][16]`, each rounded as `dot_f32` rounds that query-key pair: the
/// eight lane sums of `tile_f32` (lane `l` a chain of fused multiply-adds
/// over values `l, l + 8, ...`) kept apart, then added as `hsum` adds
/// them. One pass over the head takes lanes `l` and `l + 4` together and
/// adds them at once (`hsum`'s first step), so four passes leave four
/// partial sums per score for the rest of the tree. Result `[r][t]`.
///
/// # Safety
/// AVX2, FMA and F16C are available; each key has `hs` readable values,
/// `hs` a multiple of 8, and `q` `hs * 16`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn scores_by_lanes<const R: usize>(
    keys: [*const f32; R],
    q: *const f32,
    hs: usize,
) -> [[f32; 16]; R] {
    // `pairs[l][r][h]`: lanes `l` and `l + 4` of key `r`, queries `8h..`.
    let mut pairs = [[[_mm256_setzero_ps(); 2]; R]; 4];
    for (l, pair) in pairs.iter_mut().enumerate() {
        let mut acc = [[[_mm256_setzero_ps(); 2]; 2]; R];
        for c in (l..hs).step_by(8) {
            let x = [
                [
                    _mm256_loadu_ps(q.add(c * 16)),
                    _mm256_loadu_ps(q.add(c * 16 + 8)),
                ],
                [
                    _mm256_loadu_ps(q.add((c + 4) * 16)),
                    _mm256_loadu_ps(q.add((c + 4) * 16 + 8)),
                ],
            ];
            for r in 0..R {
                for (i, x) in x.iter().enumerate() {
                    let k = _mm256_broadcast_ss(&*keys[r].add(c + 4 * i));
                    acc[r][i][0] = _mm256_fmadd_ps(k, x[0], acc[r][i][0]);
                    acc[r][i][1] = _mm256_fmadd_ps(k, x[1], acc[r][i][1]);
                }
            }
        }
        for r in 0..R {
            for h in 0..2 {
                pair[r][h] = _mm256_add_ps(acc[r][0][h], acc[r][1][h]);
            }
        }
    }
    let mut out = [[0f32; 16]; R];
    for (r, o) in out.iter_mut().enumerate() {
        for h in 0..2 {
            let p = |l: usize| pairs[l][r][h];
            let sum = _mm256_add_ps(_mm256_add_ps(p(0), p(2)), _mm256_add_ps(p(1), p(3)));
            _mm256_storeu_ps(o.as_mut_ptr().add(8 * h), sum);
        }
    }
    out
}

/// Lanes `t >= from` of half `h` (lanes `8h..8h + 8`) of a 16-lane block:
/// the queries of a block that see a key `from` positions past its first.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lanes_from(from: usize, h: usize) -> __m256 {
    let index = _mm256_add_epi32(
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        _mm256_set1_epi32(8 * h as i32),
    );
    let below = _mm256_set1_epi32(from.min(16) as i32 - 1);
    _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, below))
}

/// Largest of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// `x = 1 / (1 + e^-x)`, the reference's operations, eight lanes at a time.
///
/// # Safety
/// AVX2, FMA and F16C are available.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn sigmoid(x: &mut [f32]) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let one = _mm256_set1_ps(1.0);
    for k in (0..n).step_by(8) {
        let v = load_upto(p.add(k), n - k);
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), v));
        store_upto(p.add(k), n - k, _mm256_div_ps(one, _mm256_add_ps(one, e)));
    }
}

/// `gate = gate * (1 / (1 + e^-gate)) * up`, the reference's operations in
/// its order, eight lanes at a time.
///
/// # Safety
/// AVX2, FMA and F16C are available; `up.len() >= gate.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let (n, g, u) = (gate.len(), gate.as_mut_ptr(), up.as_ptr());
    let one = _mm256_set1_ps(1.0);
    for k in (0..n).step_by(8) {
        let x = load_upto(g.add(k), n - k);
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        let sig = _mm256_div_ps(one, _mm256_add_ps(one, e));
        let v = _mm256_mul_ps(_mm256_mul_ps(x, sig), load_upto(u.add(k), n - k));
        store_upto(g.add(k), n - k, v);
    }
}

// ----------------------------------------------------------------------------
// Q8_0

/// Rounds half away from zero, as `f32::round`, lane by lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn round_away(y: __m256) -> __m256 {
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(y);
    let sign = _mm256_and_ps(y, _mm256_set1_ps(-0.0));
    // `y - t` is exact: both have the same sign and exponent range.
    let frac = _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(y, t));
    let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
    let one = _mm256_or_ps(_mm256_set1_ps(1.0), sign);
    _mm256_add_ps(t, _mm256_and_ps(up, one))
}

/// Quantizes one group whose length is a multiple of 8, exactly as
/// `kernels::quantize_row` does; returns (scale, sum of the int8 values).
///
/// # Safety
/// AVX2, FMA and F16C are available; `q.len() >= x.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_group8(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let n = x.len() / 8 * 8;
    let abs = |v: __m256| _mm256_andnot_ps(_mm256_set1_ps(-0.0), v);
    let mut max = _mm256_setzero_ps();
    for k in (0..n).step_by(8) {
        max = _mm256_max_ps(max, abs(_mm256_loadu_ps(x.as_ptr().add(k))));
    }
    let max = hmax(max);
    let scale = max / 127.0;
    if max == 0.0 {
        q[..n].fill(0);
        return (scale, 0);
    }
    let sv = _mm256_set1_ps(scale);
    // The low byte of each 32-bit lane, gathered into each 128-bit half's
    // first four bytes.
    let low_bytes = _mm256_setr_epi8(
        0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1, -1,
    );
    let mut sum = _mm256_setzero_si256();
    for k in (0..n).step_by(8) {
        // A true division, as the reference: an inverse would round differently.
        let y = _mm256_div_ps(_mm256_loadu_ps(x.as_ptr().add(k)), sv);
        let v = _mm256_cvttps_epi32(round_away(y));
        sum = _mm256_add_epi32(sum, v);
        let b = _mm256_shuffle_epi8(v, low_bytes);
        let eight = _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256::<1>(b));
        _mm_storel_epi64(q.as_mut_ptr().add(k) as *mut __m128i, eight);
    }
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256::<1>(sum),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    (scale, _mm_cvtsi128_si32(s))
}

/// How a 256-bit Q8 tile forms the four-byte dots of each 32-bit lane.
trait Dot4 {
    /// Whether the weight bytes carry +128 (`Q8Bytes::Offset`), whose
    /// `128 * sum(x)` the group's sum must lose.
    const OFFSET: bool;
    /// `acc` plus, per 32-bit lane, the dot of the four weight bytes of `w`
    /// with the four activation bytes of `x` (`ax` is `|x|`).
    ///
    /// # Safety
    /// The tile's features (and the impl's) are available.
    unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i, ax: __m256i) -> __m256i;
}

/// AVX2: `vpmaddubsw` multiplies `|x|` by the weight given `x`'s sign; its
/// pairs of products (at most 2 * 128 * 127) fit in 16 bits, so the dot is
/// exact in int32.
struct SignTrick;

impl Dot4 for SignTrick {
    const OFFSET: bool = false;
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i, ax: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x));
        _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// AVX-VNNI: `vpdpbusd` on unsigned (offset) weights and signed activations.
struct Vnni;

impl Dot4 for Vnni {
    const OFFSET: bool = true;
    #[inline(always)]
    unsafe fn dot4(acc: __m256i, w: __m256i, x: __m256i, _: __m256i) -> __m256i {
        _mm256_dpbusd_avx_epi32(acc, w, x)
    }
}

/// A tile over the packed Q8_0 layout with signed bytes (`Q8Bytes::Signed`):
/// one block of 16 rows against tokens `t0..t0 + T` (decoding reads one
/// block at a time, `q8_packed_rows256`). Result `[t]` holds the block's 16
/// rows for token `t0 + t`, bit-identical to `kernels::dot_q8`: each lane's
/// group dot is exact in int32 (see `SignTrick`), and the f32 terms are
/// formed and added in group order as the reference does.
///
/// # Safety
/// AVX2, FMA and F16C are available; `q` and `s` point at a block of a
/// packed matrix with `cols` columns in groups of `gs` (a multiple of 4
/// dividing `cols`), whose bytes hold no -128; tokens `t0..t0 + T` are in
/// range of `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_q8_packed<const T: usize>(
    q: *const u8,
    s: *const f32,
    dims: (usize, usize),
    x: &Q8Tokens,
    t0: usize,
) -> [[f32; 16]; T] {
    tile_q8::<SignTrick, T>(q, s, dims, x, t0)
}

/// `tile_q8_packed` on AVX-VNNI, for offset bytes (`Q8Bytes::Offset`).
///
/// # Safety
/// As `tile_q8_packed`, with AVX-VNNI available too and the bytes offset
/// (any value allowed).
#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
pub unsafe fn tile_q8_vnni<const T: usize>(
    q: *const u8,
    s: *const f32,
    dims: (usize, usize),
    x: &Q8Tokens,
    t0: usize,
) -> [[f32; 16]; T] {
    tile_q8::<Vnni, T>(q, s, dims, x, t0)
}

/// The body of both tiles, inlined into each so that it is compiled with
/// that tile's features.
///
/// # Safety
/// As the tile that calls it.
#[inline(always)]
unsafe fn tile_q8<D: Dot4, const T: usize>(
    q: *const u8,
    s: *const f32,
    (cols, gs): (usize, usize),
    x: &Q8Tokens,
    t0: usize,
) -> [[f32; 16]; T] {
    let groups = cols / gs;
    let xq = x.xq.as_ptr();
    let mut f = [[_mm256_setzero_ps(); 2]; T];
    for g in 0..groups {
        let mut a = [[_mm256_setzero_si256(); 2]; T];
        for k in (g * gs..(g + 1) * gs).step_by(4) {
            let p = q.add(k * 16) as *const __m256i;
            let w = [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))];
            for t in 0..T {
                let at = xq.add((t0 + t) * cols + k) as *const i32;
                let xv = _mm256_set1_epi32(std::ptr::read_unaligned(at));
                let ax = _mm256_abs_epi8(xv);
                for h in 0..2 {
                    a[t][h] = D::dot4(a[t][h], w[h], xv, ax);
                }
            }
        }
        for t in 0..T {
            let at = g * x.tokens + t0 + t;
            let xs = _mm256_set1_ps(x.xs_t[at]);
            let xc = _mm256_set1_epi32(if D::OFFSET { x.xc_t[at] } else { 0 });
            for h in 0..2 {
                let ws = _mm256_loadu_ps(s.add(g * 16 + 8 * h));
                let ints = _mm256_cvtepi32_ps(_mm256_sub_epi32(a[t][h], xc));
                let term = _mm256_mul_ps(_mm256_mul_ps(ints, ws), xs);
                f[t][h] = _mm256_add_ps(f[t][h], term);
            }
        }
    }
    let mut out = [[0f32; 16]; T];
    for t in 0..T {
        _mm256_storeu_ps(out[t].as_mut_ptr(), f[t][0]);
        _mm256_storeu_ps(out[t].as_mut_ptr().add(8), f[t][1]);
    }
    out
}
