//! The engine: one thread that owns the model and runs continuous batching.
//! Each loop takes new jobs from the queue, admits as many as the sequence
//! and KV limits allow, forms one step from every running sequence (one
//! decode row each, then prompt chunks in the rows left: chunked prefill),
//! runs it with `forward_batch`, samples each sequence that finished its
//! input, and sends the text to the job's HTTP handler. A job whose handler
//! has gone (the client disconnected) is dropped and its KV cache freed at
//! the next step.
//!
//! It knows nothing of HTTP: jobs come in as token ids with settings, and
//! leave as `Event`s on a channel.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use llama2::cpu::KV_BLOCK;
use llama2::sampling::{SequenceSampler, StopMatcher};
use llama2::tokenizer::Utf8Stream;
use llama2::{Chunk, Config, LanguageModel, SequenceId, Tokenizer};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{FinishReason, Settings};
use crate::metrics::Metrics;
use crate::Shared;

/// A request as the engine sees it.
pub struct Job {
    pub prompt: Vec<u32>,
    pub settings: Settings,
    pub events: UnboundedSender<Event>,
    /// When the HTTP handler received it, for time to first token.
    pub received: Instant,
    /// Whether the client reads tokens as they come. A job that is not
    /// streamed gets its tokens with `Done`: one wake-up of its HTTP task
    /// per request instead of one per token, which on a small machine
    /// took the cores the decode needs (single-stream non-streaming
    /// requests at 0.84x the CLI's rate on the 2-core Zen 4).
    pub streamed: bool,
}

/// What the engine sends back for a job.
#[derive(Debug)]
pub enum Event {
    /// One generated token and the text it releases (maybe empty: part of a
    /// character or of a possible stop string).
    Token(Piece),
    /// The last event of a job that ran to its end.
    Done {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// A job that is not streamed: all its tokens, in order.
        held: Vec<Piece>,
    },
    /// The last event of a job that failed.
    Failed(String),
}

#[derive(Debug)]
pub struct Piece {
    pub text: String,
    pub token: u32,
    /// The token's log-probability and the most likely alternatives, when
    /// the request asked for them.
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(u32, f32)>,
}

/// The engine's limits, from the command line.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Sequences running at once.
    pub parallel: usize,
    /// KV cache blocks (`KV_BLOCK` positions each) all sequences share.
    pub kv_blocks: usize,
}

/// A running job.
struct Active {
    job: Job,
    seq: SequenceId,
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions already run through the model.
    fed: usize,
    /// The length at which generation stops (`max_tokens` or the context).
    limit: usize,
    /// KV blocks reserved for it: enough for `limit` positions.
    blocks: usize,
    sampler: SequenceSampler,
    stop: StopMatcher,
    utf8: Utf8Stream,
    sent_first: bool,
    /// Tokens of a job that is not streamed, kept for `Done`.
    held: Vec<Piece>,
}

pub struct Engine {
    model: Box<dyn LanguageModel>,
    tokenizer: Arc<Tokenizer>,
    limits: Limits,
    shared: Arc<Shared>,
    waiting: VecDeque<Job>,
    running: Vec<Active>,
    /// KV blocks reserved by running jobs.
    reserved: usize,
}

/// KV blocks a sequence of `positions` positions takes.
pub fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(KV_BLOCK)
}

/// The length at which a request stops (its prompt plus `max_tokens`, at
/// most the context) and the KV blocks reserved for it.
pub fn reservation(prompt: usize, max_tokens: Option<usize>, seq_len: usize) -> (usize, usize) {
    let limit = prompt
        .saturating_add(max_tokens.unwrap_or(usize::MAX))
        .min(seq_len);
    (limit, blocks_for(limit))
}

impl Engine {
    pub fn new(
        model: Box<dyn LanguageModel>,
        tokenizer: Arc<Tokenizer>,
        limits: Limits,
        shared: Arc<Shared>,
    ) -> Self {
        let parallel = limits.parallel.clamp(1, model.max_sequences());
        shared
            .metrics
            .kv_blocks_total
            .store(limits.kv_blocks, Ordering::Relaxed);
        Engine {
            model,
            tokenizer,
            limits: Limits { parallel, ..limits },
            shared,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
        }
    }

    /// Serves jobs until the queue's senders are all gone and every job has
    /// finished.
    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = jobs.try_recv() {
                self.waiting.push_back(job);
            }
            if self.shared.cancel_all.load(Ordering::Relaxed) {
                self.cancel_all();
            }
            self.drop_disconnected();
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                self.step();
                // Gauges are true also when this step ended the last job
                // and the loop now waits for the next.
                self.publish();
            }
        }
    }

    /// Ends every job with an error: the server is shutting down and its
    /// grace period is over.
    fn cancel_all(&mut self) {
        for job in self.waiting.drain(..) {
            self.shared.pending.fetch_sub(1, Ordering::Relaxed);
            let _ = job
                .events
                .send(Event::Failed("the server is shutting down".into()));
        }
        for i in (0..self.running.len()).rev() {
            let a = self.finish(i);
            let _ = a
                .job
                .events
                .send(Event::Failed("the server is shutting down".into()));
        }
    }

    /// Forgets jobs whose clients have gone, freeing their caches.
    fn drop_disconnected(&mut self) {
        let before = self.waiting.len();
        self.waiting.retain(|j| !j.events.is_closed());
        let gone = before - self.waiting.len();
        self.shared.pending.fetch_sub(gone, Ordering::Relaxed);
        for i in (0..self.running.len()).rev() {
            if self.running[i].job.events.is_closed() {
                self.finish(i);
                self.shared
                    .metrics
                    .cancelled
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Starts waiting jobs, first come first served, while a sequence slot
    /// and the KV blocks for their whole length are free (so no running
    /// sequence ever has to be evicted).
    fn admit(&mut self) {
        let seq_len = self.model.config().seq_len;
        while self.running.len() < self.limits.parallel {
            let Some(job) = self.waiting.front() else {
                break;
            };
            let (limit, blocks) = reservation(job.prompt.len(), job.settings.max_tokens, seq_len);
            if blocks > self.limits.kv_blocks {
                let job = self.pop_waiting();
                let _ = job.events.send(Event::Failed(format!(
                    "the request needs {blocks} KV cache blocks of {KV_BLOCK} positions and the \
                     server has {} in all: lower max_tokens or start the server with a larger \
                     --kv-cache",
                    self.limits.kv_blocks
                )));
                continue;
            }
            if self.reserved + blocks > self.limits.kv_blocks {
                break;
            }
            let job = self.pop_waiting();
            match self.model.new_sequence() {
                Ok(seq) => {
                    self.reserved += blocks;
                    let sampler = SequenceSampler::new(&job.settings.params, &job.prompt);
                    let stop = StopMatcher::new(job.settings.stops.clone());
                    self.shared
                        .metrics
                        .prompt_tokens
                        .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
                    self.running.push(Active {
                        tokens: job.prompt.clone(),
                        prompt_len: job.prompt.len(),
                        fed: 0,
                        limit,
                        blocks,
                        seq,
                        sampler,
                        stop,
                        utf8: Utf8Stream::new(),
                        sent_first: false,
                        held: Vec::new(),
                        job,
                    });
                }
                Err(e) => {
                    let _ = job
                        .events
                        .send(Event::Failed(format!("cannot start a sequence: {e}")));
                }
            }
        }
    }

    fn pop_waiting(&mut self) -> Job {
        self.shared.pending.fetch_sub(1, Ordering::Relaxed);
        self.waiting.pop_front().expect("checked by the caller")
    }

    /// Which rows of which sequences the next step runs: one decode row for
    /// every sequence that has all its tokens but the last run, then prompt
    /// chunks of the others in admission order, within the batch limits.
    fn plan(&self) -> Vec<(usize, std::ops::Range<usize>)> {
        let mut rows = self.model.max_batch();
        let max_chunks = self.model.max_sequences();
        let decoding = |a: &Active| a.tokens.len() - a.fed == 1;
        let order = (0..self.running.len())
            .filter(|&i| decoding(&self.running[i]))
            .chain((0..self.running.len()).filter(|&i| !decoding(&self.running[i])));
        let mut plan = Vec::new();
        for i in order {
            if rows == 0 || plan.len() == max_chunks {
                break;
            }
            let a = &self.running[i];
            let n = (a.tokens.len() - a.fed).min(rows);
            plan.push((i, a.fed..a.fed + n));
            rows -= n;
        }
        plan
    }

    /// Runs one step and handles its results.
    fn step(&mut self) {
        let plan = self.plan();
        let started = Instant::now();
        let chunks: Vec<Chunk> = plan
            .iter()
            .map(|(i, r)| {
                let a = &self.running[*i];
                Chunk {
                    sequence: a.seq,
                    tokens: &a.tokens[r.clone()],
                    pos0: r.start,
                }
            })
            .collect();
        let rows: usize = plan.iter().map(|(_, r)| r.len()).sum();
        let config = *self.model.config();
        let vocab = config.vocab_size;
        let logits = match self.model.forward_batch(&chunks) {
            Ok(l) => l,
            Err(e) => {
                let message = format!("the model failed: {e}");
                for i in plan_indices_desc(&plan) {
                    let a = self.finish(i);
                    let _ = a.job.events.send(Event::Failed(message.clone()));
                }
                return;
            }
        };
        let mut generated = 0;
        let mut finished = Vec::new();
        for ((i, r), row) in plan.iter().zip(logits.chunks_mut(vocab)) {
            let a = &mut self.running[*i];
            a.fed = r.end;
            if a.fed < a.tokens.len() {
                continue;
            }
            generated += 1;
            let (tok, m) = (&self.tokenizer, &self.shared.metrics);
            if let Some(reason) = advance(a, (tok, &config, m), row) {
                finished.push((*i, reason));
            }
        }
        let m = &self.shared.metrics;
        m.observe_step(rows, generated, started.elapsed());
        finished.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (i, reason) in finished {
            let a = self.finish(i);
            let completion_tokens = a.tokens.len() - a.prompt_len;
            let _ = a.job.events.send(Event::Done {
                reason,
                prompt_tokens: a.prompt_len,
                completion_tokens,
                held: a.held,
            });
        }
    }

    /// Removes running job `i`, freeing its sequence and blocks.
    fn finish(&mut self, i: usize) -> Active {
        let a = self.running.swap_remove(i);
        self.model.free_sequence(a.seq);
        self.reserved -= a.blocks;
        a
    }

    /// Publishes the gauges.
    fn publish(&self) {
        let m = &self.shared.metrics;
        let used: usize = self.running.iter().map(|a| blocks_for(a.fed)).sum();
        m.kv_blocks_used.store(used, Ordering::Relaxed);
        m.running.store(self.running.len(), Ordering::Relaxed);
        m.queue_depth.store(
            self.shared.pending.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if self.running.is_empty() {
            m.idle();
        }
    }
}

/// Indices of a plan's jobs, highest first (so `swap_remove` keeps the
/// others' indices valid).
fn plan_indices_desc(plan: &[(usize, std::ops::Range<usize>)]) -> Vec<usize> {
    let mut v: Vec<usize> = plan.iter().map(|(i, _)| *i).collect();
    v.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
    v
}

/// Samples job `a`'s next token from `logits`, sends its text, and says
/// whether the job has ended.
fn advance(
    a: &mut Active,
    (tok, c, m): (&Tokenizer, &Config, &Metrics),
    logits: &mut [f32],
) -> Option<FinishReason> {
    let sampled = a.sampler.sample(logits);
    let token = sampled.token;
    let prev = *a.tokens.last().expect("prompts hold a token");
    a.tokens.push(token);
    if !a.job.settings.ignore_eos && (token == c.bos || c.eos.contains(token)) {
        // The end token itself prints nothing; what stop strings held back
        // was no stop after all.
        let text = a.stop.finish();
        send_token(a, m, text, &sampled);
        return Some(FinishReason::Stop);
    }
    let mut bytes = Vec::new();
    a.utf8.push(tok.decode(prev, token), &mut bytes);
    let (mut text, hit) = a.stop.push(&String::from_utf8_lossy(&bytes));
    if hit {
        send_token(a, m, text, &sampled);
        return Some(FinishReason::Stop);
    }
    let full = a.tokens.len() >= a.limit;
    if full {
        text.push_str(&a.stop.finish());
    }
    send_token(a, m, text, &sampled);
    full.then_some(FinishReason::Length)
}

fn send_token(a: &mut Active, m: &Metrics, text: String, sampled: &llama2::sampling::Sampled) {
    if !a.sent_first {
        a.sent_first = true;
        m.observe_first_token(a.job.received.elapsed());
    }
    let piece = Piece {
        text,
        token: sampled.token,
        logprob: sampled.logprob,
        top_logprobs: sampled.top_logprobs.clone(),
    };
    match a.job.streamed {
        true => {
            let _ = a.job.events.send(Event::Token(piece));
        }
        false => a.held.push(piece),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_stop_at_the_context_even_without_max_tokens() {
        assert_eq!(reservation(5, None, 512), (512, 32));
        assert_eq!(reservation(5, Some(usize::MAX), 512), (512, 32));
        assert_eq!(reservation(5, Some(10), 512), (15, 1));
        assert_eq!(reservation(5, Some(12), 512), (17, 2));
    }
}
