//! Sampling beyond llama2.c: per-request settings (`SamplingParams`), a
//! per-sequence sampler with top-k, min-p and repetition/frequency/presence
//! penalties plus log-probabilities (`SequenceSampler`), and stop strings
//! that may span several tokens (`StopMatcher`). With only temperature,
//! top-p and seed set, `SequenceSampler` is llama2.c's `Sampler` itself, so
//! the default stays bit for bit run.c's.

use std::collections::{HashMap, HashSet};

use crate::sampler::{argmax, overflows, sort_until_mass, Rng, Sampler};

/// The most alternatives `top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Per-request sampling settings. Default = llama2.c's behaviour
/// (temperature 1, top_p 0.9, everything else off).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass; outside (0, 1) = off, as llama2.c.
    pub top_p: f32,
    /// Keep only the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// 0 = off; keep tokens with p >= min_p * p_max.
    pub min_p: f32,
    /// 1 = off; CTRL/Hugging Face style: logit > 0 ? logit / r : logit * r,
    /// for every token seen in the prompt or generated so far.
    pub repetition_penalty: f32,
    /// 0 = off; OpenAI: logit -= f * count(token in generated tokens).
    pub frequency_penalty: f32,
    /// 0 = off; OpenAI: logit -= p * (count > 0) over generated tokens.
    pub presence_penalty: f32,
    /// The xorshift generator's start state, as run.c's `-s`. Seed 0 is
    /// xorshift's fixed point (every draw is 0, so sampling always takes
    /// the first candidate): pick a nonzero seed for random text.
    pub seed: u64,
    /// None = no logprobs; Some(n) = the chosen token's logprob and the n
    /// most likely (n <= 20).
    pub top_logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            top_logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Checks every field; the error names the field, what was expected
    /// and what was found.
    pub fn validate(&self) -> Result<(), String> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(format!(
                "temperature must be a finite number >= 0 (0 = greedy), found {t}"
            ));
        }
        if self.top_p.is_nan() {
            return Err("top_p must be a number (outside (0, 1) turns it off), found NaN".into());
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            return Err(format!(
                "min_p must be between 0 and 1 (0 = off), found {m}"
            ));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(format!(
                "repetition_penalty must be a finite number > 0 (1 = off), found {r}"
            ));
        }
        check_openai_penalty("frequency_penalty", self.frequency_penalty)?;
        check_openai_penalty("presence_penalty", self.presence_penalty)?;
        match self.top_logprobs {
            Some(n) if n > MAX_TOP_LOGPROBS => Err(format!(
                "top_logprobs must be at most {MAX_TOP_LOGPROBS}, found {n}"
            )),
            _ => Ok(()),
        }
    }

    /// Whether only llama2.c's settings are in use, so that llama2.c's
    /// `Sampler` does the sampling.
    fn is_llama2c(&self) -> bool {
        self.top_k == 0
            && self.min_p == 0.0
            && self.repetition_penalty == 1.0
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
    }
}

/// OpenAI's range for its two penalties.
fn check_openai_penalty(name: &str, v: f32) -> Result<(), String> {
    if (-2.0..=2.0).contains(&v) {
        Ok(())
    } else {
        Err(format!(
            "{name} must be between -2 and 2 (0 = off), found {v}"
        ))
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// The chosen token's logprob, when `top_logprobs` was asked for.
    pub logprob: Option<f32>,
    /// The most likely tokens and their logprobs, most likely first (ties:
    /// lower id first); empty unless `top_logprobs` was asked for.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Something that picks the next token: llama2.c's `Sampler` or a
/// `SequenceSampler`. The generation loops take either.
pub trait NextToken {
    /// Picks the next token from `logits` (which it may overwrite) and
    /// records it as generated.
    fn next_token(&mut self, logits: &mut [f32]) -> u32;

    /// Tokens fed to the model as prompt (e.g. a chat turn), for penalties
    /// that count them.
    fn feed_prompt(&mut self, _tokens: &[u32]) {}

    /// Samples a token that will be thrown away (run.c's chat samples at
    /// every prompt position): it draws from the generator as
    /// `next_token` does but is not recorded as generated.
    fn sample_discarded(&mut self, logits: &mut [f32]) -> u32 {
        self.next_token(logits)
    }
}

impl NextToken for Sampler {
    fn next_token(&mut self, logits: &mut [f32]) -> u32 {
        self.sample(logits)
    }
}

/// How a `SequenceSampler` picks tokens.
enum Engine {
    /// llama2.c's sampler, untouched.
    Llama2c(Sampler),
    /// The extended pipeline, with its own generator and candidate buffer.
    Extended {
        rng: Rng,
        candidates: Vec<(f32, u32)>,
    },
}

/// Tokens seen so far, for the penalties.
#[derive(Default)]
struct History {
    /// Times each token was generated.
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt or generated (the repetition penalty's set).
    seen: HashSet<u32>,
}

/// A sampler for one sequence: llama2.c's `Sampler` when only
/// temperature/top_p/seed are set (bit-identical, same RNG draws), the
/// extended pipeline otherwise.
///
/// The extended pipeline, in order: penalties (repetition, frequency,
/// presence); then temperature 0 is argmax, else temperature, top-k,
/// softmax, min-p, top-p (llama2.c's nucleus: most likely first, cut after
/// the running sum first exceeds p), and a multinomial draw with one
/// `next_f32` from the same xorshift generator.
///
/// Logprobs are the natural-log softmax of the logits after the penalties,
/// before temperature and truncation: what the model (with the penalties)
/// says, independent of how the token was then drawn.
pub struct SequenceSampler {
    params: SamplingParams,
    engine: Engine,
    history: History,
    /// The penalized logits, kept for the chosen token's logprob (the
    /// sampler overwrites its input).
    saved: Vec<f32>,
    /// Scratch for the top-logprobs selection.
    ranked: Vec<(f32, u32)>,
}

impl SequenceSampler {
    /// A sampler with `params` (used as given: call `validate` first);
    /// `prompt` tokens count for repetition_penalty only.
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        let engine = if params.is_llama2c() {
            Engine::Llama2c(Sampler::new(params.temperature, params.top_p, params.seed))
        } else {
            Engine::Extended {
                rng: Rng::new(params.seed),
                candidates: Vec::new(),
            }
        };
        let mut s = SequenceSampler {
            params: params.clone(),
            engine,
            history: History::default(),
            saved: Vec::new(),
            ranked: Vec::new(),
        };
        s.add_prompt(prompt);
        s
    }

    /// The settings this sampler was made with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// More prompt tokens (a later chat turn): they count for
    /// repetition_penalty, as the first prompt does.
    pub fn add_prompt(&mut self, tokens: &[u32]) {
        for &t in tokens {
            self.history.seen.insert(t);
        }
    }

    /// Picks the next token from `logits` (may overwrite them) and records
    /// it in the history.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        let s = self.pick(logits);
        *self.history.generated.entry(s.token).or_insert(0) += 1;
        self.history.seen.insert(s.token);
        s
    }

    /// `sample` without recording the token.
    fn pick(&mut self, logits: &mut [f32]) -> Sampled {
        if logits.is_empty() {
            return Sampled {
                token: 0,
                logprob: None,
                top_logprobs: Vec::new(),
            };
        }
        self.apply_penalties(logits);
        let want_logprobs = self.params.top_logprobs;
        if want_logprobs.is_some() {
            self.saved.clear();
            self.saved.extend_from_slice(logits);
        }
        let token = match &mut self.engine {
            Engine::Llama2c(sampler) => sampler.sample(logits),
            Engine::Extended { rng, candidates } => {
                extended_pick(&self.params, logits, rng, candidates)
            }
        };
        let (logprob, top_logprobs) = match want_logprobs {
            Some(n) => {
                let lse = log_sum_exp(&self.saved);
                let top = top_logprobs(&self.saved, n, lse, &mut self.ranked);
                (Some(self.saved[token as usize] - lse), top)
            }
            None => (None, Vec::new()),
        };
        Sampled {
            token,
            logprob,
            top_logprobs,
        }
    }

    /// The repetition penalty over prompt and generated tokens, then the
    /// frequency and presence penalties over generated ones. Each touches
    /// only the tokens seen, not the whole vocabulary.
    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        let r = p.repetition_penalty;
        if r != 1.0 {
            for &t in &self.history.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / r } else { *l * r };
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &count) in &self.history.generated {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * count as f32 + p.presence_penalty;
                }
            }
        }
    }
}

impl NextToken for SequenceSampler {
    fn next_token(&mut self, logits: &mut [f32]) -> u32 {
        self.sample(logits).token
    }

    fn feed_prompt(&mut self, tokens: &[u32]) {
        self.add_prompt(tokens);
    }

    fn sample_discarded(&mut self, logits: &mut [f32]) -> u32 {
        self.pick(logits).token
    }
}

/// Descending by value, lower id first on ties: a total order, so every
/// selection below is deterministic and top-k 1 is argmax.
fn most_likely_first(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The extended pipeline after the penalties (see `SequenceSampler`).
fn extended_pick(
    p: &SamplingParams,
    logits: &[f32],
    rng: &mut Rng,
    candidates: &mut Vec<(f32, u32)>,
) -> u32 {
    let t = p.temperature;
    if t == 0.0 || overflows(logits, t) {
        return argmax(logits);
    }
    let coin = rng.next_f32();
    candidates.clear();
    candidates.extend(logits.iter().enumerate().map(|(i, &l)| (l / t, i as u32)));
    keep_top_k(candidates, p.top_k);
    softmax_candidates(candidates);
    keep_min_p(candidates, p.min_p);
    if candidates.is_empty() {
        // Only NaN probabilities fail every filter: a broken model.
        return argmax(logits);
    }
    if p.top_p > 0.0 && p.top_p < 1.0 {
        nucleus(candidates, p.top_p, coin)
    } else {
        // The candidates are normalized, so the coin is used as run.c
        // uses it: with nothing cut away this is run.c's draw exactly.
        draw(candidates, coin)
    }
}

/// Keeps the `k` largest (all when k is 0 or at least their number), by
/// selection rather than a sort.
fn keep_top_k(c: &mut Vec<(f32, u32)>, k: usize) {
    if k > 0 && k < c.len() {
        c.select_nth_unstable_by(k - 1, most_likely_first);
        c.truncate(k);
    }
}

/// Softmax over the candidates' values, as run.c computes it.
fn softmax_candidates(c: &mut [(f32, u32)]) {
    let max = c.iter().fold(f32::NEG_INFINITY, |m, x| m.max(x.0));
    let mut sum = 0f32;
    for x in c.iter_mut() {
        x.0 = (x.0 - max).exp();
        sum += x.0;
    }
    for x in c.iter_mut() {
        x.0 /= sum;
    }
}

/// Drops tokens below `min_p` times the top probability and renormalizes,
/// so that top-p then measures mass among the survivors.
fn keep_min_p(c: &mut Vec<(f32, u32)>, min_p: f32) {
    if min_p <= 0.0 {
        return;
    }
    let p_max = c.iter().fold(0f32, |m, x| m.max(x.0));
    let threshold = min_p * p_max;
    c.retain(|x| x.0 >= threshold);
    let sum: f32 = c.iter().map(|x| x.0).sum();
    for x in c.iter_mut() {
        x.0 /= sum;
    }
}

/// llama2.c's top-p over the candidates: most likely first, cut after the
/// running sum first exceeds `top_p`, draw within the cut.
fn nucleus(c: &mut [(f32, u32)], top_p: f32, coin: f32) -> u32 {
    let kept = sort_until_mass(c, top_p);
    let mut cumulative = 0f32;
    let mut last = kept.len() - 1;
    for (i, &(p, _)) in kept.iter().enumerate() {
        cumulative += p;
        if cumulative > top_p {
            last = i;
            break;
        }
    }
    draw(&kept[..=last], coin * cumulative)
}

/// The first candidate whose cumulative probability exceeds `r`, or the
/// last one.
fn draw(c: &[(f32, u32)], r: f32) -> u32 {
    let mut cdf = 0f32;
    for &(p, id) in c {
        cdf += p;
        if r < cdf {
            return id;
        }
    }
    c[c.len() - 1].1
}

/// ln(sum(exp(x))), shifted by the maximum so that it cannot overflow, and
/// summed in f64 so that 32000 small terms do not lose the tail.
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The `n` most likely tokens with their logprobs, most likely first.
fn top_logprobs(
    logits: &[f32],
    n: usize,
    lse: f32,
    ranked: &mut Vec<(f32, u32)>,
) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    ranked.clear();
    ranked.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
    keep_top_k(ranked, n);
    ranked.sort_unstable_by(most_likely_first);
    ranked.iter().map(|&(l, id)| (id, l - lse)).collect()
}

/// Stop strings that may span several tokens: text is pushed as it is
/// decoded; what is safe to emit comes out, text that could be the start of
/// a stop string is held back.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet emitted: at most a possible start of a stop string.
    held: String,
    stopped: bool,
}

impl StopMatcher {
    /// A matcher for `stops`; empty strings are ignored (they would match
    /// before any text).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Returns (text to emit now, whether a stop string was hit). On a
    /// hit, the emitted text ends just before the stop string; after it,
    /// nothing more is emitted.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(text);
        if let Some(at) = self.first_stop() {
            self.held.truncate(at);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        let keep = self.possible_start();
        let emit = self.held[..self.held.len() - keep].to_owned();
        self.held.drain(..self.held.len() - keep);
        (emit, false)
    }

    /// Text still held back when generation ends without a stop.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.held)
    }

    /// Where the earliest stop string starts in the held text.
    fn first_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// The length of the longest end of the held text that is a proper
    /// beginning of some stop string (0 if none).
    fn possible_start(&self) -> usize {
        let held = self.held.as_bytes();
        self.stops
            .iter()
            .filter_map(|s| {
                (1..s.len().min(held.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && held.ends_with(&s.as_bytes()[..k]))
            })
            .max()
            .unwrap_or(0)
    }
}
