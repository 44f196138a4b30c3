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

use super::super::super::kernels::{triangle_row, Rows};
use super::super::super::packed::BLOCK_ROWS;
use super::Q8Tokens;

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
    /// Loads the elements at `p` whose lanes `m` sets as f32, zeros
    /// elsewhere; the others are not read.
    ///
    /// # Safety
    /// As `load16`, for the lanes `m` sets.
    unsafe fn load_masked(p: *const Self, m: __mmask16) -> __m512;
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
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load_masked(p: *const f32, m: __mmask16) -> __m512 {
        _mm512_maskz_loadu_ps(m, p)
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
        Self::load_masked(p, mask16(n))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load_masked(p: *const f16, m: __mmask16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p as *const i16))
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
        Self::load_masked(p, mask16(n))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    unsafe fn load_masked(p: *const bf16, m: __mmask16) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(m, p as *const i16);
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
    if R * T == 8 || R * T == 16 {
        // Many sums at once: a quarter of the shuffles of one
        // `_mm512_reduce_add_ps` each (the scores of decode attention are
        // 48 or 64 multiply-adds per key, so the sums are most of the work).
        let at = |i: usize| acc[i / T][i % T];
        let sums = match R * T {
            8 => sums8(std::array::from_fn(at)),
            _ => sums16(std::array::from_fn(at)),
        };
        for r in 0..R {
            for t in 0..T {
                out[r][t] = sums[r * T + t];
            }
        }
    } else {
        for r in 0..R {
            for t in 0..T {
                out[r][t] = _mm512_reduce_add_ps(acc[r][t]);
            }
        }
    }
    out
}

/// The lane sums of eight vectors, each rounded as `_mm512_reduce_add_ps`
/// rounds it: value `l + 8` added to value `l`, then `l + 4`, then `l + 2`,
/// then the last pair, for all eight at once by shuffling two vectors'
/// halves (then quarters, pairs) together before each addition.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sums8(v: [__m512; 8]) -> [f32; 16] {
    let halves: [__m512; 4] = std::array::from_fn(|j| halves_added(v[2 * j], v[2 * j + 1]));
    let quarters: [__m512; 2] =
        std::array::from_fn(|m| quarters_added(halves[2 * m], halves[2 * m + 1]));
    let pairs = pairs_added(quarters[0], quarters[1]);
    in_order(last_added(pairs, pairs))
}

/// `sums8` for sixteen vectors.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sums16(v: [__m512; 16]) -> [f32; 16] {
    let halves: [__m512; 8] = std::array::from_fn(|j| halves_added(v[2 * j], v[2 * j + 1]));
    let quarters: [__m512; 4] =
        std::array::from_fn(|m| quarters_added(halves[2 * m], halves[2 * m + 1]));
    let pairs: [__m512; 2] =
        std::array::from_fn(|p| pairs_added(quarters[2 * p], quarters[2 * p + 1]));
    in_order(last_added(pairs[0], pairs[1]))
}

/// `[a.lo + a.hi, b.lo + b.hi]` by 256-bit halves: each vector's values
/// `l + 8` added to its values `l`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn halves_added(a: __m512, b: __m512) -> __m512 {
    let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
    let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
    _mm512_add_ps(lo, hi)
}

/// From two results of `halves_added` (vectors `a, b` and `c, d`), each
/// vector's 8 sums folded to 4, one vector per 128-bit lane: `[a, b, c, d]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn quarters_added(p: __m512, q: __m512) -> __m512 {
    let even = _mm512_shuffle_f32x4::<0b10_00_10_00>(p, q);
    let odd = _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q);
    _mm512_add_ps(even, odd)
}

/// From two results of `quarters_added`, each lane's 4 sums folded to 2:
/// lane `L` holds `r`'s two then `s`'s two.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn pairs_added(r: __m512, s: __m512) -> __m512 {
    let first = _mm512_shuffle_ps::<0b01_00_01_00>(r, s);
    let second = _mm512_shuffle_ps::<0b11_10_11_10>(r, s);
    _mm512_add_ps(first, second)
}

/// The last addition: lane `L` of the result holds vectors `L, L + 4,
/// L + 8, L + 12`'s sums (of sixteen; of eight, `L` and `L + 4` twice).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn last_added(t: __m512, u: __m512) -> __m512 {
    let first = _mm512_shuffle_ps::<0b10_00_10_00>(t, u);
    let second = _mm512_shuffle_ps::<0b11_01_11_01>(t, u);
    _mm512_add_ps(first, second)
}

/// `last_added`'s sums by vector: vector `k`'s is value `4 (k % 4) + k / 4`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn in_order(v: __m512) -> [f32; 16] {
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), v);
    std::array::from_fn(|k| lanes[4 * (k % 4) + k / 4])
}

/// The batched f32 product tile: `R` weight rows against `B` blocks of 16
/// tokens of `TokenBlocks`' layout (one vector each), as outer products:
/// per column, each row's weight is broadcast once and multiplied into
/// every block's token vector, so no horizontal sums; 12 rows by 2 blocks
/// keep 24 accumulators and load 14 values per 24 multiply-adds. Result
/// `[r][b][t]`: row `r` for token `t` of block `b`. The weights are rows
/// (`[*const f32; R]`) or a matrix stored by columns (`super::ByColumns`).
///
/// # Safety
/// AVX-512F is available; `w` has `cols` readable values for each of its
/// `R` rows and each `xt[b]` has `cols * 16`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn tile_f32_batch<W: super::TileWeights<R>, const R: usize, const B: usize>(
    w: W,
    xt: [*const f32; B],
    cols: usize,
) -> [[[f32; 16]; B]; R] {
    let mut acc = [[_mm512_setzero_ps(); B]; R];
    for k in 0..cols {
        let x: [__m512; B] = std::array::from_fn(|b| _mm512_loadu_ps(xt[b].add(k * 16)));
        for r in 0..R {
            let v = _mm512_set1_ps(*w.at(r, k));
            for b in 0..B {
                acc[r][b] = _mm512_fmadd_ps(v, x[b], acc[r][b]);
            }
        }
    }
    let mut out = [[[0f32; 16]; B]; R];
    for r in 0..R {
        for b in 0..B {
            _mm512_storeu_ps(out[r][b].as_mut_ptr(), acc[r][b]);
        }
    }
    out
}

/// Stores a whole `tile_f32_batch` result (`R <= 16` rows by `B` blocks of
/// 16 tokens) token by token: token `t0 + 16 * b + t`'s `R` results go to
/// `out[(t0 + 16 * b + t) * ld + col..][..R]`. Each block's rows are
/// transposed in registers (a 16 x 16 transpose, missing rows zero) so a
/// token's results leave in one masked vector store instead of `R` scalar
/// ones (the scalar stores were 4% of a training step).
///
/// # Safety
/// AVX-512F is available; every position written lies inside `out`'s
/// allocation at `out`.
#[target_feature(enable = "avx512f")]
pub unsafe fn store_tile_by_token<const R: usize, const B: usize>(
    v: &[[[f32; 16]; B]; R],
    out: *mut f32,
    ld: usize,
    (col, t0): (usize, usize),
) {
    const { assert!(R <= 16) };
    let mask = mask16(R);
    for b in 0..B {
        let rows: [__m512; 16] = std::array::from_fn(|r| {
            if r < R {
                _mm512_loadu_ps(v[r][b].as_ptr())
            } else {
                _mm512_setzero_ps()
            }
        });
        let columns = transpose16(rows);
        for (t, c) in columns.iter().enumerate() {
            let dst = out.add((t0 + 16 * b + t) * ld + col);
            _mm512_mask_storeu_ps(dst, mask, *c);
        }
    }
}

/// `block[k * 16 + t] = x[t * stride + k]` for `t < tokens` and `k < cols`,
/// zero for `tokens <= t < 16`: up to 16 activation rows laid out as one
/// block of `TokenBlocks`, 16 columns at a time through `transpose16`.
///
/// # Safety
/// AVX-512F is available; `tokens <= 16`, `x` holds `(tokens - 1) * stride
/// + cols` values when `tokens > 0`, and `block` `cols * 16`.
#[target_feature(enable = "avx512f")]
pub unsafe fn pack_token_block(
    x: &[f32],
    stride: usize,
    tokens: usize,
    cols: usize,
    block: &mut [f32],
) {
    let (xp, bp) = (x.as_ptr(), block.as_mut_ptr());
    for k0 in (0..cols).step_by(16) {
        let width = (cols - k0).min(16);
        let m = mask16(width);
        let rows: [__m512; 16] = std::array::from_fn(|t| {
            if t < tokens {
                _mm512_maskz_loadu_ps(m, xp.add(t * stride + k0))
            } else {
                _mm512_setzero_ps()
            }
        });
        let columns = transpose16(rows);
        for (c, v) in columns.iter().enumerate().take(width) {
            _mm512_storeu_ps(bp.add((k0 + c) * 16), *v);
        }
    }
}

/// The transpose of a 16 x 16 matrix held as 16 row vectors: element `c`
/// of result `r` is element `r` of input `c`. Pairs of rows interleave,
/// then quads, then 128-bit lanes twice.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // t[2i], t[2i+1]: rows 2i and 2i+1 interleaved, low and high halves of
    // each 128-bit lane.
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4g + e]: in 128-bit lane k, rows 4g..4g + 4 of column 4k + e.
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let (g, e) = (i / 4, i % 4);
        let (a, b) = (t[4 * g + e / 2], t[4 * g + 2 + e / 2]);
        if e % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xEE>(a, b)
        }
    });
    // Gather each column's four 128-bit pieces: lanes 0 and 2, or 1 and
    // 3, of two sources, twice.
    let mut out = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        let even_lo = _mm512_shuffle_f32x4::<0x88>(u[e], u[4 + e]);
        let odd_lo = _mm512_shuffle_f32x4::<0xDD>(u[e], u[4 + e]);
        let even_hi = _mm512_shuffle_f32x4::<0x88>(u[8 + e], u[12 + e]);
        let odd_hi = _mm512_shuffle_f32x4::<0xDD>(u[8 + e], u[12 + e]);
        out[e] = _mm512_shuffle_f32x4::<0x88>(even_lo, even_hi);
        out[8 + e] = _mm512_shuffle_f32x4::<0xDD>(even_lo, even_hi);
        out[4 + e] = _mm512_shuffle_f32x4::<0x88>(odd_lo, odd_hi);
        out[12 + e] = _mm512_shuffle_f32x4::<0xDD>(odd_lo, odd_hi);
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

/// Attention scores of one head for `T` queries: `att[t * n + j] =
/// (queries.row(t) · keys.row(j)) / scale` for the `n` keys, `R` keys per
/// tile so each loaded key serves all `T` queries. Bit-identical to one
/// `dot_f32` per (query, key): each pair has its own chain and reduction.
///
/// # Safety
/// AVX-512F/BW/VL and F16C are available; `queries` has `T` rows of the
/// keys' length and `att` holds `T * n` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn attention_scores<W: super::KvElement, const R: usize, const T: usize>(
    att: &mut [f32],
    queries: Rows,
    keys: Rows<W>,
    scale: f32,
) {
    super::scores_by_tiles::<Tiles512, W, R, T>(att, queries, keys, scale)
}

/// This level's f32 tile, for `scores_by_tiles`.
struct Tiles512;

impl super::F32Tiles for Tiles512 {
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
/// registers `16 * V` values at a time, each loaded value row serving all
/// `T` queries. The same fused multiply-adds in the same order as one
/// `axpy` per key on a zeroed output, so bit-identical to it. One query
/// wants `V` whole vectors of its head per pass (3 for heads of 48): a
/// pass of four with the last masked off cost a masked load per key for
/// nothing.
///
/// # Safety
/// AVX-512F/BW/VL and F16C are available; `out` holds `T * hs` values and
/// `att` `T * n`, for the `n` rows of `hs` values in `values`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c,fma")]
pub unsafe fn weighted_sum<W: Wide, const T: usize, const V: usize>(
    out: &mut [f32],
    att: &[f32],
    values: Rows<W>,
) {
    let (hs, n) = (values.width(), values.count());
    let (vp, stride) = (values.data().as_ptr(), values.stride());
    let mut k = 0;
    while k < hs {
        let m: [__mmask16; V] = std::array::from_fn(|i| {
            let left = hs.saturating_sub(k + 16 * i);
            mask16(left.min(16))
        });
        // Whole passes load without masks (a masked load costs more on AMD).
        let whole = k + 16 * V <= hs;
        let width = (16 * V).min(hs - k);
        let mut acc = [[_mm512_setzero_ps(); V]; T];
        for j in 0..n {
            let ahead = j + super::PREFETCH_ROWS;
            if ahead < n {
                super::prefetch_rows((vp.wrapping_add(k), stride, width), ahead..ahead + 1);
            }
            // Masked-off lanes are never read; `wrapping_add` keeps the
            // address arithmetic defined when they run past `values`.
            let row = vp.wrapping_add(j * stride + k);
            let v: [__m512; V] = std::array::from_fn(|i| {
                if whole {
                    W::load16(row.add(16 * i))
                } else {
                    W::load_masked(row.wrapping_add(16 * i), m[i])
                }
            });
            for t in 0..T {
                let a = _mm512_set1_ps(*att.get_unchecked(t * n + j));
                for i in 0..V {
                    acc[t][i] = _mm512_fmadd_ps(a, v[i], acc[t][i]);
                }
            }
        }
        for t in 0..T {
            let o = out.as_mut_ptr().add(t * hs);
            for i in 0..V {
                if whole {
                    _mm512_storeu_ps(o.add(k + 16 * i), acc[t][i]);
                } else {
                    _mm512_mask_storeu_ps(o.wrapping_add(k + 16 * i), m[i], acc[t][i]);
                }
            }
        }
        k += 16 * V;
    }
}

/// Attention scores of `R` keys against a block of 16 queries `q`
/// `[hs][16]`, each rounded as `dot_f32` rounds that query-key pair at this
/// level: the sixteen lane sums of `tile_f32` (lane `l` a chain of fused
/// multiply-adds over values `l, l + 16, ...`) kept apart, then added as
/// `_mm512_reduce_add_ps` adds them (`tree16`). One pass over the head
/// takes lanes `l` and `l + 8` together and adds them at once (the
/// reduction's first step), so eight passes leave eight partial sums per
/// score for the rest of the tree. Result `[r][t]`.
///
/// # Safety
/// AVX-512F is available; each key has `hs` readable values, `hs` a
/// multiple of 16, and `q` `hs * 16`.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn scores_by_lanes<const R: usize>(
    keys: [*const f32; R],
    q: *const f32,
    hs: usize,
) -> [[f32; 16]; R] {
    // `pairs[l][r]`: lanes `l` and `l + 8` of key `r`.
    let mut pairs = [[_mm512_setzero_ps(); R]; 8];
    for (l, pair) in pairs.iter_mut().enumerate() {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for c in (l..hs).step_by(16) {
            let x = [
                _mm512_loadu_ps(q.add(c * 16)),
                _mm512_loadu_ps(q.add((c + 8) * 16)),
            ];
            for r in 0..R {
                for (i, x) in x.iter().enumerate() {
                    let k = _mm512_set1_ps(*keys[r].add(c + 8 * i));
                    acc[r][i] = _mm512_fmadd_ps(k, *x, acc[r][i]);
                }
            }
        }
        for r in 0..R {
            pair[r] = _mm512_add_ps(acc[r][0], acc[r][1]);
        }
    }
    let mut out = [[0f32; 16]; R];
    for (r, o) in out.iter_mut().enumerate() {
        let sum = tree8(std::array::from_fn(|l| pairs[l][r]));
        _mm512_storeu_ps(o.as_mut_ptr(), sum);
    }
    out
}

/// `kernels::softmax_by_block` with one vector per key (its 16 queries'
/// lanes): each query's maximum, exponentials and sum run down its lane
/// with no horizontal step, and round as `softmax` does on that query
/// alone: the exponentials are the same `exp16`, the sum is kept as
/// sixteen lane sums (key `j` into sum `j % 16`, as `exp_sum` adds a row's
/// keys) added as `_mm512_reduce_add_ps` adds them, and the division is a
/// true one. Keys past `first` are masked off in the lanes of the queries
/// before them.
///
/// # Safety
/// AVX-512F is available; `att.len()` is a multiple of 16.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_by_block(att: &mut [f32], first: usize, scale: f32) {
    let (n, p) = (att.len() / 16, att.as_mut_ptr());
    let (scale, low) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::NEG_INFINITY));
    // The lanes (queries `t`, at `first + t`) that see key `j`.
    let seeing = |j: usize| match j.checked_sub(first) {
        Some(from) if from > 0 => !mask16(from.min(16)),
        _ => !0,
    };
    let mut max = low;
    for j in 0..n {
        // A true division: the scaled scores feed `exp`, which turns a
        // rounding of a large score into a large relative error.
        let s = _mm512_div_ps(_mm512_loadu_ps(p.add(j * 16)), scale);
        let s = _mm512_mask_blend_ps(seeing(j), low, s);
        _mm512_storeu_ps(p.add(j * 16), s);
        max = _mm512_max_ps(max, s);
    }
    let mut sums = [_mm512_setzero_ps(); 16];
    for j0 in (0..n).step_by(16) {
        for (l, sum) in sums.iter_mut().enumerate().take(n - j0) {
            let j = j0 + l;
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(j * 16)), max));
            let e = _mm512_maskz_mov_ps(seeing(j), e);
            _mm512_storeu_ps(p.add(j * 16), e);
            *sum = _mm512_add_ps(*sum, e);
        }
    }
    let sum = tree8(std::array::from_fn(|l| _mm512_add_ps(sums[l], sums[l + 8])));
    for j in 0..n {
        let v = _mm512_div_ps(_mm512_loadu_ps(p.add(j * 16)), sum);
        _mm512_storeu_ps(p.add(j * 16), v);
    }
}

/// Lane by lane, the rest of `_mm512_reduce_add_ps`'s additions once its
/// first step has added value `l + 8` to value `l`: `v[l] + v[l + 4]`,
/// then `+ [l + 2]`, then the last pair.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tree8(v: [__m512; 8]) -> __m512 {
    let add = |a, b| _mm512_add_ps(a, b);
    let quarters: [__m512; 4] = std::array::from_fn(|l| add(v[l], v[l + 4]));
    add(add(quarters[0], quarters[2]), add(quarters[1], quarters[3]))
}

/// `e^x` lane by lane, within 2 ulp of `f32::exp` (NaN stays NaN): `x = n
/// ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` from its Taylor series to `r^7`
/// (truncation below 1e-8 relative), times `2^n` by `scalef`, which also
/// takes results below the normal range to subnormals and zero.
///
/// # Safety
/// AVX-512F is available.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp16(x: __m512) -> __m512 {
    // Below -104, e^x is below the smallest subnormal; clamping keeps `n`
    // small. `max(low, x)` returns `x` when it is NaN.
    let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln 2 in two parts: `n * LN2_HI` is exact for the `n` that occur.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
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
    let mut p = _mm512_set1_ps(INV_FACT[7]);
    for &c in INV_FACT[..7].iter().rev() {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `kernels::triangle_product_add`: for each 16 columns `j0..j0 + 16` of
/// the triangle and 8 of `a`'s columns at a time, one pass down the rows
/// `t >= j0` with the 8 sums in registers (rows shorter than the chunk are
/// masked to their length).
///
/// # Safety
/// AVX-512F is available; `tri` holds `triangle_row(T)` values, `a` has
/// `T` rows and `out` `(width - 1) * ld + T` values, `width > 0`.
#[target_feature(enable = "avx512f,fma")]
pub unsafe fn triangle_product_add(tri: &[f32], a: Rows, out: &mut [f32], ld: usize) {
    const D: usize = 8;
    let (t_len, width, stride) = (a.count(), a.width(), a.stride());
    let (tp, ap, op) = (tri.as_ptr(), a.data().as_ptr(), out.as_mut_ptr());
    for j0 in (0..t_len).step_by(16) {
        let cols = mask16((t_len - j0).min(16));
        for d0 in (0..width).step_by(D) {
            // Columns past `width` repeat the last one; their sums are dropped.
            let ds: [usize; D] = std::array::from_fn(|i| (d0 + i).min(width - 1));
            let mut acc = [_mm512_setzero_ps(); D];
            for t in j0..t_len {
                let m = cols & mask16((t + 1 - j0).min(16));
                let v = _mm512_maskz_loadu_ps(m, tp.add(triangle_row(t) + j0));
                let row = ap.add(t * stride);
                for i in 0..D {
                    acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(ds[i])), v, acc[i]);
                }
            }
            for (i, &sum) in acc.iter().enumerate().take(width - d0) {
                let o = op.add((d0 + i) * ld + j0);
                _mm512_mask_storeu_ps(o, cols, _mm512_add_ps(_mm512_maskz_loadu_ps(cols, o), sum));
            }
        }
    }
}

/// In-place softmax: maximum, `e^(x - max)` and their sum sixteen lanes at
/// a time, then a true division by the sum as the reference does.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax(x: &mut [f32]) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let max = _mm512_set1_ps(max_of(p, n));
    let sum = _mm512_set1_ps(exp_sum::<true>(p, n, max));
    let mut k = 0;
    while k < n {
        let m = mask16((n - k).min(16));
        let v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p.add(k)), sum);
        _mm512_mask_storeu_ps(p.add(k), m, v);
        k += 16;
    }
}

/// `max + ln(sum of e^(x - max))` over `x` (not empty), `max` its largest
/// value: `softmax`'s first two passes without its stores.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
pub unsafe fn log_sum_exp(x: &[f32]) -> f32 {
    let (n, p) = (x.len(), x.as_ptr());
    let max = max_of(p, n);
    // `exp_sum` only writes through its pointer when it stores.
    max + exp_sum::<false>(p as *mut f32, n, _mm512_set1_ps(max)).ln()
}

/// `x = e^(x - shift) * scale`, sixteen lanes at a time.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_shifted(x: &mut [f32], shift: f32, scale: f32) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let (shift, scale) = (_mm512_set1_ps(shift), _mm512_set1_ps(scale));
    let mut k = 0;
    while k < n {
        let m = mask16((n - k).min(16));
        let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(k)), shift));
        _mm512_mask_storeu_ps(p.add(k), m, _mm512_mul_ps(e, scale));
        k += 16;
    }
}

/// `x = 1 / (1 + e^-x)`, the reference's operations, sixteen lanes at a
/// time.
///
/// # Safety
/// AVX-512F is available.
#[target_feature(enable = "avx512f")]
pub unsafe fn sigmoid(x: &mut [f32]) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let one = _mm512_set1_ps(1.0);
    let mut k = 0;
    while k < n {
        let m = mask16((n - k).min(16));
        let e = exp16(_mm512_sub_ps(
            _mm512_setzero_ps(),
            _mm512_maskz_loadu_ps(m, p.add(k)),
        ));
        _mm512_mask_storeu_ps(p.add(k), m, _mm512_div_ps(one, _mm512_add_ps(one, e)));
        k += 16;
    }
}

/// The largest of the `n` values at `p`.
///
/// # Safety
/// AVX-512F is available; `p..p + n` is readable.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn max_of(p: *const f32, n: usize) -> f32 {
    // Plain index loops: a cloned `step_by().map()` iterator kept its state
    // (and the accumulators) on the stack, a store-to-load chain per vector
    // that made this 14% of a stories260K training step.
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut k = 0;
    while k < n {
        let m = mask16((n - k).min(16));
        max = _mm512_mask_max_ps(max, m, max, _mm512_maskz_loadu_ps(m, p.add(k)));
        k += 16;
    }
    _mm512_reduce_max_ps(max)
}

/// The sum of `e^(x - max)` over the `n` values at `p`, storing each in
/// place of its `x` when `STORE`.
///
/// # Safety
/// AVX-512F is available; `p..p + n` is readable, and writable when
/// `STORE`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn exp_sum<const STORE: bool>(p: *mut f32, n: usize, max: __m512) -> f32 {
    let mut sum = _mm512_setzero_ps();
    let mut k = 0;
    while k < n {
        let m = mask16((n - k).min(16));
        let e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(k)), max));
        if STORE {
            _mm512_mask_storeu_ps(p.add(k), m, e);
        }
        sum = _mm512_mask_add_ps(sum, m, sum, e);
        k += 16;
    }
    _mm512_reduce_add_ps(sum)
}

/// `gate = gate * (1 / (1 + e^-gate)) * up`, the reference's operations in
/// its order, sixteen lanes at a time.
///
/// # Safety
/// AVX-512F is available; `up.len() >= gate.len()`.
#[target_feature(enable = "avx512f")]
pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
    let (n, g, u) = (gate.len(), gate.as_mut_ptr(), up.as_ptr());
    let one = _mm512_set1_ps(1.0);
    for k in (0..n).step_by(16) {
        let m = mask16((n - k).min(16));
        let x = _mm512_maskz_loadu_ps(m, g.add(k));
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        let sig = _mm512_div_ps(one, _mm512_add_ps(one, e));
        let v = _mm512_mul_ps(_mm512_mul_ps(x, sig), _mm512_maskz_loadu_ps(m, u.add(k)));
        _mm512_mask_storeu_ps(g.add(k), m, v);
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

/// Where a tile's results belong: `v[i]` holds the 16 rows of block `b0 +
/// i / t_step` for token `t0 + i % t_step`.
#[derive(Clone, Copy)]
pub struct BlockTile {
    pub b0: usize,
    pub t0: usize,
    pub t_step: usize,
}

/// Stores a tile's results `v` to `out[t * ld + j - rows.start]` for the
/// rows `j` in `rows` and tokens `t < n`; rows and tokens outside are
/// dropped. Compiled with AVX-512 so the masked stores inline.
///
/// # Safety
/// AVX-512F is available; every such position is writable.
#[target_feature(enable = "avx512f")]
pub unsafe fn store_blocks(
    out: *mut f32,
    ld: usize,
    (rows, n): (std::ops::Range<usize>, usize),
    tile: BlockTile,
    v: &[__m512],
) {
    for (i, &v) in v.iter().enumerate() {
        let (b, t) = (tile.b0 + i / tile.t_step, tile.t0 + i % tile.t_step);
        let first = (b * BLOCK_ROWS).max(rows.start);
        let last = ((b + 1) * BLOCK_ROWS).min(rows.end);
        if t >= n || first >= last {
            continue;
        }
        let dst = out.add(t * ld + first - rows.start);
        if last - first == BLOCK_ROWS {
            _mm512_storeu_ps(dst, v);
        } else {
            // Lanes `first - b * 16..last - b * 16`; masked-off lanes are
            // never accessed, so the base may lie before `dst`'s
            // allocation and `wrapping_sub` keeps the arithmetic defined.
            let lanes = (first - b * BLOCK_ROWS, last - b * BLOCK_ROWS);
            let m = mask16(lanes.1) & !mask16(lanes.0);
            _mm512_mask_storeu_ps(dst.wrapping_sub(lanes.0), m, v);
        }
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
