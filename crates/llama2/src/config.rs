//! Model hyper-parameters, their validation, and the sizes derived from
//! them. llama2.c's headers give only the seven dimensions; the rest (RoPE
//! base and scaling, norm epsilon, head size, BOS/EOS ids) take llama2.c's
//! values there and come from the model's own files for other formats, so
//! no backend hard-codes 10000, 1e-5 or token ids. All sizes are `usize`
//! computed with checked arithmetic, so a header claiming absurd dimensions
//! becomes an error rather than an overflow.

use crate::error::{Error, Result};

/// Largest value accepted for any single dimension. Llama 2 70B has
/// hidden_dim 28672 and vocab 32000; newer Llama vocabularies reach 128256.
/// Anything far beyond that is a corrupt header, not a model.
const MAX_DIMENSION: usize = 1 << 24;
/// Largest accepted layer count and context length.
const MAX_LAYERS: usize = 1 << 12;
const MAX_SEQ_LEN: usize = 1 << 20;

/// llama2.c's RoPE base, which its files imply.
pub const LLAMA2C_ROPE_THETA: f32 = 10000.0;
/// llama2.c's RMSNorm epsilon, which its files imply.
pub const LLAMA2C_NORM_EPS: f32 = 1e-5;
/// Most end-of-sequence ids a model may declare (Llama 3 has three).
const MAX_EOS: usize = 8;

/// Hyper-parameters of a Llama-architecture transformer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Width of the residual stream (D).
    pub dim: usize,
    /// Width of the feed-forward hidden layer (H).
    pub hidden_dim: usize,
    /// Number of transformer blocks (L).
    pub n_layers: usize,
    /// Number of query heads.
    pub n_heads: usize,
    /// Number of key/value heads (grouped-query attention when < n_heads).
    pub n_kv_heads: usize,
    /// Vocabulary size (V), always positive here.
    pub vocab_size: usize,
    /// Maximum context length (S).
    pub seq_len: usize,
    /// Whether the classifier reuses the token embedding matrix.
    pub shared_classifier: bool,
    /// Dimension of one attention head (hs); dim / n_heads in llama2.c files.
    pub head_dim: usize,
    /// RoPE base: pair `j` of a head rotates by `pos / theta^(2j / hs)`.
    pub rope_theta: f32,
    /// Llama 3's RoPE frequency scaling, when the model uses it.
    pub rope_scaling: Option<Llama3Scaling>,
    /// Epsilon added to the mean square in RMSNorm.
    pub norm_eps: f32,
    /// Beginning-of-sequence token.
    pub bos: u32,
    /// End-of-sequence tokens (chat turns end at them).
    pub eos: TokenSet,
    /// Whether generation stops at an EOS token. llama2.c's `run` stops
    /// only at BOS (TinyStories separates stories with BOS), so its files
    /// say no; models from other sources say yes.
    pub eos_ends_generation: bool,
}

/// Llama 3's RoPE scaling (`rope_type: llama3`): low frequencies divided by
/// `factor`, high ones kept, the band between interpolated.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    /// Context length the model was pretrained with.
    pub original_context: usize,
}

/// A small set of token ids (a model's EOS tokens), compared as the list
/// of its ids.
#[derive(Clone, Copy)]
pub struct TokenSet {
    ids: [u32; MAX_EOS],
    len: usize,
}

impl TokenSet {
    /// The set of `ids`; more than eight is an error.
    pub fn new(ids: &[u32]) -> Result<Self> {
        if ids.len() > MAX_EOS {
            return Err(Error::Config(format!(
                "{} end-of-sequence ids given; at most {MAX_EOS} are supported",
                ids.len()
            )));
        }
        let mut set = TokenSet {
            ids: [0; MAX_EOS],
            len: ids.len(),
        };
        set.ids[..ids.len()].copy_from_slice(ids);
        Ok(set)
    }

    pub const fn one(id: u32) -> Self {
        let mut ids = [0; MAX_EOS];
        ids[0] = id;
        TokenSet { ids, len: 1 }
    }

    pub fn contains(&self, id: u32) -> bool {
        self.as_slice().contains(&id)
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.ids[..self.len]
    }
}

impl PartialEq for TokenSet {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for TokenSet {}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_slice().fmt(f)
    }
}

impl Config {
    /// Builds a config from the raw signed header values, rejecting anything
    /// that cannot describe a working model.
    #[allow(clippy::too_many_arguments)]
    pub fn from_header(
        dim: i32,
        hidden_dim: i32,
        n_layers: i32,
        n_heads: i32,
        n_kv_heads: i32,
        vocab_size: i32,
        seq_len: i32,
        shared_classifier: bool,
    ) -> Result<Config> {
        let raw = [
            ("dim", dim),
            ("hidden_dim", hidden_dim),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("n_kv_heads", n_kv_heads),
            ("vocab_size", vocab_size),
            ("seq_len", seq_len),
        ];
        if let Some((name, v)) = raw.iter().find(|(_, v)| *v <= 0) {
            return Err(Error::Config(format!(
                "{name} is {v}; expected a positive value"
            )));
        }
        let config = Config::llama2c(
            dim as usize,
            hidden_dim as usize,
            n_layers as usize,
            n_heads as usize,
            n_kv_heads as usize,
            vocab_size as usize,
            seq_len as usize,
            shared_classifier,
        );
        config.validate()?;
        Ok(config)
    }

    /// A config of these dimensions with everything else as llama2.c has it
    /// (RoPE base 10000, epsilon 1e-5, BOS 1, EOS 2, head size dim /
    /// n_heads). Not validated: `validate` says whether it describes a model.
    #[allow(clippy::too_many_arguments)]
    pub const fn llama2c(
        dim: usize,
        hidden_dim: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        vocab_size: usize,
        seq_len: usize,
        shared_classifier: bool,
    ) -> Config {
        Config {
            dim,
            hidden_dim,
            n_layers,
            n_heads,
            n_kv_heads,
            vocab_size,
            seq_len,
            shared_classifier,
            head_dim: match dim.checked_div(n_heads) {
                Some(hs) => hs,
                None => 0,
            },
            rope_theta: LLAMA2C_ROPE_THETA,
            rope_scaling: None,
            norm_eps: LLAMA2C_NORM_EPS,
            bos: 1,
            eos: TokenSet::one(2),
            eos_ends_generation: false,
        }
    }

    /// Checks each dimension's range and the relations between dimensions
    /// that the forward pass relies on. Models built from a config call this
    /// themselves, so a hand-written config gets an error, not a panic.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        let ranges = [
            ("dim", self.dim, MAX_DIMENSION),
            ("hidden_dim", self.hidden_dim, MAX_DIMENSION),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("n_heads", self.n_heads, MAX_DIMENSION),
            ("n_kv_heads", self.n_kv_heads, MAX_DIMENSION),
            ("vocab_size", self.vocab_size, MAX_DIMENSION),
            ("seq_len", self.seq_len, MAX_SEQ_LEN),
        ];
        for (name, v, max) in ranges {
            if v == 0 || v > max {
                return fail(format!(
                    "{name} is {v}; expected a value between 1 and {max}"
                ));
            }
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return fail(format!(
                "n_heads {} does not divide dim {}",
                self.n_heads, self.dim
            ));
        }
        if self.n_kv_heads > self.n_heads || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return fail(format!(
                "n_kv_heads {} does not divide n_heads {}",
                self.n_kv_heads, self.n_heads
            ));
        }
        if self.head_dim.checked_mul(self.n_heads) != Some(self.dim) {
            return fail(format!(
                "head_dim {} times n_heads {} is not dim {}: models whose attention width \
                 differs from dim are not supported",
                self.head_dim, self.n_heads, self.dim
            ));
        }
        if !self.head_size().is_multiple_of(2) {
            return fail(format!(
                "head size {} (dim / n_heads) is odd; rotary embeddings need pairs",
                self.head_size()
            ));
        }
        if self.vocab_size < 3 {
            return fail(format!(
                "vocab_size {} leaves no room for <unk>, BOS and EOS",
                self.vocab_size
            ));
        }
        self.validate_numbers()
    }

    /// The non-dimension hyper-parameters: finite, positive where they must
    /// be, and token ids inside the vocabulary.
    fn validate_numbers(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::Config(msg));
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return fail(format!(
                "rope_theta is {}; expected a finite number above 1 (llama2.c uses 10000)",
                self.rope_theta
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0 && self.norm_eps < 1.0) {
            return fail(format!(
                "the norm epsilon is {}; expected a small positive number such as 1e-5",
                self.norm_eps
            ));
        }
        if let Some(s) = self.rope_scaling {
            let ok = s.factor.is_finite()
                && s.factor >= 1.0
                && s.low_freq_factor.is_finite()
                && s.high_freq_factor.is_finite()
                && 0.0 < s.low_freq_factor
                && s.low_freq_factor < s.high_freq_factor
                && s.original_context > 0;
            if !ok {
                return fail(format!(
                    "llama3 RoPE scaling {s:?}: expected factor >= 1, 0 < low_freq_factor < \
                     high_freq_factor and a positive original context"
                ));
            }
        }
        let vocab = self.vocab_size;
        for (what, id) in std::iter::once(("BOS", self.bos))
            .chain(self.eos.as_slice().iter().map(|&id| ("EOS", id)))
        {
            if id as usize >= vocab {
                return fail(format!(
                    "{what} token id {id} is outside the vocabulary of {vocab}"
                ));
            }
        }
        Ok(())
    }

    /// Dimension of one attention head (hs).
    pub fn head_size(&self) -> usize {
        self.head_dim
    }

    /// The rotation frequency of each of a head's `hs / 2` pairs (pair `j`
    /// holds elements `2j`, `2j + 1`): `1 / theta^(2j / hs)`, then Llama 3's
    /// scaling when the model has it, computed in f32 as transformers does.
    pub fn rope_frequencies(&self) -> Vec<f32> {
        let hs = self.head_size();
        (0..hs)
            .step_by(2)
            .map(|j| {
                let freq = 1.0 / self.rope_theta.powf(j as f32 / hs as f32);
                match self.rope_scaling {
                    Some(s) => s.scale(freq),
                    None => freq,
                }
            })
            .collect()
    }

    /// Width of the key and value vectors of one token (KV).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_size()
    }

    /// Refuses a model whose f32 KV cache of one whole context (keys and
    /// values of every layer) would not fit in this machine's memory: every
    /// sequence's cache may grow that far.
    pub fn check_kv_cache_fits(&self) -> Result<()> {
        let values = (self.seq_len as u64) * (self.kv_dim() as u64) * (self.n_layers as u64);
        crate::files::check_allocation(
            values.saturating_mul(8),
            &format!(
                "the KV cache ({} layers x {} positions x {} values, keys and values in f32)",
                self.n_layers,
                self.seq_len,
                self.kv_dim()
            ),
            "the model's context length sets its size",
        )
    }

    /// How many query heads share one key/value head.
    pub fn kv_group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Number of weights in the model's matrices and vectors, as streamed per
    /// decoded token (the classifier counted once even when shared).
    pub fn parameter_count(&self) -> u64 {
        let (d, h, l, v, kv) = (
            self.dim as u64,
            self.hidden_dim as u64,
            self.n_layers as u64,
            self.vocab_size as u64,
            self.kv_dim() as u64,
        );
        let per_layer = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d;
        l * per_layer + d + v * d
    }
}

impl Llama3Scaling {
    /// One frequency scaled: wavelengths longer than the original context /
    /// low_freq_factor are slowed by `factor`, shorter than context /
    /// high_freq_factor kept, and those between interpolated smoothly.
    fn scale(&self, freq: f32) -> f32 {
        let context = self.original_context as f32;
        let wavelen = 2.0 * std::f32::consts::PI / freq;
        if wavelen < context / self.high_freq_factor {
            freq
        } else if wavelen > context / self.low_freq_factor {
            freq / self.factor
        } else {
            let smooth = (context / wavelen - self.low_freq_factor)
                / (self.high_freq_factor - self.low_freq_factor);
            (1.0 - smooth) * freq / self.factor + smooth * freq
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_relations() {
        assert!(Config::from_header(64, 172, 5, 8, 4, 512, 512, true).is_ok());
        assert!(Config::from_header(64, 172, 5, 7, 7, 512, 512, true).is_err());
        assert!(Config::from_header(64, 172, 5, 8, 3, 512, 512, true).is_err());
        assert!(Config::from_header(64, 172, 0, 8, 4, 512, 512, true).is_err());
        assert!(Config::from_header(64, -1, 5, 8, 4, 512, 512, true).is_err());
        assert!(Config::from_header(i32::MAX, 172, 5, 8, 4, 512, 512, true).is_err());
        assert!(Config::from_header(64, 172, 5, 64, 64, 512, 512, true).is_err());
        assert!(Config::from_header(64, 172, 5, 32, 32, 512, 512, true).is_ok());
        assert!(Config::from_header(63, 172, 5, 63, 63, 512, 512, true).is_err());
    }

    #[test]
    fn validates_hand_written_configs() {
        let good = Config::from_header(64, 172, 5, 8, 4, 512, 512, true).unwrap();
        assert!(good.validate().is_ok());
        for bad in [
            Config { n_heads: 0, ..good },
            Config {
                n_kv_heads: 0,
                ..good
            },
            Config { dim: 0, ..good },
            Config {
                n_heads: 6,
                n_kv_heads: 6,
                head_dim: 10,
                ..good
            },
            Config {
                seq_len: usize::MAX,
                ..good
            },
            Config {
                head_dim: 16,
                ..good
            },
            Config {
                rope_theta: f32::NAN,
                ..good
            },
            Config {
                norm_eps: 0.0,
                ..good
            },
            Config { bos: 512, ..good },
            Config {
                eos: TokenSet::new(&[2, 600]).unwrap(),
                ..good
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
    }
}

#[cfg(test)]
mod rope_tests {
    use super::*;

    #[test]
    fn default_frequencies_are_llama2c_bit_for_bit() {
        let c = Config::from_header(64, 172, 5, 8, 4, 512, 512, true).unwrap();
        let want: Vec<f32> = (0..8)
            .step_by(2)
            .map(|j| 1.0 / 10000f32.powf(j as f32 / 8.0))
            .collect();
        assert_eq!(c.rope_frequencies(), want);
    }

    #[test]
    fn llama3_scaling_keeps_high_slows_low_and_blends_between() {
        let s = Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192,
        };
        // Wavelength 2 pi < 2048: kept.
        assert_eq!(s.scale(1.0), 1.0);
        // Wavelength 2 pi * 1e4 > 8192: divided by the factor.
        assert_eq!(s.scale(1e-4), 1e-4 / 8.0);
        // Between 2048 and 8192 the result lies between the two.
        let f = 2.0 * std::f32::consts::PI / 4096.0;
        let scaled = s.scale(f);
        assert!(f / 8.0 < scaled && scaled < f, "{scaled}");
    }
}
