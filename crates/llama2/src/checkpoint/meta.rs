//! PyTorch checkpoints of the Llama code bases: Meta's model directories
//! (`params.json` and one `consolidated.NN.pth` per model-parallel shard)
//! and llama2.c's `train.py` checkpoints (`ckpt.pt`, with `model_args` and
//! the state dict). Both name tensors as Meta's `model.py` does and keep
//! q/k rows interleaved, so after reading (`pickle.rs`, a data parser that
//! never runs code) they go through the same `assemble.rs` step as every
//! format.
//!
//! Meta shards split each matrix along one axis: the token embedding, `wo`
//! and `w2` along their columns, the other matrices along their rows; norm
//! vectors are repeated in every shard. The joined tensors are copied once
//! into memory at load; a single shard is used in place.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapMut;
use serde_json::Value;

use super::assemble::{Naming, TensorSet};
use super::pickle::{TorchFile, TorchTensor};
use super::raw::RawTensor;
use super::{ModelWeights, Source};
use crate::config::{Config, LLAMA2C_ROPE_THETA};
use crate::error::{Error, Result};
use crate::files;

/// Context length of a Meta model when neither its files nor the caller
/// say: Llama 2's. params.json does not store it.
pub const META_DEFAULT_CONTEXT: usize = 4096;

/// Whether `dir` looks like a Meta model directory.
pub fn is_model_dir(dir: &Path) -> bool {
    dir.join("params.json").is_file()
}

/// Loads the Meta model in `dir`, with a context of `context` positions
/// (`META_DEFAULT_CONTEXT` when `None`).
pub fn load_dir(dir: &Path, context: Option<usize>) -> Result<ModelWeights> {
    let params_path = dir.join("params.json");
    let bytes = files::read_bounded(&params_path, "params.json", 1 << 20)?;
    let params: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::checkpoint(&params_path, format!("not valid JSON: {e}")))?;
    let shards = shard_paths(dir)?;
    let files = shards
        .iter()
        .map(|p| TorchFile::open(p))
        .collect::<Result<Vec<_>>>()?;
    let tensors = join_shards(&files).map_err(|reason| Error::checkpoint(dir, reason))?;
    let config = meta_config(&params, &tensors, context.unwrap_or(META_DEFAULT_CONTEXT))
        .map_err(|reason| Error::checkpoint(&params_path, reason))?;
    assemble(tensors, config, Source::Meta).map_err(|e| in_file(dir, e))
}

/// Loads a llama2.c `train.py` checkpoint.
pub fn load_train_checkpoint(path: &Path) -> Result<ModelWeights> {
    let file = TorchFile::open(path)?;
    let state = file.state_dict()?;
    let shared = is_tied(&state);
    let tensors = state
        .iter()
        .map(|(name, t)| Ok((name.clone(), file.raw_tensor(name, t)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let args = file.root().get("model_args").ok_or_else(|| {
        Error::checkpoint(
            path,
            "it has no model_args: not a llama2.c train.py checkpoint",
        )
    })?;
    let config = train_config(args, &tensors, shared)
        .map_err(|reason| Error::checkpoint(path, format!("model_args: {reason}")))?;
    assemble(tensors, config, Source::TrainCheckpoint).map_err(|e| in_file(path, e))
}

fn assemble(
    tensors: HashMap<String, RawTensor>,
    config: Config,
    source: Source,
) -> Result<ModelWeights> {
    TensorSet {
        tensors,
        naming: Naming::Meta,
        rotate_half: false,
        source,
    }
    .assemble(config)
}

fn in_file(path: &Path, e: Error) -> Error {
    match e {
        Error::Invalid(reason) | Error::Config(reason) => Error::checkpoint(path, reason),
        other => other,
    }
}

/// llama2.c's model.py ties the classifier to the embedding: both names
/// refer to one storage.
fn is_tied(state: &[(String, TorchTensor)]) -> bool {
    let find = |name: &str| state.iter().find(|(n, _)| n == name).map(|(_, t)| t);
    match (find("tok_embeddings.weight"), find("output.weight")) {
        (Some(e), Some(o)) => e.storage == o.storage && e.storage_offset == o.storage_offset,
        (Some(_), None) => true,
        _ => false,
    }
}

/// `consolidated.00.pth`, `consolidated.01.pth`, ... in order.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("consolidated.") && name.ends_with(".pth")
        })
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(Error::checkpoint(
            dir,
            "no consolidated.NN.pth shards beside params.json",
        ));
    }
    Ok(shards)
}

/// The axis along which Meta's model-parallel code splits `name`, or `None`
/// for tensors repeated in every shard.
fn split_axis(name: &str) -> Option<usize> {
    if name.ends_with("norm.weight") {
        None
    } else if name == "tok_embeddings.weight"
        || name.ends_with("attention.wo.weight")
        || name.ends_with("feed_forward.w2.weight")
    {
        Some(1)
    } else {
        Some(0)
    }
}

/// Every tensor of the shards joined along its split axis (the single
/// shard's tensors in place when there is one shard).
fn join_shards(files: &[TorchFile]) -> std::result::Result<HashMap<String, RawTensor>, String> {
    let mut parts: HashMap<String, Vec<RawTensor>> = HashMap::new();
    for f in files {
        let state = f.state_dict().map_err(|e| e.to_string())?;
        for (name, t) in &state {
            let raw = f.raw_tensor(name, t).map_err(|e| e.to_string())?;
            parts.entry(name.clone()).or_default().push(raw);
        }
    }
    let mut out = HashMap::new();
    for (name, pieces) in parts {
        if pieces.len() != files.len() {
            return Err(format!(
                "tensor {name} is in {} of the {} shards; the shards disagree",
                pieces.len(),
                files.len()
            ));
        }
        let joined = match (pieces.len(), split_axis(&name)) {
            (1, _) => pieces.into_iter().next().expect("one piece"),
            (_, None) => check_repeated(&name, pieces)?,
            (_, Some(axis)) => concatenate(&name, &pieces, axis)?,
        };
        out.insert(name, joined);
    }
    Ok(out)
}

/// A tensor every shard holds whole: they must agree on it.
fn check_repeated(name: &str, pieces: Vec<RawTensor>) -> std::result::Result<RawTensor, String> {
    let first = &pieces[0];
    if pieces
        .iter()
        .any(|p| p.shape != first.shape || p.bytes() != first.bytes())
    {
        return Err(format!(
            "tensor {name} differs between shards; they disagree"
        ));
    }
    Ok(pieces.into_iter().next().expect("one piece"))
}

/// `pieces` (2-D, same type) joined along `axis` into a new in-memory map.
fn concatenate(
    name: &str,
    pieces: &[RawTensor],
    axis: usize,
) -> std::result::Result<RawTensor, String> {
    let first = &pieces[0];
    let same = |p: &RawTensor| {
        p.dtype == first.dtype && p.shape.len() == 2 && p.shape[1 - axis] == first.shape[1 - axis]
    };
    if first.shape.len() != 2 || !pieces.iter().all(same) {
        let shapes: Vec<_> = pieces.iter().map(|p| p.shape.clone()).collect();
        return Err(format!(
            "tensor {name}: shard shapes {shapes:?} cannot be joined along axis {axis}; the \
             shards disagree"
        ));
    }
    let mut shape = first.shape.clone();
    shape[axis] = pieces.iter().map(|p| p.shape[axis]).sum();
    let total: usize = pieces.iter().map(|p| p.len).sum();
    let mut map = MmapMut::map_anon(total.max(1)).map_err(|e| e.to_string())?;
    match axis {
        0 => {
            let mut at = 0;
            for p in pieces {
                map[at..at + p.len].copy_from_slice(p.bytes());
                at += p.len;
            }
        }
        _ => {
            // Row r of the result is row r of every piece, side by side.
            let rows = first.shape[0];
            let mut at = 0;
            for r in 0..rows {
                for p in pieces {
                    let row = p.len / rows;
                    map[at..at + row].copy_from_slice(&p.bytes()[r * row..(r + 1) * row]);
                    at += row;
                }
            }
        }
    }
    let map = Arc::new(map.make_read_only().map_err(|e| e.to_string())?);
    RawTensor::new(name.to_owned(), first.dtype, shape, map, 0).map_err(|e| e.to_string())
}

/// A dimension of a 2-D tensor, if present.
fn dim_of(tensors: &HashMap<String, RawTensor>, name: &str, axis: usize) -> Option<usize> {
    tensors.get(name).and_then(|t| t.shape.get(axis).copied())
}

/// A Meta `params.json` as a `Config`; hidden size and vocabulary come from
/// the tensors (params.json gives the vocabulary as -1 and the hidden size
/// only as a rounding rule).
fn meta_config(
    p: &Value,
    tensors: &HashMap<String, RawTensor>,
    context: usize,
) -> std::result::Result<Config, String> {
    let int = |key: &str| -> std::result::Result<Option<usize>, String> {
        match p.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| format!("{key} is {v}; expected a positive integer")),
        }
    };
    let need = |key: &str| int(key)?.ok_or_else(|| format!("params.json has no {key}"));
    let (dim, n_heads) = (need("dim")?, need("n_heads")?);
    let hidden = dim_of(tensors, "layers.0.feed_forward.w1.weight", 0)
        .ok_or("the shards have no layers.0.feed_forward.w1.weight")?;
    let vocab = dim_of(tensors, "tok_embeddings.weight", 0)
        .ok_or("the shards have no tok_embeddings.weight")?;
    let mut c = Config::llama2c(
        dim,
        hidden,
        need("n_layers")?,
        n_heads,
        int("n_kv_heads")?.unwrap_or(n_heads),
        vocab,
        int("max_seq_len")?.unwrap_or(context),
        !tensors.contains_key("output.weight"),
    );
    if let Some(eps) = p.get("norm_eps").and_then(Value::as_f64) {
        c.norm_eps = eps as f32;
    }
    c.rope_theta = p
        .get("rope_theta")
        .and_then(Value::as_f64)
        .map_or(LLAMA2C_ROPE_THETA, |t| t as f32);
    c.eos_ends_generation = true;
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

/// llama2.c's `ModelArgs` from a train.py checkpoint as a `Config` (its
/// norm epsilon and RoPE base are model.py's fixed 1e-5 and 10000).
fn train_config(
    args: &super::pickle::Value,
    tensors: &HashMap<String, RawTensor>,
    shared: bool,
) -> std::result::Result<Config, String> {
    let int = |key: &str| -> std::result::Result<usize, String> {
        args.get(key)
            .and_then(|v| v.as_int())
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| format!("{key} is missing or not a positive integer"))
    };
    let n_heads = int("n_heads")?;
    let n_kv_heads = match args.get("n_kv_heads").and_then(|v| v.as_int()) {
        Some(n) if n > 0 => n as usize,
        _ => n_heads,
    };
    let hidden = dim_of(tensors, "layers.0.feed_forward.w1.weight", 0)
        .ok_or("the state dict has no layers.0.feed_forward.w1.weight")?;
    let c = Config::llama2c(
        int("dim")?,
        hidden,
        int("n_layers")?,
        n_heads,
        n_kv_heads,
        int("vocab_size")?,
        int("max_seq_len")?,
        shared,
    );
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}
