//! The `Backend` trait: the ops one forward pass needs, and nothing else.
//! `model.rs` writes the transformer once over these ops; the CPU backend
//! (`cpu/`) and the CUDA backend (crate `llama2-cuda`) implement them.
//!
//! Every op works on a batch of `rows` tokens. Most ops do not care where
//! a row comes from; rotary embedding and attention do, and take the batch
//! as `Segment`s: consecutive rows of one sequence at consecutive positions.
//! Decoding one sequence is a batch of one row, prompt prefill one segment
//! of many rows, and a server's step one segment per running sequence
//! (weights are read once for all of them). Activation buffers are
//! row-major `[rows][width]` in the backend's own memory.
//!
//! The trait has two layers. The primitive ops (rmsnorm, matmul, rope,
//! attention, silu_mul, add, ...) are what every backend implements. The
//! fused ops (`norm_matmul`, `rope_attention`, `matmul_add`, `norm_swiglu`)
//! are what `model.rs` calls: their default bodies chain the primitives, and
//! a backend overrides them where one kernel can do the work of several
//! (saving launches and memory passes) without the forward pass changing.

use std::ops::Range;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::HostMatrix;

/// How a backend's KV caches store keys and values. f32 keeps llama2.c's
/// arithmetic; f16 halves the cache (the bytes attention reads per token
/// and the memory per sequence), as llama.cpp's default cache does, at a
/// rounding of every key and value to 11 significant bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }

    /// Bytes of one stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(KvDtype::F32),
            "f16" | "fp16" => Ok(KvDtype::F16),
            _ => Err(format!("unknown KV cache type '{s}': expected f32 or f16")),
        }
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The rows of a batched step that belong to one sequence: rows `rows` of
/// every activation buffer, at positions `pos0..pos0 + rows.len()` of that
/// sequence, attending over its own KV cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub rows: Range<usize>,
    pub pos0: usize,
}

impl Segment {
    /// The whole batch of `rows` rows as one sequence at `pos0..`.
    pub fn single(rows: usize, pos0: usize) -> Self {
        Segment {
            rows: 0..rows,
            pos0,
        }
    }
}

/// A compute device able to run the transformer's ops.
pub trait Backend {
    /// A weight matrix `[rows][cols]` in the backend's memory and storage type.
    type Matrix;
    /// An f32 vector in the backend's memory (norm gains).
    type Vector;
    /// An activation buffer of f32 values, `[rows][width]`.
    type Buffer;
    /// One sequence's key and value caches, all layers, `[L][S][KV]` each.
    type KvCache;

    /// A one-line description, e.g. "cpu (2 threads, avx2)".
    fn describe(&self) -> String;

    /// The largest batch the ops accept at once; longer prompts are fed in
    /// chunks of this many tokens.
    fn max_batch(&self) -> usize;

    /// The most sequences (segments) one step may hold. Backends whose
    /// attention reads one cache per step keep the default, 1, and a
    /// scheduler then runs their sequences one after the other.
    fn max_sequences(&self) -> usize {
        1
    }

    /// Takes the model-wide numbers the ops use, before anything else: the
    /// norm epsilon and the rotary frequencies (`Config::rope_frequencies`).
    /// Nothing in a backend may assume llama2.c's values for them.
    fn prepare(&mut self, config: &Config) -> Result<()>;

    /// Copies a weight matrix to the backend, converting its storage type if
    /// the backend computes in another precision.
    fn upload_matrix(&mut self, m: &HostMatrix) -> Result<Self::Matrix>;
    /// A random matrix `[rows][cols]` from `seed` (values uniform in
    /// ±sqrt(3 / cols)), for benchmarks. Backends may build it in place
    /// instead of generating it on the host and copying it over.
    fn random_matrix(&mut self, rows: usize, cols: usize, seed: u64) -> Result<Self::Matrix> {
        self.upload_matrix(&crate::synth::random_matrix(rows, cols, seed))
    }
    /// Copies an f32 vector to the backend.
    fn upload_vector(&mut self, v: &[f32]) -> Result<Self::Vector>;
    /// A zeroed activation buffer of `len` f32 values.
    fn buffer(&mut self, len: usize) -> Result<Self::Buffer>;
    /// Zeroed key/value caches of one sequence for `config`, with room for
    /// `positions` positions. A backend whose caches take memory only as
    /// they fill (the CPU's reserves the whole context and is given pages
    /// as attention writes them) may ignore `positions`; one whose cannot
    /// grow allocates the whole context whatever `positions` says.
    fn kv_cache(&mut self, config: &Config, positions: usize) -> Result<Self::KvCache>;

    /// Runs one forward step over `tokens`, whose rows form `segments`.
    /// `ops` issues the step's ops; a backend may record them once and
    /// replay the recording for later steps of the same shape (CUDA graphs),
    /// taking the tokens and positions from here, so `ops` must do nothing
    /// but call ops.
    fn step(
        &mut self,
        tokens: &[u32],
        segments: &[Segment],
        ops: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        let _ = (tokens, segments);
        ops(self)
    }

    /// `out[r] = table[tokens[r]]` for each row: the token embedding lookup.
    fn embed(&mut self, out: &mut Self::Buffer, table: &Self::Matrix, tokens: &[u32])
        -> Result<()>;

    /// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for `rows` rows of
    /// the weight's width, with the `eps` of the prepared config.
    fn rmsnorm(
        &mut self,
        out: &mut Self::Buffer,
        x: &Self::Buffer,
        weight: &Self::Vector,
        rows: usize,
    ) -> Result<()>;

    /// For each `(w, out)` pair: `out[r] = w · x[r]` for `rows` rows. Pairs
    /// share the input, so a backend can quantize or stage it once and run
    /// the products together (QKV, w1/w3).
    fn matmul(
        &mut self,
        x: &Self::Buffer,
        rows: usize,
        outs: &mut [(&Self::Matrix, &mut Self::Buffer)],
    ) -> Result<()>;

    /// Rotary position embedding on `q` `[rows][D]` and `k` `[rows][KV]`,
    /// row `r` at position `pos0 + r`.
    fn rope(
        &mut self,
        q: &mut Self::Buffer,
        k: &mut Self::Buffer,
        rows: usize,
        pos0: usize,
        config: &Config,
    ) -> Result<()>;

    /// Stores `k` and `v` `[rows][KV]` into `layer` of the cache at
    /// `pos0..pos0 + rows`, then computes causal multi-head attention of `q`
    /// `[rows][D]` over positions `0..=pos0 + r` into `out` `[rows][D]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        out: &mut Self::Buffer,
        q: &Self::Buffer,
        k: &Self::Buffer,
        v: &Self::Buffer,
        cache: &mut Self::KvCache,
        layer: usize,
        rows: usize,
        pos0: usize,
        config: &Config,
    ) -> Result<()>;

    /// `gate[i] = silu(gate[i]) * up[i]` for the first `len` values.
    fn silu_mul(&mut self, gate: &mut Self::Buffer, up: &Self::Buffer, len: usize) -> Result<()>;

    /// `x[i] += y[i]` for the first `len` values: the residual connection.
    fn add(&mut self, x: &mut Self::Buffer, y: &Self::Buffer, len: usize) -> Result<()>;

    /// Copies row `from` of `src` into row `to` of `dst` (rows of `width`).
    fn copy_row(
        &mut self,
        dst: (&mut Self::Buffer, usize),
        src: (&Self::Buffer, usize),
        width: usize,
    ) -> Result<()>;

    /// Copies the first `out.len()` values of `src` to the host.
    fn read(&mut self, src: &Self::Buffer, out: &mut [f32]) -> Result<()>;

    /// As `read`, and says whether every value copied is finite (the model
    /// refuses logits with NaN or infinity). The default scans the copy;
    /// a backend whose threads share the copy checks each part as it goes.
    fn read_finite(&mut self, src: &Self::Buffer, out: &mut [f32]) -> Result<bool> {
        self.read(src, out)?;
        Ok(all_finite(out))
    }

    /// Whether buffers are host memory (the CPU), so that
    /// `finite_in_place` can hand their values out: the model then returns
    /// a batch's logits where the classifier wrote them, without a copy.
    fn buffers_on_host(&self) -> bool {
        false
    }

    /// The first `len` values of `src` in place, and whether every one is
    /// finite, where `buffers_on_host`.
    fn finite_in_place<'a>(
        &mut self,
        _src: &'a mut Self::Buffer,
        _len: usize,
    ) -> Result<(&'a mut [f32], bool)> {
        Err(Error::Backend(
            "this backend's buffers are not host memory: read them with read_finite".into(),
        ))
    }

    // ------------------------------------------------------------------
    // Fused ops: defaults chain the primitives above.

    /// For each `(w, out)` pair: `out[r] = w · rmsnorm(x[r]) * weight`.
    /// `normed` `[rows][D]` is scratch for the normalized rows; a backend
    /// that folds the norm into the product may leave it untouched.
    fn norm_matmul(
        &mut self,
        x: &Self::Buffer,
        weight: &Self::Vector,
        rows: usize,
        normed: &mut Self::Buffer,
        outs: &mut [(&Self::Matrix, &mut Self::Buffer)],
    ) -> Result<()> {
        self.rmsnorm(normed, x, weight, rows)?;
        self.matmul(normed, rows, outs)
    }

    /// Rotary embedding of `q` and `k`, then `attention`: stores k and v in
    /// the cache and attends.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &mut self,
        out: &mut Self::Buffer,
        q: &mut Self::Buffer,
        k: &mut Self::Buffer,
        v: &Self::Buffer,
        cache: &mut Self::KvCache,
        layer: usize,
        rows: usize,
        pos0: usize,
        config: &Config,
    ) -> Result<()> {
        self.rope(q, k, rows, pos0, config)?;
        self.attention(out, q, k, v, cache, layer, rows, pos0, config)
    }

    /// `rope_attention` for a batch of several sequences: the rows of
    /// `segments[i]` attend over `caches[i]`. The default takes one segment
    /// starting at row 0, for backends whose `max_sequences` is 1.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_segments(
        &mut self,
        out: &mut Self::Buffer,
        q: &mut Self::Buffer,
        k: &mut Self::Buffer,
        v: &Self::Buffer,
        caches: &mut [&mut Self::KvCache],
        layer: usize,
        segments: &[Segment],
        config: &Config,
    ) -> Result<()> {
        match (segments, caches) {
            ([s], [cache]) if s.rows.start == 0 => {
                let rows = s.rows.len();
                self.rope_attention(out, q, k, v, cache, layer, rows, s.pos0, config)
            }
            _ => Err(Error::Backend(format!(
                "{} runs one sequence per step, not {}",
                self.describe(),
                segments.len()
            ))),
        }
    }

    /// The residual connection of a projection: `residual[r] += w · x[r]`,
    /// with `proj` `[rows][D]` as scratch for the product.
    #[allow(clippy::too_many_arguments)]
    fn matmul_add(
        &mut self,
        x: &Self::Buffer,
        rows: usize,
        w: &Self::Matrix,
        proj: &mut Self::Buffer,
        residual: &mut Self::Buffer,
        config: &Config,
    ) -> Result<()> {
        self.matmul(x, rows, &mut [(w, proj)])?;
        self.add(residual, proj, rows * config.dim)
    }

    /// The SwiGLU feed-forward input: `gate = silu(w1 · n) * (w3 · n)` with
    /// `n = rmsnorm(x) * weight`; `normed` and `up` `[rows][H]` are scratch.
    #[allow(clippy::too_many_arguments)]
    fn norm_swiglu(
        &mut self,
        x: &Self::Buffer,
        weight: &Self::Vector,
        rows: usize,
        normed: &mut Self::Buffer,
        (w1, w3): (&Self::Matrix, &Self::Matrix),
        gate: &mut Self::Buffer,
        up: &mut Self::Buffer,
        config: &Config,
    ) -> Result<()> {
        self.norm_matmul(
            x,
            weight,
            rows,
            normed,
            &mut [(w1, &mut *gate), (w3, &mut *up)],
        )?;
        self.silu_mul(gate, up, rows * config.hidden_dim)
    }
}

/// Whether every value is finite, in one vectorizable pass: `x * 0` is 0
/// for a finite `x` and NaN for NaN or infinity, and 16 independent lane
/// sums keep the loop free of a serial dependency (it runs over every
/// token's logits).
pub(crate) fn all_finite(v: &[f32]) -> bool {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (acc, &x) in lanes.iter_mut().zip(chunk) {
            *acc += x * 0.0;
        }
    }
    lanes.iter().all(|&a| a == 0.0) && tail.iter().all(|x| x.is_finite())
}

#[cfg(test)]
mod tests {
    use super::all_finite;

    #[test]
    fn all_finite_finds_any_nan_or_infinity_at_any_place() {
        for len in [0usize, 1, 15, 16, 17, 100, 32000] {
            let v: Vec<f32> = (0..len).map(|i| (i as f32 - 50.0) * 1e30).collect();
            assert!(all_finite(&v), "len {len}");
            for at in [0, len / 2, len.saturating_sub(1)] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    if len == 0 {
                        continue;
                    }
                    let mut w = v.clone();
                    w[at] = bad;
                    assert!(!all_finite(&w), "len {len} at {at} {bad}");
                }
            }
        }
        // Large finite values whose differences would overflow stay finite.
        assert!(all_finite(&[f32::MAX, -f32::MAX, f32::MAX]));
    }
}
