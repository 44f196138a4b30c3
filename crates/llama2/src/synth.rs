//! Synthetic models: the standard llama2.c shapes filled with seeded random
//! weights of a realistic scale, so speed can be measured without downloads
//! and other engines can be timed on identical files (`llama2 synth`).

use rayon::prelude::*;

use crate::checkpoint::{FileFormat, LayerWeights, ModelWeights};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::sampler::Rng;
use crate::tensor::{DType, HostMatrix, Storage};

/// The model shapes benchmarks know by name.
pub const SHAPES: [(&str, Config); 5] = [
    ("stories260K", shape(64, 172, 5, 8, 4, 512, 512)),
    ("stories15M", shape(288, 768, 6, 6, 6, 32000, 256)),
    ("stories42M", shape(512, 1376, 8, 8, 8, 32000, 1024)),
    ("stories110M", shape(768, 2048, 12, 12, 12, 32000, 1024)),
    ("llama2-7b", shape(4096, 11008, 32, 32, 32, 32000, 4096)),
];

const fn shape(d: usize, h: usize, l: usize, nh: usize, nkv: usize, v: usize, s: usize) -> Config {
    Config::llama2c(d, h, l, nh, nkv, v, s, true)
}

/// The config of a named shape (case-insensitive), or an error naming the
/// shapes there are.
pub fn shape_config(name: &str) -> Result<Config> {
    SHAPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, c)| *c)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "unknown shape '{name}': expected {}",
                shape_names()
            ))
        })
}

/// Names of all shapes, for error messages.
pub fn shape_names() -> String {
    SHAPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join("|")
}

/// Values per independently seeded chunk, so generation runs in parallel and
/// gives the same values whatever the thread count.
const CHUNK: usize = 1 << 16;

/// Fills `out` with values uniform in [-scale, scale) from `seed`.
pub fn fill_uniform(out: &mut [f32], seed: u64, scale: f32) {
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = Rng::new(mix(seed, i as u64));
            for v in chunk {
                *v = (rng.next_f32() * 2.0 - 1.0) * scale;
            }
        });
}

/// splitmix64 finalizer of (seed, stream): distinct non-zero generator seeds.
fn mix(seed: u64, stream: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) | 1
}

/// A random `[rows][cols]` matrix whose products keep activations of unit
/// scale: uniform in ±sqrt(3 / cols).
pub fn random_matrix(rows: usize, cols: usize, seed: u64) -> HostMatrix {
    let mut data = vec![0f32; rows * cols];
    fill_uniform(&mut data, seed, (3.0 / cols as f32).sqrt());
    HostMatrix::from_f32(rows, cols, data)
}

/// Seeds of a model's matrices, in upload order: one per matrix.
pub fn matrix_seed(seed: u64, index: u64) -> u64 {
    mix(seed, index + 1)
}

/// A whole random model of `config` with matrices stored as `dtype`.
pub fn random_weights(config: &Config, dtype: DType, seed: u64) -> ModelWeights {
    let c = config;
    let (d, h, kv, v) = (c.dim, c.hidden_dim, c.kv_dim(), c.vocab_size);
    let gs = crate::quant::default_group_size(d, h);
    let mut index = 0;
    let mut matrix = |rows: usize, cols: usize| {
        index += 1;
        let m = random_matrix(rows, cols, matrix_seed(seed, index));
        if dtype == DType::F32 {
            m
        } else {
            m.convert(dtype, gs)
                .expect("random values are finite and small")
        }
    };
    let ones = || Storage::owned(vec![1f32; d]);
    let layers = (0..c.n_layers)
        .map(|_| LayerWeights {
            rms_att: ones(),
            wq: matrix(d, d),
            wk: matrix(kv, d),
            wv: matrix(kv, d),
            wo: matrix(d, d),
            rms_ffn: ones(),
            w1: matrix(h, d),
            w2: matrix(d, h),
            w3: matrix(h, d),
        })
        .collect();
    let token_embedding = matrix(v, d);
    let format = match dtype {
        DType::Q8 => FileFormat::V2 { group_size: gs },
        _ => FileFormat::V1,
    };
    ModelWeights {
        config: *c,
        format: crate::checkpoint::Source::Llama2c(format),
        token_embedding,
        layers,
        rms_final: ones(),
        classifier: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_is_a_valid_config() {
        for (name, config) in SHAPES {
            config.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(shape_config(name).unwrap(), config);
        }
        assert!(shape_config("stories1B").is_err());
    }
}
