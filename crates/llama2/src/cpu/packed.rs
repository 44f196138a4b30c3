//! The CPU backend's weight matrices: the checkpoint's `HostMatrix` (copied
//! into huge pages where it can be), or Q8_0 weights repacked at upload for
//! the vector products. The packed layout interleaves 16 rows four bytes
//! at a time, so one 64-byte load feeds AVX-512's `vpdpbusd` with four
//! columns of 16 rows (two 32-byte loads feed AVX2's `vpmaddubsw`) and
//! each lane accumulates one row's exact group dot: no horizontal add tree
//! per group.
//!
//! This file owns the layout (packing, reading rows back) and what goes
//! into the backend's huge pages (`arena`); the tiles that read it live in
//! `simd/`.

use std::ops::Range;

use bytemuck::Pod;

use super::kernels::{Isa, Q8Acts};
use super::simd;
use crate::arena::Arena;
use crate::tensor::{HostMatrix, MatrixData, Q8Data, Storage};

/// Rows interleaved in one packed block.
pub const BLOCK_ROWS: usize = 16;

/// A weight matrix as the CPU backend stores it.
#[derive(Clone, Debug)]
pub enum CpuMatrix {
    /// The file's (or converted) storage, read in place.
    Host(HostMatrix),
    /// Q8_0 repacked for the VNNI product.
    PackedQ8(PackedQ8),
}

impl CpuMatrix {
    /// `m` in the layout `isa`'s kernels read fastest, in `arena`'s huge
    /// pages: Q8_0 repacked there, other types copied there while the
    /// arena's budget lasts (else read where they are, usually the file's
    /// map).
    pub fn new(isa: Isa, m: HostMatrix, arena: &mut Arena) -> CpuMatrix {
        match (&m.data, simd::q8_bytes(isa)) {
            (MatrixData::Q8(d), Some(bytes)) => PackedQ8::new(d, m.rows, m.cols, bytes, arena)
                .map_or(CpuMatrix::Host(m), CpuMatrix::PackedQ8),
            _ => CpuMatrix::Host(resident(m, arena)),
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            CpuMatrix::Host(m) => m.rows,
            CpuMatrix::PackedQ8(p) => p.rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            CpuMatrix::Host(m) => m.cols,
            CpuMatrix::PackedQ8(p) => p.cols,
        }
    }

    /// The Q8_0 group size, if the matrix is quantized.
    pub fn q8_group_size(&self) -> Option<usize> {
        match self {
            CpuMatrix::Host(HostMatrix {
                data: MatrixData::Q8(d),
                ..
            }) => Some(d.group_size),
            CpuMatrix::Host(_) => None,
            CpuMatrix::PackedQ8(p) => Some(p.gs),
        }
    }

    /// Row `r` as f32 values, equal to `HostMatrix::row_f32` of the source.
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        match self {
            CpuMatrix::Host(m) => m.row_f32(r),
            CpuMatrix::PackedQ8(p) => p.row_f32(r),
        }
    }
}

/// `m` with its values copied into `arena` if the budget allows.
fn resident(m: HostMatrix, arena: &mut Arena) -> HostMatrix {
    fn copy<T: Pod>(s: &Storage<T>, arena: &mut Arena) -> Option<Storage<T>> {
        if s.is_resident() {
            return None;
        }
        arena.copy(s)
    }
    let data = match &m.data {
        MatrixData::F32(s) => copy(s, arena).map(MatrixData::F32),
        MatrixData::F16(s) => copy(s, arena).map(MatrixData::F16),
        MatrixData::BF16(s) => copy(s, arena).map(MatrixData::BF16),
        MatrixData::Q8(d) => copy(&d.q, arena).and_then(|q| {
            let scales = copy(&d.scales, arena)?;
            Some(MatrixData::Q8(Q8Data {
                q,
                scales,
                ..d.clone()
            }))
        }),
    };
    match data {
        Some(data) => HostMatrix { data, ..m },
        None => m,
    }
}

/// How a packed byte holds its int8 weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Q8Bytes {
    /// The value plus 128: `vpdpbusd` multiplies unsigned bytes by signed
    /// ones, so the weights go unsigned and the activations stay signed.
    Offset,
    /// The value itself: AVX2's `vpmaddubsw` takes `|x|` as the unsigned
    /// side and the weight with `x`'s sign as the signed one. Negating
    /// -128 overflows, so matrices holding -128 are not packed this way
    /// (Q8_0 quantizers write -127..127).
    Signed,
}

impl Q8Bytes {
    /// What is XORed into a value's bits to store it.
    fn mask(self) -> u8 {
        match self {
            Q8Bytes::Offset => 0x80,
            Q8Bytes::Signed => 0,
        }
    }
}

/// Q8_0 weights in blocks of `BLOCK_ROWS` rows; the last block is padded
/// with zero rows. Requires whole groups per row and groups of a multiple
/// of 4 values.
#[derive(Clone, Debug)]
pub struct PackedQ8 {
    pub rows: usize,
    pub cols: usize,
    pub gs: usize,
    pub bytes: Q8Bytes,
    /// Values encoded as `bytes` says, `[block][cols / 4][16 rows][4]`, in
    /// huge pages (decode streams all of it per token).
    pub q: Storage<u8>,
    /// Scales `[block][groups][16 rows]`.
    pub s: Storage<f32>,
}

impl PackedQ8 {
    /// Repacks `d` (a `[rows][cols]` matrix) into `arena`; `None` when
    /// groups straddle rows or are not a multiple of 4 long, or when
    /// `bytes` cannot hold a value of `d`.
    pub fn new(
        d: &Q8Data,
        rows: usize,
        cols: usize,
        bytes: Q8Bytes,
        arena: &mut Arena,
    ) -> Option<PackedQ8> {
        let gs = d.group_size;
        if gs == 0 || !gs.is_multiple_of(4) || !cols.is_multiple_of(gs) {
            return None;
        }
        if bytes == Q8Bytes::Signed && d.q[..rows * cols].contains(&i8::MIN) {
            return None;
        }
        let mask = bytes.mask();
        let groups = cols / gs;
        let blocks = rows.div_ceil(BLOCK_ROWS);
        let q = arena.alloc(blocks * BLOCK_ROWS * cols, |q: &mut [u8]| {
            q.fill(mask);
            for row in 0..rows {
                let (b, r) = (row / BLOCK_ROWS, row % BLOCK_ROWS);
                let src = &d.q[row * cols..(row + 1) * cols];
                let block = &mut q[b * BLOCK_ROWS * cols..(b + 1) * BLOCK_ROWS * cols];
                for (k4, v) in src.chunks_exact(4).enumerate() {
                    let at = (k4 * BLOCK_ROWS + r) * 4;
                    for (o, &x) in block[at..at + 4].iter_mut().zip(v) {
                        *o = (x as u8) ^ mask;
                    }
                }
            }
        });
        let s = arena.alloc(blocks * BLOCK_ROWS * groups, |s: &mut [f32]| {
            for row in 0..rows {
                let (b, r) = (row / BLOCK_ROWS, row % BLOCK_ROWS);
                for g in 0..groups {
                    s[(b * groups + g) * BLOCK_ROWS + r] = d.scales[row * groups + g];
                }
            }
        });
        Some(PackedQ8 {
            rows,
            cols,
            gs,
            bytes,
            q,
            s,
        })
    }

    pub fn groups(&self) -> usize {
        self.cols / self.gs
    }

    /// Where block `b`'s values and scales start, for the tiles that read
    /// from there (panics past the last block).
    pub fn block(&self, b: usize) -> (*const u8, *const f32) {
        (
            self.q[b * BLOCK_ROWS * self.cols..].as_ptr(),
            self.s[b * BLOCK_ROWS * self.groups()..].as_ptr(),
        )
    }

    /// Row `r` dequantized: value times its group's scale.
    pub fn row_f32(&self, row: usize) -> Vec<f32> {
        let (b, r) = (row / BLOCK_ROWS, row % BLOCK_ROWS);
        let block = &self.q[b * BLOCK_ROWS * self.cols..];
        (0..self.cols)
            .map(|k| {
                let v = (block[((k / 4) * BLOCK_ROWS + r) * 4 + k % 4] ^ self.bytes.mask()) as i8;
                v as f32 * self.s[(b * self.groups() + k / self.gs) * BLOCK_ROWS + r]
            })
            .collect()
    }
}

/// `out[t * ld + j - rows.start] = w[j] · x[t]` for a packed matrix, with
/// `acts` the activations quantized in `w`'s group size; bit-identical to
/// `kernels::dot_q8`.
pub fn product_packed(
    isa: Isa,
    w: &PackedQ8,
    acts: &Q8Acts,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    assert!(acts.gs == w.gs && acts.cols == w.cols && rows.end <= w.rows);
    assert!(rows.is_empty() || out.len() >= (acts.n - 1) * ld + rows.len());
    let done = simd::q8_packed_rows(isa, w, acts, rows, out, ld);
    assert!(done, "a packed Q8 matrix needs the level that packed it");
}
