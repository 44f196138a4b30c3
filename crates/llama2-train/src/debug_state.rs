//! A training debug folder written from llama2.c's model.py (as
//! `shared/models/train-debug`): `model.bin` (the initial weights, llama2.c
//! version 1), `state.json` (config, hyper-parameters, and a table of
//! arrays: name, dtype, shape, byte offset and length into `tensors.bin`)
//! and `tensors.bin` (little-endian). Every size and offset is checked, so
//! a damaged folder is an error naming what is wrong.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::Batch;
use crate::params::Params;

/// The model's config as model.py's `ModelArgs` has it.
#[derive(Clone, Debug, Deserialize)]
struct ConfigJson {
    dim: usize,
    hidden_dim: usize,
    n_layers: usize,
    n_heads: usize,
    n_kv_heads: usize,
    vocab_size: usize,
    max_seq_len: usize,
    norm_eps: f32,
    rope_theta: f32,
}

/// train.py's hyper-parameters of the recorded run.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct HyperParameters {
    pub batch_size: usize,
    pub seq_len: usize,
    pub learning_rate: f32,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub grad_clip: f32,
    /// AdamW steps recorded in `adamw_losses`.
    pub steps: usize,
}

/// One entry of `state.json`'s array table.
#[derive(Clone, Debug, Deserialize)]
struct ArrayEntry {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    offset: u64,
    bytes: u64,
}

#[derive(Clone, Debug, Deserialize)]
struct StateJson {
    config: ConfigJson,
    hyper_parameters: HyperParameters,
    arrays: Vec<ArrayEntry>,
}

/// Everything a debug folder holds, decoded.
pub struct DebugState {
    pub dir: PathBuf,
    /// The initial parameters, config included (epsilon and RoPE base
    /// taken from `state.json`).
    pub params: Params,
    pub hyper: HyperParameters,
    /// `inputs` and `targets`, `[B][T]`.
    pub batch: Batch,
    /// PyTorch's logits `[B][T][V]`.
    pub logits: Vec<f32>,
    /// PyTorch's mean cross-entropy.
    pub loss: f32,
    /// PyTorch's gradient of every parameter, in `Params::infos` order.
    pub grads: Vec<Vec<f32>>,
    /// The loss before each AdamW step `[steps]`.
    pub adamw_losses: Vec<f32>,
}

/// The array table and the bytes it points into.
struct Arrays<'a> {
    entries: &'a [ArrayEntry],
    data: &'a [u8],
    /// `tensors.bin`, for messages.
    path: &'a Path,
}

impl Arrays<'_> {
    /// The bytes of array `name`, checked to be `dtype` of `shape`, its
    /// length to match, and to lie within `tensors.bin`.
    fn bytes(&self, name: &str, dtype: &str, shape: &[usize]) -> Result<&[u8]> {
        let fail = |m: String| Err(Error::folder(self.path, m));
        let Some(e) = self.entries.iter().find(|e| e.name == name) else {
            return fail(format!("state.json lists no array {name:?}"));
        };
        if e.dtype != dtype {
            return fail(format!("array {name} is {}; expected {dtype}", e.dtype));
        }
        if e.shape != shape {
            return fail(format!(
                "array {name} has shape {:?}; expected {shape:?}",
                e.shape
            ));
        }
        let want_bytes = shape
            .iter()
            .try_fold(4u64, |n, &d| n.checked_mul(d as u64))
            .unwrap_or(u64::MAX);
        if e.bytes != want_bytes {
            return fail(format!(
                "array {name} claims {} bytes; its shape {shape:?} needs {want_bytes}",
                e.bytes
            ));
        }
        let end = e
            .offset
            .checked_add(e.bytes)
            .filter(|&end| end <= self.data.len() as u64);
        match end {
            Some(end) => Ok(&self.data[e.offset as usize..end as usize]),
            None => fail(format!(
                "array {name} (offset {}, {} bytes) runs past the end of the file ({} bytes)",
                e.offset,
                e.bytes,
                self.data.len()
            )),
        }
    }

    fn f32s(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let bytes = self.bytes(name, "float32", shape)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    fn i32s(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        let bytes = self.bytes(name, "int32", shape)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

/// Reads a file of the folder, naming it when it is missing.
fn read_file(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    std::fs::read(&path).map_err(|e| Error::folder(&path, format!("cannot read {name}: {e}")))
}

/// Reads and checks the debug folder `dir`.
pub fn load(dir: &Path) -> Result<DebugState> {
    if !dir.is_dir() {
        return Err(Error::folder(
            dir,
            "not a directory (expected a training debug folder)",
        ));
    }
    let json_path = dir.join("state.json");
    let json = read_file(dir, "state.json")?;
    let state: StateJson = serde_json::from_slice(&json)
        .map_err(|e| Error::folder(&json_path, format!("malformed state.json: {e}")))?;
    let model_path = dir.join("model.bin");
    if !model_path.is_file() {
        return Err(Error::folder(&model_path, "model.bin is missing"));
    }
    let weights = llama2::checkpoint::open(&model_path, None)?;
    let params = params_for(&weights, &state.config, &json_path)?;
    let data = read_file(dir, "tensors.bin")?;
    let tensors_path = dir.join("tensors.bin");
    let arrays = Arrays {
        entries: &state.arrays,
        data: &data,
        path: &tensors_path,
    };
    let h = state.hyper_parameters;
    let (b, t, v) = (h.batch_size, h.seq_len, params.config.vocab_size);
    let inputs = arrays.i32s("inputs", &[b, t])?;
    let targets = arrays.i32s("targets", &[b, t])?;
    let batch = Batch::new(b, t, &inputs, &targets, &params.config)
        .map_err(|e| Error::folder(&tensors_path, format!("inputs/targets: {e}")))?;
    let grads = params
        .infos()
        .iter()
        .map(|info| arrays.f32s(&format!("grad.{}", info.name), &info.shape))
        .collect::<Result<Vec<_>>>()?;
    Ok(DebugState {
        dir: dir.to_owned(),
        logits: arrays.f32s("logits", &[b, t, v])?,
        loss: arrays.f32s("loss", &[1])?[0],
        grads,
        adamw_losses: arrays.f32s("adamw_losses", &[h.steps])?,
        params,
        hyper: h,
        batch,
    })
}

/// The parameters of `weights`, after checking that model.bin and
/// state.json describe the same model; epsilon and the RoPE base come from
/// state.json (llama2.c files imply llama2.c's defaults).
fn params_for(weights: &llama2::ModelWeights, j: &ConfigJson, json_path: &Path) -> Result<Params> {
    let c = weights.config;
    let pairs = [
        ("dim", c.dim, j.dim),
        ("hidden_dim", c.hidden_dim, j.hidden_dim),
        ("n_layers", c.n_layers, j.n_layers),
        ("n_heads", c.n_heads, j.n_heads),
        ("n_kv_heads", c.n_kv_heads, j.n_kv_heads),
        ("vocab_size", c.vocab_size, j.vocab_size),
        ("max_seq_len", c.seq_len, j.max_seq_len),
    ];
    if let Some((name, file, json)) = pairs.iter().find(|(_, a, b)| a != b) {
        return Err(Error::folder(
            json_path,
            format!("state.json says {name} = {json} but model.bin has {file}"),
        ));
    }
    let mut params = Params::from_weights(weights)?;
    params.config.norm_eps = j.norm_eps;
    params.config.rope_theta = j.rope_theta;
    params.config.validate()?;
    Ok(params)
}
