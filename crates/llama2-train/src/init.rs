//! A new model as llama2.c's model.py builds one: its `ModelArgs` turned
//! into a `Config` (hidden size `multiple_of * ceil(int(2 * 4 * dim / 3) /
//! multiple_of)`), weights from `normal(0, 0.02)`, the residual projections
//! `wo` and `w3` from `normal(0, 0.02 / sqrt(2 * n_layers))` (model.py
//! rescales parameters whose names end in `wo.weight` or `w3.weight`), and
//! RMSNorm gains of 1. Our normal generator, so not PyTorch's numbers.

use llama2::Config;

use crate::error::Result;
use crate::params::{LayerParams, Params};
use crate::rng::Rng;

/// model.py's `ModelArgs` (dropout is always 0 here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelArgs {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub multiple_of: usize,
    pub max_seq_len: usize,
}

impl ModelArgs {
    /// model.py's FeedForward width: `int(2 * 4 * dim / 3)` rounded up to a
    /// multiple of `multiple_of`.
    pub fn hidden_dim(&self) -> usize {
        let h = 2 * 4 * self.dim / 3;
        self.multiple_of.max(1) * h.div_ceil(self.multiple_of.max(1))
    }

    /// The config, validated by the library (heads dividing dim and so on).
    pub fn config(&self) -> Result<Config> {
        let i = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
        Ok(Config::from_header(
            i(self.dim),
            i(self.hidden_dim()),
            i(self.n_layers),
            i(self.n_heads),
            i(self.n_kv_heads),
            i(self.vocab_size),
            i(self.max_seq_len),
            true,
        )?)
    }
}

/// `n` draws from `normal(0, std)`.
fn normal(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * std).collect()
}

/// Fresh parameters for `config`, drawn in model.py's parameter order from
/// one generator seeded with `seed`.
pub fn init_params(config: &Config, seed: u64) -> Params {
    let c = config;
    let (d, kv, h, v) = (c.dim, c.kv_dim(), c.hidden_dim, c.vocab_size);
    let mut rng = Rng::new(seed);
    let std = 0.02f32;
    let scaled = std / (2.0 * c.n_layers as f32).sqrt();
    let tok_embeddings = normal(&mut rng, v * d, std);
    let layers = (0..c.n_layers)
        .map(|_| LayerParams {
            wq: normal(&mut rng, d * d, std),
            wk: normal(&mut rng, kv * d, std),
            wv: normal(&mut rng, kv * d, std),
            wo: normal(&mut rng, d * d, scaled),
            w1: normal(&mut rng, h * d, std),
            w2: normal(&mut rng, d * h, std),
            w3: normal(&mut rng, h * d, scaled),
            attention_norm: vec![1.0; d],
            ffn_norm: vec![1.0; d],
        })
        .collect();
    Params {
        config: *c,
        tok_embeddings,
        layers,
        norm: vec![1.0; d],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dim: usize, multiple_of: usize) -> ModelArgs {
        ModelArgs {
            dim,
            n_layers: 5,
            n_heads: 8,
            n_kv_heads: 4,
            vocab_size: 512,
            multiple_of,
            max_seq_len: 512,
        }
    }

    #[test]
    fn hidden_dim_as_model_py() {
        // stories260K (dim 64, multiple_of 4) has hidden 172; stories15M
        // (dim 288, multiple_of 32) has 768.
        assert_eq!(args(64, 4).hidden_dim(), 172);
        assert_eq!(args(288, 32).hidden_dim(), 768);
    }

    #[test]
    fn init_has_model_py_scales() {
        let c = args(64, 4).config().unwrap();
        let p = init_params(&c, 1);
        p.check_shapes().unwrap();
        let std = |t: &[f32]| (t.iter().map(|x| x * x).sum::<f32>() / t.len() as f32).sqrt();
        assert!((std(&p.tok_embeddings) - 0.02).abs() < 0.001);
        assert!((std(&p.layers[0].wo) - 0.02 / 10f32.sqrt()).abs() < 0.0005);
        assert!((std(&p.layers[0].w3) - 0.02 / 10f32.sqrt()).abs() < 0.0005);
        assert!(p.norm.iter().all(|&g| g == 1.0));
        assert_eq!(init_params(&c, 1), p);
    }
}
