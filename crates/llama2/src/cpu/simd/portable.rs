//! Targets without SIMD kernels: only the scalar level exists, and every
//! function declines so the scalar loops in `kernels.rs` run.

use super::super::kernels::{Isa, KvRows, Level, Q8Acts, Rows, TokenBlocks, WeightRows};
use std::ops::Range;

pub fn supported(level: Level) -> bool {
    level == Level::Scalar
}

pub fn dot_f32(_: Isa, _: &[f32], _: &[f32]) -> Option<f32> {
    None
}

pub fn axpy(_: Isa, _: &mut [f32], _: f32, _: &[f32]) -> bool {
    false
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

#[allow(clippy::too_many_arguments)]
pub fn f32_rows(
    _: Isa,
    _: WeightRows,
    _: (&[f32], Option<&TokenBlocks>),
    _: (usize, usize),
    _: Range<usize>,
    _: &mut [f32],
    _: usize,
) -> bool {
    false
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
