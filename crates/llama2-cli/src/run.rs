//! The llama2.c-compatible commands: generation and chat (the top level) and
//! `tokenize`. Flags are clamped here exactly as run.c clamps them. Without
//! the sampling flags beyond run.c's, llama2.c's `Sampler` runs unchanged.

use std::io::{self, BufWriter, Write};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use llama2::checkpoint;
use llama2::generate::{self, ChatInput};
use llama2::sampler::Sampler;
use llama2::sampling::{NextToken, SamplingParams, SequenceSampler};
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

/// llama2.c's `Sampler` when no flag beyond run.c's is given (the exact
/// code path, so the text is unchanged), else a `SequenceSampler`.
fn make_sampler(args: &RunArgs, s: &Settings) -> Result<Box<dyn NextToken>> {
    let a = &args.sampling;
    if !a.any() {
        return Ok(Box::new(Sampler::new(s.temperature, s.topp, s.seed)));
    }
    let params = SamplingParams {
        temperature: s.temperature,
        top_p: s.topp,
        top_k: a.top_k.unwrap_or(0),
        min_p: a.min_p.unwrap_or(0.0),
        repetition_penalty: a.repeat_penalty.unwrap_or(1.0),
        frequency_penalty: a.frequency_penalty.unwrap_or(0.0),
        presence_penalty: a.presence_penalty.unwrap_or(0.0),
        seed: s.seed,
        top_logprobs: None,
    };
    // The flags' parsers already check each value; this is the library's
    // word on the combination.
    params.validate().map_err(anyhow::Error::msg)?;
    Ok(Box::new(SequenceSampler::new(&params, &[])))
}

/// `llama2 <checkpoint> [flags]`: generate or chat.
pub fn run(args: &RunArgs) -> Result<()> {
    let path = args.checkpoint.as_deref().context("no checkpoint given")?;
    if args.mode == Mode::Chat && !args.sampling.stop.is_empty() {
        bail!("--stop works in generate mode only; chat turns end at the model's end of sequence");
    }
    let started = Instant::now();
    let weights = checkpoint::open(path, args.device.ctx_size)?;
    let tokenizer = llama2::tokenizer::find(args.tokenizer.as_deref(), path, &weights.config)?;
    let mut model = device::load_model(&weights, &args.device)?;
    let load_time = started.elapsed();
    let s = clamp(args, weights.config.seq_len);
    let mut sampler = make_sampler(args, &s)?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    // --exact promises run.c's text, so byte pieces print as run.c prints them.
    let printing = if args.device.exact {
        Printing::Llama2c
    } else {
        Printing::Characters
    };
    let stats = match args.mode {
        Mode::Generate => generate::generate_until(
            model.as_mut(),
            &tokenizer,
            sampler.as_mut(),
            args.prompt.as_deref().unwrap_or(""),
            s.steps,
            &args.sampling.stop,
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
                sampler.as_mut(),
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
