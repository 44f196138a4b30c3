//! train.py's loop on the CPU: each iteration sets the learning rate from
//! the schedule, runs `gradient_accumulation_steps` micro-batches (their
//! gradients averaged, as train.py's `loss / gradient_accumulation_steps`
//! before `backward`), clips by the global norm and takes an AdamW step.
//! At iteration 0, every `eval_interval` and at the end it estimates the
//! train and val losses and, when val improves (or always), saves
//! `ckpt.bin` and exports `model.bin`.
//!
//! One difference from train.py: it stops after exactly `max_iters` steps
//! (train.py takes one more, unsaved, after its last eval), so a checkpoint
//! at iteration `k` holds the parameters after `k` steps and a resumed run
//! continues from there bit for bit.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::ckpt::{self, TrainState};
use crate::data::{SplitName, TokenData};
use crate::error::{Error, Result};
use crate::model::{backward, forward};
use crate::ops::residual::accumulate;
use crate::optim::clip_grad_norm;
use crate::params::Params;
use crate::rng::Rng;
use crate::schedule::LrSchedule;

/// The loop's settings (train.py's names).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_iters: u64,
    pub schedule: LrSchedule,
    /// 0 disables clipping, as train.py.
    pub grad_clip: f32,
    pub eval_interval: u64,
    pub eval_iters: usize,
    pub eval_only: bool,
    pub always_save_checkpoint: bool,
    /// Log a step line every this many iterations.
    pub log_interval: u64,
    /// Seeds the eval batches (fixed per split, so evals are comparable).
    pub seed: u64,
    pub out_dir: PathBuf,
}

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    Eval {
        iter: u64,
        train: f32,
        val: f32,
        /// Whether ckpt.bin and model.bin were written.
        saved: bool,
    },
    Step {
        iter: u64,
        /// Mean loss over the iteration's micro-batches.
        loss: f32,
        lr: f64,
        grad_norm: f32,
        ms: f64,
        tokens_per_s: f64,
    },
}

/// Totals for the final summary.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub steps: u64,
    pub final_iter: u64,
    pub last_loss: Option<f32>,
    pub best_val: f32,
    pub train_seconds: f64,
    pub tokens: u64,
}

impl Summary {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.train_seconds.max(1e-9)
    }
}

/// Mean loss over `iters` batches of `split`, from a generator seeded by
/// `seed` and the split alone (the same batches at every eval).
pub fn estimate_loss(
    p: &Params,
    data: &TokenData,
    split: SplitName,
    iters: usize,
    batch: usize,
    seed: u64,
) -> Result<f32> {
    let salt = match split {
        SplitName::Train => 0x7472_6169_6e00,
        SplitName::Val => 0x7661_6c00,
    };
    let mut rng = Rng::new(seed ^ salt);
    let mut sum = 0f64;
    for _ in 0..iters {
        let b = data
            .split(split)
            .batch(&mut rng, batch, p.config.seq_len, &p.config)?;
        sum += forward(p, &b).loss as f64;
    }
    Ok((sum / iters as f64) as f32)
}

/// Bytes of the activations one micro-batch of `batch` sequences keeps for
/// the backward (`N = B * T`): per layer six `[N][D]`, two `[N][KV]`,
/// three `[N][H]` and the causal half of the attention probabilities
/// `[B][Hq][T * (T + 1) / 2]`, plus the logits `[N][V]` (which become their
/// own gradient). Saturates instead of overflowing.
pub fn activation_bytes(c: &llama2::Config, batch: usize) -> u64 {
    let (b, t) = (batch as u64, c.seq_len as u64);
    let n = b * t;
    let per_layer = n * (6 * c.dim as u64 + 2 * c.kv_dim() as u64 + 3 * c.hidden_dim as u64)
        + b.saturating_mul(c.n_heads as u64)
            .saturating_mul(t * (t + 1) / 2);
    let floats = per_layer
        .saturating_mul(c.n_layers as u64)
        .saturating_add(n * c.vocab_size as u64);
    floats.saturating_mul(4)
}

/// ckpt.bin and model.bin in `out_dir`.
pub fn ckpt_path(out_dir: &Path) -> PathBuf {
    out_dir.join("ckpt.bin")
}

/// Evaluates at `state.iter`; saves when val improves or always, unless at
/// iteration 0 (train.py never saves the untrained model).
fn eval_and_save(state: &mut TrainState, data: &TokenData, o: &TrainOptions) -> Result<Event> {
    let loss = |s| estimate_loss(&state.params, data, s, o.eval_iters, o.batch_size, o.seed);
    let (train, val) = (loss(SplitName::Train)?, loss(SplitName::Val)?);
    let mut saved = false;
    if val < state.best_val || o.always_save_checkpoint {
        state.best_val = state.best_val.min(val);
        if o.always_save_checkpoint {
            // train.py records the latest val as "best" when saving always.
            state.best_val = val;
        }
        if state.iter > 0 {
            ckpt::save(state, &ckpt_path(&o.out_dir))?;
            ckpt::export_v0(&state.params, &o.out_dir.join("model.bin"))?;
            saved = true;
        }
    }
    Ok(Event::Eval {
        iter: state.iter,
        train,
        val,
        saved,
    })
}

/// One optimizer step: micro-batches, averaged gradients, clip, AdamW.
/// Returns (mean loss, grad norm before clipping).
fn step(state: &mut TrainState, data: &TokenData, o: &TrainOptions, lr: f64) -> Result<(f32, f32)> {
    let p = &state.params;
    let mut grads: Option<Params> = None;
    let mut loss_sum = 0f64;
    for _ in 0..o.gradient_accumulation_steps {
        let b = data
            .train
            .batch(&mut state.rng, o.batch_size, p.config.seq_len, &p.config)?;
        let acts = forward(p, &b);
        loss_sum += acts.loss as f64;
        let g = backward(p, &b, acts);
        match &mut grads {
            None => grads = Some(g),
            Some(sum) => {
                for (s, t) in sum.tensors_mut().into_iter().zip(g.tensors()) {
                    accumulate(s, t);
                }
            }
        }
    }
    let mut grads = grads.expect("at least one micro-step");
    let scale = 1.0 / o.gradient_accumulation_steps as f32;
    if o.gradient_accumulation_steps > 1 {
        for t in grads.tensors_mut() {
            t.iter_mut().for_each(|g| *g *= scale);
        }
    }
    let norm = if o.grad_clip != 0.0 {
        clip_grad_norm(&mut grads, o.grad_clip)
    } else {
        f32::NAN
    };
    state.optimizer.set_lr(lr as f32);
    state.optimizer.step(&mut state.params, &grads);
    Ok((
        (loss_sum / o.gradient_accumulation_steps as f64) as f32,
        norm,
    ))
}

/// Runs the loop from `state.iter` to `max_iters`, reporting through
/// `report`.
pub fn train(
    state: &mut TrainState,
    data: &TokenData,
    o: &TrainOptions,
    mut report: impl FnMut(&Event),
) -> Result<Summary> {
    if o.eval_interval == 0
        || o.eval_iters == 0
        || o.batch_size == 0
        || o.gradient_accumulation_steps == 0
    {
        return Err(Error::Invalid(
            "eval_interval, eval_iters, batch_size and gradient_accumulation_steps must be positive".into(),
        ));
    }
    std::fs::create_dir_all(&o.out_dir).map_err(|e| Error::io(&o.out_dir, e))?;
    let tokens_per_iter =
        (o.batch_size * o.gradient_accumulation_steps * state.params.config.seq_len) as u64;
    let mut summary = Summary::default();
    let mut last_eval = None;
    while state.iter < o.max_iters {
        let lr = o.schedule.lr(state.iter);
        if state.iter.is_multiple_of(o.eval_interval) {
            report(&eval_and_save(state, data, o)?);
            last_eval = Some(state.iter);
        }
        if o.eval_only {
            break;
        }
        let start = Instant::now();
        let (loss, grad_norm) = step(state, data, o, lr)?;
        let secs = start.elapsed().as_secs_f64();
        summary.train_seconds += secs;
        summary.tokens += tokens_per_iter;
        summary.steps += 1;
        summary.last_loss = Some(loss);
        if state.iter.is_multiple_of(o.log_interval.max(1)) {
            report(&Event::Step {
                iter: state.iter,
                loss,
                lr,
                grad_norm,
                ms: secs * 1e3,
                tokens_per_s: tokens_per_iter as f64 / secs.max(1e-9),
            });
        }
        state.iter += 1;
    }
    // The end: one more eval (and save) after the last step, unless done.
    if last_eval != Some(state.iter) && (!o.eval_only || last_eval.is_none()) {
        report(&eval_and_save(state, data, o)?);
    }
    summary.final_iter = state.iter;
    summary.best_val = state.best_val;
    Ok(summary)
}
