//! The training checkpoint `ckpt.bin` (our format, train.py's `ckpt.pt` in
//! spirit: everything `--init-from resume` needs to continue bit for bit)
//! and the inference export `model.bin` (llama2.c version 0, as train.py's
//! `model_export` writes by default, so `run.c` and `llama2` read it).
//!
//! `ckpt.bin`, all little-endian:
//!
//! | bytes | field                                                    |
//! |-------|----------------------------------------------------------|
//! | 8     | magic `L2TRCKPT`                                         |
//! | 4     | format version, u32 = 1                                  |
//! | 28    | dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len (u32 each) |
//! | 8     | iter_num, u64 (steps taken)                              |
//! | 4     | best_val_loss, f32 (infinity before the first eval)      |
//! | 8     | the batch generator's xorshift state, u64                |
//! | 4     | AdamW's step count, u32                                  |
//! | 4 * P | the parameters, f32, in model.py's `named_parameters()` order |
//! | 4 * P | AdamW's first moments, same order                        |
//! | 4 * P | AdamW's second moments, same order                       |

use std::io::Write;
use std::path::Path;

use llama2::checkpoint::{LayerWeights, Source};
use llama2::tensor::Storage;
use llama2::{Config, FileFormat, HostMatrix, ModelWeights};

use crate::error::{Error, Result};
use crate::optim::{AdamW, AdamWConfig};
use crate::params::Params;
use crate::rng::Rng;

const MAGIC: &[u8; 8] = b"L2TRCKPT";
const VERSION: u32 = 1;
/// Bytes before the tensors.
const HEADER_BYTES: usize = 8 + 4 + 28 + 8 + 4 + 8 + 4;

/// What a checkpoint restores.
pub struct TrainState {
    pub params: Params,
    pub optimizer: AdamW,
    /// Steps taken.
    pub iter: u64,
    /// Best validation loss seen (infinity before any eval).
    pub best_val: f32,
    /// The training batches' generator.
    pub rng: Rng,
}

fn put_u32(out: &mut Vec<u8>, v: usize) {
    out.extend((v as u32).to_le_bytes());
}

fn put_floats<'a>(out: &mut Vec<u8>, tensors: impl IntoIterator<Item = &'a Vec<f32>>) {
    for t in tensors {
        for v in t {
            out.extend(v.to_le_bytes());
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash mid-write never leaves a torn checkpoint.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves `state` to `path` in the format above.
pub fn save(state: &TrainState, path: &Path) -> Result<()> {
    let c = &state.params.config;
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(VERSION.to_le_bytes());
    for v in [
        c.dim,
        c.hidden_dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        c.seq_len,
    ] {
        put_u32(&mut out, v);
    }
    out.extend(state.iter.to_le_bytes());
    out.extend(state.best_val.to_le_bytes());
    out.extend(state.rng.state().to_le_bytes());
    out.extend(state.optimizer.step_count().to_le_bytes());
    put_floats(&mut out, state.params.tensors());
    let (m, v) = state.optimizer.moments();
    put_floats(&mut out, m);
    put_floats(&mut out, v);
    write_atomic(path, &out)
}

/// A little-endian reader over the checkpoint's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let v = self.bytes[self.at..self.at + N]
            .try_into()
            .expect("length checked");
        self.at += N;
        v
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    /// Fills tensors shaped as `like`.
    fn tensors(&mut self, like: &[&Vec<f32>]) -> Vec<Vec<f32>> {
        like.iter()
            .map(|t| {
                (0..t.len())
                    .map(|_| f32::from_le_bytes(self.take()))
                    .collect()
            })
            .collect()
    }
}

/// Loads a checkpoint written by `save`; the optimizer gets `adam` as its
/// hyper-parameters (train.py takes them from the command line on resume).
pub fn load(path: &Path, adam: AdamWConfig) -> Result<TrainState> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::folder(path, m);
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err(bad(
            "not a llama2 training checkpoint (no L2TRCKPT header)".into()
        ));
    }
    let mut r = Reader {
        bytes: &bytes,
        at: 8,
    };
    let version = r.u32();
    if version != VERSION {
        return Err(bad(format!(
            "checkpoint format version {version}; this build reads {VERSION}"
        )));
    }
    let h: Vec<i32> = (0..7).map(|_| r.u32() as i32).collect();
    let config = Config::from_header(h[0], h[1], h[2], h[3], h[4], h[5], h[6], true)
        .map_err(|e| bad(e.to_string()))?;
    let iter = u64::from_le_bytes(r.take());
    let best_val = f32::from_le_bytes(r.take());
    let rng = Rng::from_state(u64::from_le_bytes(r.take()));
    let step = r.u32();
    let mut params = crate::init::init_params(&config, 0);
    let n: usize = params.tensors().iter().map(|t| t.len()).sum();
    let want = HEADER_BYTES + 3 * 4 * n;
    if bytes.len() != want {
        return Err(bad(format!(
            "{} bytes; the header's model needs {want} (truncated or damaged)",
            bytes.len()
        )));
    }
    let values = r.tensors(&params.tensors());
    for (t, v) in params.tensors_mut().into_iter().zip(values) {
        *t = v;
    }
    let m = r.tensors(&params.tensors());
    let v = r.tensors(&params.tensors());
    let mut optimizer = AdamW::new(adam, &params);
    optimizer.restore(step, m, v)?;
    Ok(TrainState {
        params,
        optimizer,
        iter,
        best_val,
        rng,
    })
}

/// The parameters as the library's weights (f32, classifier tied).
pub fn to_weights(p: &Params) -> ModelWeights {
    let c = &p.config;
    let (d, kv, h) = (c.dim, c.kv_dim(), c.hidden_dim);
    let m = |rows: usize, cols: usize, t: &Vec<f32>| HostMatrix::from_f32(rows, cols, t.clone());
    let layers = p
        .layers
        .iter()
        .map(|l| LayerWeights {
            rms_att: Storage::owned(l.attention_norm.clone()),
            wq: m(d, d, &l.wq),
            wk: m(kv, d, &l.wk),
            wv: m(kv, d, &l.wv),
            wo: m(d, d, &l.wo),
            rms_ffn: Storage::owned(l.ffn_norm.clone()),
            w1: m(h, d, &l.w1),
            w2: m(d, h, &l.w2),
            w3: m(h, d, &l.w3),
        })
        .collect();
    ModelWeights {
        config: *c,
        format: Source::Llama2c(FileFormat::V0),
        token_embedding: m(c.vocab_size, d, &p.tok_embeddings),
        layers,
        rms_final: Storage::owned(p.norm.clone()),
        classifier: None,
    }
}

/// Writes `p` to `path` as a llama2.c version 0 checkpoint.
pub fn export_v0(p: &Params, path: &Path) -> Result<()> {
    let mut out = Vec::new();
    llama2::checkpoint::write(&to_weights(p), FileFormat::V0, &mut out)
        .map_err(|e| Error::io(path, e))?;
    write_atomic(path, &out)
}
