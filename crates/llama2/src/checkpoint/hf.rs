//! Hugging Face model directories: `config.json` (both the older style with
//! `rope_theta` and `rope_scaling` at the top level and transformers 5's
//! `rope_parameters`) and the weights in `model.safetensors` or in shards
//! listed by `model.safetensors.index.json` (or, in older directories,
//! `pytorch_model.bin` pickles). Weight files are memory-mapped; their
//! tensors are used in place (see `assemble.rs`).
//! Only the Llama architecture is accepted; anything the forward pass does
//! not implement (biases, other activations, other RoPE types) is refused by
//! name rather than run wrongly.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};
use serde_json::Value;

use super::assemble::{Naming, TensorSet};
use super::raw::{RawDType, RawTensor};
use super::{ModelWeights, Source};
use crate::config::{Config, Llama3Scaling, TokenSet, LLAMA2C_ROPE_THETA};
use crate::error::{Error, Result};
use crate::files;
use crate::tensor::HostMatrix;

/// Largest config.json or index read: real ones are a few kilobytes.
const MAX_JSON_BYTES: u64 = 16 << 20;

/// Whether `dir` looks like a Hugging Face model directory.
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// Loads the model in the Hugging Face directory `dir`.
pub fn load(dir: &Path) -> Result<ModelWeights> {
    let config = read_config(&dir.join("config.json"))?;
    let tensors = read_weights(dir)?;
    TensorSet {
        tensors,
        naming: Naming::HuggingFace,
        rotate_half: true,
        source: Source::HuggingFace,
    }
    .assemble(config)
    .map_err(|e| in_dir(dir, e))
}

/// Errors of assembling a directory's tensors, said of the directory.
fn in_dir(dir: &Path, e: Error) -> Error {
    match e {
        Error::Invalid(reason) | Error::Config(reason) => Error::checkpoint(dir, reason),
        other => other,
    }
}

/// A JSON file of bounded size, parsed.
fn read_json(path: &Path) -> Result<Value> {
    let bytes = files::read_bounded(path, "JSON file", MAX_JSON_BYTES)?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::checkpoint(path, format!("not valid JSON: {e}")))
}

// ----------------------------------------------------------------------------
// config.json

/// The model's hyper-parameters from `config.json`.
pub fn read_config(path: &Path) -> Result<Config> {
    let json = read_json(path)?;
    parse_config(&json).map_err(|reason| Error::checkpoint(path, reason))
}

/// `config.json` as a `Config`, or what is missing or unsupported.
pub fn parse_config(j: &Value) -> std::result::Result<Config, String> {
    let model_type = j.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type != "llama" {
        return Err(format!(
            "model_type is {}; this program runs Llama models (model_type \"llama\")",
            j.get("model_type").unwrap_or(&Value::Null)
        ));
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if j.get(flag).and_then(Value::as_bool) == Some(true) {
            return Err(format!(
                "{flag} is true; Llama models without biases are supported"
            ));
        }
    }
    if let Some(act) = j.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(format!("hidden_act is {act:?}; expected \"silu\""));
        }
    }
    let dim = usize_key(j, "hidden_size")?;
    let n_heads = usize_key(j, "num_attention_heads")?;
    let mut c = Config::llama2c(
        dim,
        usize_key(j, "intermediate_size")?,
        usize_key(j, "num_hidden_layers")?,
        n_heads,
        optional_usize(j, "num_key_value_heads")?.unwrap_or(n_heads),
        usize_key(j, "vocab_size")?,
        usize_key(j, "max_position_embeddings")?,
        // transformers' LlamaConfig default.
        j.get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    );
    if let Some(hd) = optional_usize(j, "head_dim")? {
        c.head_dim = hd;
    }
    // transformers' LlamaConfig default epsilon is 1e-6, not llama2.c's 1e-5.
    c.norm_eps = optional_f32(j, "rms_norm_eps")?.unwrap_or(1e-6);
    let (theta, scaling) = rope(j)?;
    c.rope_theta = theta;
    c.rope_scaling = scaling;
    c.bos = optional_usize(j, "bos_token_id")?.unwrap_or(1) as u32;
    c.eos = eos_ids(j)?;
    c.eos_ends_generation = true;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// RoPE base and scaling: `rope_parameters` (transformers 5) or the
/// top-level `rope_theta` and `rope_scaling` (earlier versions).
fn rope(j: &Value) -> std::result::Result<(f32, Option<Llama3Scaling>), String> {
    let params = j.get("rope_parameters").filter(|v| v.is_object());
    let theta = match params.and_then(|p| p.get("rope_theta")) {
        Some(v) => number(v, "rope_parameters.rope_theta")?,
        None => optional_f32(j, "rope_theta")?.unwrap_or(LLAMA2C_ROPE_THETA),
    };
    let scaling = params
        .or_else(|| j.get("rope_scaling").filter(|v| v.is_object()))
        .filter(|s| s.get("rope_type").or_else(|| s.get("type")).is_some());
    let Some(s) = scaling else {
        return Ok((theta, None));
    };
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    match kind {
        "default" => Ok((theta, None)),
        "llama3" => {
            let f = |key: &str| {
                s.get(key)
                    .ok_or_else(|| format!("llama3 RoPE scaling has no {key}"))
                    .and_then(|v| number(v, key))
            };
            let context = f("original_max_position_embeddings")?;
            Ok((
                theta,
                Some(Llama3Scaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_context: context as usize,
                }),
            ))
        }
        other => Err(format!(
            "RoPE type {other:?} is not supported; supported: default, llama3"
        )),
    }
}

/// `eos_token_id`: one id or a list (llama2.c's 2 when absent).
fn eos_ids(j: &Value) -> std::result::Result<TokenSet, String> {
    let ids: Vec<u32> = match j.get("eos_token_id") {
        None | Some(Value::Null) => vec![2],
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| token_id(v).ok_or("eos_token_id list entry"))
            .collect::<std::result::Result<_, _>>()
            .map_err(|what| format!("{what} is not a token id"))?,
        Some(v) => vec![token_id(v)
            .ok_or_else(|| format!("eos_token_id is {v}; expected an id or a list of ids"))?],
    };
    TokenSet::new(&ids).map_err(|e| e.to_string())
}

/// A token id: a non-negative integer that fits 32 bits (a larger one is
/// refused, not cut to its low bits).
fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|id| u32::try_from(id).ok())
}

fn usize_key(j: &Value, key: &str) -> std::result::Result<usize, String> {
    optional_usize(j, key)?.ok_or_else(|| format!("config.json has no {key}"))
}

fn optional_usize(j: &Value, key: &str) -> std::result::Result<Option<usize>, String> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| Some(n as usize))
            .ok_or_else(|| format!("{key} is {v}; expected a non-negative integer")),
    }
}

fn optional_f32(j: &Value, key: &str) -> std::result::Result<Option<f32>, String> {
    match j.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => number(v, key).map(Some),
    }
}

fn number(v: &Value, key: &str) -> std::result::Result<f32, String> {
    v.as_f64()
        .map(|x| x as f32)
        .ok_or_else(|| format!("{key} is {v}; expected a number"))
}

// ----------------------------------------------------------------------------
// safetensors

/// Every tensor of the directory's safetensors file or shards, by name.
/// Safetensors first; older directories have only PyTorch pickles
/// (`pytorch_model.bin`, or shards listed in `pytorch_model.bin.index.json`),
/// read by the same never-executing parser as Meta checkpoints.
fn read_weights(dir: &Path) -> Result<HashMap<String, RawTensor>> {
    let (files, pickled) = weight_files(dir)?;
    let mut tensors = HashMap::new();
    for file in &files {
        let read = if pickled {
            read_pickle(file)?
        } else {
            read_safetensors(file)?
        };
        for t in read {
            let name = t.name.clone();
            if tensors.insert(name.clone(), t).is_some() {
                return Err(Error::checkpoint(
                    file,
                    format!("tensor {name} is also in another shard; the shards disagree"),
                ));
            }
        }
    }
    Ok(tensors)
}

/// The weight files of `dir`, and whether they are pickles.
fn weight_files(dir: &Path) -> Result<(Vec<std::path::PathBuf>, bool)> {
    for (single, index, pickled) in [
        ("model.safetensors", "model.safetensors.index.json", false),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", true),
    ] {
        if dir.join(single).is_file() {
            return Ok((vec![dir.join(single)], pickled));
        }
        if dir.join(index).is_file() {
            return Ok((shard_files(dir, &dir.join(index))?, pickled));
        }
    }
    Err(Error::checkpoint(
        dir,
        "no model.safetensors, pytorch_model.bin or their .index.json beside config.json",
    ))
}

/// The tensors of one `pytorch_model.bin` file.
fn read_pickle(path: &Path) -> Result<Vec<RawTensor>> {
    let file = super::pickle::TorchFile::open(path)?;
    file.state_dict()?
        .iter()
        .map(|(name, t)| file.raw_tensor(name, t))
        .collect()
}

/// The shard files an index names, each once, checked to be in `dir`.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<std::path::PathBuf>> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::checkpoint(index, "it has no weight_map object"))?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .filter(|f| is_plain_file_name(f))
            .ok_or_else(|| {
                Error::checkpoint(
                    index,
                    format!(
                        "tensor {tensor} maps to {file}; expected a file name in the directory"
                    ),
                )
            })?;
        names.insert(file.to_owned());
    }
    Ok(names.into_iter().map(|f| dir.join(f)).collect())
}

/// A name without directories, so an index cannot point outside its folder.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != ".." && name != "." && !name.contains(['/', '\\'])
}

/// The tensors of one safetensors file, memory-mapped.
pub fn read_safetensors(path: &Path) -> Result<Vec<RawTensor>> {
    let (file, len) = files::open_regular(path, "safetensors file")?;
    tensors_of(files::map(&file, len, path)?).map_err(|reason| Error::checkpoint(path, reason))
}

/// The tensors described by the safetensors header at the start of `map`.
pub fn tensors_of(map: Arc<Mmap>) -> std::result::Result<Vec<RawTensor>, String> {
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|e| format!("not a valid safetensors file: {e}"))?;
    let data_start = 8 + header_len as u64;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            Dtype::F32 => RawDType::F32,
            Dtype::F16 => RawDType::F16,
            Dtype::BF16 => RawDType::BF16,
            other => {
                return Err(format!(
                    "tensor {name} is {other:?}; supported types are F32, F16 and BF16"
                ))
            }
        };
        let (start, end) = info.data_offsets;
        let t = RawTensor::new(
            name.clone(),
            dtype,
            info.shape.clone(),
            map.clone(),
            data_start + start as u64,
        )
        .map_err(|e| e.to_string())?;
        if t.len != end - start {
            return Err(format!(
                "tensor {name}: its offsets span {} bytes but {:?} {:?} needs {}",
                end - start,
                info.dtype,
                info.shape,
                t.len
            ));
        }
        out.push(t);
    }
    Ok(out)
}

// ----------------------------------------------------------------------------
// Writing a Hugging Face directory

/// Writes `weights` as a Hugging Face model directory `dir` (which must
/// exist): `model.safetensors` in `dtype` (f32, f16 or bf16; int8 weights
/// are dequantized) with `wq`/`wk` rows back in rotate-half order, and a
/// transformers-style `config.json`. Tensors are converted one at a time
/// as they are written.
pub fn write_dir(weights: &ModelWeights, dir: &Path, dtype: crate::tensor::DType) -> Result<()> {
    use super::read::Tensor;
    use crate::tensor::DType;
    let c = &weights.config;
    let st_dtype = match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::Q8 => {
            return Err(Error::Invalid(
                "Hugging Face directories hold f32, f16 or bf16 weights, not q8".into(),
            ))
        }
    };
    if dtype == DType::F16 {
        // f16 saturates to infinity above 65504: refuse instead.
        for m in std::iter::once(&weights.token_embedding)
            .chain(
                weights
                    .layers
                    .iter()
                    .flat_map(|l| l.matrices().map(|(_, m, _)| m)),
            )
            .chain(weights.classifier.as_ref())
        {
            crate::tensor::check_representable(&m.to_f32(), m.cols, DType::F16)?;
        }
    }
    let out_tensor = |(name, t, w): (String, Tensor, super::Weight)| {
        let (shape, source) = match w {
            super::Weight::Matrix(m) => {
                // q and k go back to the rotate-half row order.
                let heads = match t {
                    Tensor::Wq => Some(c.n_heads),
                    Tensor::Wk => Some(c.n_kv_heads),
                    _ => None,
                };
                (vec![m.rows, m.cols], Values::Matrix(m.clone(), heads))
            }
            super::Weight::Vector(v) => (vec![v.len()], Values::Vector(v.clone())),
        };
        let tensor = OutTensor {
            shape,
            dtype: st_dtype,
            source,
        };
        (name, tensor)
    };
    let path = dir.join("model.safetensors");
    let named: Vec<(String, OutTensor)> = weights
        .tensors_named(Naming::HuggingFace)
        .into_iter()
        .map(out_tensor)
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(named, Some(metadata), &path)
        .map_err(|e| Error::checkpoint(&path, format!("cannot write: {e}")))?;
    let config = config_json(c, dtype);
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    std::fs::write(dir.join("config.json"), text + "\n").map_err(|source| Error::Io {
        path: dir.join("config.json"),
        source,
    })
}

/// transformers' `config.json` for `c`.
pub fn config_json(c: &Config, dtype: crate::tensor::DType) -> Value {
    let mut rope = serde_json::json!({ "rope_theta": c.rope_theta, "rope_type": "default" });
    if let Some(s) = c.rope_scaling {
        rope = serde_json::json!({
            "rope_theta": c.rope_theta,
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_context,
        });
    }
    let eos: Vec<u32> = c.eos.as_slice().to_vec();
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": c.shared_classifier,
        "bos_token_id": c.bos,
        "eos_token_id": if eos.len() == 1 { Value::from(eos[0]) } else { Value::from(eos) },
        "dtype": match dtype {
            crate::tensor::DType::F16 => "float16",
            crate::tensor::DType::BF16 => "bfloat16",
            _ => "float32",
        },
    })
}

/// One tensor to write, converted when safetensors asks for its bytes.
struct OutTensor {
    shape: Vec<usize>,
    dtype: Dtype,
    source: Values,
}

/// Where an `OutTensor`'s values come from: a matrix (with the heads whose
/// rows go back to rotate-half order) or a norm vector.
enum Values {
    Matrix(HostMatrix, Option<usize>),
    Vector(crate::tensor::Storage<f32>),
}

impl safetensors::tensor::View for OutTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        let values = match &self.source {
            Values::Matrix(m, None) => m.to_f32(),
            Values::Matrix(m, Some(heads)) => {
                super::assemble::permute_to_rotate_half(&m.to_f32(), m.rows, m.cols, *heads)
            }
            Values::Vector(v) => v.to_vec(),
        };
        let bytes: Vec<u8> = match self.dtype {
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            _ => bytemuck::cast_slice(&values).to_vec(),
        };
        std::borrow::Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n * if self.dtype == Dtype::F32 { 4 } else { 2 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(eos: Value) -> Value {
        serde_json::json!({
            "model_type": "llama", "hidden_size": 8, "intermediate_size": 12,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32,
            "max_position_embeddings": 16, "eos_token_id": eos,
        })
    }

    #[test]
    fn eos_ids_read_as_given() {
        let c = parse_config(&config(serde_json::json!([2, 3]))).unwrap();
        assert_eq!(c.eos.as_slice(), [2, 3]);
        let c = parse_config(&config(serde_json::json!(5))).unwrap();
        assert_eq!(c.eos.as_slice(), [5]);
    }

    #[test]
    fn eos_ids_beyond_32_bits_are_refused_not_truncated() {
        // 2^32 + 2 would be id 2 if cut to its low 32 bits.
        let big = (1u64 << 32) + 2;
        for eos in [serde_json::json!(big), serde_json::json!([2, big])] {
            let err = parse_config(&config(eos)).unwrap_err();
            assert!(err.contains("eos_token_id"), "{err}");
        }
    }
}
