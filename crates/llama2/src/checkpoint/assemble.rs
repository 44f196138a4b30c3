//! From stored tensors to `ModelWeights`: the one step shared by every
//! foreign format. A format's reader hands over its tensors by name
//! (`RawTensor`s, windows of its memory-mapped files) and says how it names
//! them and how it orders the rows of the query and key projections; this
//! file finds each Llama tensor, checks its shape and type against the
//! config, and borrows it in place when it can (f32, f16 and bf16 data at an
//! aligned offset), so nothing downstream knows where a model came from.
//!
//! Rotary layout: Hugging Face checkpoints store the rows of each head of
//! `wq` and `wk` as two halves (the "rotate-half" layout of their RoPE),
//! where llama2.c, Meta and GGUF interleave them in pairs. We permute those
//! two matrices to the interleaved order once, here, rather than giving
//! every backend (CPU reference, SIMD, CUDA kernels) a second RoPE variant:
//! it costs one copy of two matrices per layer at load and keeps one RoPE
//! everywhere. All other tensors stay where the file has them.

use std::collections::HashMap;

use bytemuck::Pod;
use half::{bf16, f16};

use super::raw::{RawDType, RawTensor};
use super::read::Tensor;
use super::{LayerWeights, ModelWeights, Source};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{HostMatrix, MatrixData, Q8Data, Storage};

/// How a format names the Llama tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// transformers' `LlamaForCausalLM`: `model.layers.0.self_attn.q_proj.weight`.
    HuggingFace,
    /// Meta's `consolidated.*.pth` and llama2.c's `model.py`:
    /// `layers.0.attention.wq.weight`.
    Meta,
    /// llama.cpp's GGUF: `blk.0.attn_q.weight`.
    Gguf,
}

impl Naming {
    /// The stored name of `tensor` in `layer` (ignored for whole-model tensors).
    pub(super) fn name(self, tensor: Tensor, layer: usize) -> String {
        use Tensor::*;
        let (hf, meta, gguf) = match tensor {
            Embedding => ("model.embed_tokens", "tok_embeddings", "token_embd"),
            RmsFinal => ("model.norm", "norm", "output_norm"),
            Classifier => ("lm_head", "output", "output"),
            RmsAtt => ("input_layernorm", "attention_norm", "attn_norm"),
            Wq => ("self_attn.q_proj", "attention.wq", "attn_q"),
            Wk => ("self_attn.k_proj", "attention.wk", "attn_k"),
            Wv => ("self_attn.v_proj", "attention.wv", "attn_v"),
            Wo => ("self_attn.o_proj", "attention.wo", "attn_output"),
            RmsFfn => ("post_attention_layernorm", "ffn_norm", "ffn_norm"),
            W1 => ("mlp.gate_proj", "feed_forward.w1", "ffn_gate"),
            W2 => ("mlp.down_proj", "feed_forward.w2", "ffn_down"),
            W3 => ("mlp.up_proj", "feed_forward.w3", "ffn_up"),
        };
        let whole = matches!(tensor, Embedding | RmsFinal | Classifier);
        match (self, whole) {
            (Naming::HuggingFace, true) => format!("{hf}.weight"),
            (Naming::HuggingFace, false) => format!("model.layers.{layer}.{hf}.weight"),
            (Naming::Meta, true) => format!("{meta}.weight"),
            (Naming::Meta, false) => format!("layers.{layer}.{meta}.weight"),
            (Naming::Gguf, true) => format!("{gguf}.weight"),
            (Naming::Gguf, false) => format!("blk.{layer}.{gguf}.weight"),
        }
    }
}

/// A format's tensors, by stored name.
pub struct TensorSet {
    pub tensors: HashMap<String, RawTensor>,
    pub naming: Naming,
    /// Whether `wq`/`wk` rows are in Hugging Face's rotate-half order.
    pub rotate_half: bool,
    /// Where the tensors come from.
    pub source: Source,
}

impl TensorSet {
    fn get(&self, tensor: Tensor, layer: usize) -> Result<&RawTensor> {
        let name = self.naming.name(tensor, layer);
        self.tensors.get(&name).ok_or_else(|| {
            Error::Invalid(format!(
                "the model has no tensor {name}, which a Llama model of this config needs"
            ))
        })
    }

    /// Every weight `config` needs, as `ModelWeights`.
    pub fn assemble(&self, config: Config) -> Result<ModelWeights> {
        config.validate()?;
        let c = &config;
        let matrix = |t: Tensor, layer: usize| -> Result<HostMatrix> {
            let raw = self.get(t, layer)?;
            let (rows, cols) = t.shape(c);
            let heads = match t {
                Tensor::Wq if self.rotate_half => Some(c.n_heads),
                Tensor::Wk if self.rotate_half => Some(c.n_kv_heads),
                _ => None,
            };
            to_matrix(raw, rows, cols, heads)
        };
        let vector = |t: Tensor, layer: usize| -> Result<Storage<f32>> {
            let raw = self.get(t, layer)?;
            to_vector(raw, t.shape(c).1)
        };
        let layers = (0..c.n_layers)
            .map(|l| {
                Ok(LayerWeights {
                    rms_att: vector(Tensor::RmsAtt, l)?,
                    wq: matrix(Tensor::Wq, l)?,
                    wk: matrix(Tensor::Wk, l)?,
                    wv: matrix(Tensor::Wv, l)?,
                    wo: matrix(Tensor::Wo, l)?,
                    rms_ffn: vector(Tensor::RmsFfn, l)?,
                    w1: matrix(Tensor::W1, l)?,
                    w2: matrix(Tensor::W2, l)?,
                    w3: matrix(Tensor::W3, l)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let weights = ModelWeights {
            config,
            format: self.source,
            token_embedding: matrix(Tensor::Embedding, 0)?,
            layers,
            rms_final: vector(Tensor::RmsFinal, 0)?,
            classifier: if c.shared_classifier {
                None
            } else {
                Some(matrix(Tensor::Classifier, 0)?)
            },
        };
        weights.check_shapes()?;
        Ok(weights)
    }
}

/// `raw` as a `[rows][cols]` matrix, borrowed from its file when possible.
/// `heads`: permute the rows of that many heads from rotate-half order.
fn to_matrix(
    raw: &RawTensor,
    rows: usize,
    cols: usize,
    heads: Option<usize>,
) -> Result<HostMatrix> {
    if raw.shape != [rows, cols] {
        return Err(Error::Invalid(format!(
            "tensor {} has shape {:?}; the config needs [{rows}, {cols}]",
            raw.name, raw.shape
        )));
    }
    let n = rows * cols;
    let data = match (raw.dtype, heads) {
        (RawDType::F32, None) => MatrixData::F32(Storage::from_map(&raw.map, raw.offset, n)),
        (RawDType::F16, None) => MatrixData::F16(Storage::from_map(&raw.map, raw.offset, n)),
        (RawDType::BF16, None) => MatrixData::BF16(Storage::from_map(&raw.map, raw.offset, n)),
        (RawDType::F32, Some(h)) => MatrixData::F32(permuted::<f32>(raw, rows, cols, h)),
        (RawDType::F16, Some(h)) => MatrixData::F16(permuted::<f16>(raw, rows, cols, h)),
        (RawDType::BF16, Some(h)) => MatrixData::BF16(permuted::<bf16>(raw, rows, cols, h)),
        (RawDType::Q8_0Blocks, None) => MatrixData::Q8(q8_from_blocks(raw.bytes())),
        (RawDType::Q8_0Blocks, Some(_)) => {
            return Err(Error::Invalid(format!(
                "tensor {}: Q8_0 blocks in rotate-half order are not supported",
                raw.name
            )))
        }
    };
    Ok(HostMatrix { rows, cols, data })
}

/// A norm vector of `len` values, widened to f32 (norms are tiny; the
/// forward pass keeps them in f32 whatever the matrices are).
fn to_vector(raw: &RawTensor, len: usize) -> Result<Storage<f32>> {
    if raw.shape != [len] {
        return Err(Error::Invalid(format!(
            "tensor {} has shape {:?}; the config needs [{len}]",
            raw.name, raw.shape
        )));
    }
    Ok(match raw.dtype {
        RawDType::F32 => Storage::from_map(&raw.map, raw.offset, len),
        RawDType::F16 => Storage::owned(widen::<f16>(raw, f16::to_f32)),
        RawDType::BF16 => Storage::owned(widen::<bf16>(raw, bf16::to_f32)),
        RawDType::Q8_0Blocks => {
            return Err(Error::Invalid(format!(
                "tensor {} is a norm vector stored as Q8_0; expected F32, F16 or BF16",
                raw.name
            )))
        }
    })
}

fn widen<T: Pod>(raw: &RawTensor, to_f32: fn(T) -> f32) -> Vec<f32> {
    bytemuck::pod_collect_to_vec::<u8, T>(raw.bytes())
        .into_iter()
        .map(to_f32)
        .collect()
}

/// The rows of `raw` (`heads` heads of `rows / heads` rows each) moved from
/// rotate-half order (row `t * half + j` of a head) to interleaved order
/// (row `2j + t`), the layout `transformers`' conversion script undoes.
fn permuted<T: Pod>(raw: &RawTensor, rows: usize, cols: usize, heads: usize) -> Storage<T> {
    let values: Vec<T> = bytemuck::pod_collect_to_vec(raw.bytes());
    Storage::owned(permute_rotate_half(&values, rows, cols, heads))
}

/// `permuted` on a plain slice `[rows][cols]`.
pub fn permute_rotate_half<T: Copy>(w: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    // Row `2j + t` comes from row `t * half + j`.
    gather_head_rows(w, (rows, cols, heads), |r, half| (r % 2) * half + r / 2)
}

/// The inverse of `permute_rotate_half`: interleaved rows back to
/// Hugging Face's rotate-half order (for writing Hugging Face files).
pub fn permute_to_rotate_half<T: Copy>(w: &[T], rows: usize, cols: usize, heads: usize) -> Vec<T> {
    // Row `t * half + j` comes from row `2j + t`.
    gather_head_rows(w, (rows, cols, heads), |r, half| 2 * (r % half) + r / half)
}

/// The rows of `w` reordered within each head: row `r` of a head is the
/// head's row `source(r, half)`, with `half` half the head's rows.
fn gather_head_rows<T: Copy>(
    w: &[T],
    (rows, cols, heads): (usize, usize, usize),
    source: impl Fn(usize, usize) -> usize,
) -> Vec<T> {
    let per_head = rows / heads;
    let half = per_head / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..heads {
        for r in 0..per_head {
            let src = h * per_head + source(r, half);
            out.extend_from_slice(&w[src * cols..(src + 1) * cols]);
        }
    }
    out
}

/// GGUF Q8_0 blocks (an f16 scale, then 32 int8) as our Q8 layout: the
/// int8 values contiguous, one f32 scale per group of 32.
fn q8_from_blocks(bytes: &[u8]) -> Q8Data {
    let blocks = bytes.len() / 34;
    let mut q = Vec::with_capacity(blocks * 32);
    let mut scales = Vec::with_capacity(blocks);
    for block in bytes.chunks_exact(34) {
        scales.push(f16::from_le_bytes([block[0], block[1]]).to_f32());
        q.extend(block[2..].iter().map(|&b| b as i8));
    }
    Q8Data {
        q: Storage::owned(q),
        scales: Storage::owned(scales),
        group_size: 32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_half_permutation_interleaves_each_head() {
        // Two heads of 4 rows: [a0 a1 b0 b1] (halves) -> [a0 b0 a1 b1].
        let w: Vec<u32> = (0..8).collect();
        assert_eq!(permute_rotate_half(&w, 8, 1, 2), [0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn the_two_row_orders_are_inverse() {
        let w: Vec<u32> = (0..48).collect();
        let there = permute_rotate_half(&w, 24, 2, 3);
        assert_eq!(permute_to_rotate_half(&there, 24, 2, 3), w);
    }

    #[test]
    fn names_follow_each_format() {
        assert_eq!(
            Naming::HuggingFace.name(Tensor::W2, 3),
            "model.layers.3.mlp.down_proj.weight"
        );
        assert_eq!(
            Naming::Meta.name(Tensor::Wk, 0),
            "layers.0.attention.wk.weight"
        );
        assert_eq!(Naming::Gguf.name(Tensor::RmsFinal, 0), "output_norm.weight");
    }
}
