//! Checkpoints: every format a Llama model comes in, read from memory maps
//! with every size checked before any weight is touched, and llama2.c's
//! formats written back (for tests, quantization and `synth`).
//!
//! - `read.rs`/`write.rs`: llama2.c's version 0 (legacy fp32, 28-byte
//!   header), 1 (fp32, 256-byte `ak42` header) and 2 (Q8_0 int8);
//! - `hf.rs`: Hugging Face directories (config.json, safetensors);
//! - `meta.rs`: Meta directories and llama2.c `train.py` checkpoints, read
//!   by `pickle.rs` (torch zip pickles, parsed, never executed);
//! - `gguf.rs`: llama.cpp's GGUF;
//! - `assemble.rs`: the one step from any format's tensors to `ModelWeights`.
//!
//! The llama2.c byte layouts are documented in `shared/docs/FORMATS.md`.

mod assemble;
mod extension;
pub mod gguf;
pub mod gguf_write;
pub mod hf;
pub mod meta;
pub mod pickle;
pub mod raw;
mod read;
mod write;

pub use assemble::{Naming, TensorSet};
pub use read::{from_bytes, load};
pub use write::{write, FileFormat};

use std::path::Path;

/// Opens a model of any supported kind, detected from the path itself:
///
/// - a directory with `config.json`: Hugging Face (safetensors);
/// - a directory with `params.json`: Meta (`consolidated.NN.pth` shards);
/// - a file starting with "GGUF": llama.cpp / ollama;
/// - a zip file (torch.save): a llama2.c `train.py` checkpoint;
/// - any other file: a llama2.c checkpoint, version 0, 1 or 2.
///
/// `context` sets the context length: at most the model's own, or, for
/// Meta models (whose files do not say), any (default 4096).
pub fn open(path: &Path, context: Option<usize>) -> Result<ModelWeights> {
    let mut weights = if path.is_dir() {
        if hf::is_model_dir(path) {
            hf::load(path)?
        } else if meta::is_model_dir(path) {
            return meta::load_dir(path, context);
        } else {
            return Err(Error::checkpoint(
                path,
                "this directory has neither config.json (a Hugging Face model) nor \
                 params.json (a Meta model)",
            ));
        }
    } else {
        match sniff(path)? {
            Kind::Gguf => gguf::load_model(path)?,
            Kind::Zip => meta::load_train_checkpoint(path)?,
            Kind::Llama2c => load(path)?,
        }
    };
    if let Some(n) = context {
        let trained = weights.config.seq_len;
        if n == 0 || n > trained {
            return Err(Error::Invalid(format!(
                "--context {n}: the model's context is {trained} positions; give 1 to {trained}"
            )));
        }
        weights.config.seq_len = n;
    }
    Ok(weights)
}

/// What a model file is, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gguf,
    Zip,
    Llama2c,
}

/// The kind of the model file at `path`, from its magic bytes.
fn sniff(path: &Path) -> Result<Kind> {
    use std::io::Read;
    let (file, _) = crate::files::open_regular(path, "checkpoint")?;
    let mut magic = Vec::with_capacity(4);
    file.take(4)
        .read_to_end(&mut magic)
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok(match magic.as_slice() {
        b"GGUF" => Kind::Gguf,
        b"PK\x03\x04" => Kind::Zip,
        _ => Kind::Llama2c,
    })
}

use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{HostMatrix, Storage};

/// Magic number of version 1 and 2 files: the bytes "ak42" read as little-endian u32.
pub const MAGIC: u32 = 0x616b_3432;
/// Size of the version 1/2 header.
pub const HEADER_V1_BYTES: usize = 256;
/// Size of the version 0 header: seven int32.
pub const HEADER_V0_BYTES: usize = 28;

/// The weights of one transformer block.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// Attention RMSNorm gain `[D]`.
    pub rms_att: Storage<f32>,
    /// Query projection `[D][D]`.
    pub wq: HostMatrix,
    /// Key projection `[KV][D]`.
    pub wk: HostMatrix,
    /// Value projection `[KV][D]`.
    pub wv: HostMatrix,
    /// Attention output projection `[D][D]`.
    pub wo: HostMatrix,
    /// Feed-forward RMSNorm gain `[D]`.
    pub rms_ffn: Storage<f32>,
    /// Gate projection `[H][D]`.
    pub w1: HostMatrix,
    /// Down projection `[D][H]`.
    pub w2: HostMatrix,
    /// Up projection `[H][D]`.
    pub w3: HostMatrix,
}

/// One tensor of a model, borrowed, as the exporters take it.
enum Weight<'a> {
    Matrix(&'a HostMatrix),
    Vector(&'a Storage<f32>),
}

impl ModelWeights {
    /// Every tensor with its name under `naming` and its kind, in the
    /// order Hugging Face's and llama.cpp's converters write them: the
    /// embedding, each block (its two norms, then its matrices), the final
    /// norm, and the classifier when it is not shared.
    fn tensors_named(&self, naming: assemble::Naming) -> Vec<(String, read::Tensor, Weight<'_>)> {
        use read::Tensor::*;
        let mut out = vec![(
            naming.name(Embedding, 0),
            Embedding,
            Weight::Matrix(&self.token_embedding),
        )];
        for (l, layer) in self.layers.iter().enumerate() {
            out.push((
                naming.name(RmsAtt, l),
                RmsAtt,
                Weight::Vector(&layer.rms_att),
            ));
            out.push((
                naming.name(RmsFfn, l),
                RmsFfn,
                Weight::Vector(&layer.rms_ffn),
            ));
            for (_, m, t) in layer.matrices() {
                out.push((naming.name(t, l), t, Weight::Matrix(m)));
            }
        }
        out.push((
            naming.name(RmsFinal, 0),
            RmsFinal,
            Weight::Vector(&self.rms_final),
        ));
        if let Some(cls) = &self.classifier {
            out.push((naming.name(Classifier, 0), Classifier, Weight::Matrix(cls)));
        }
        out
    }
}

impl LayerWeights {
    /// The block's matrices with their names and tensor kinds, in file order.
    fn matrices(&self) -> [(&'static str, &HostMatrix, read::Tensor); 7] {
        use read::Tensor::*;
        [
            ("wq", &self.wq, Wq),
            ("wk", &self.wk, Wk),
            ("wv", &self.wv, Wv),
            ("wo", &self.wo, Wo),
            ("w1", &self.w1, W1),
            ("w2", &self.w2, W2),
            ("w3", &self.w3, W3),
        ]
    }
}

/// Where a model came from, for messages (and for choosing behaviour that
/// differs between llama2.c and other sources).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A llama2.c checkpoint of one of its versions.
    Llama2c(FileFormat),
    /// A Hugging Face directory (config.json and safetensors).
    HuggingFace,
    /// A Meta directory (params.json and consolidated.NN.pth).
    Meta,
    /// A llama2.c `train.py` checkpoint (ckpt.pt).
    TrainCheckpoint,
    /// A llama.cpp GGUF file.
    Gguf,
}

impl Source {
    /// A short human description, e.g. "version 2 (int8, group size 64)".
    pub fn describe(self) -> String {
        match self {
            Source::Llama2c(f) => f.describe(),
            Source::HuggingFace => "Hugging Face safetensors".into(),
            Source::Meta => "Meta consolidated checkpoint".into(),
            Source::TrainCheckpoint => "llama2.c train.py checkpoint".into(),
            Source::Gguf => "GGUF".into(),
        }
    }
}

/// A whole model as read from a checkpoint, on the host.
#[derive(Clone, Debug)]
pub struct ModelWeights {
    pub config: Config,
    /// Which file format it came from.
    pub format: Source,
    /// Token embedding `[V][D]`, in the file's storage type (Q8 for version 2;
    /// rows are dequantized when looked up).
    pub token_embedding: HostMatrix,
    /// The transformer blocks, `L` of them.
    pub layers: Vec<LayerWeights>,
    /// Final RMSNorm gain `[D]`.
    pub rms_final: Storage<f32>,
    /// Classifier `[V][D]`; `None` when it is the token embedding.
    pub classifier: Option<HostMatrix>,
}

impl ModelWeights {
    /// The classifier matrix `[V][D]`, shared or separate.
    pub fn classifier(&self) -> &HostMatrix {
        self.classifier.as_ref().unwrap_or(&self.token_embedding)
    }

    /// Checks every matrix and vector against the config's shapes (layer
    /// count included). Files are checked this way while they are read; this
    /// catches weights assembled by hand before a model is built from them.
    pub fn check_shapes(&self) -> Result<()> {
        use read::Tensor;
        let c = &self.config;
        if self.layers.len() != c.n_layers {
            return Err(Error::Invalid(format!(
                "the config has {} layers but {} were given",
                c.n_layers,
                self.layers.len()
            )));
        }
        let vector = |name: &str, s: &Storage<f32>| {
            let (_, d) = Tensor::RmsFinal.shape(c);
            if s.len() == d {
                Ok(())
            } else {
                Err(Error::Invalid(format!(
                    "weight {name}: expected {d} values, found {}",
                    s.len()
                )))
            }
        };
        let matrix = |name: &str, m: &HostMatrix, t: Tensor| {
            let (rows, cols) = t.shape(c);
            m.check_shape(name, rows, cols)
        };
        matrix("token_embedding", &self.token_embedding, Tensor::Embedding)?;
        if let Some(m) = &self.classifier {
            matrix("classifier", m, Tensor::Classifier)?;
        }
        vector("rms_final", &self.rms_final)?;
        for (i, l) in self.layers.iter().enumerate() {
            let name = |w: &str| format!("layers[{i}].{w}");
            vector(&name("rms_att"), &l.rms_att)?;
            vector(&name("rms_ffn"), &l.rms_ffn)?;
            for (w, m, t) in l.matrices() {
                matrix(&name(w), m, t)?;
            }
        }
        Ok(())
    }

    /// Checks the numbers that are cheap to check: every norm gain and every
    /// Q8 scale must be finite (a NaN there silently turns all output into
    /// one token). Matrix values are too many to scan at load; a NaN among
    /// them shows up in the logits, which the model checks every step.
    pub fn check_values(&self) -> Result<()> {
        let vector = |name: &str, v: &[f32]| -> Result<()> {
            match v.iter().position(|x| !x.is_finite()) {
                None => Ok(()),
                Some(i) => Err(Error::NonFinite(format!(
                    "weight {name} holds {} at index {i}; the checkpoint is damaged (re-export or \
                     re-download it)",
                    v[i]
                ))),
            }
        };
        let scales = |name: &str, m: &HostMatrix| -> Result<()> {
            match &m.data {
                crate::tensor::MatrixData::Q8(q) => {
                    vector(&format!("{name} (Q8 scales)"), &q.scales)
                }
                _ => Ok(()),
            }
        };
        vector("rms_final", &self.rms_final)?;
        scales("token_embedding", &self.token_embedding)?;
        if let Some(m) = &self.classifier {
            scales("classifier", m)?;
        }
        for (i, l) in self.layers.iter().enumerate() {
            let name = |w: &str| format!("layers[{i}].{w}");
            vector(&name("rms_att"), &l.rms_att)?;
            vector(&name("rms_ffn"), &l.rms_ffn)?;
            for (w, m, _) in l.matrices() {
                scales(&name(w), m)?;
            }
        }
        Ok(())
    }

    /// Bytes of weights one decoded token streams: every matrix and norm once.
    pub fn bytes_per_token(&self) -> u64 {
        let norms = (self.config.n_layers * 2 + 1) * self.config.dim * 4;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.matrices()
                    .iter()
                    .map(|(_, m, _)| m.byte_size())
                    .sum::<usize>()
            })
            .sum();
        (norms + layers + self.classifier().byte_size()) as u64
    }
}
