//! Writing GGUF (version 3) files that llama.cpp loads: the `llama.*`
//! hyper-parameters, the SentencePiece vocabulary as `tokenizer.ggml.*`,
//! and the tensors under llama.cpp's names in F32, F16 or Q8_0, streamed
//! one at a time. Q8_0 is quantized as llama.cpp's converter does it (scale
//! `max|x| / 127` stored as f16, values `round(x / scale)` with halves away
//! from zero), so the data bytes equal its output; matrices whose rows are
//! not a multiple of 32 are written in F16, as it does.

use std::io::{self, Write};

use half::f16;

use super::assemble::Naming;
use super::{ModelWeights, Weight};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostMatrix};
use crate::tokenizer::Tokenizer;

/// Data alignment, llama.cpp's default.
const ALIGNMENT: u64 = 32;

const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

/// ggml tensor types written here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q8_0 = 8,
}

impl GgmlType {
    fn bytes(self, n: usize) -> usize {
        match self {
            GgmlType::F32 => 4 * n,
            GgmlType::F16 => 2 * n,
            GgmlType::Q8_0 => n / 32 * 34,
        }
    }
}

/// One tensor to write: its name, `[rows][cols]` and type, and its values.
struct Entry<'a> {
    name: String,
    rows: usize,
    cols: usize,
    ty: GgmlType,
    values: Values<'a>,
}

enum Values<'a> {
    Matrix(&'a HostMatrix),
    Vector(&'a [f32]),
}

/// Writes `weights` and `tokenizer` as a GGUF file with matrices in
/// `dtype` (f32, f16 or q8; norms stay f32).
pub fn write(
    weights: &ModelWeights,
    tokenizer: &Tokenizer,
    dtype: DType,
    out: &mut (impl Write + ?Sized),
) -> Result<()> {
    let c = &weights.config;
    if c.rope_scaling.is_some() {
        return Err(Error::Invalid(
            "GGUF export of a model with Llama 3 RoPE scaling is not supported yet".into(),
        ));
    }
    if tokenizer.is_hugging_face() {
        return Err(Error::Invalid(
            "GGUF export needs a SentencePiece vocabulary (tokenizer.bin or tokenizer.model); \
             byte-level tokenizer.json vocabularies are not supported yet"
                .into(),
        ));
    }
    let matrix_type = |cols: usize| match dtype {
        DType::F32 => GgmlType::F32,
        DType::Q8 if cols.is_multiple_of(32) => GgmlType::Q8_0,
        _ => GgmlType::F16,
    };
    let entries = entries(weights, matrix_type);
    let metadata = metadata(c, tokenizer, dtype);
    let io = |e: io::Error| Error::Invalid(format!("cannot write the GGUF file: {e}"));
    write_header(&metadata, &entries, out).map_err(io)?;
    for e in &entries {
        let bytes = tensor_bytes(e)?;
        out.write_all(&bytes).map_err(io)?;
        let pad = padding(bytes.len() as u64);
        out.write_all(&vec![0u8; pad as usize]).map_err(io)?;
    }
    out.flush().map_err(io)
}

/// The tensors in llama.cpp's names and order (embedding, each block, the
/// final norm, the classifier when it is not shared).
fn entries<'a>(w: &'a ModelWeights, matrix_type: impl Fn(usize) -> GgmlType) -> Vec<Entry<'a>> {
    let entry = |(name, _, weight)| match weight {
        Weight::Matrix(m) => Entry {
            name,
            rows: m.rows,
            cols: m.cols,
            ty: matrix_type(m.cols),
            values: Values::Matrix(m),
        },
        Weight::Vector(v) => Entry {
            name,
            rows: 1,
            cols: v.len(),
            ty: GgmlType::F32,
            values: Values::Vector(v),
        },
    };
    w.tensors_named(Naming::Gguf)
        .into_iter()
        .map(entry)
        .collect()
}

/// A metadata value.
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(Vec<u8>),
    Strings(Vec<Vec<u8>>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

fn metadata(c: &Config, tok: &Tokenizer, dtype: DType) -> Vec<(&'static str, Meta)> {
    let (bos, eos) = tok.bos_eos();
    let vocab = tok.vocab_size() as u32;
    let pieces: Vec<Vec<u8>> = (0..vocab)
        .map(|id| match id {
            id if id == bos => b"<s>".to_vec(),
            id if id == eos => b"</s>".to_vec(),
            _ => to_spm_space(tok.piece(id)),
        })
        .collect();
    // llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte.
    let types: Vec<i32> = pieces
        .iter()
        .enumerate()
        .map(|(id, p)| match id as u32 {
            0 => 2,
            id if id == bos || id == eos => 3,
            _ if p.len() == 6 && p.starts_with(b"<0x") && p.ends_with(b">") => 6,
            _ => 1,
        })
        .collect();
    let file_type = match dtype {
        DType::F32 => 0,
        DType::Q8 => 7,
        _ => 1,
    };
    let u = |v: usize| Meta::U32(v as u32);
    vec![
        ("general.architecture", Meta::Str(b"llama".to_vec())),
        ("general.name", Meta::Str(b"llama2-rs export".to_vec())),
        ("general.file_type", Meta::U32(file_type)),
        ("general.quantization_version", Meta::U32(2)),
        ("llama.context_length", u(c.seq_len)),
        ("llama.embedding_length", u(c.dim)),
        ("llama.block_count", u(c.n_layers)),
        ("llama.feed_forward_length", u(c.hidden_dim)),
        ("llama.attention.head_count", u(c.n_heads)),
        ("llama.attention.head_count_kv", u(c.n_kv_heads)),
        ("llama.attention.key_length", u(c.head_dim)),
        ("llama.attention.value_length", u(c.head_dim)),
        ("llama.rope.dimension_count", u(c.head_dim)),
        ("llama.rope.freq_base", Meta::F32(c.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(c.norm_eps),
        ),
        ("llama.vocab_size", Meta::U32(vocab)),
        ("tokenizer.ggml.model", Meta::Str(b"llama".to_vec())),
        ("tokenizer.ggml.tokens", Meta::Strings(pieces)),
        (
            "tokenizer.ggml.scores",
            Meta::F32s((0..vocab).map(|id| tok.score(id)).collect()),
        ),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(bos)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(eos)),
        ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
        ("tokenizer.ggml.add_eos_token", Meta::Bool(false)),
    ]
}

/// A space as SentencePiece's "▁", as GGUF vocabularies spell it.
fn to_spm_space(piece: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(piece.len());
    for &b in piece {
        if b == b' ' {
            out.extend_from_slice("\u{2581}".as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

fn padding(len: u64) -> u64 {
    (ALIGNMENT - len % ALIGNMENT) % ALIGNMENT
}

fn write_string(out: &mut impl Write, s: &[u8]) -> io::Result<()> {
    out.write_all(&(s.len() as u64).to_le_bytes())?;
    out.write_all(s)
}

fn write_header(
    meta: &[(&str, Meta)],
    entries: &[Entry],
    out: &mut (impl Write + ?Sized),
) -> io::Result<()> {
    let mut h: Vec<u8> = Vec::new();
    h.extend(b"GGUF");
    h.extend(3u32.to_le_bytes());
    h.extend((entries.len() as u64).to_le_bytes());
    h.extend((meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        write_string(&mut h, key.as_bytes())?;
        write_meta(&mut h, value)?;
    }
    let mut offset = 0u64;
    for e in entries {
        write_string(&mut h, e.name.as_bytes())?;
        let dims: Vec<u64> = if e.rows == 1 {
            vec![e.cols as u64]
        } else {
            vec![e.cols as u64, e.rows as u64]
        };
        h.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| h.extend(d.to_le_bytes()));
        h.extend((e.ty as u32).to_le_bytes());
        h.extend(offset.to_le_bytes());
        let len = e.ty.bytes(e.rows * e.cols) as u64;
        offset += len + padding(len);
    }
    let pad = padding(h.len() as u64) as usize;
    h.extend(std::iter::repeat_n(0u8, pad));
    out.write_all(&h)
}

fn write_meta(h: &mut Vec<u8>, value: &Meta) -> io::Result<()> {
    let typed = |h: &mut Vec<u8>, ty: u32| h.extend(ty.to_le_bytes());
    let array = |h: &mut Vec<u8>, ty: u32, n: usize| {
        typed(h, TYPE_ARRAY);
        h.extend(ty.to_le_bytes());
        h.extend((n as u64).to_le_bytes());
    };
    match value {
        Meta::U32(v) => {
            typed(h, TYPE_U32);
            h.extend(v.to_le_bytes());
        }
        Meta::F32(v) => {
            typed(h, TYPE_F32);
            h.extend(v.to_le_bytes());
        }
        Meta::Bool(v) => {
            typed(h, TYPE_BOOL);
            h.push(*v as u8);
        }
        Meta::Str(s) => {
            typed(h, TYPE_STRING);
            write_string(h, s)?;
        }
        Meta::Strings(list) => {
            array(h, TYPE_STRING, list.len());
            for s in list {
                write_string(h, s)?;
            }
        }
        Meta::F32s(list) => {
            array(h, TYPE_F32, list.len());
            list.iter().for_each(|v| h.extend(v.to_le_bytes()));
        }
        Meta::I32s(list) => {
            array(h, TYPE_I32, list.len());
            list.iter().for_each(|v| h.extend(v.to_le_bytes()));
        }
    }
    Ok(())
}

/// The data of one tensor in its type.
fn tensor_bytes(e: &Entry) -> Result<Vec<u8>> {
    let values = match e.values {
        Values::Matrix(m) => m.to_f32(),
        Values::Vector(v) => v.to_vec(),
    };
    let at = |what: &str| format!("tensor {}: {what}", e.name);
    Ok(match e.ty {
        GgmlType::F32 => bytemuck::cast_slice(&values).to_vec(),
        GgmlType::F16 => {
            crate::tensor::check_representable(&values, e.cols, DType::F16)
                .map_err(|err| Error::NonFinite(at(&err.to_string())))?;
            values
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                .collect()
        }
        GgmlType::Q8_0 => {
            crate::tensor::check_representable(&values, e.cols, DType::Q8)
                .map_err(|err| Error::NonFinite(at(&err.to_string())))?;
            values.chunks_exact(32).flat_map(q8_0_block).collect()
        }
    })
}

/// One Q8_0 block as llama.cpp's converter writes it: f16 scale, 32 int8.
fn q8_0_block(x: &[f32]) -> Vec<u8> {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut block = f16::from_f32(d).to_le_bytes().to_vec();
    block.extend(x.iter().map(|&v| (v * id).round() as i8 as u8));
    block
}
