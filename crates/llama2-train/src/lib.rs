//! llama2-train: llama2.c's training (`model.py` and `train.py`), in Rust,
//! over the `llama2` library's config and checkpoints. All math is ours, in
//! f32, on the CPU:
//!
//! | file           | owns                                                        |
//! |----------------|-------------------------------------------------------------|
//! | `ops/`         | each op's forward and hand-written backward, side by side;   |
//! |                | `ops/gemm.rs` the cache-blocked product all matmuls use      |
//! | `params.rs`    | the trainable tensors (model.py's names), from `ModelWeights`|
//! | `model.rs`     | the forward pass on a batch `[B][T]`, kept activations, and  |
//! |                | the backward pass through them                               |
//! | `optim.rs`     | AdamW as `torch.optim.AdamW`, global-norm gradient clipping  |
//! | `rng.rs`       | xorshift64* with a storable state, Box-Muller normals        |
//! | `init.rs`      | model.py's `ModelArgs` to a config, its weight init          |
//! | `data.rs`      | pretokenized uint16 shards, the train/val split, batches     |
//! | `schedule.rs`  | train.py's `get_lr` (warmup, cosine decay)                   |
//! | `ckpt.rs`      | our resumable `ckpt.bin`; `model.bin` export (version 0)     |
//! | `trainer.rs`   | train.py's loop: accumulation, clipping, eval, checkpoints   |
//! | `heap.rs`      | keeping freed activations in the process between steps       |
//! | `debug_state.rs` | reading a PyTorch debug folder (`state.json`, `tensors.bin`) |
//! | `check.rs`     | comparing our loss, logits, gradients and AdamW steps with it|
//!
//! Data parallelism (gradients all-reduced between replicas) is a design
//! only, in docs/TRAINING.md.

pub mod check;
pub mod ckpt;
pub mod data;
pub mod debug_state;
pub mod error;
pub mod heap;
pub mod init;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod rng;
pub mod schedule;
pub mod trainer;

#[cfg(test)]
mod gradcheck;

pub use error::{Error, Result};
pub use model::{backward, forward, Activations, Batch};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig};
pub use params::{LayerParams, Params};
