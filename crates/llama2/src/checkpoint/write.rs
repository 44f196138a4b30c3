//! Writing checkpoints in any of the three formats, from weights of any
//! storage type: f32 data is written as is, Q8 data is dequantized for fp32
//! formats, and f32 data is quantized (ties to even) for version 2. Used by
//! `llama2 synth`, by quantization, and by the tests that convert between
//! formats.

use std::io::{self, Write};

use super::read::{rope_table_floats, tensor_order, Tensor};
use super::{ModelWeights, HEADER_V0_BYTES, HEADER_V1_BYTES, MAGIC};
use crate::config::Config;
use crate::tensor::{DType, HostMatrix, MatrixData};

/// A checkpoint file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// llama2.c's legacy fp32 layout.
    V0,
    /// fp32 with the `ak42` header.
    V1,
    /// Q8_0 int8 with the `ak42` header.
    V2 { group_size: usize },
}

impl FileFormat {
    /// A short human description, e.g. "version 2 (int8, group size 64)".
    pub fn describe(self) -> String {
        match self {
            FileFormat::V0 => "version 0 (fp32, legacy)".into(),
            FileFormat::V1 => "version 1 (fp32)".into(),
            FileFormat::V2 { group_size } => format!("version 2 (int8, group size {group_size})"),
        }
    }
}

/// Writes `weights` to `out` in `format`, tensor by tensor (only the
/// tensor being quantized is ever held in memory besides the weights). A
/// model whose hyper-parameters version 0 cannot express is refused for it.
pub fn write(weights: &ModelWeights, format: FileFormat, out: &mut impl Write) -> io::Result<()> {
    let c = &weights.config;
    let shared = weights.classifier.is_none();
    if format == FileFormat::V0 && super::extension::needs_extension(c) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "version 0 cannot store this model's RoPE base {}, scaling {:?}, norm epsilon {} \
                 or BOS/EOS ids {}/{:?}, which differ from llama2.c's; export version 1 or 2",
                c.rope_theta, c.rope_scaling, c.norm_eps, c.bos, c.eos
            ),
        ));
    }
    write_header(c, shared, format, out)?;
    for t in tensor_order(format, shared) {
        for m in slices(weights, t) {
            match format {
                FileFormat::V2 { group_size } if t.is_matrix() => {
                    let q8 = m
                        .convert(DType::Q8, group_size)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    write_q8(&q8, out)?
                }
                _ => write_f32s(&m.to_f32(), out)?,
            }
        }
        // Version 0 has the two legacy RoPE tables after rms_final, whether
        // or not a classifier follows.
        if t == Tensor::RmsFinal && format == FileFormat::V0 {
            write_rope_tables(c, out)?;
        }
    }
    out.flush()
}

fn write_header(
    c: &Config,
    shared: bool,
    format: FileFormat,
    out: &mut impl Write,
) -> io::Result<()> {
    let dims = |vocab: i32| {
        [
            c.dim as i32,
            c.hidden_dim as i32,
            c.n_layers as i32,
            c.n_heads as i32,
            c.n_kv_heads as i32,
            vocab,
            c.seq_len as i32,
        ]
    };
    let mut header: Vec<u8> = Vec::with_capacity(HEADER_V1_BYTES);
    match format {
        FileFormat::V0 => {
            let vocab = if shared {
                c.vocab_size as i32
            } else {
                -(c.vocab_size as i32)
            };
            dims(vocab)
                .iter()
                .for_each(|v| header.extend(v.to_le_bytes()));
            debug_assert_eq!(header.len(), HEADER_V0_BYTES);
        }
        FileFormat::V1 | FileFormat::V2 { .. } => {
            let version: i32 = if format == FileFormat::V1 { 1 } else { 2 };
            header.extend(MAGIC.to_le_bytes());
            header.extend(version.to_le_bytes());
            dims(c.vocab_size as i32)
                .iter()
                .for_each(|v| header.extend(v.to_le_bytes()));
            header.push(shared as u8);
            if let FileFormat::V2 { group_size } = format {
                header.extend((group_size as i32).to_le_bytes());
            }
            header.resize(HEADER_V1_BYTES, 0);
            super::extension::write(c, &mut header);
        }
    }
    out.write_all(&header)
}

/// The per-layer slices of tensor `t`, as matrices (vectors have one row).
fn slices(w: &ModelWeights, t: Tensor) -> Vec<HostMatrix> {
    let vector = |v: &crate::tensor::Storage<f32>| HostMatrix {
        rows: 1,
        cols: v.len(),
        data: MatrixData::F32(v.clone()),
    };
    let layers = w.layers.iter();
    match t {
        Tensor::RmsAtt => layers.map(|l| vector(&l.rms_att)).collect(),
        Tensor::RmsFfn => layers.map(|l| vector(&l.rms_ffn)).collect(),
        Tensor::RmsFinal => vec![vector(&w.rms_final)],
        Tensor::Embedding => vec![w.token_embedding.clone()],
        Tensor::Classifier => vec![w.classifier().clone()],
        Tensor::Wq => layers.map(|l| l.wq.clone()).collect(),
        Tensor::Wk => layers.map(|l| l.wk.clone()).collect(),
        Tensor::Wv => layers.map(|l| l.wv.clone()).collect(),
        Tensor::Wo => layers.map(|l| l.wo.clone()).collect(),
        Tensor::W1 => layers.map(|l| l.w1.clone()).collect(),
        Tensor::W2 => layers.map(|l| l.w2.clone()).collect(),
        Tensor::W3 => layers.map(|l| l.w3.clone()).collect(),
    }
}

fn write_f32s(values: &[f32], out: &mut impl Write) -> io::Result<()> {
    out.write_all(bytemuck::cast_slice(values))
}

fn write_q8(m: &HostMatrix, out: &mut impl Write) -> io::Result<()> {
    let MatrixData::Q8(d) = &m.data else {
        unreachable!("converted to Q8 by the caller")
    };
    out.write_all(bytemuck::cast_slice(&d.q))?;
    out.write_all(bytemuck::cast_slice(&d.scales))
}

/// llama2.c's legacy RoPE tables, `cos` then `sin` of `pos * freq_j`
/// `[S][hs / 2]`, as model.py's `precompute_freqs_cis` computes them in
/// float32: the angle rounded to f32 once, its cosine and sine rounded
/// from double precision (within an ulp of torch's).
fn write_rope_tables(c: &Config, out: &mut impl Write) -> io::Result<()> {
    let freqs = c.rope_frequencies();
    for trig in [f64::cos, f64::sin] {
        let table: Vec<f32> = (0..c.seq_len)
            .flat_map(|pos| {
                freqs
                    .iter()
                    .map(move |&f| trig((pos as f32 * f) as f64) as f32)
            })
            .collect();
        debug_assert_eq!(2 * table.len() as u64, rope_table_floats(c));
        write_f32s(&table, out)?;
    }
    Ok(())
}
