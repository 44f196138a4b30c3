//! Rotary position embedding in llama2.c's and model.py's interleaved-pair
//! form: elements `2j` and `2j + 1` of every head are one complex number,
//! rotated by `pos * freq[j]`. The backward of a rotation is the rotation
//! by the opposite angle. Rows rotate in parallel, in blocks.

use rayon::prelude::*;

use super::ROWS_PER_TASK;

/// The cosine and sine of every angle of a sequence: `[T][hs / 2]` each,
/// angle `pos * freq[j]` computed in f32 as model.py's
/// `precompute_freqs_cis` does (`torch.outer(t, freqs)`, then `polar`).
pub struct RopeTable {
    /// `cos(pos * freq[j])`, `[T][hs / 2]`.
    cos: Vec<f32>,
    /// `sin(pos * freq[j])`, `[T][hs / 2]`.
    sin: Vec<f32>,
    /// Pairs per head (`hs / 2`).
    pairs: usize,
    /// Sequence length T: row `n` of a batch sits at position `n % T`.
    seq_len: usize,
}

impl RopeTable {
    /// The table for positions `0..seq_len` and `freqs` `[hs / 2]`
    /// (`Config::rope_frequencies`).
    pub fn new(seq_len: usize, freqs: &[f32]) -> Self {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in 0..seq_len {
            for &f in freqs {
                let (s, c) = (pos as f32 * f).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        RopeTable {
            cos,
            sin,
            pairs: freqs.len(),
            seq_len,
        }
    }

    /// Rotates every head of every row of `x` `[N][heads * hs]` in place by
    /// `sign * pos * freq[j]`; `N` is a whole number of sequences.
    fn rotate(&self, x: &mut [f32], width: usize, sign: f32) {
        x.par_chunks_mut(ROWS_PER_TASK * width)
            .enumerate()
            .for_each(|(b, rows)| self.rotate_rows(rows, b * ROWS_PER_TASK, width, sign));
    }

    /// `rotate` for the rows `x` of the batch from row `first`.
    fn rotate_rows(&self, x: &mut [f32], first: usize, width: usize, sign: f32) {
        for (i, row) in x.chunks_exact_mut(width).enumerate() {
            let at = ((first + i) % self.seq_len) * self.pairs;
            let (cos, sin) = (&self.cos[at..][..self.pairs], &self.sin[at..][..self.pairs]);
            for head in row.chunks_exact_mut(2 * self.pairs) {
                for (j, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (c, s) = (cos[j], sign * sin[j]);
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            }
        }
    }
}

/// Applies RoPE in place to `x` `[N][width]` (width = heads * hs): row `n`
/// is position `n % T` of its sequence.
pub fn rope_forward(x: &mut [f32], width: usize, table: &RopeTable) {
    table.rotate(x, width, 1.0);
}

/// The gradient through RoPE, in place: `dy` `[N][width]` becomes `dx`,
/// rotated back by the forward's angles (a rotation's transpose is its
/// inverse).
pub fn rope_backward(dy: &mut [f32], width: usize, table: &RopeTable) {
    table.rotate(dy, width, -1.0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::*;

    fn freqs() -> Vec<f32> {
        let c = llama2::Config::from_header(16, 32, 1, 2, 1, 10, 8, true).unwrap();
        c.rope_frequencies()
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (t, width) = (3, 16);
        let table = RopeTable::new(t, &freqs());
        let x = random(2 * t * width, 1, 1.0);
        let probe = random(x.len(), 2, 1.0);
        let mut dx = probe.clone();
        rope_backward(&mut dx, width, &table);
        let numeric = numeric_grad(&x, 1e-2, |x| {
            let mut y = x.to_vec();
            rope_forward(&mut y, width, &table);
            probe_loss(&y, &probe)
        });
        assert_grad_close("dx", &dx, &numeric, 1e-3);
    }

    #[test]
    fn forward_matches_the_inference_engine() {
        let (t, width) = (4, 16);
        let table = RopeTable::new(t, &freqs());
        let x = random(t * width, 3, 1.0);
        let mut got = x.clone();
        rope_forward(&mut got, width, &table);
        for pos in 0..t {
            let mut q = x[pos * width..][..width].to_vec();
            let mut k = vec![0f32; 0];
            llama2::cpu::reference::rope(&mut q, &mut k, pos, &freqs());
            assert_eq!(&got[pos * width..][..width], &q[..], "position {pos}");
        }
    }
}
