//! The transformer, written once over the `Backend` ops, in dataflow order.
//! There is no device-specific code here: the CPU and CUDA backends run this
//! same function, for one decoded token, a whole batch of prompt tokens, or
//! the rows of many sequences at once (a server's step).

use crate::backend::{all_finite, Backend, Segment};
use crate::checkpoint::ModelWeights;
use crate::config::Config;
use crate::error::{Error, Result};

// ----------------------------------------------------------------------------
// Weights on the backend

/// One transformer block's weights, on the backend.
struct Layer<B: Backend> {
    rms_att: B::Vector, // [D]
    wq: B::Matrix,      // [D][D]
    wk: B::Matrix,      // [KV][D]
    wv: B::Matrix,      // [KV][D]
    wo: B::Matrix,      // [D][D]
    rms_ffn: B::Vector, // [D]
    w1: B::Matrix,      // [H][D]
    w2: B::Matrix,      // [D][H]
    w3: B::Matrix,      // [H][D]
}

/// All weights, on the backend.
struct Weights<B: Backend> {
    token_embedding: B::Matrix,    // [V][D]
    layers: Vec<Layer<B>>,         // L of them
    rms_final: B::Vector,          // [D]
    classifier: Option<B::Matrix>, // [V][D]; None: shares token_embedding
}

impl<B: Backend> Weights<B> {
    fn upload(b: &mut B, w: &ModelWeights) -> Result<Self> {
        // Conversions can refuse a value; the error then names the weight.
        let matrix = |b: &mut B, name: &dyn Fn() -> String, m| {
            b.upload_matrix(m).map_err(|e| e.in_weight(&name()))
        };
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let name = |w: &'static str| move || format!("layers[{i}].{w}");
                Ok(Layer {
                    rms_att: b.upload_vector(&l.rms_att)?,
                    wq: matrix(b, &name("wq"), &l.wq)?,
                    wk: matrix(b, &name("wk"), &l.wk)?,
                    wv: matrix(b, &name("wv"), &l.wv)?,
                    wo: matrix(b, &name("wo"), &l.wo)?,
                    rms_ffn: b.upload_vector(&l.rms_ffn)?,
                    w1: matrix(b, &name("w1"), &l.w1)?,
                    w2: matrix(b, &name("w2"), &l.w2)?,
                    w3: matrix(b, &name("w3"), &l.w3)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Weights {
            token_embedding: matrix(b, &|| "token_embedding".into(), &w.token_embedding)?,
            layers,
            rms_final: b.upload_vector(&w.rms_final)?,
            classifier: w
                .classifier
                .as_ref()
                .map(|m| matrix(b, &|| "classifier".into(), m))
                .transpose()?,
        })
    }

    /// Random weights of `c`'s shape built by the backend itself: the same
    /// values `synth::random_weights(c, F32, seed)` gives, matrix by matrix.
    fn synthetic(b: &mut B, c: &Config, seed: u64) -> Result<Self> {
        let (d, h, kv, v) = (c.dim, c.hidden_dim, c.kv_dim(), c.vocab_size);
        let ones = vec![1f32; d];
        let mut index = 0;
        let mut matrix = |b: &mut B, rows: usize, cols: usize| {
            index += 1;
            b.random_matrix(rows, cols, crate::synth::matrix_seed(seed, index))
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            layers.push(Layer {
                rms_att: b.upload_vector(&ones)?,
                wq: matrix(b, d, d)?,
                wk: matrix(b, kv, d)?,
                wv: matrix(b, kv, d)?,
                wo: matrix(b, d, d)?,
                rms_ffn: b.upload_vector(&ones)?,
                w1: matrix(b, h, d)?,
                w2: matrix(b, d, h)?,
                w3: matrix(b, h, d)?,
            });
        }
        Ok(Weights {
            token_embedding: matrix(b, v, d)?,
            layers,
            rms_final: b.upload_vector(&ones)?,
            classifier: None,
        })
    }

    fn classifier(&self) -> &B::Matrix {
        self.classifier.as_ref().unwrap_or(&self.token_embedding)
    }
}

// ----------------------------------------------------------------------------
// Activations

/// Activation buffers for a batch of up to `B` = `max_batch` tokens.
struct State<B: Backend> {
    x: B::Buffer,      // [B][D] residual stream
    xb: B::Buffer,     // [B][D] normalized input of a sub-layer
    q: B::Buffer,      // [B][D] queries
    k: B::Buffer,      // [B][KV] keys of the batch
    v: B::Buffer,      // [B][KV] values of the batch
    att: B::Buffer,    // [B][D] attention output, before wo
    proj: B::Buffer,   // [B][D] output of wo or w2, added to x
    gate: B::Buffer,   // [B][H] w1 output, then silu(w1) * w3
    up: B::Buffer,     // [B][H] w3 output
    last: B::Buffer,   // [B][D] each segment's last row, for its logits
    logits: B::Buffer, // [B][V]
}

impl<B: Backend> State<B> {
    fn new(b: &mut B, c: &Config, batch: usize) -> Result<Self> {
        let (d, kv, h, v) = (c.dim, c.kv_dim(), c.hidden_dim, c.vocab_size);
        Ok(State {
            x: b.buffer(batch * d)?,
            xb: b.buffer(batch * d)?,
            q: b.buffer(batch * d)?,
            k: b.buffer(batch * kv)?,
            v: b.buffer(batch * kv)?,
            att: b.buffer(batch * d)?,
            proj: b.buffer(batch * d)?,
            gate: b.buffer(batch * h)?,
            up: b.buffer(batch * h)?,
            last: b.buffer(batch * d)?,
            logits: b.buffer(batch * v)?,
        })
    }
}

/// Which logits a forward step computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// None: a chunk of a prompt that more chunks follow (the classifier
    /// is the largest matrix of a small model, read for nothing).
    None,
    /// Only the last token's of each segment (generation).
    Last,
    /// Every token's (perplexity, chat parity, checks).
    All,
}

// ----------------------------------------------------------------------------
// The forward pass

/// One forward step of `tokens`, whose rows form `segments` (one per
/// sequence, `caches[i]` holding segment `i`'s keys and values), leaving the
/// requested logits in `s.logits`: `[segments][V]` for `Logits::Last`.
#[allow(clippy::too_many_arguments)]
fn forward<B: Backend>(
    b: &mut B,
    c: &Config,
    w: &Weights<B>,
    s: &mut State<B>,
    caches: &mut [&mut B::KvCache],
    tokens: &[u32],
    segments: &[Segment],
    want: Logits,
) -> Result<()> {
    let n = tokens.len();
    b.embed(&mut s.x, &w.token_embedding, tokens)?;
    for (l, layer) in w.layers.iter().enumerate() {
        // Attention block: x += wo · attention(rope(wq·xb), rope(wk·xb), wv·xb)
        // with xb = rmsnorm(x).
        b.norm_matmul(
            &s.x,
            &layer.rms_att,
            n,
            &mut s.xb,
            &mut [
                (&layer.wq, &mut s.q),
                (&layer.wk, &mut s.k),
                (&layer.wv, &mut s.v),
            ],
        )?;
        b.rope_attention_segments(&mut s.att, &mut s.q, &mut s.k, &s.v, caches, l, segments, c)?;
        b.matmul_add(&s.att, n, &layer.wo, &mut s.proj, &mut s.x, c)?;

        // Feed-forward block: x += w2 · (silu(w1·xb) * (w3·xb)), xb = rmsnorm(x).
        let ffn = (&layer.w1, &layer.w3);
        b.norm_swiglu(
            &s.x,
            &layer.rms_ffn,
            n,
            &mut s.xb,
            ffn,
            &mut s.gate,
            &mut s.up,
            c,
        )?;
        b.matmul_add(&s.gate, n, &layer.w2, &mut s.proj, &mut s.x, c)?;
    }
    let classifier = &mut [(w.classifier(), &mut s.logits)];
    match want {
        Logits::None => Ok(()),
        Logits::All => b.norm_matmul(&s.x, &w.rms_final, n, &mut s.xb, classifier),
        Logits::Last => {
            for (i, seg) in segments.iter().enumerate() {
                b.copy_row((&mut s.last, i), (&s.x, seg.rows.end - 1), c.dim)?;
            }
            let rows = segments.len();
            b.norm_matmul(&s.last, &w.rms_final, rows, &mut s.xb, classifier)
        }
    }
}

// ----------------------------------------------------------------------------
// The model as the rest of the program sees it

/// A sequence whose keys and values a model holds between steps: the
/// handle `forward_batch` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SequenceId(usize);

/// One sequence's rows in a `forward_batch` step: `tokens` at positions
/// `pos0..` of `sequence`.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    pub sequence: SequenceId,
    pub tokens: &'a [u32],
    pub pos0: usize,
}

/// A loaded model that turns tokens into logits, whatever the backend.
/// Generation, chat, perplexity, checks and the server are written against
/// this.
pub trait LanguageModel {
    fn config(&self) -> &Config;
    /// A description of the backend running it.
    fn describe(&self) -> String;
    /// Runs `tokens` at positions `pos0..` and returns the last token's
    /// logits `[V]`. Long inputs are processed in batches.
    fn forward(&mut self, tokens: &[u32], pos0: usize) -> Result<&[f32]>;
    /// Runs `tokens` at positions `pos0..` and returns every token's logits
    /// `[tokens.len()][V]`.
    fn forward_all(&mut self, tokens: &[u32], pos0: usize) -> Result<&[f32]>;

    /// The most tokens, of all chunks together, one `forward_batch` takes.
    fn max_batch(&self) -> usize;
    /// The most chunks (sequences) one `forward_batch` takes.
    fn max_sequences(&self) -> usize;
    /// Starts a sequence with an empty KV cache, separate from the one
    /// `forward` and `forward_all` use. Its memory grows with its length
    /// (on backends whose caches can grow) and is returned by
    /// `free_sequence`.
    fn new_sequence(&mut self) -> Result<SequenceId>;
    /// Forgets a sequence and frees its KV cache.
    fn free_sequence(&mut self, id: SequenceId);
    /// One forward step over the chunks of several sequences, weights read
    /// once for all of them; returns each chunk's last-token logits
    /// `[chunks.len()][V]`, which the caller may overwrite (sampling does).
    /// A chunk may start at most at its sequence's length (positions not
    /// yet written would be read as zeros).
    fn forward_batch(&mut self, chunks: &[Chunk<'_>]) -> Result<&mut [f32]>;
}

/// The transformer on backend `B`.
pub struct Transformer<B: Backend> {
    config: Config,
    backend: B,
    weights: Weights<B>,
    state: State<B>,
    batch: usize,
    /// KV caches by sequence id; slot 0 is `forward`'s, made at first use
    /// with room for the whole context (a server never needs it).
    caches: Vec<Option<B::KvCache>>,
    /// Positions written so far in each slot of `caches`.
    lengths: Vec<usize>,
    /// Host copy of logits, `[n][V]`.
    logits: Vec<f32>,
}

impl<B: Backend> Transformer<B> {
    /// Uploads `weights` to `backend` and allocates the activations.
    pub fn new(mut backend: B, weights: &ModelWeights) -> Result<Self> {
        let config = weights.config;
        config.validate()?;
        weights.check_shapes()?;
        weights.check_values()?;
        backend.prepare(&config)?;
        let w = Weights::upload(&mut backend, weights)?;
        Self::with_weights(backend, config, w)
    }

    /// A model of `config`'s shape with random weights built on the backend
    /// (benchmarks: no file, no host copy of a 7B model).
    pub fn synthetic(mut backend: B, config: &Config, seed: u64) -> Result<Self> {
        config.validate()?;
        backend.prepare(config)?;
        let w = Weights::synthetic(&mut backend, config, seed)?;
        Self::with_weights(backend, *config, w)
    }

    fn with_weights(mut backend: B, config: Config, weights: Weights<B>) -> Result<Self> {
        // Caches are made later, per sequence; a model whose one context
        // cannot fit is refused now rather than at its first token.
        config.check_kv_cache_fits()?;
        let batch = backend.max_batch().clamp(1, config.seq_len);
        let state = State::new(&mut backend, &config, batch)?;
        Ok(Transformer {
            config,
            backend,
            weights,
            state,
            batch,
            caches: vec![None],
            lengths: vec![0],
            logits: Vec::new(),
        })
    }

    /// The backend, for backend-specific reporting.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn check_range(&self, tokens: &[u32], pos0: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Invalid("forward needs at least one token".into()));
        }
        let end = pos0 + tokens.len();
        if end > self.config.seq_len {
            return Err(Error::PromptTooLong {
                tokens: end,
                context: self.config.seq_len,
            });
        }
        if let Some(&t) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the model's vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// Slot 0's cache, made with room for the whole context on first use.
    fn default_cache(&mut self) -> Result<()> {
        if self.caches[0].is_none() {
            let seq_len = self.config.seq_len;
            self.caches[0] = Some(self.backend.kv_cache(&self.config, seq_len)?);
        }
        Ok(())
    }

    /// Runs one step of `tokens` in `segments`, segment `i` in slot
    /// `slots[i]` of `caches`. The caches are moved out of their slots for
    /// the step (each is a distinct slot) and put back after it.
    fn run_step(
        &mut self,
        tokens: &[u32],
        segments: &[Segment],
        slots: &[usize],
        want: Logits,
    ) -> Result<()> {
        let mut taken: Vec<B::KvCache> = slots
            .iter()
            .map(|&i| self.caches[i].take().expect("live sequences have caches"))
            .collect();
        let Transformer {
            config,
            backend,
            weights,
            state,
            ..
        } = self;
        let mut caches: Vec<&mut B::KvCache> = taken.iter_mut().collect();
        let result = backend.step(tokens, segments, &mut |b| {
            forward(
                b,
                config,
                weights,
                state,
                &mut caches,
                tokens,
                segments,
                want,
            )
        });
        for (&i, cache) in slots.iter().zip(taken) {
            self.caches[i] = Some(cache);
        }
        result
    }

    fn run_chunk(&mut self, chunk: &[u32], pos0: usize, want: Logits) -> Result<()> {
        self.default_cache()?;
        let segments = [Segment::single(chunk.len(), pos0)];
        self.run_step(chunk, &segments, &[0], want)?;
        self.lengths[0] = pos0 + chunk.len();
        Ok(())
    }

    /// The slot of a live sequence other than slot 0.
    fn slot(&self, id: SequenceId) -> Result<usize> {
        match self.caches.get(id.0) {
            Some(Some(_)) if id.0 != 0 => Ok(id.0),
            _ => Err(Error::Invalid(format!(
                "sequence {} is not a live sequence of this model",
                id.0
            ))),
        }
    }

    /// Checks a batch of chunks against the limits and the sequences'
    /// lengths; returns their slots.
    fn check_chunks(&self, chunks: &[Chunk<'_>]) -> Result<Vec<usize>> {
        let rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        if chunks.is_empty() || rows > self.batch || chunks.len() > self.max_sequences() {
            return Err(Error::Invalid(format!(
                "a batch of {} chunks and {rows} tokens; this model takes 1 to {} chunks of \
                 {} tokens in all",
                chunks.len(),
                self.max_sequences(),
                self.batch
            )));
        }
        let mut slots = Vec::with_capacity(chunks.len());
        for c in chunks {
            let slot = self.slot(c.sequence)?;
            if slots.contains(&slot) {
                return Err(Error::Invalid(format!(
                    "sequence {slot} appears twice in one batch"
                )));
            }
            self.check_range(c.tokens, c.pos0)?;
            if c.pos0 > self.lengths[slot] {
                return Err(Error::Invalid(format!(
                    "a chunk at position {} of sequence {slot}, which holds {} positions: \
                     feed the positions in between first",
                    c.pos0, self.lengths[slot]
                )));
            }
            slots.push(slot);
        }
        Ok(slots)
    }
}

/// Copies rows of `v` logits from `src` into `out` and refuses them if any
/// is NaN or infinite, naming the position (`position(row)`) of the first
/// such row.
fn read_logits<B: Backend>(
    backend: &mut B,
    src: &B::Buffer,
    out: &mut [f32],
    v: usize,
    position: impl Fn(usize) -> usize,
) -> Result<()> {
    if backend.read_finite(src, out)? {
        return Ok(());
    }
    check_rows(out, v, position)
}

/// `check_logits` for each row of `v` logits in `logits`, row `i` at
/// `position(i)`.
fn check_rows(logits: &[f32], v: usize, position: impl Fn(usize) -> usize) -> Result<()> {
    for (i, row) in logits.chunks(v).enumerate() {
        check_logits(row, position(i))?;
    }
    Ok(())
}

/// Refuses logits with NaN or infinity (at position `pos`): sampling from
/// them would print one token over and over, or garbage, with no sign that
/// anything went wrong. One pass over the vocabulary per token.
fn check_logits(logits: &[f32], pos: usize) -> Result<()> {
    if all_finite(logits) {
        return Ok(());
    }
    let nan = logits.iter().filter(|l| l.is_nan()).count();
    let inf = logits.iter().filter(|l| l.is_infinite()).count();
    Err(Error::NonFinite(format!(
        "the model computed non-finite logits at position {pos} ({nan} NaN and {inf} infinite \
         of {}): its weights hold NaN or infinity, or values so large that the activations \
         overflow; the checkpoint is damaged or not a trained model",
        logits.len()
    )))
}

impl<B: Backend> LanguageModel for Transformer<B> {
    fn config(&self) -> &Config {
        &self.config
    }

    fn describe(&self) -> String {
        self.backend.describe()
    }

    fn forward(&mut self, tokens: &[u32], pos0: usize) -> Result<&[f32]> {
        self.check_range(tokens, pos0)?;
        let v = self.config.vocab_size;
        let mut pos = pos0;
        let end = pos0 + tokens.len();
        for chunk in tokens.chunks(self.batch) {
            let want = if pos + chunk.len() == end {
                Logits::Last
            } else {
                Logits::None
            };
            self.run_chunk(chunk, pos, want)?;
            pos += chunk.len();
        }
        self.logits.resize(v, 0.0);
        let out = &mut self.logits[..v];
        read_logits(&mut self.backend, &self.state.logits, out, v, |_| pos - 1)?;
        Ok(&self.logits[..v])
    }

    fn forward_all(&mut self, tokens: &[u32], pos0: usize) -> Result<&[f32]> {
        self.check_range(tokens, pos0)?;
        let v = self.config.vocab_size;
        self.logits.resize(tokens.len() * v, 0.0);
        let mut pos = pos0;
        for chunk in tokens.chunks(self.batch) {
            self.run_chunk(chunk, pos, Logits::All)?;
            let at = (pos - pos0) * v;
            let out = &mut self.logits[at..at + chunk.len() * v];
            read_logits(&mut self.backend, &self.state.logits, out, v, |i| pos + i)?;
            pos += chunk.len();
        }
        Ok(&self.logits)
    }

    fn max_batch(&self) -> usize {
        self.batch
    }

    fn max_sequences(&self) -> usize {
        self.backend.max_sequences().clamp(1, self.batch)
    }

    fn new_sequence(&mut self) -> Result<SequenceId> {
        let cache = self.backend.kv_cache(&self.config, 0)?;
        let free = (1..self.caches.len()).find(|&i| self.caches[i].is_none());
        let slot = free.unwrap_or_else(|| {
            self.caches.push(None);
            self.lengths.push(0);
            self.caches.len() - 1
        });
        self.caches[slot] = Some(cache);
        self.lengths[slot] = 0;
        Ok(SequenceId(slot))
    }

    fn free_sequence(&mut self, id: SequenceId) {
        if id.0 != 0 && id.0 < self.caches.len() {
            self.caches[id.0] = None;
            self.lengths[id.0] = 0;
        }
    }

    fn forward_batch(&mut self, chunks: &[Chunk<'_>]) -> Result<&mut [f32]> {
        let slots = self.check_chunks(chunks)?;
        let mut tokens = Vec::new();
        let mut segments = Vec::with_capacity(chunks.len());
        for c in chunks {
            let start = tokens.len();
            tokens.extend_from_slice(c.tokens);
            segments.push(Segment {
                rows: start..tokens.len(),
                pos0: c.pos0,
            });
        }
        self.run_step(&tokens, &segments, &slots, Logits::Last)?;
        for (c, &slot) in chunks.iter().zip(&slots) {
            self.lengths[slot] = c.pos0 + c.tokens.len();
        }
        let v = self.config.vocab_size;
        let last = |i: usize| chunks[i].pos0 + chunks[i].tokens.len() - 1;
        let n = chunks.len() * v;
        // A server step's logits are megabytes (16 sequences x 32000):
        // where the backend's buffers are host memory they are handed out
        // where the classifier wrote them.
        if self.backend.buffers_on_host() {
            let (logits, finite) = self.backend.finite_in_place(&mut self.state.logits, n)?;
            if !finite {
                check_rows(logits, v, last)?;
            }
            return Ok(logits);
        }
        self.logits.resize(n, 0.0);
        read_logits(
            &mut self.backend,
            &self.state.logits,
            &mut self.logits,
            v,
            last,
        )?;
        Ok(&mut self.logits)
    }
}
