//! The Llama forward pass for training, as model.py's `Transformer.forward`
//! with targets: embedding, `L` blocks of (RMSNorm, grouped-query attention
//! with RoPE, residual; RMSNorm, SwiGLU feed-forward, residual), final
//! RMSNorm, the tied classifier, mean cross-entropy. It keeps what each
//! op's backward needs, and `backward` walks the same ops in reverse.

use crate::error::{Error, Result};
use crate::ops::attention::{attention_backward, attention_forward, AttentionShape};
use crate::ops::cross_entropy::{cross_entropy_backward, cross_entropy_forward, IGNORE_INDEX};
use crate::ops::embedding::{embedding_backward, embedding_forward};
use crate::ops::matmul::{matmul_backward, matmul_forward};
use crate::ops::residual::{accumulate, residual_forward};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use crate::ops::rope::{rope_backward, rope_forward, RopeTable};
use crate::ops::swiglu::{swiglu_backward, swiglu_forward};
use crate::ops::{recycle, zeroed};
use crate::params::{LayerParams, Params};

/// A batch of token ids and their targets, both `[B][T]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Sequences (B).
    pub batch: usize,
    /// Positions per sequence (T).
    pub seq_len: usize,
    /// Input ids `[B][T]`.
    pub inputs: Vec<u32>,
    /// Target ids `[B][T]`; `-1` is ignored by the loss.
    pub targets: Vec<i32>,
}

impl Batch {
    /// A batch checked against the model: `B * T` ids each, inputs below
    /// the vocabulary size, targets too or `-1`, and T within the context.
    pub fn new(
        batch: usize,
        seq_len: usize,
        inputs: &[i32],
        targets: &[i32],
        config: &llama2::Config,
    ) -> Result<Batch> {
        let n = batch.checked_mul(seq_len).filter(|&n| n > 0);
        let fail = |m: String| Err(Error::Invalid(m));
        if n != Some(inputs.len()) || n != Some(targets.len()) {
            return fail(format!(
                "a batch of {batch} x {seq_len} needs that many inputs and targets; \
                 {} and {} were given",
                inputs.len(),
                targets.len()
            ));
        }
        if seq_len > config.seq_len {
            return fail(format!(
                "sequence length {seq_len} exceeds the model's context {}",
                config.seq_len
            ));
        }
        let v = config.vocab_size as i64;
        if let Some(bad) = inputs.iter().find(|&&id| id < 0 || id as i64 >= v) {
            return fail(format!("input id {bad} is outside the vocabulary 0..{v}"));
        }
        if let Some(bad) = targets
            .iter()
            .find(|&&id| (id < 0 && id != IGNORE_INDEX) || id as i64 >= v)
        {
            return fail(format!(
                "target id {bad} is outside the vocabulary 0..{v} (and is not -1)"
            ));
        }
        Ok(Batch {
            batch,
            seq_len,
            inputs: inputs.iter().map(|&id| id as u32).collect(),
            targets: targets.to_vec(),
        })
    }

    /// Rows of every activation (`N = B * T`).
    pub fn rows(&self) -> usize {
        self.batch * self.seq_len
    }
}

/// What one block's backward needs from its forward. `N = B * T`.
#[derive(Clone, Debug)]
pub struct LayerActivations {
    /// Block input `[N][D]`.
    x: Vec<f32>,
    /// Attention RMSNorm output `[N][D]` and inverse RMS `[N]`.
    xn_att: Vec<f32>,
    inv_rms_att: Vec<f32>,
    /// Queries `[N][D]` and keys `[N][KV]` after RoPE; values `[N][KV]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities, the causal half: `[B][Hq][T * (T + 1) / 2]`.
    probs: Vec<f32>,
    /// Attention output before `wo` `[N][D]`.
    att: Vec<f32>,
    /// Residual stream after attention `[N][D]`.
    h: Vec<f32>,
    /// Feed-forward RMSNorm output `[N][D]` and inverse RMS `[N]`.
    xn_ffn: Vec<f32>,
    inv_rms_ffn: Vec<f32>,
    /// `xn_ffn @ w1^T`, `xn_ffn @ w3^T` and `silu(h1) * h3`, all `[N][H]`.
    h1: Vec<f32>,
    h3: Vec<f32>,
    g: Vec<f32>,
}

/// Everything the backward needs, with the forward's results.
#[derive(Clone, Debug)]
pub struct Activations {
    layers: Vec<LayerActivations>,
    /// Output of the last block `[N][D]`.
    x_final: Vec<f32>,
    /// Final RMSNorm output `[N][D]` and inverse RMS `[N]`.
    xn_final: Vec<f32>,
    inv_rms_final: Vec<f32>,
    /// Classifier output `[N][V]`.
    pub logits: Vec<f32>,
    /// `logsumexp` of each row of the logits `[N]`.
    log_sum_exp: Vec<f32>,
    /// Mean cross-entropy over the targets that are not `-1`.
    pub loss: f32,
}

/// The sizes every op of one pass needs.
struct Dims {
    d: usize,
    kv: usize,
    hidden: usize,
    vocab: usize,
    eps: f32,
    rope: RopeTable,
    attention: AttentionShape,
}

impl Dims {
    fn new(p: &Params, b: &Batch) -> Dims {
        let c = &p.config;
        Dims {
            d: c.dim,
            kv: c.kv_dim(),
            hidden: c.hidden_dim,
            vocab: c.vocab_size,
            eps: c.norm_eps,
            rope: RopeTable::new(b.seq_len, &c.rope_frequencies()),
            attention: AttentionShape {
                batch: b.batch,
                seq_len: b.seq_len,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_size: c.head_size(),
            },
        }
    }
}

/// The forward pass of `p` on `batch`, keeping the activations.
pub fn forward(p: &Params, batch: &Batch) -> Activations {
    let dims = Dims::new(p, batch);
    let mut x = embedding_forward(&p.tok_embeddings, &batch.inputs, dims.d);
    let mut layers = Vec::with_capacity(p.layers.len());
    for lp in &p.layers {
        let (acts, out) = layer_forward(lp, x, &dims);
        layers.push(acts);
        x = out;
    }
    let (xn_final, inv_rms_final) = rmsnorm_forward(&x, &p.norm, dims.eps);
    let logits = matmul_forward(&xn_final, &p.tok_embeddings, dims.d, dims.vocab);
    let loss = cross_entropy_forward(&logits, &batch.targets, dims.vocab);
    Activations {
        log_sum_exp: loss.log_sum_exp,
        loss: loss.mean,
        layers,
        x_final: x,
        xn_final,
        inv_rms_final,
        logits,
    }
}

/// One block on its input `x` `[N][D]`: returns what its backward needs and
/// its output `[N][D]`.
fn layer_forward(lp: &LayerParams, x: Vec<f32>, dims: &Dims) -> (LayerActivations, Vec<f32>) {
    let (d, kv, hidden) = (dims.d, dims.kv, dims.hidden);
    let (xn_att, inv_rms_att) = rmsnorm_forward(&x, &lp.attention_norm, dims.eps);
    let mut q = matmul_forward(&xn_att, &lp.wq, d, d);
    let mut k = matmul_forward(&xn_att, &lp.wk, d, kv);
    let v = matmul_forward(&xn_att, &lp.wv, d, kv);
    rope_forward(&mut q, d, &dims.rope);
    rope_forward(&mut k, kv, &dims.rope);
    let (att, probs) = attention_forward(&q, &k, &v, dims.attention);
    let h = residual_through(&x, matmul_forward(&att, &lp.wo, d, d));
    let (xn_ffn, inv_rms_ffn) = rmsnorm_forward(&h, &lp.ffn_norm, dims.eps);
    let h1 = matmul_forward(&xn_ffn, &lp.w1, d, hidden);
    let h3 = matmul_forward(&xn_ffn, &lp.w3, d, hidden);
    let g = swiglu_forward(&h1, &h3);
    let out = residual_through(&h, matmul_forward(&g, &lp.w2, hidden, d));
    let acts = LayerActivations {
        x,
        xn_att,
        inv_rms_att,
        q,
        k,
        v,
        probs,
        att,
        h,
        xn_ffn,
        inv_rms_ffn,
        h1,
        h3,
        g,
    };
    (acts, out)
}

/// The gradient of `acts.loss` with respect to every parameter of `p`,
/// from the activations `forward(p, batch)` kept, which it consumes: the
/// logits become their own gradient, and each block's activations are
/// freed once its backward is done. The embedding's gradient sums its two
/// uses: the classifier and the lookup.
pub fn backward(p: &Params, batch: &Batch, acts: Activations) -> Params {
    let dims = Dims::new(p, batch);
    let mut grads = p.zeros_like();
    let Activations {
        layers,
        x_final,
        xn_final,
        inv_rms_final,
        logits: mut dlogits,
        log_sum_exp,
        ..
    } = acts;
    cross_entropy_backward(&mut dlogits, &log_sum_exp, &batch.targets, dims.vocab);
    let mut dxn = zeroed(xn_final.len());
    matmul_backward(
        &dlogits,
        &xn_final,
        &p.tok_embeddings,
        dims.d,
        dims.vocab,
        &mut dxn,
        &mut grads.tok_embeddings,
    );
    recycle(dlogits);
    recycle(xn_final);
    let mut dx = rmsnorm_backward(&dxn, &x_final, &p.norm, &inv_rms_final, &mut grads.norm);
    for ((lp, la), lg) in p.layers.iter().zip(layers).zip(&mut grads.layers).rev() {
        dx = layer_backward(lp, &la, dx, lg, &dims);
        la.recycle_products();
    }
    embedding_backward(&dx, &batch.inputs, dims.d, &mut grads.tok_embeddings);
    grads
}

/// `x + branch`, the branch being a product's output, given back once added.
fn residual_through(x: &[f32], branch: Vec<f32>) -> Vec<f32> {
    let out = residual_forward(x, &branch);
    recycle(branch);
    out
}

impl LayerActivations {
    /// Gives back the buffers that came from `for_overwrite` (the
    /// products', the norms' and attention's outputs) for the next step's.
    fn recycle_products(self) {
        let LayerActivations {
            xn_att,
            q,
            k,
            v,
            probs,
            att,
            xn_ffn,
            h1,
            h3,
            ..
        } = self;
        for v in [xn_att, q, k, v, probs, att, xn_ffn, h1, h3] {
            recycle(v);
        }
    }
}

/// One block's backward: from the gradient of its output `dout` `[N][D]`,
/// adds its parameters' gradients into `lg` and returns the gradient of its
/// input `[N][D]`. Each residual passes `dout` to both the skip path and
/// the branch, and the two are summed.
fn layer_backward(
    lp: &LayerParams,
    la: &LayerActivations,
    dout: Vec<f32>,
    lg: &mut LayerParams,
    dims: &Dims,
) -> Vec<f32> {
    let (d, kv, hidden) = (dims.d, dims.kv, dims.hidden);
    // Feed-forward branch: out = h + w2(silu(w1 xn) * w3 xn).
    let mut dg = zeroed(la.g.len());
    matmul_backward(&dout, &la.g, &lp.w2, hidden, d, &mut dg, &mut lg.w2);
    let (dh1, dh3) = swiglu_backward(&dg, &la.h1, &la.h3);
    let mut dxn_ffn = zeroed(la.xn_ffn.len());
    matmul_backward(
        &dh1,
        &la.xn_ffn,
        &lp.w1,
        d,
        hidden,
        &mut dxn_ffn,
        &mut lg.w1,
    );
    matmul_backward(
        &dh3,
        &la.xn_ffn,
        &lp.w3,
        d,
        hidden,
        &mut dxn_ffn,
        &mut lg.w3,
    );
    let mut dh = dout;
    let from_ffn = rmsnorm_backward(
        &dxn_ffn,
        &la.h,
        &lp.ffn_norm,
        &la.inv_rms_ffn,
        &mut lg.ffn_norm,
    );
    accumulate(&mut dh, &from_ffn);
    // Attention branch: h = x + wo(attention(rope(wq xn), rope(wk xn), wv xn)).
    let mut datt = zeroed(la.att.len());
    matmul_backward(&dh, &la.att, &lp.wo, d, d, &mut datt, &mut lg.wo);
    let (mut dq, mut dk, dv) =
        attention_backward(&datt, &la.q, &la.k, &la.v, &la.probs, dims.attention);
    rope_backward(&mut dq, d, &dims.rope);
    rope_backward(&mut dk, kv, &dims.rope);
    let mut dxn_att = zeroed(la.xn_att.len());
    matmul_backward(&dq, &la.xn_att, &lp.wq, d, d, &mut dxn_att, &mut lg.wq);
    matmul_backward(&dk, &la.xn_att, &lp.wk, d, kv, &mut dxn_att, &mut lg.wk);
    matmul_backward(&dv, &la.xn_att, &lp.wv, d, kv, &mut dxn_att, &mut lg.wv);
    let mut dx = dh;
    let from_att = rmsnorm_backward(
        &dxn_att,
        &la.x,
        &lp.attention_norm,
        &la.inv_rms_att,
        &mut lg.attention_norm,
    );
    accumulate(&mut dx, &from_att);
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use llama2::Config;

    /// A tiny random model (GQA, 2 layers) and batch.
    fn tiny() -> (Params, Batch) {
        let config = Config::from_header(16, 24, 2, 4, 2, 11, 8, true).unwrap();
        let weights = llama2::synth::random_weights(&config, llama2::DType::F32, 3);
        let mut p = Params::from_weights(&weights).unwrap();
        // Norm gains away from 1 so their gradients are exercised.
        let gains = crate::gradcheck::random(p.norm.len(), 9, 0.5);
        for (g, r) in p.norm.iter_mut().zip(gains) {
            *g = 1.0 + r;
        }
        let inputs = [1, 5, 3, 3, 0, 10, 7, 2, 4, 4];
        let targets = [5, 3, 3, 0, 10, 7, 2, -1, 4, 9];
        let batch = Batch::new(2, 5, &inputs, &targets, &config).unwrap();
        (p, batch)
    }

    #[test]
    fn gradients_match_finite_differences_of_the_whole_model() {
        let (p, batch) = tiny();
        let grads = backward(&p, &batch, forward(&p, &batch));
        let infos = p.infos();
        for (i, info) in infos.iter().enumerate() {
            let analytic = grads.tensors()[i];
            let scale = analytic.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            // A handful of elements per tensor: each costs two forward passes.
            for j in (0..info.len()).step_by(info.len().div_ceil(5)) {
                let loss_at = |delta: f32| {
                    let mut q = p.clone();
                    q.tensors_mut()[i][j] += delta;
                    forward(&q, &batch).loss as f64
                };
                let h = 1e-2f32;
                let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
                let diff = (numeric - analytic[j] as f64).abs();
                assert!(
                    diff <= 2e-2 * scale + 1e-4,
                    "{}[{j}]: analytic {} numeric {numeric} (tensor scale {scale})",
                    info.name,
                    analytic[j]
                );
            }
        }
    }

    #[test]
    fn logits_match_the_inference_engine() {
        use llama2::LanguageModel;
        let (_, batch) = tiny();
        let weights = llama2::synth::random_weights(&batch_config(), llama2::DType::F32, 3);
        let p = Params::from_weights(&weights).unwrap();
        let acts = forward(&p, &batch);
        let mut model =
            llama2::Transformer::new(llama2::CpuBackend::new(1).unwrap(), &weights).unwrap();
        let v = p.config.vocab_size;
        for (b, ids) in batch.inputs.chunks(batch.seq_len).enumerate() {
            let want = model.forward_all(ids, 0).unwrap().to_vec();
            let got = &acts.logits[b * batch.seq_len * v..][..want.len()];
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "sequence {b}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_what_recycled_buffers_held() {
        // Heads of 16 (attention by query blocks) over a 32 + 8 query split.
        let config = Config::from_header(32, 48, 2, 2, 1, 11, 40, true).unwrap();
        let weights = llama2::synth::random_weights(&config, llama2::DType::F32, 4);
        let p = Params::from_weights(&weights).unwrap();
        let inputs: Vec<i32> = (0..80).map(|i| (i * 7 + 3) % 11).collect();
        let targets: Vec<i32> = inputs.iter().map(|&i| (i + 1) % 11).collect();
        let batch = Batch::new(2, 40, &inputs, &targets, &config).unwrap();
        let run = || {
            let acts = forward(&p, &batch);
            let loss = acts.loss;
            (loss, backward(&p, &batch, acts))
        };
        let (loss, grads) = run();
        crate::ops::poison_spares();
        let (again, grads_again) = run();
        assert_eq!(loss.to_bits(), again.to_bits(), "loss {loss} then {again}");
        for (info, (a, b)) in p
            .infos()
            .iter()
            .zip(grads.tensors().iter().zip(grads_again.tensors()))
        {
            let first = a
                .iter()
                .zip(b.iter())
                .position(|(x, y)| x.to_bits() != y.to_bits());
            assert!(
                first.is_none(),
                "{}: first difference at {first:?}",
                info.name
            );
        }
    }

    fn batch_config() -> Config {
        tiny().0.config
    }

    #[test]
    fn bad_batches_are_errors() {
        let (p, _) = tiny();
        let c = &p.config;
        assert!(Batch::new(1, 2, &[1, 2], &[2, 3], c).is_ok());
        assert!(Batch::new(1, 2, &[1], &[2, 3], c).is_err());
        assert!(Batch::new(1, 2, &[1, 11], &[2, 3], c).is_err());
        assert!(Batch::new(1, 2, &[1, 2], &[2, -2], c).is_err());
        assert!(Batch::new(1, 9, &[0; 9], &[0; 9], c).is_err());
        assert!(Batch::new(0, 2, &[], &[], c).is_err());
    }
}
