//! llama2-train: llama2.c's training (`model.py` and `train.py`), in Rust,
//! over the `llama2` library's config and checkpoints. All math is ours, in
//! f32, on the CPU:
//!
//! | file           | owns                                                        |
//! |----------------|-------------------------------------------------------------|
//! | `ops/`         | each op's forward and hand-written backward, side by side    |
//! | `params.rs`    | the trainable tensors (model.py's names), from `ModelWeights`|
//! | `model.rs`     | the forward pass on a batch `[B][T]`, kept activations, and  |
//! |                | the backward pass through them                               |
//! | `optim.rs`     | AdamW as `torch.optim.AdamW`, global-norm gradient clipping  |
//! | `debug_state.rs` | reading a PyTorch debug folder (`state.json`, `tensors.bin`) |
//! | `check.rs`     | comparing our loss, logits, gradients and AdamW steps with it|
//!
//! Data parallelism (gradients all-reduced between replicas) is a design
//! only, in docs/TRAINING.md.

pub mod check;
pub mod debug_state;
pub mod error;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;

#[cfg(test)]
mod gradcheck;

pub use error::{Error, Result};
pub use model::{backward, forward, Activations, Batch};
pub use optim::{clip_grad_norm, AdamW, AdamWConfig};
pub use params::{LayerParams, Params};
