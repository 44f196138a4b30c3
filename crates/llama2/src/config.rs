//! Model hyper-parameters as stored in a checkpoint header, their validation,
//! and the sizes derived from them. All sizes are `usize` computed with
//! checked arithmetic, so a header claiming absurd dimensions becomes an error
//! rather than an overflow.

use crate::error::{Error, Result};

/// Largest value accepted for any single dimension. Llama 2 70B has
/// hidden_dim 28672 and vocab 32000; newer Llama vocabularies reach 128256.
/// Anything far beyond that is a corrupt header, not a model.
const MAX_DIMENSION: usize = 1 << 24;
/// Largest accepted layer count and context length.
const MAX_LAYERS: usize = 1 << 12;
const MAX_SEQ_LEN: usize = 1 << 20;

/// Hyper-parameters of a Llama-architecture transformer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
        let config = Config {
            dim: dim as usize,
            hidden_dim: hidden_dim as usize,
            n_layers: n_layers as usize,
            n_heads: n_heads as usize,
            n_kv_heads: n_kv_heads as usize,
            vocab_size: vocab_size as usize,
            seq_len: seq_len as usize,
            shared_classifier,
        };
        config.validate()?;
        Ok(config)
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
        Ok(())
    }

    /// Dimension of one attention head (hs).
    pub fn head_size(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Width of the key and value vectors of one token (KV).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_size()
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
                ..good
            },
            Config {
                seq_len: usize::MAX,
                ..good
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?} accepted");
        }
    }
}
