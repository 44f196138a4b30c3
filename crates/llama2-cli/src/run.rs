//! The llama2.c-compatible commands: generation and chat (the top level) and
//! `tokenize`. Flags are clamped here exactly as run.c clamps them.

use std::io::{self, BufWriter, Write};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use llama2::checkpoint;
use llama2::generate::{self, ChatInput};
use llama2::sampler::Sampler;
use llama2::tokenizer::Printing;

use crate::args::{Mode, RunArgs, TokenizeArgs};
use crate::device;

/// run.c's clamping of odd flag values.
struct Settings {
    temperature: f32,
    topp: f32,
    seed: u64,
    steps: usize,
}

fn clamp(args: &RunArgs, seq_len: usize) -> Settings {
    let temperature = if args.temperature < 0.0 {
        0.0
    } else {
        args.temperature
    };
    let topp = if (0.0..=1.0).contains(&args.topp) {
        args.topp
    } else {
        0.9
    };
    let seed = if args.seed == 0 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    } else {
        args.seed
    };
    let steps = if args.steps <= 0 || args.steps as u64 > seq_len as u64 {
        seq_len
    } else {
        args.steps as usize
    };
    Settings {
        temperature,
        topp,
        seed,
        steps,
    }
}

/// `llama2 <checkpoint> [flags]`: generate or chat.
pub fn run(args: &RunArgs) -> Result<()> {
    let path = args.checkpoint.as_deref().context("no checkpoint given")?;
    let started = Instant::now();
    let weights = checkpoint::open(path, args.device.ctx_size)?;
    let tokenizer = llama2::tokenizer::find(args.tokenizer.as_deref(), path, &weights.config)?;
    let mut model = device::load_model(&weights, &args.device)?;
    let load_time = started.elapsed();
    let s = clamp(args, weights.config.seq_len);
    let mut sampler = Sampler::new(s.temperature, s.topp, s.seed);
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    // --exact promises run.c's text, so byte pieces print as run.c prints them.
    let printing = if args.device.exact {
        Printing::Llama2c
    } else {
        Printing::Characters
    };
    let stats = match args.mode {
        Mode::Generate => generate::generate(
            model.as_mut(),
            &tokenizer,
            &mut sampler,
            args.prompt.as_deref().unwrap_or(""),
            s.steps,
            (&mut out, printing),
        )?,
        Mode::Chat => {
            let stdin = io::stdin();
            let mut lines = stdin.lock();
            let input = ChatInput {
                system: args.system.clone(),
                user: args.prompt.clone(),
                lines: &mut lines,
            };
            generate::chat(
                model.as_mut(),
                &tokenizer,
                &mut sampler,
                input,
                s.steps,
                (&mut out, printing),
            )?
        }
    };
    out.flush()?;
    eprintln!(
        "loaded {} ({}) in {:.0} ms on {}",
        path.display(),
        weights.format.describe(),
        load_time.as_secs_f64() * 1e3,
        model.describe()
    );
    if stats.prompt_tokens > 1 {
        eprintln!(
            "prefill: {} tokens in {:.1} ms ({:.0} tok/s)",
            stats.prompt_tokens,
            stats.prefill.as_secs_f64() * 1e3,
            stats.prompt_tokens as f64 / stats.prefill.as_secs_f64().max(1e-9)
        );
    }
    if let Some(tps) = stats.decode_tokens_per_second() {
        eprintln!("achieved tok/s: {tps:.6}");
    }
    Ok(())
}

/// `llama2 tokenize -z TOKENIZER "text"`: ids separated by single spaces.
pub fn tokenize(args: &TokenizeArgs) -> Result<()> {
    let tokenizer = llama2::tokenizer::open(&args.tokenizer, args.vocab)?;
    let ids = tokenizer.encode_text(&args.text, true, false)?;
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    let mut out = io::stdout().lock();
    writeln!(out, "{}", line.join(" "))?;
    Ok(())
}
