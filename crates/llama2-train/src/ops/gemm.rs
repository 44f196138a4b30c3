//! The one matrix product training needs, `out[q][p] (+)= a[p] · b[q]`,
//! over operands that may be stored transposed, so that a linear layer's
//! forward and both of its gradients are the same call (see `matmul.rs`).
//!
//! The arithmetic is the inference library's float product
//! (`kernels::float_product`: outer-product tiles at the AVX2 and AVX-512
//! levels). What this file adds is the blocking a training-sized product
//! needs around it: the reduction is cut into `REDUCTION_BLOCK`-long
//! slices and `b` into `Q_BLOCK`-row pieces, so that each task's share of
//! both operands stays in the L2 cache while the tiles sweep it. A
//! transposed `a` (both gradients' case) is read in place by the
//! by-columns tiles; a row-major one is borrowed, or copied into
//! row-major slices once when the reduction is cut. Each task packs its
//! piece of `b` straight into the tiles' token blocks: one pass over `b`,
//! against `p` passes of the product. Tasks are
//! pieces of `b`, each writing its own rows of `out`, in parallel on
//! rayon's pool.

use std::borrow::Cow;
use std::ops::Range;

use llama2::cpu::kernels::{self, Isa, TokenBlocks, WeightRows, TOKEN_BLOCK};
use rayon::prelude::*;

/// Longest stretch of the reduction multiplied in one call: a 256-row
/// piece of `b` at this length is 512 KB, a quarter of a 2 MB L2.
const REDUCTION_BLOCK: usize = 512;

/// Most rows of `b` per task.
const Q_BLOCK: usize = 256;

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// A matrix of `f32` in a slice: element `(i, j)` at `data[i * rs + j * cs]`.
/// `rows(d, w)` is the row-major `[_][w]` matrix in `d`, `transposed(d, w)`
/// its transpose.
#[derive(Clone, Copy)]
pub struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// `d` as rows of `width`.
    pub fn rows(data: &'a [f32], width: usize) -> Self {
        View {
            data,
            rs: width,
            cs: 1,
        }
    }

    /// The transpose of `d` as rows of `width`: `(i, j)` is `d[j * width + i]`.
    pub fn transposed(data: &'a [f32], width: usize) -> Self {
        View {
            data,
            rs: 1,
            cs: width,
        }
    }

    /// The view as a matrix stored by columns, `(data, distance between
    /// columns)`, when it is one: a transposed view, whose rows are
    /// adjacent values.
    fn by_columns(&self) -> Option<(&'a [f32], usize)> {
        (self.rs == 1 && self.cs > 1).then_some((self.data, self.cs))
    }

    /// Rows `rows` and columns `cols` of the view as `[rows][cols]`
    /// row-major: borrowed when already laid out so, else copied.
    fn block(&self, rows: Range<usize>, cols: Range<usize>) -> Cow<'a, [f32]> {
        let width = cols.len();
        if self.cs == 1 && self.rs == width {
            return Cow::Borrowed(&self.data[rows.start * width..rows.end * width]);
        }
        let mut out = vec![0f32; rows.len() * width];
        if self.cs == 1 {
            for (dst, i) in out.chunks_exact_mut(width).zip(rows) {
                dst.copy_from_slice(&self.data[i * self.rs + cols.start..][..width]);
            }
        } else {
            transpose_into(self, rows, cols, &mut out);
        }
        Cow::Owned(out)
    }

    /// Rows `rows` and columns `cols` laid out as the float tiles read a
    /// batch (`TokenBlocks`: blocks of 16 rows, one column of a block
    /// contiguous, rows past the end zero), straight from the view.
    pub(crate) fn pack_blocks(
        &self,
        isa: Isa,
        rows: Range<usize>,
        cols: Range<usize>,
        out: &mut TokenBlocks,
    ) {
        let (n, width) = (rows.len(), cols.len());
        (out.n, out.cols) = (n, width);
        let per_block = width * TOKEN_BLOCK;
        let len = n.div_ceil(TOKEN_BLOCK) * per_block;
        if out.data.len() < len {
            out.data.resize(len, 0.0);
        }
        if self.rs == 1 {
            // Transposed storage: a column's 16 rows are contiguous, and
            // all the blocks' pieces of one column are one run, read
            // together (block by block, each column was a 64-byte read
            // from a different stored row, as far apart as the classifier
            // gradient's 128 KB rows).
            for k in 0..width {
                let column = &self.data[(cols.start + k) * self.cs..];
                for (b, block) in out.data[..len].chunks_exact_mut(per_block).enumerate() {
                    let t0 = rows.start + b * TOKEN_BLOCK;
                    let tokens = (rows.end - t0).min(TOKEN_BLOCK);
                    let dst = &mut block[k * TOKEN_BLOCK..][..TOKEN_BLOCK];
                    copy_column(&column[t0..][..tokens], dst);
                }
            }
            return;
        }
        for (b, block) in out.data[..len].chunks_exact_mut(per_block).enumerate() {
            // Row-major storage (the only other kind of view): a transpose
            // of up to 16 rows.
            let t0 = rows.start + b * TOKEN_BLOCK;
            let tokens = (rows.end - t0).min(TOKEN_BLOCK);
            let rows_here = &self.data[t0 * self.rs + cols.start..];
            kernels::pack_token_block(isa, rows_here, (self.rs, tokens, width), block);
        }
    }
}

/// One column of a token block (16 values) from its `src.len()` rows,
/// zero past them. Whole columns copy as arrays of 16: a copy of a run of
/// unknown length is a `memcpy` call, which for the classifier's gradient
/// (a `[V][N]` view packed 16 values at a time) was 2-3% of a stories15M
/// step.
fn copy_column(src: &[f32], column: &mut [f32]) {
    match (
        <&[f32; TOKEN_BLOCK]>::try_from(src),
        <&mut [f32; TOKEN_BLOCK]>::try_from(&mut *column),
    ) {
        (Ok(src), Ok(dst)) => *dst = *src,
        _ => {
            column[..src.len()].copy_from_slice(src);
            column[src.len()..].fill(0.0);
        }
    }
}

/// Copies a transposed view (`cs > 1`) block by block, so both the reads
/// (runs along `i`, contiguous when `rs == 1`) and the writes stay within a
/// few cache lines at a time.
fn transpose_into(v: &View, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
    const TILE: usize = 16;
    let width = cols.len();
    for i0 in rows.clone().step_by(TILE) {
        let i1 = (i0 + TILE).min(rows.end);
        for j0 in cols.clone().step_by(TILE) {
            let j1 = (j0 + TILE).min(cols.end);
            for j in j0..j1 {
                for i in i0..i1 {
                    out[(i - rows.start) * width + j - cols.start] = v.data[i * v.rs + j * v.cs];
                }
            }
        }
    }
}

/// `out[q][p] = a[p] · b[q]` (or `+=` when `accumulate`), for `a` `[P][R]`
/// and `b` `[Q][R]` given as views and `out` `[Q][P]` row-major, at the
/// kernels' level `isa`.
pub fn gemm_nt(
    isa: Isa,
    a: View,
    b: View,
    (p, q, r): (usize, usize, usize),
    out: &mut [f32],
    accumulate: bool,
) {
    assert_eq!(out.len(), q * p, "gemm_nt: out must be [Q][P]");
    if p == 0 || q == 0 {
        return;
    }
    if r == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let per = q_block(q);
    // A transposed `a` is read in place when every task's batch goes to the
    // by-columns tiles; otherwise it is copied once into row-major slices
    // shared by every task.
    let smallest_task = q - (q.div_ceil(per) - 1) * per;
    let a = match a.by_columns() {
        Some(columns) if kernels::takes_token_blocks(isa, smallest_task) => {
            ASource::Columns(columns)
        }
        _ => ASource::Rows(
            reduction_slices(r)
                .map(|range| a.block(0..p, range))
                .collect(),
        ),
    };
    let task = |(k, out): (usize, &mut [f32])| {
        let rows = k * per..(k * per + per).min(q);
        product_rows(isa, &a, b, (p, r), rows, out, accumulate);
    };
    if p * q * r < PARALLEL_MIN_WORK {
        out.chunks_mut(per * p).enumerate().for_each(task);
    } else {
        out.par_chunks_mut(per * p).enumerate().for_each(task);
    }
}

/// Where the tiles read `a` from.
enum ASource<'a> {
    /// In place, stored by columns: `(data, distance between columns)`.
    Columns((&'a [f32], usize)),
    /// Copied (or borrowed) row-major, one `[P][len]` piece per reduction
    /// slice.
    Rows(Vec<Cow<'a, [f32]>>),
}

/// The reduction `0..r` in `REDUCTION_BLOCK`-long slices.
fn reduction_slices(r: usize) -> impl Iterator<Item = Range<usize>> {
    (0..r)
        .step_by(REDUCTION_BLOCK)
        .map(move |r0| r0..(r0 + REDUCTION_BLOCK).min(r))
}

/// Rows of `b` per task: at most `Q_BLOCK`, in whole token blocks, and as
/// many tasks as a whole number of rounds over the threads needs, so that
/// no thread is left waiting for a last task (288 rows on 2 threads were 3
/// tasks of 96 while one thread idled; as 2 of 144 the `dw` products of
/// stories15M's attention and `w2` ran 1.3x and 1.4x as fast on a Zen 3).
fn q_block(q: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let rounds = q.div_ceil(threads * Q_BLOCK);
    q.div_ceil(threads * rounds).next_multiple_of(TOKEN_BLOCK)
}

/// Rows `rows` of `out` (`[rows][p]`, this task's share): every reduction
/// slice of `a` against the same rows of `b`.
fn product_rows(
    isa: Isa,
    a: &ASource,
    b: View,
    (p, r): (usize, usize),
    rows: Range<usize>,
    out: &mut [f32],
    accumulate: bool,
) {
    let n = rows.len();
    let (mut partial, mut blocks) = (Vec::new(), TokenBlocks::default());
    // The tiles' own layout when the level takes it, else plain rows.
    let blocked = kernels::takes_token_blocks(isa, n);
    for (k, range) in reduction_slices(r).enumerate() {
        let into_out = k == 0 && !accumulate;
        if !into_out {
            partial.resize(n * p, 0.0);
        }
        let dst = if into_out {
            &mut *out
        } else {
            &mut partial[..]
        };
        let plain;
        let x = if blocked {
            b.pack_blocks(isa, rows.clone(), range.clone(), &mut blocks);
            (&[][..], Some(&blocks))
        } else {
            plain = b.block(rows.clone(), range.clone());
            (&plain[..], None)
        };
        match a {
            ASource::Columns((data, cs)) => {
                let w = (&data[range.start * cs..], *cs);
                kernels::float_product_by_columns(isa, w, &blocks, 0..p, dst, p);
            }
            ASource::Rows(slices) => {
                let w = WeightRows::F32(&slices[k]);
                kernels::float_product(isa, w, range.len(), x, n, 0..p, dst, p);
            }
        }
        if !into_out {
            out.iter_mut().zip(&partial).for_each(|(o, v)| *o += v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::random;

    /// The plain triple loop.
    fn reference(a: View, b: View, (p, q, r): (usize, usize, usize)) -> Vec<f32> {
        let at = |v: &View, i: usize, j: usize| v.data[i * v.rs + j * v.cs] as f64;
        let mut out = vec![0f32; q * p];
        for i in 0..q {
            for j in 0..p {
                out[i * p + j] = (0..r).map(|k| at(&a, j, k) * at(&b, i, k)).sum::<f64>() as f32;
            }
        }
        out
    }

    fn check(isa: Isa, (p, q, r): (usize, usize, usize), a_t: bool, b_t: bool) {
        let ad = random(p * r, 1, 1.0);
        let bd = random(q * r, 2, 1.0);
        let a = if a_t {
            View::transposed(&ad, p)
        } else {
            View::rows(&ad, r)
        };
        let b = if b_t {
            View::transposed(&bd, q)
        } else {
            View::rows(&bd, r)
        };
        let want = reference(a, b, (p, q, r));
        let start = random(q * p, 3, 1.0);
        for accumulate in [false, true] {
            let mut got = start.clone();
            gemm_nt(isa, a, b, (p, q, r), &mut got, accumulate);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let w = if accumulate { w + start[i] } else { *w };
                let tol = 1e-5 * (r as f32).sqrt() * w.abs().max(1.0);
                assert!(
                    (g - w).abs() <= tol,
                    "{:?} {p}x{q}x{r} a_t {a_t} b_t {b_t} accumulate {accumulate}: \
                     first mismatch at [{}][{}]: {g} vs {w}",
                    isa.level(),
                    i / p,
                    i % p
                );
            }
        }
    }

    #[test]
    fn matches_the_triple_loop_at_every_level_and_layout() {
        for isa in Isa::all() {
            for shape in [
                (1, 1, 1),
                (5, 3, 7),
                (37, 70, 19),
                (48, 300, 1100),
                (300, 45, 600),
            ] {
                for (a_t, b_t) in [(false, false), (true, false), (false, true), (true, true)] {
                    check(isa, shape, a_t, b_t);
                }
            }
        }
    }

    #[test]
    fn an_empty_reduction_is_zero_or_leaves_out_alone() {
        let empty = View::rows(&[], 0);
        let mut out = vec![3.0; 6];
        for (accumulate, want) in [(true, 3.0), (false, 0.0)] {
            gemm_nt(Isa::scalar(), empty, empty, (2, 3, 0), &mut out, accumulate);
            assert_eq!(out, [want; 6]);
        }
    }
}
