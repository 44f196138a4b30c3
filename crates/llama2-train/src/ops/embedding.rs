//! Token embedding: rows of the table looked up by id, and its backward, a
//! scatter-add of the output gradient into the looked-up rows.

use rayon::prelude::*;

use super::{zeroed, ROWS_PER_TASK};

/// `out[n] = table[ids[n]]`: `table` `[V][D]`, `ids` `[N]` (each `< V`,
/// checked by the caller) -> `[N][D]`.
pub fn embedding_forward(table: &[f32], ids: &[u32], dim: usize) -> Vec<f32> {
    let mut out = zeroed(ids.len() * dim);
    out.par_chunks_mut(ROWS_PER_TASK * dim)
        .zip(ids.par_chunks(ROWS_PER_TASK))
        .for_each(|(rows, ids)| {
            for (row, &id) in rows.chunks_exact_mut(dim).zip(ids) {
                row.copy_from_slice(&table[id as usize * dim..][..dim]);
            }
        });
    out
}

/// `dtable[ids[n]] += dout[n]`: `dout` `[N][D]`, `dtable` `[V][D]`. A token
/// appearing twice gets both rows' gradients.
pub fn embedding_backward(dout: &[f32], ids: &[u32], dim: usize, dtable: &mut [f32]) {
    for (&id, d) in ids.iter().zip(dout.chunks_exact(dim)) {
        let row = &mut dtable[id as usize * dim..][..dim];
        for (g, &v) in row.iter_mut().zip(d) {
            *g += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    #[test]
    fn backward_matches_finite_differences() {
        let (v, d) = (5, 3);
        let ids = [1u32, 4, 1, 0];
        let table = random(v * d, 1, 1.0);
        let probe = random(ids.len() * d, 2, 1.0);
        let mut dtable = vec![0f32; v * d];
        embedding_backward(&probe, &ids, d, &mut dtable);
        let numeric = numeric_grad(&table, 1e-2, |t| {
            probe_loss(&embedding_forward(t, &ids, d), &probe)
        });
        assert_grad_close("dtable", &dtable, &numeric, 1e-4);
    }
}
