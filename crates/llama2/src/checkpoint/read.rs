//! Reading checkpoints. The format is detected from the first bytes, the
//! expected file size is computed from the header with 64-bit checked
//! arithmetic and compared with the real size, and only then are tensors
//! sliced out of the memory map (borrowed when aligned, copied when not).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;

use super::{FileFormat, LayerWeights, ModelWeights, HEADER_V0_BYTES, HEADER_V1_BYTES, MAGIC};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::files;
use crate::tensor::{HostMatrix, MatrixData, Q8Data, Storage};

/// Opens, validates and maps the checkpoint at `path`. Only the header is
/// read before the size it implies has been checked against the file, so a
/// lying header never gets a huge (or sparse) file mapped.
pub fn load(path: &Path) -> Result<ModelWeights> {
    let (mut file, len) = files::open_regular(path, "checkpoint")?;
    let mut head = vec![0u8; HEADER_V1_BYTES.min(len.try_into().unwrap_or(usize::MAX))];
    file.read_exact(&mut head).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let header = check_header(&head, len).map_err(|reason| Error::checkpoint(path, reason))?;
    Ok(slice_weights(&files::map(&file, len, path)?, &header))
}

/// Validates and slices a checkpoint held in memory (tests and fuzzing):
/// the same checks as `load`, on a private copy of `bytes`.
pub fn from_bytes(bytes: &[u8]) -> Result<ModelWeights> {
    let name = Path::new("<memory>");
    let header = check_header(bytes, bytes.len() as u64)
        .map_err(|reason| Error::checkpoint(name, reason))?;
    Ok(slice_weights(&files::map_copy(bytes, name)?, &header))
}

/// Parses the header at the start of `head` and checks that a body of the
/// layout it describes fills a file of exactly `len` bytes.
fn check_header(head: &[u8], len: u64) -> std::result::Result<Header, String> {
    if len < HEADER_V0_BYTES as u64 {
        return Err(format!(
            "the file is {len} bytes, shorter than any checkpoint header ({HEADER_V0_BYTES} bytes)"
        ));
    }
    if len > usize::MAX as u64 {
        return Err(format!(
            "{len} bytes do not fit in this machine's address space"
        ));
    }
    let header = parse_header(head)?;
    let expected = header.file_size().map_err(|e| e.to_string())?;
    if expected != len {
        let what = if len < expected {
            "truncated"
        } else {
            "longer than its header says"
        };
        return Err(format!(
            "{what}: the header ({}, {:?}) needs exactly {expected} bytes but the file has {len}; \
             re-export or re-download it",
            header.format.describe(),
            header.config
        ));
    }
    Ok(header)
}

/// What the header says: the config and the layout of the body.
#[derive(Clone, Copy, Debug)]
pub(super) struct Header {
    pub config: Config,
    pub format: FileFormat,
}

fn read_i32(bytes: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn parse_header(bytes: &[u8]) -> std::result::Result<Header, String> {
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let config_at = |at: usize, shared: bool| -> std::result::Result<Config, String> {
        let v: Vec<i32> = (0..7).map(|i| read_i32(bytes, at + 4 * i)).collect();
        // Version 0 stores an unshared classifier as a negative vocab_size.
        let vocab = match (at, v[5].checked_abs()) {
            (0, Some(abs)) => abs,
            (0, None) => {
                return Err(format!(
                    "vocab_size is {}; expected a positive value (or its negation)",
                    v[5]
                ))
            }
            _ => v[5],
        };
        Config::from_header(v[0], v[1], v[2], v[3], v[4], vocab, v[6], shared)
            .map_err(|e| e.to_string())
    };
    if magic != MAGIC {
        let config = config_at(0, read_i32(bytes, 20) > 0)?;
        return Ok(Header {
            config,
            format: FileFormat::V0,
        });
    }
    if bytes.len() < HEADER_V1_BYTES {
        return Err(format!(
            "it starts with the 'ak42' magic but is only {} bytes, shorter than the {HEADER_V1_BYTES}-byte header",
            bytes.len()
        ));
    }
    let version = read_i32(bytes, 4);
    let shared = match bytes[36] {
        0 => false,
        1 => true,
        other => {
            return Err(format!(
                "shared_classifier byte is {other}; expected 0 or 1"
            ))
        }
    };
    let mut config = config_at(8, shared)?;
    super::extension::read(bytes, &mut config)?;
    config
        .validate()
        .map_err(|e| format!("header extension: {e}"))?;
    let format = match version {
        1 => FileFormat::V1,
        2 => {
            let group_size = read_i32(bytes, 37);
            if group_size <= 0 || group_size > 1 << 20 {
                return Err(format!(
                    "Q8_0 group size is {group_size}; expected a positive number such as 64"
                ));
            }
            FileFormat::V2 {
                group_size: group_size as usize,
            }
        }
        other => {
            return Err(format!(
                "unknown version {other}; this program reads versions 0, 1 and 2"
            ))
        }
    };
    Ok(Header { config, format })
}

/// The tensors of a checkpoint body, in file order, with their shapes.
/// `reader` is called once per tensor; the layout differences between
/// versions live here and nowhere else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tensor {
    RmsAtt,
    RmsFfn,
    RmsFinal,
    Embedding,
    Wq,
    Wk,
    Wv,
    Wo,
    W1,
    W2,
    W3,
    Classifier,
}

impl Tensor {
    /// `(rows, cols)` of one layer's slice of this tensor (vectors have one row).
    pub(super) fn shape(self, c: &Config) -> (usize, usize) {
        let (d, h, kv, v) = (c.dim, c.hidden_dim, c.kv_dim(), c.vocab_size);
        match self {
            Tensor::RmsAtt | Tensor::RmsFfn | Tensor::RmsFinal => (1, d),
            Tensor::Embedding | Tensor::Classifier => (v, d),
            Tensor::Wq | Tensor::Wo => (d, d),
            Tensor::Wk | Tensor::Wv => (kv, d),
            Tensor::W1 | Tensor::W3 => (h, d),
            Tensor::W2 => (d, h),
        }
    }

    /// How many slices (layers) the tensor has.
    pub(super) fn count(self, c: &Config) -> usize {
        match self {
            Tensor::RmsFinal | Tensor::Embedding | Tensor::Classifier => 1,
            _ => c.n_layers,
        }
    }

    /// Whether version 2 stores it quantized.
    pub(super) fn is_matrix(self) -> bool {
        !matches!(self, Tensor::RmsAtt | Tensor::RmsFfn | Tensor::RmsFinal)
    }
}

/// The body's tensors in file order for `format`. The version 0 RoPE tables
/// are not listed: they sit between `RmsFinal` and `Classifier`.
pub(super) fn tensor_order(format: FileFormat, shared: bool) -> Vec<Tensor> {
    use Tensor::*;
    let mut order = match format {
        FileFormat::V0 => vec![
            Embedding, RmsAtt, Wq, Wk, Wv, Wo, RmsFfn, W1, W2, W3, RmsFinal,
        ],
        _ => vec![
            RmsAtt, RmsFfn, RmsFinal, Embedding, Wq, Wk, Wv, Wo, W1, W2, W3,
        ],
    };
    if !shared {
        order.push(Classifier);
    }
    order
}

/// Floats in the two legacy RoPE tables of a version 0 file.
pub(super) fn rope_table_floats(c: &Config) -> u64 {
    c.seq_len as u64 * c.head_size() as u64
}

impl Header {
    /// The exact file size the header implies, or why it cannot be computed.
    fn file_size(&self) -> Result<u64> {
        let c = &self.config;
        let overflow = || Error::Config(format!("sizes overflow 64 bits: {c:?}"));
        let mut total: u64 = match self.format {
            FileFormat::V0 => HEADER_V0_BYTES as u64 + 4 * rope_table_floats(c),
            _ => HEADER_V1_BYTES as u64,
        };
        for t in tensor_order(self.format, c.shared_classifier) {
            let (rows, cols) = t.shape(c);
            let n = (rows as u64)
                .checked_mul(cols as u64)
                .ok_or_else(overflow)?;
            let per_slice = match self.format {
                FileFormat::V2 { group_size } if t.is_matrix() => {
                    if n % group_size as u64 != 0 {
                        return Err(Error::Config(format!(
                            "Q8_0 group size {group_size} does not divide the {rows}x{cols} {t:?} tensor"
                        )));
                    }
                    n + 4 * (n / group_size as u64)
                }
                _ => 4 * n,
            };
            let bytes = per_slice
                .checked_mul(t.count(c) as u64)
                .ok_or_else(overflow)?;
            total = total.checked_add(bytes).ok_or_else(overflow)?;
        }
        Ok(total)
    }
}

/// Walks the (already size-checked) body and slices out every tensor.
fn slice_weights(map: &Arc<Mmap>, header: &Header) -> ModelWeights {
    let c = header.config;
    let mut at = match header.format {
        FileFormat::V0 => HEADER_V0_BYTES,
        _ => HEADER_V1_BYTES,
    };
    let mut tensors: Vec<(Tensor, Vec<HostMatrix>)> = Vec::new();
    for t in tensor_order(header.format, c.shared_classifier) {
        if t == Tensor::Classifier && header.format == FileFormat::V0 {
            at += 4 * rope_table_floats(&c) as usize;
        }
        let (rows, cols) = t.shape(&c);
        let n = rows * cols;
        let slices = (0..t.count(&c))
            .map(|_| {
                let data = match header.format {
                    FileFormat::V2 { group_size } if t.is_matrix() => {
                        let q = Storage::from_map(map, at, n);
                        let scales = Storage::from_map(map, at + n, n / group_size);
                        at += n + 4 * (n / group_size);
                        MatrixData::Q8(Q8Data {
                            q,
                            scales,
                            group_size,
                        })
                    }
                    _ => {
                        let d = Storage::from_map(map, at, n);
                        at += 4 * n;
                        MatrixData::F32(d)
                    }
                };
                HostMatrix { rows, cols, data }
            })
            .collect();
        tensors.push((t, slices));
    }
    let mut take = |want: Tensor| -> Vec<HostMatrix> {
        tensors
            .iter_mut()
            .find(|(t, _)| *t == want)
            .map(|(_, v)| std::mem::take(v))
            .unwrap_or_default()
    };
    let vector = |m: HostMatrix| match m.data {
        MatrixData::F32(s) => s,
        _ => unreachable!("norm vectors are always stored as f32"),
    };
    let rms_att = take(Tensor::RmsAtt);
    let rms_ffn = take(Tensor::RmsFfn);
    let mut wq = take(Tensor::Wq).into_iter();
    let mut wk = take(Tensor::Wk).into_iter();
    let mut wv = take(Tensor::Wv).into_iter();
    let mut wo = take(Tensor::Wo).into_iter();
    let mut w1 = take(Tensor::W1).into_iter();
    let mut w2 = take(Tensor::W2).into_iter();
    let mut w3 = take(Tensor::W3).into_iter();
    let layers = rms_att
        .into_iter()
        .zip(rms_ffn)
        .map(|(att, ffn)| LayerWeights {
            rms_att: vector(att),
            wq: wq.next().expect("one per layer"),
            wk: wk.next().expect("one per layer"),
            wv: wv.next().expect("one per layer"),
            wo: wo.next().expect("one per layer"),
            rms_ffn: vector(ffn),
            w1: w1.next().expect("one per layer"),
            w2: w2.next().expect("one per layer"),
            w3: w3.next().expect("one per layer"),
        })
        .collect();
    let rms_final = vector(take(Tensor::RmsFinal).remove(0));
    let token_embedding = take(Tensor::Embedding).remove(0);
    let classifier = take(Tensor::Classifier).pop();
    ModelWeights {
        config: c,
        format: super::Source::Llama2c(header.format),
        token_embedding,
        layers,
        rms_final,
        classifier,
    }
}
