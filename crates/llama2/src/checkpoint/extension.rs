//! Hyper-parameters beyond llama2.c's seven, kept in the zero padding of the
//! 256-byte version 1/2 header, so that a model with another RoPE base,
//! Llama 3 RoPE scaling, another norm epsilon or its own BOS/EOS ids
//! survives export to llama2.c's formats. Zero always means llama2.c's
//! value, so llama2.c's own files (all zeros there) read as before, and
//! llama2.c's `runq`, which ignores the padding, still reads our files.
//!
//! | offset | type      | field                                             |
//! |--------|-----------|---------------------------------------------------|
//! | 64     | f32       | RoPE theta (0: 10000)                             |
//! | 68     | f32       | RMSNorm epsilon (0: 1e-5)                         |
//! | 72     | f32       | Llama 3 RoPE scaling factor (0: no scaling)       |
//! | 76     | f32       | its low_freq_factor                               |
//! | 80     | f32       | its high_freq_factor                              |
//! | 84     | u32       | its original context length                       |
//! | 88     | u32       | BOS id + 1 (0: id 1)                              |
//! | 92     | u32       | number of EOS ids, n (0: id 2, and generation     |
//! |        |           | stops only at BOS, as llama2.c's `run`)           |
//! | 96     | u32 x n   | the EOS ids, n <= 8                               |

use crate::config::{Config, Llama3Scaling, TokenSet, LLAMA2C_NORM_EPS, LLAMA2C_ROPE_THETA};

const THETA: usize = 64;
const EPS: usize = 68;
const FACTOR: usize = 72;
const LOW: usize = 76;
const HIGH: usize = 80;
const ORIGINAL: usize = 84;
const BOS: usize = 88;
const EOS_COUNT: usize = 92;
const EOS_IDS: usize = 96;

/// Whether `c` has numbers llama2.c's version 0 header cannot say (its
/// RoPE, norm epsilon or BOS/EOS ids differ from llama2.c's). Whether
/// generation stops at EOS is not among them: a version 0 file simply
/// stops at BOS, as llama2.c does.
pub fn needs_extension(c: &Config) -> bool {
    let plain = Config::llama2c(
        c.dim,
        c.hidden_dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        c.seq_len,
        c.shared_classifier,
    );
    c.rope_theta != plain.rope_theta
        || c.norm_eps != plain.norm_eps
        || c.rope_scaling.is_some()
        || c.bos != plain.bos
        || c.eos != plain.eos
}

/// Writes `c`'s extension fields into `header` (256 bytes, zero-filled).
pub fn write(c: &Config, header: &mut [u8]) {
    let mut f32_at = |at: usize, v: f32, default: f32| {
        let v = if v == default { 0.0 } else { v };
        header[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    f32_at(THETA, c.rope_theta, LLAMA2C_ROPE_THETA);
    f32_at(EPS, c.norm_eps, LLAMA2C_NORM_EPS);
    if let Some(s) = c.rope_scaling {
        f32_at(FACTOR, s.factor, 0.0);
        f32_at(LOW, s.low_freq_factor, 0.0);
        f32_at(HIGH, s.high_freq_factor, 0.0);
    }
    let mut u32_at = |at: usize, v: u32| header[at..at + 4].copy_from_slice(&v.to_le_bytes());
    if let Some(s) = c.rope_scaling {
        u32_at(ORIGINAL, s.original_context as u32);
    }
    if c.bos != 1 {
        u32_at(BOS, c.bos + 1);
    }
    if c.eos_ends_generation {
        let ids = c.eos.as_slice();
        u32_at(EOS_COUNT, ids.len() as u32);
        for (i, &id) in ids.iter().enumerate() {
            u32_at(EOS_IDS + 4 * i, id);
        }
    }
}

/// Applies the extension fields of `header` to `c` (then to be validated).
pub fn read(header: &[u8], c: &mut Config) -> std::result::Result<(), String> {
    let f32_at = |at: usize| f32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    let or = |v: f32, default: f32| if v == 0.0 { default } else { v };
    c.rope_theta = or(f32_at(THETA), LLAMA2C_ROPE_THETA);
    c.norm_eps = or(f32_at(EPS), LLAMA2C_NORM_EPS);
    if f32_at(FACTOR) != 0.0 {
        c.rope_scaling = Some(Llama3Scaling {
            factor: f32_at(FACTOR),
            low_freq_factor: f32_at(LOW),
            high_freq_factor: f32_at(HIGH),
            original_context: u32_at(ORIGINAL) as usize,
        });
    }
    if u32_at(BOS) != 0 {
        c.bos = u32_at(BOS) - 1;
    }
    let n = u32_at(EOS_COUNT) as usize;
    if n > 0 {
        if n > 8 {
            return Err(format!(
                "the header extension lists {n} EOS ids; at most 8 fit"
            ));
        }
        let ids: Vec<u32> = (0..n).map(|i| u32_at(EOS_IDS + 4 * i)).collect();
        c.eos = TokenSet::new(&ids).map_err(|e| e.to_string())?;
        c.eos_ends_generation = true;
    }
    Ok(())
}
