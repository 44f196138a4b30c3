//! `llama2 train`: a training run as llama2.c's train.py (`--data DIR
//! --out-dir DIR`, train.py's flags in kebab case), or `--check-against
//! DIR`, which compares our forward, backward and AdamW steps with a PyTorch
//! debug folder. Crate `llama2-train` does the work; this file parses,
//! prints and sets the exit status.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use llama2_train::check::{check_against, DEFAULT_TOLERANCE};
use llama2_train::ckpt::{self, TrainState};
use llama2_train::data::TokenData;
use llama2_train::init::{init_params, ModelArgs};
use llama2_train::schedule::LrSchedule;
use llama2_train::trainer::{self, Event, TrainOptions};
use llama2_train::{AdamW, AdamWConfig};

/// `--tolerance`: a positive finite number.
fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number, found {s:?}")),
    }
}

/// A count that must be at least 1.
fn parse_positive(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(format!("expected a positive whole number, found {s:?}")),
    }
}

/// A finite, non-negative number.
fn parse_non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("expected a number >= 0, found {s:?}")),
    }
}

/// `--dropout`: only 0 is built (our forward has no dropout).
fn parse_dropout(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v == 0.0 => Ok(v),
        Ok(_) => Err("only dropout 0 is supported (train.py's default for pretraining)".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `--threads`: 0 (one per core) up to the library's limit.
fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n <= llama2::cpu::MAX_THREADS => Ok(n),
        _ => Err(format!("expected 0 to {}", llama2::cpu::MAX_THREADS)),
    }
}

/// train.py's `init_from`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum InitFrom {
    /// A new model, initialized as model.py.
    Scratch,
    /// Everything from OUT_DIR/ckpt.bin (model, optimizer, iteration, RNG).
    Resume,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A training debug folder from llama2.c's model.py (model.bin,
    /// state.json, tensors.bin): check our loss, logits, gradients and
    /// AdamW steps against it instead of training.
    #[arg(long, value_name = "DIR", conflicts_with = "data")]
    pub check_against: Option<PathBuf>,
    /// Largest relative difference accepted for the loss, logits,
    /// gradients and step losses (--check-against only).
    #[arg(long, default_value_t = DEFAULT_TOLERANCE, value_parser = parse_tolerance)]
    pub tolerance: f64,
    /// Directory of pretokenized *.bin shards (little-endian uint16 ids);
    /// the first by name is validation (a lone shard: its last 10%).
    #[arg(long, value_name = "DIR", required_unless_present = "check_against")]
    pub data: Option<PathBuf>,
    /// Where ckpt.bin and model.bin go.
    #[arg(long, value_name = "DIR", default_value = "out")]
    pub out_dir: PathBuf,
    #[arg(long, default_value_t = 32, value_parser = parse_positive)]
    pub batch_size: u64,
    #[arg(long, default_value_t = 256, value_parser = parse_positive)]
    pub max_seq_len: u64,
    #[arg(long, default_value_t = 32000, value_parser = parse_positive)]
    pub vocab_size: u64,
    #[arg(long, default_value_t = 288, value_parser = parse_positive)]
    pub dim: u64,
    #[arg(long, default_value_t = 6, value_parser = parse_positive)]
    pub n_layers: u64,
    #[arg(long, default_value_t = 6, value_parser = parse_positive)]
    pub n_heads: u64,
    #[arg(long, default_value_t = 6, value_parser = parse_positive)]
    pub n_kv_heads: u64,
    /// The feed-forward width is int(8 * dim / 3) rounded up to this.
    #[arg(long, default_value_t = 32, value_parser = parse_positive)]
    pub multiple_of: u64,
    /// Must be 0.
    #[arg(long, default_value_t = 0.0, value_parser = parse_dropout)]
    pub dropout: f64,
    #[arg(long, default_value_t = 4, value_parser = parse_positive)]
    pub gradient_accumulation_steps: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 5e-4, value_parser = parse_non_negative)]
    pub learning_rate: f64,
    /// Optimizer steps in all (a resumed run continues up to this).
    #[arg(long, default_value_t = 100_000)]
    pub max_iters: u64,
    #[arg(long, default_value_t = 0.1, value_parser = parse_non_negative)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0.9, value_parser = parse_non_negative)]
    pub beta1: f64,
    #[arg(long, default_value_t = 0.95, value_parser = parse_non_negative)]
    pub beta2: f64,
    /// Clip gradients to this global L2 norm; 0 disables.
    #[arg(long, default_value_t = 1.0, value_parser = parse_non_negative)]
    pub grad_clip: f64,
    /// Warmup then cosine decay (the default); --no-decay-lr keeps it flat.
    #[arg(long, overrides_with = "no_decay_lr")]
    pub decay_lr: bool,
    #[arg(long, overrides_with = "decay_lr")]
    pub no_decay_lr: bool,
    #[arg(long, default_value_t = 1000)]
    pub warmup_iters: u64,
    /// Where the cosine reaches --min-lr [default: --max-iters].
    #[arg(long)]
    pub lr_decay_iters: Option<u64>,
    #[arg(long, default_value_t = 0.0, value_parser = parse_non_negative)]
    pub min_lr: f64,
    #[arg(long, default_value_t = 2000, value_parser = parse_positive)]
    pub eval_interval: u64,
    /// Batches per split in each eval.
    #[arg(long, default_value_t = 100, value_parser = parse_positive)]
    pub eval_iters: u64,
    /// Evaluate once and stop.
    #[arg(long)]
    pub eval_only: bool,
    /// Save at every eval, not only when val improves.
    #[arg(long)]
    pub always_save_checkpoint: bool,
    /// Print a step line every this many iterations.
    #[arg(long, default_value_t = 1, value_parser = parse_positive)]
    pub log_interval: u64,
    #[arg(long, value_enum, default_value_t = InitFrom::Scratch)]
    pub init_from: InitFrom,
    /// Seeds the init, the batches and the eval batches.
    #[arg(long, default_value_t = 1337)]
    pub seed: u64,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0, value_parser = parse_threads)]
    pub threads: usize,
}

/// `llama2 train`.
pub fn train(args: &TrainArgs) -> Result<()> {
    if let Some(dir) = &args.check_against {
        return check(dir, args.tolerance);
    }
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global()
            .context("setting up the thread pool")?;
    }
    run(args)
}

fn check(dir: &std::path::Path, tolerance: f64) -> Result<()> {
    let report = check_against(dir, tolerance)?;
    println!("{report}");
    if !report.passed() {
        bail!(
            "the check against {} failed: {} values over the tolerance {:e} (listed above)",
            dir.display(),
            report.failures().len(),
            tolerance
        );
    }
    Ok(())
}

fn adam_config(a: &TrainArgs) -> AdamWConfig {
    AdamWConfig {
        lr: a.learning_rate as f32,
        beta1: a.beta1 as f32,
        beta2: a.beta2 as f32,
        eps: 1e-8,
        weight_decay: a.weight_decay as f32,
    }
}

/// A new model, or everything from ckpt.bin on resume (whose model shape
/// wins over the flags, as train.py's resume).
fn initial_state(a: &TrainArgs) -> Result<TrainState> {
    if a.init_from == InitFrom::Resume {
        let path = trainer::ckpt_path(&a.out_dir);
        let state = ckpt::load(&path, adam_config(a))?;
        eprintln!(
            "resuming from {} at iteration {}",
            path.display(),
            state.iter
        );
        return Ok(state);
    }
    let u = |v: u64| v as usize;
    let config = ModelArgs {
        dim: u(a.dim),
        n_layers: u(a.n_layers),
        n_heads: u(a.n_heads),
        n_kv_heads: u(a.n_kv_heads),
        vocab_size: u(a.vocab_size),
        multiple_of: u(a.multiple_of),
        max_seq_len: u(a.max_seq_len),
    }
    .config()?;
    let params = init_params(&config, a.seed);
    Ok(TrainState {
        optimizer: AdamW::new(adam_config(a), &params),
        params,
        iter: 0,
        best_val: f32::INFINITY,
        rng: llama2_train::rng::Rng::new(a.seed.wrapping_add(1)),
    })
}

fn run(a: &TrainArgs) -> Result<()> {
    let dir = a.data.as_ref().expect("clap requires --data");
    llama2_train::heap::keep_freed_memory();
    let mut state = initial_state(a)?;
    let c = state.params.config;
    let data = TokenData::load(dir, c.vocab_size, c.seq_len)?;
    check_memory(&c, a.batch_size as usize)?;
    let n_params: usize = state.params.tensors().iter().map(|t| t.len()).sum();
    eprintln!(
        "model: dim {} hidden {} layers {} heads {}/{} vocab {} seq {} ({n_params} parameters); \
         data: {} train / {} val tokens",
        c.dim,
        c.hidden_dim,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.vocab_size,
        c.seq_len,
        data.train.tokens(),
        data.val.tokens()
    );
    let options = TrainOptions {
        batch_size: a.batch_size as usize,
        gradient_accumulation_steps: a.gradient_accumulation_steps as usize,
        max_iters: a.max_iters,
        schedule: LrSchedule {
            learning_rate: a.learning_rate,
            decay_lr: !a.no_decay_lr,
            warmup_iters: a.warmup_iters,
            lr_decay_iters: a.lr_decay_iters.unwrap_or(a.max_iters),
            min_lr: a.min_lr,
        },
        grad_clip: a.grad_clip as f32,
        eval_interval: a.eval_interval,
        eval_iters: a.eval_iters as usize,
        eval_only: a.eval_only,
        always_save_checkpoint: a.always_save_checkpoint,
        log_interval: a.log_interval,
        seed: a.seed,
        out_dir: a.out_dir.clone(),
    };
    let summary = trainer::train(&mut state, &data, &options, print_event)?;
    let gflops = 6.0 * n_params as f64 * summary.tokens_per_s() / 1e9;
    println!(
        "done: {} steps to iteration {} in {:.1}s, {:.0} tokens/s ({gflops:.2} GFLOP/s as 6 * params * tokens/s); \
         last loss {}, best val {:.4}",
        summary.steps,
        summary.final_iter,
        summary.train_seconds,
        summary.tokens_per_s(),
        summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.best_val
    );
    Ok(())
}

/// Refuses a shape whose kept activations exceed 3/4 of the machine's
/// memory (from /proc/meminfo; skipped where that cannot be read), since
/// the allocation would otherwise abort the process.
fn check_memory(c: &llama2::Config, batch: usize) -> Result<()> {
    let need = trainer::activation_bytes(c, batch);
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_owned();
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    if let Some(kib) = total_kib {
        let limit = kib * 1024 / 4 * 3;
        if need > limit {
            bail!(
                "one micro-batch keeps about {:.1} GiB of activations for the backward, more than \
                 3/4 of this machine's {:.1} GiB; lower --batch-size or --max-seq-len",
                need as f64 / (1u64 << 30) as f64,
                (kib * 1024) as f64 / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

/// train.py's log lines.
fn print_event(e: &Event) {
    match e {
        Event::Eval { iter, train, val, saved } => {
            let note = if *saved { ", saved ckpt.bin and model.bin" } else { "" };
            println!("step {iter}: train loss {train:.4}, val loss {val:.4}{note}");
        }
        Event::Step { iter, loss, lr, grad_norm, ms, tokens_per_s } => println!(
            "{iter} | loss {loss:.4} | lr {lr:.3e} | grad norm {grad_norm:.4} | {ms:.2}ms | {tokens_per_s:.0} tokens/s"
        ),
    }
}
