//! The trainable tensors of a Llama model in f32, named and ordered as
//! model.py's `named_parameters()`. A gradient is a `Params` too, so the
//! optimizer and the check walk both in the same order.

use llama2::{Config, ModelWeights};

use crate::error::{Error, Result};
use crate::ops::zeroed;

/// One transformer block's parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParams {
    /// `attention_norm.weight` `[D]`.
    pub attention_norm: Vec<f32>,
    /// `attention.wq.weight` `[D][D]`.
    pub wq: Vec<f32>,
    /// `attention.wk.weight` `[KV][D]`.
    pub wk: Vec<f32>,
    /// `attention.wv.weight` `[KV][D]`.
    pub wv: Vec<f32>,
    /// `attention.wo.weight` `[D][D]`.
    pub wo: Vec<f32>,
    /// `ffn_norm.weight` `[D]`.
    pub ffn_norm: Vec<f32>,
    /// `feed_forward.w1.weight` (gate) `[H][D]`.
    pub w1: Vec<f32>,
    /// `feed_forward.w2.weight` (down) `[D][H]`.
    pub w2: Vec<f32>,
    /// `feed_forward.w3.weight` (up) `[H][D]`.
    pub w3: Vec<f32>,
}

/// A whole model's parameters. The classifier is the token embedding
/// (model.py ties `output.weight` to `tok_embeddings.weight`).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    pub config: Config,
    /// `tok_embeddings.weight` `[V][D]`, also the classifier.
    pub tok_embeddings: Vec<f32>,
    /// The `L` blocks.
    pub layers: Vec<LayerParams>,
    /// `norm.weight` `[D]`, the final RMSNorm gain.
    pub norm: Vec<f32>,
}

/// A parameter's model.py name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamInfo {
    fn new(name: String, shape: &[usize]) -> Self {
        ParamInfo {
            name,
            shape: shape.to_vec(),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Params {
    /// The f32 parameters of `weights`. Training ties the classifier to the
    /// embedding as model.py does, so a model with a separate classifier is
    /// refused rather than silently retied.
    pub fn from_weights(weights: &ModelWeights) -> Result<Params> {
        if weights.classifier.is_some() {
            return Err(Error::Invalid(
                "the model has a separate classifier; training ties it to the token \
                 embedding, as llama2.c's model.py does"
                    .into(),
            ));
        }
        let layers = weights
            .layers
            .iter()
            .map(|l| LayerParams {
                attention_norm: l.rms_att.to_vec(),
                wq: l.wq.to_f32(),
                wk: l.wk.to_f32(),
                wv: l.wv.to_f32(),
                wo: l.wo.to_f32(),
                ffn_norm: l.rms_ffn.to_vec(),
                w1: l.w1.to_f32(),
                w2: l.w2.to_f32(),
                w3: l.w3.to_f32(),
            })
            .collect();
        Ok(Params {
            config: weights.config,
            tok_embeddings: weights.token_embedding.to_f32(),
            layers,
            norm: weights.rms_final.to_vec(),
        })
    }

    /// Parameters of the same shapes, all zero: a gradient to add into.
    pub fn zeros_like(&self) -> Params {
        let z = |t: &Vec<f32>| zeroed(t.len());
        Params {
            config: self.config,
            tok_embeddings: z(&self.tok_embeddings),
            layers: self
                .layers
                .iter()
                .map(|l| LayerParams {
                    attention_norm: z(&l.attention_norm),
                    wq: z(&l.wq),
                    wk: z(&l.wk),
                    wv: z(&l.wv),
                    wo: z(&l.wo),
                    ffn_norm: z(&l.ffn_norm),
                    w1: z(&l.w1),
                    w2: z(&l.w2),
                    w3: z(&l.w3),
                })
                .collect(),
            norm: z(&self.norm),
        }
    }

    /// Names and shapes of every parameter, in model.py's order.
    pub fn infos(&self) -> Vec<ParamInfo> {
        let c = &self.config;
        let (d, kv, h, v) = (c.dim, c.kv_dim(), c.hidden_dim, c.vocab_size);
        let mut infos = vec![ParamInfo::new("tok_embeddings.weight".into(), &[v, d])];
        for i in 0..c.n_layers {
            let at = |part: &str, shape: &[usize]| {
                ParamInfo::new(format!("layers.{i}.{part}.weight"), shape)
            };
            infos.extend([
                at("attention.wq", &[d, d]),
                at("attention.wk", &[kv, d]),
                at("attention.wv", &[kv, d]),
                at("attention.wo", &[d, d]),
                at("feed_forward.w1", &[h, d]),
                at("feed_forward.w2", &[d, h]),
                at("feed_forward.w3", &[h, d]),
                at("attention_norm", &[d]),
                at("ffn_norm", &[d]),
            ]);
        }
        infos.push(ParamInfo::new("norm.weight".into(), &[d]));
        infos
    }

    /// Every tensor, in the order of `infos`.
    pub fn tensors(&self) -> Vec<&Vec<f32>> {
        let mut out = vec![&self.tok_embeddings];
        for l in &self.layers {
            out.extend([
                &l.wq,
                &l.wk,
                &l.wv,
                &l.wo,
                &l.w1,
                &l.w2,
                &l.w3,
                &l.attention_norm,
                &l.ffn_norm,
            ]);
        }
        out.push(&self.norm);
        out
    }

    /// Every tensor, mutable, in the order of `infos`.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out = vec![&mut self.tok_embeddings];
        for l in &mut self.layers {
            out.extend([
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w1,
                &mut l.w2,
                &mut l.w3,
                &mut l.attention_norm,
                &mut l.ffn_norm,
            ]);
        }
        out.push(&mut self.norm);
        out
    }

    /// Checks every tensor's length against the config.
    pub fn check_shapes(&self) -> Result<()> {
        if self.layers.len() != self.config.n_layers {
            return Err(Error::Invalid(format!(
                "{} layers given for a config of {}",
                self.layers.len(),
                self.config.n_layers
            )));
        }
        for (info, t) in self.infos().iter().zip(self.tensors()) {
            if t.len() != info.len() {
                return Err(Error::Invalid(format!(
                    "{} has {} values; its shape {:?} needs {}",
                    info.name,
                    t.len(),
                    info.shape,
                    info.len()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_shapes_and_tensors_line_up() {
        let config = Config::from_header(16, 24, 2, 4, 2, 10, 8, true).unwrap();
        let weights = llama2::synth::random_weights(&config, llama2::DType::F32, 7);
        let p = Params::from_weights(&weights).unwrap();
        p.check_shapes().unwrap();
        let infos = p.infos();
        assert_eq!(infos.len(), 1 + 9 * 2 + 1);
        assert_eq!(infos[2].name, "layers.0.attention.wk.weight");
        assert_eq!(infos[2].shape, [8, 16]);
        assert_eq!(p.tensors()[2], &weights.layers[0].wk.to_f32());
        assert!(p
            .zeros_like()
            .tensors()
            .iter()
            .all(|t| t.iter().all(|&v| v == 0.0)));
    }
}
