//! Q8_0 quantization: groups of `group_size` consecutive values sharing one
//! f32 scale, `scale = max|w| / 127`, `q = round_ties_even(w / scale)`. The
//! same rule serves weights (when writing version 2 files) and activations
//! (at run time, runq's W8A8 math). The group size lives in each tensor.

use rayon::prelude::*;

use crate::tensor::{Q8Data, Storage};

/// Quantizes `values` in groups of `group_size` (which must divide the length).
pub fn quantize(values: &[f32], group_size: usize) -> Q8Data {
    let mut q = vec![0i8; values.len()];
    let mut scales = vec![0f32; values.len() / group_size];
    quantize_into(values, group_size, &mut q, &mut scales);
    Q8Data {
        q: Storage::owned(q),
        scales: Storage::owned(scales),
        group_size,
    }
}

/// Quantizes `values` into caller-provided buffers. A final partial group
/// (when `group_size` does not divide the length) gets its own scale, which
/// is what activation quantization of a row needs.
pub fn quantize_into(values: &[f32], group_size: usize, q: &mut [i8], scales: &mut [f32]) {
    // Independent groups: quantize blocks of them in parallel.
    const GROUPS_PER_TASK: usize = 4096;
    let block = group_size * GROUPS_PER_TASK;
    values
        .par_chunks(block)
        .zip(q.par_chunks_mut(block))
        .zip(scales.par_chunks_mut(GROUPS_PER_TASK))
        .for_each(|((values, q), scales)| {
            for ((group, qg), scale) in values
                .chunks(group_size)
                .zip(q.chunks_mut(group_size))
                .zip(scales.iter_mut())
            {
                *scale = quantize_group(group, qg);
            }
        });
}

/// Quantizes one group and returns its scale. An all-zero group gets scale 0
/// and zero values rather than NaN.
pub fn quantize_group(group: &[f32], q: &mut [i8]) -> f32 {
    let max = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    for (out, &v) in q.iter_mut().zip(group) {
        *out = if scale == 0.0 {
            0
        } else {
            (v / scale).round_ties_even() as i8
        };
    }
    scale
}

/// Largest power of two <= 64 dividing both `dim` and `hidden_dim`: the group
/// size we write, so llama2.c's `runq` (which assumes rows start on group
/// boundaries) also reads our files correctly.
pub fn default_group_size(dim: usize, hidden_dim: usize) -> usize {
    let mut gs = 64;
    while gs > 1 && (!dim.is_multiple_of(gs) || !hidden_dim.is_multiple_of(gs)) {
        gs /= 2;
    }
    gs
}

/// Group size for quantizing one matrix of `cols` columns at load time: the
/// largest power of two <= 64 dividing `cols`, so rows start on groups.
pub fn group_size_for(cols: usize) -> usize {
    default_group_size(cols, cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_group_has_zero_scale_and_values() {
        let d = quantize(&[0.0; 8], 4);
        assert!(d.scales.iter().all(|&s| s == 0.0));
        assert!(d.q.iter().all(|&q| q == 0));
    }

    #[test]
    fn rounds_ties_to_even_and_maps_max_to_127() {
        let d = quantize(&[1.0, -0.5, 0.25, 127.0 / 254.0 * 1.0], 4);
        assert_eq!(d.q[0], 127);
        assert_eq!(d.q[1], -64); // -63.5 rounds to even
        assert_eq!(d.scales[0], 1.0 / 127.0);
    }

    #[test]
    fn group_size_choice() {
        assert_eq!(default_group_size(64, 172), 4);
        assert_eq!(default_group_size(288, 768), 32);
        assert_eq!(default_group_size(4096, 11008), 64);
    }
}
