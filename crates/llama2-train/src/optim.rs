//! The optimizer step of llama2.c's train.py: gradients clipped by their
//! global L2 norm (`torch.nn.utils.clip_grad_norm_`), then AdamW exactly as
//! `torch.optim.AdamW` computes it, with `configure_optimizers`' two
//! groups: weight decay on parameters of 2 or more dimensions (matrices
//! and the embedding), none on the norm gains.

use crate::error::{Error, Result};
use crate::params::Params;
use rayon::prelude::*;

/// AdamW's hyper-parameters (train.py's names in the comments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// `learning_rate`.
    pub lr: f32,
    /// `beta1`, the first moment's decay.
    pub beta1: f32,
    /// `beta2`, the second moment's decay.
    pub beta2: f32,
    /// Added to the second moment's root (PyTorch's default 1e-8).
    pub eps: f32,
    /// `weight_decay`, for the decayed group only.
    pub weight_decay: f32,
}

/// AdamW's state: the step count and both moments of every parameter, in
/// `Params::tensors` order.
pub struct AdamW {
    config: AdamWConfig,
    /// Steps taken so far.
    step: u32,
    /// First moments, shaped as the parameters.
    exp_avg: Vec<Vec<f32>>,
    /// Second moments, shaped as the parameters.
    exp_avg_sq: Vec<Vec<f32>>,
    /// Whether each parameter is in the weight-decay group (2+ dimensions).
    decayed: Vec<bool>,
}

impl AdamW {
    /// Zero moments for `params`, grouped as train.py's
    /// `configure_optimizers`.
    pub fn new(config: AdamWConfig, params: &Params) -> AdamW {
        let zeros = || {
            params
                .tensors()
                .iter()
                .map(|t| vec![0f32; t.len()])
                .collect()
        };
        AdamW {
            config,
            step: 0,
            exp_avg: zeros(),
            exp_avg_sq: zeros(),
            decayed: params.infos().iter().map(|i| i.shape.len() >= 2).collect(),
        }
    }

    /// Sets the learning rate for the next steps (train.py sets each param
    /// group's `lr` from the schedule every iteration).
    pub fn set_lr(&mut self, lr: f32) {
        self.config.lr = lr;
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u32 {
        self.step
    }

    /// The first and second moments, in `Params::tensors` order.
    pub fn moments(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.exp_avg, &self.exp_avg_sq)
    }

    /// Restores a checkpoint's step count and moments; each moment must be
    /// shaped as the parameters this optimizer was made for.
    pub fn restore(
        &mut self,
        step: u32,
        exp_avg: Vec<Vec<f32>>,
        exp_avg_sq: Vec<Vec<f32>>,
    ) -> Result<()> {
        let fits = |m: &[Vec<f32>]| {
            m.len() == self.exp_avg.len()
                && m.iter().zip(&self.exp_avg).all(|(a, b)| a.len() == b.len())
        };
        if !fits(&exp_avg) || !fits(&exp_avg_sq) {
            return Err(Error::Invalid(
                "the optimizer state does not fit the model's parameters".into(),
            ));
        }
        (self.step, self.exp_avg, self.exp_avg_sq) = (step, exp_avg, exp_avg_sq);
        Ok(())
    }

    /// One step on `params` with `grads` (shaped alike), as PyTorch's
    /// single-tensor AdamW: `p *= 1 - lr * wd` first (decoupled decay), then
    /// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`, and
    /// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`. The
    /// bias corrections are computed in f64, as Python floats are. Each
    /// element's update is independent, so chunks of it run in parallel.
    pub fn step(&mut self, params: &mut Params, grads: &Params) {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - (c.beta1 as f64).powi(t);
        let bias2_sqrt = (1.0 - (c.beta2 as f64).powi(t)).sqrt();
        let step_size = (c.lr as f64 / bias1) as f32;
        let bias2_sqrt = bias2_sqrt as f32;
        let tensors = params.tensors_mut().into_iter().zip(grads.tensors());
        let state = self
            .exp_avg
            .iter_mut()
            .zip(&mut self.exp_avg_sq)
            .zip(&self.decayed);
        for ((p, g), ((m, v), &decayed)) in tensors.zip(state) {
            let keep = if decayed {
                1.0 - c.lr * c.weight_decay
            } else {
                1.0
            };
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                        *p *= keep;
                        *m += (g - *m) * (1.0 - c.beta1);
                        *v = *v * c.beta2 + g * g * (1.0 - c.beta2);
                        let denom = v.sqrt() / bias2_sqrt + c.eps;
                        *p -= step_size * *m / denom;
                    }
                });
        }
    }
}

/// Values per parallel task of the optimizer and the clipping: enough
/// that a task's work dwarfs its scheduling, few enough that stories15M's
/// embedding splits into a hundred.
const CHUNK: usize = 1 << 16;

/// Scales every gradient by `max_norm / (norm + 1e-6)` when their global L2
/// norm exceeds `max_norm`, as `clip_grad_norm_`; returns the norm before
/// clipping. The norm is summed in f64, in parallel chunks.
pub fn clip_grad_norm(grads: &mut Params, max_norm: f32) -> f32 {
    // Each chunk's sum, then their sum in order: the same norm whatever
    // thread ran which chunk.
    let partial: Vec<f64> = grads
        .tensors()
        .iter()
        .flat_map(|t| t.chunks(CHUNK))
        .collect::<Vec<_>>()
        .par_iter()
        .map(|c| c.iter().map(|&g| g as f64 * g as f64).sum::<f64>())
        .collect();
    let norm = partial.iter().sum::<f64>().sqrt() as f32;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for t in grads.tensors_mut() {
            t.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama2::Config;

    fn tiny() -> Params {
        let config = Config::from_header(8, 12, 1, 2, 1, 5, 4, true).unwrap();
        Params::from_weights(&llama2::synth::random_weights(
            &config,
            llama2::DType::F32,
            1,
        ))
        .unwrap()
    }

    const CONFIG: AdamWConfig = AdamWConfig {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    #[test]
    fn first_step_moves_each_weight_by_about_lr() {
        // At step 1, m / sqrt(v) after bias correction is sign(g), so every
        // parameter moves by lr (plus decay on matrices only).
        let mut p = tiny();
        let before = p.clone();
        let mut grads = p.zeros_like();
        for t in grads.tensors_mut() {
            t.iter_mut()
                .enumerate()
                .for_each(|(i, g)| *g = if i % 2 == 0 { 0.5 } else { -2.0 });
        }
        let mut opt = AdamW::new(CONFIG, &p);
        opt.step(&mut p, &grads);
        for ((info, new), old) in p.infos().iter().zip(p.tensors()).zip(before.tensors()) {
            let keep = if info.shape.len() >= 2 {
                1.0 - CONFIG.lr * CONFIG.weight_decay
            } else {
                1.0
            };
            for (i, (&n, &o)) in new.iter().zip(old.iter()).enumerate() {
                let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
                let want = o * keep - sign * CONFIG.lr;
                assert!(
                    (n - want).abs() <= 1e-6,
                    "{}[{i}]: {n} vs {want}",
                    info.name
                );
            }
        }
    }

    #[test]
    fn second_step_matches_the_formula() {
        let mut p = tiny();
        let mut opt = AdamW::new(CONFIG, &p);
        let mut grads = p.zeros_like();
        grads.norm[0] = 1.0;
        opt.step(&mut p, &grads);
        let after_one = p.norm[0];
        grads.norm[0] = 3.0;
        opt.step(&mut p, &grads);
        let m: f64 = 0.9 * 0.1 + 0.1 * 3.0;
        let v: f64 = 0.95 * 0.05 + 0.05 * 9.0;
        let want = after_one as f64
            - 1e-2 / (1.0 - 0.81) * m / (v.sqrt() / (1.0 - 0.9025f64).sqrt() + 1e-8);
        assert!(
            (p.norm[0] as f64 - want).abs() < 1e-6,
            "{} vs {want}",
            p.norm[0]
        );
    }

    #[test]
    fn clipping_scales_to_the_max_norm_only_when_above() {
        let mut grads = tiny().zeros_like();
        grads.norm[0] = 3.0;
        grads.tok_embeddings[0] = 4.0;
        assert_eq!(clip_grad_norm(&mut grads, 10.0), 5.0);
        assert_eq!(grads.norm[0], 3.0);
        assert_eq!(clip_grad_norm(&mut grads, 1.0), 5.0);
        let norm: f32 = (grads.norm[0].powi(2) + grads.tok_embeddings[0].powi(2)).sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }
}
