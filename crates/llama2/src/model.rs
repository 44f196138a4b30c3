//! The transformer, written once over the `Backend` ops, in dataflow order.
//! There is no device-specific code here: the CPU and CUDA backends run this
//! same function, for one decoded token or a whole batch of prompt tokens.

use crate::backend::Backend;
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

/// Activation buffers for a batch of up to `B` = `max_batch` tokens, and the
/// KV cache.
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
    last: B::Buffer,   // [1][D] final-normed last row, for decode logits
    logits: B::Buffer, // [B][V]
    cache: B::KvCache, // [L][S][KV] keys and values
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
            last: b.buffer(d)?,
            logits: b.buffer(batch * v)?,
            cache: b.kv_cache(c)?,
        })
    }
}

/// Which logits a forward step computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity, chat parity, checks).
    All,
}

// ----------------------------------------------------------------------------
// The forward pass

/// One forward step of `tokens` at positions `pos0..`, leaving the requested
/// logits in `s.logits`.
fn forward<B: Backend>(
    b: &mut B,
    c: &Config,
    w: &Weights<B>,
    s: &mut State<B>,
    tokens: &[u32],
    pos0: usize,
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
        b.rope_attention(
            &mut s.att,
            &mut s.q,
            &mut s.k,
            &s.v,
            &mut s.cache,
            l,
            n,
            pos0,
            c,
        )?;
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
        Logits::All => b.norm_matmul(&s.x, &w.rms_final, n, &mut s.xb, classifier),
        Logits::Last => {
            b.copy_row(&mut s.last, &s.x, n - 1, c.dim)?;
            b.norm_matmul(&s.last, &w.rms_final, 1, &mut s.xb, classifier)
        }
    }
}

// ----------------------------------------------------------------------------
// The model as the rest of the program sees it

/// A loaded model that turns tokens into logits, whatever the backend.
/// Generation, chat, perplexity and checks are written against this.
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
}

/// The transformer on backend `B`.
pub struct Transformer<B: Backend> {
    config: Config,
    backend: B,
    weights: Weights<B>,
    state: State<B>,
    batch: usize,
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
        let batch = backend.max_batch().clamp(1, config.seq_len);
        let w = Weights::upload(&mut backend, weights)?;
        let state = State::new(&mut backend, &config, batch)?;
        Ok(Transformer {
            config,
            backend,
            weights: w,
            state,
            batch,
            logits: Vec::new(),
        })
    }

    /// A model of `config`'s shape with random weights built on the backend
    /// (benchmarks: no file, no host copy of a 7B model).
    pub fn synthetic(mut backend: B, config: &Config, seed: u64) -> Result<Self> {
        config.validate()?;
        backend.prepare(config)?;
        let batch = backend.max_batch().clamp(1, config.seq_len);
        let w = Weights::synthetic(&mut backend, config, seed)?;
        let state = State::new(&mut backend, config, batch)?;
        Ok(Transformer {
            config: *config,
            backend,
            weights: w,
            state,
            batch,
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

    fn run_chunk(&mut self, chunk: &[u32], pos0: usize, want: Logits) -> Result<()> {
        let Transformer {
            config,
            backend,
            weights,
            state,
            ..
        } = self;
        backend.step(chunk, pos0, &mut |b| {
            forward(b, config, weights, state, chunk, pos0, want)
        })
    }
}

/// Refuses logits with NaN or infinity (at position `pos`): sampling from
/// them would print one token over and over, or garbage, with no sign that
/// anything went wrong. One pass over the vocabulary per token.
fn check_logits(logits: &[f32], pos: usize) -> Result<()> {
    if logits.iter().all(|l| l.is_finite()) {
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
        for chunk in tokens.chunks(self.batch) {
            self.run_chunk(chunk, pos, Logits::Last)?;
            pos += chunk.len();
        }
        self.logits.resize(v, 0.0);
        self.backend
            .read(&self.state.logits, &mut self.logits[..v])?;
        check_logits(&self.logits[..v], pos - 1)?;
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
            self.backend.read(&self.state.logits, out)?;
            for (i, row) in out.chunks(v).enumerate() {
                check_logits(row, pos + i)?;
            }
            pos += chunk.len();
        }
        Ok(&self.logits)
    }
}
