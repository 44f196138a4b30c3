//! llama2: inference for Llama-architecture models, from llama2.c's files
//! and from every format such models come in. This crate holds everything
//! but the devices' own code:
//!
//! | file               | owns                                                    |
//! |--------------------|---------------------------------------------------------|
//! | `config.rs`        | hyper-parameters, their validation, derived sizes       |
//! | `checkpoint/`      | reading every model format; writing llama2.c, HF, GGUF  |
//! | `files/`           | opening inputs: regular files only, sizes bounded, maps |
//! | `tensor.rs`        | weight storage: f32, f16, bf16, Q8_0; mmap-backed       |
//! | `arena/`           | huge-page memory the CPU backend copies weights into    |
//! | `quant.rs`         | Q8_0 quantization                                       |
//! | `tokenizer.rs`     | BPE encode/decode, UTF-8-safe output, finding tokenizers|
//! | `sentencepiece.rs` | `tokenizer.model`: reading, conversion to tokenizer.bin |
//! | `hf_tokenizer.rs`  | `tokenizer.json` through Hugging Face's library          |
//! | `tokenizer_train.rs` | training a Llama-style BPE vocabulary (both files)    |
//! | `corpus.rs`        | training text: .txt, JSON Lines, JSON arrays            |
//! | `pretokenize.rs`   | documents to uint16 token shards (tinystories.py)       |
//! | `sampler.rs`       | xorshift RNG, argmax, multinomial, top-p                |
//! | `sampling.rs`      | top-k, min-p, penalties, logprobs, stop strings         |
//! | `backend.rs`       | the `Backend` trait: the ops a forward pass needs       |
//! | `model.rs`         | the forward pass, once, over a `Backend`; many          |
//! |                    | sequences per step (`forward_batch`) for a server       |
//! | `cpu/`             | the CPU backend: scalar reference ops and fast ops      |
//! | `generate.rs`      | generation and chat loops                               |
//! | `synth.rs`         | random models of the standard shapes, for benchmarks    |
//!
//! It deliberately knows nothing of CUDA (crate `llama2-cuda`) or of command
//! lines (crate `llama2-cli`).

pub mod arena;
pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod corpus;
pub mod cpu;
pub mod error;
pub mod files;
pub mod generate;
pub mod hf_tokenizer;
pub mod model;
pub mod pretokenize;
pub mod quant;
pub mod sampler;
pub mod sampling;
pub mod sentencepiece;
pub mod synth;
pub mod tensor;
pub mod tokenizer;
pub mod tokenizer_train;

pub use backend::{Backend, KvDtype, Segment};
pub use checkpoint::{FileFormat, ModelWeights};
pub use config::Config;
pub use cpu::CpuBackend;
pub use error::{Error, Result};
pub use model::{Chunk, LanguageModel, Logits, SequenceId, Transformer};
pub use tensor::{DType, HostMatrix};
pub use tokenizer::Tokenizer;
