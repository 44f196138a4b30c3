//! `llama2 bench`: prefill and decode speed of a named shape with random
//! weights built on the device (or of a real checkpoint), the bytes of
//! weights streamed per token, and the share of the machine's measured
//! memory bandwidth that represents. Medians over several runs.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use llama2::cpu::kernels::{self, Isa};
use llama2::sampler::{argmax, Rng};
use llama2::synth::{self, shape_config, shape_names};
use llama2::{checkpoint, Chunk, Config, DType, HostMatrix, LanguageModel, Transformer};
use rayon::prelude::*;

use crate::args::{BenchArgs, Device};
use crate::device;

/// What one benchmark measured.
struct Measured {
    prefill_tps: Option<f64>,
    decode_tps: f64,
    /// All sequences' tok/s when `--sequences` are decoded together.
    batch_decode_tps: Option<f64>,
    bytes_per_token: f64,
    peak_gbs: f64,
}

/// Bytes of weights one decode step reads: every matrix once, the norms,
/// and the classifier (the embedding row looked up is negligible).
pub fn weight_bytes_per_token(c: &Config, dtype: DType) -> f64 {
    let matrices = (c.n_layers
        * (2 * c.dim * c.dim + 2 * c.dim * c.kv_dim() + 3 * c.dim * c.hidden_dim)
        + c.vocab_size * c.dim) as f64;
    let gs = llama2::quant::default_group_size(c.dim, c.hidden_dim);
    matrices * dtype.bytes_per_element(gs) + ((2 * c.n_layers + 1) * c.dim * 4) as f64
}

/// Read bandwidth of host memory in GB/s over a working set of `bytes`
/// (what one decode step streams, so that caches help the probe exactly as
/// much as they help the model) with `threads` threads (0: all cores). The
/// probe is an f32 matrix-vector product through the CPU backend's own
/// decode kernel (eight rows in flight per thread, each thread a few
/// contiguous row ranges), so it reads memory the way the model does, minus
/// everything else a forward step does; best of five passes after a
/// warm-up pass.
pub fn host_read_bandwidth_gbs(bytes: f64, threads: usize, isa: Isa) -> Result<f64> {
    const COLS: usize = 1024;
    let rows = (bytes.clamp(16e6, 2e9) / (4 * COLS) as f64) as usize;
    let matrix = HostMatrix::from_f32(rows, COLS, vec![1f32; rows * COLS]);
    let x = vec![1f32; COLS];
    let mut out = vec![0f32; rows];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    // A few row ranges per thread even out threads that start late.
    let per_task = rows.div_ceil(4 * pool.current_num_threads());
    let mut best = 0f64;
    for pass in 0..6 {
        let start = Instant::now();
        pool.install(|| {
            out.par_chunks_mut(per_task)
                .enumerate()
                .for_each(|(k, out)| {
                    let first = k * per_task;
                    let range = first..first + out.len();
                    kernels::product(isa, &matrix, &x, 1, Default::default(), range, out, rows)
                })
        });
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(&out);
        if pass > 0 {
            best = best.max((rows * COLS * 4) as f64 / secs / 1e9);
        }
    }
    Ok(best)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Builds the model to measure and returns it with its config and dtype.
fn build(args: &BenchArgs, device: Device) -> Result<(Box<dyn LanguageModel>, Config, DType)> {
    if let Some(path) = &args.model {
        let weights = checkpoint::open(path, args.device.ctx_size)?;
        let dtype = args.device.dtype.unwrap_or(weights.layers[0].wq.dtype());
        let model = device::load_model_on(&weights, &args.device, device)?;
        return Ok((model, weights.config, dtype));
    }
    let config = shape_config(&args.shape)?;
    let dtype = args.device.dtype.unwrap_or(DType::F32);
    let model: Box<dyn LanguageModel> = match device {
        Device::Cuda => {
            llama2_cuda::synthetic_model(&config, dtype, args.device.kv_dtype, args.seed)?
        }
        _ => Box::new(Transformer::synthetic(
            device::cpu_backend(&args.device, Some(dtype))?,
            &config,
            args.seed,
        )?),
    };
    Ok((model, config, dtype))
}

/// Times one batched prefill of `n` random tokens at position 0.
fn time_prefill(model: &mut dyn LanguageModel, n: usize, rng: &mut Rng) -> Result<f64> {
    let vocab = model.config().vocab_size as u32;
    let tokens: Vec<u32> = (0..n).map(|_| rng.next_u32() % vocab).collect();
    let start = Instant::now();
    model.forward(&tokens, 0)?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Times `n` greedy decode steps from position 0, after one untimed step.
fn time_decode(model: &mut dyn LanguageModel, n: usize) -> Result<f64> {
    let mut token = argmax(model.forward(&[1], 0)?);
    let start = Instant::now();
    for pos in 1..=n {
        token = argmax(model.forward(&[token], pos)?);
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Times `n` greedy decode steps of `seqs` sequences batched into each
/// step (a server's decode), after one untimed step; returns all
/// sequences' tokens per second together.
fn time_batch_decode(model: &mut dyn LanguageModel, seqs: usize, n: usize) -> Result<f64> {
    let ids = (0..seqs)
        .map(|_| model.new_sequence())
        .collect::<llama2::Result<Vec<_>>>()?;
    let vocab = model.config().vocab_size;
    // Different first tokens, so the sequences differ.
    let mut tokens: Vec<u32> = (0..seqs)
        .map(|i| 1 + (i * 7) as u32 % (vocab as u32 - 1))
        .collect();
    let mut start = Instant::now();
    for pos in 0..=n {
        if pos == 1 {
            start = Instant::now();
        }
        let chunks: Vec<Chunk> = ids
            .iter()
            .zip(&tokens)
            .map(|(&sequence, t)| Chunk {
                sequence,
                tokens: std::slice::from_ref(t),
                pos0: pos,
            })
            .collect();
        let logits = model.forward_batch(&chunks)?;
        for (t, row) in tokens.iter_mut().zip(logits.chunks(vocab)) {
            *t = argmax(row);
        }
    }
    let rate = (n * seqs) as f64 / start.elapsed().as_secs_f64();
    for id in ids {
        model.free_sequence(id);
    }
    Ok(rate)
}

/// Refuses token counts the model cannot run as asked: a benchmark times
/// exactly the work it reports, or nothing.
fn check_counts(args: &BenchArgs, config: &Config) -> Result<()> {
    let context = config.seq_len;
    if args.gen_tokens == 0 {
        bail!("--gen-tokens 0: nothing to time; give at least 1");
    }
    if args.gen_tokens + 1 > context {
        bail!(
            "--gen-tokens {} needs {} positions (one untimed first step, then the timed ones) \
             but the model's context is {context}: give at most {}",
            args.gen_tokens,
            args.gen_tokens + 1,
            context - 1
        );
    }
    if args.prompt_tokens > context {
        bail!(
            "--prompt-tokens {} is more than the model's context of {context}: give at most \
             {context} (0 skips the prefill measurement)",
            args.prompt_tokens
        );
    }
    if args.runs == 0 {
        bail!("--runs 0: nothing to time; give at least 1");
    }
    if args.sequences == 0 {
        bail!("--sequences 0: nothing to time; give at least 1");
    }
    Ok(())
}

fn measure(args: &BenchArgs) -> Result<(Measured, Config, DType, String)> {
    let device = device::resolve(&args.device)?;
    let (mut model, config, dtype) = build(args, device)?;
    let bytes_per_token = weight_bytes_per_token(&config, dtype);
    let peak_gbs = match device {
        Device::Cuda => llama2_cuda::copy_bandwidth_gbs()?,
        _ => host_read_bandwidth_gbs(
            bytes_per_token,
            args.device.threads,
            device::cpu_isa(&args.device)?,
        )?,
    };
    check_counts(args, &config)?;
    let (gen, prompt) = (args.gen_tokens, args.prompt_tokens);
    let mut rng = Rng::new(args.seed | 1);
    if prompt > 0 {
        // Untimed: first-use costs (library handles, workspaces) are not prefill speed.
        time_prefill(model.as_mut(), prompt, &mut rng)?;
    }
    let seqs = args.sequences;
    if seqs > model.max_sequences().min(model.max_batch()) {
        bail!(
            "--sequences {seqs}: {} batches at most {} sequences per step",
            model.describe(),
            model.max_sequences().min(model.max_batch())
        );
    }
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut batched = Vec::new();
    for _ in 0..args.runs {
        if prompt > 0 {
            prefill.push(time_prefill(model.as_mut(), prompt, &mut rng)?);
        }
        decode.push(time_decode(model.as_mut(), gen)?);
        if seqs > 1 {
            batched.push(time_batch_decode(model.as_mut(), seqs, gen)?);
        }
    }
    let measured = Measured {
        prefill_tps: (!prefill.is_empty()).then(|| median(prefill)),
        batch_decode_tps: (!batched.is_empty()).then(|| median(batched)),
        decode_tps: median(decode),
        bytes_per_token,
        peak_gbs,
    };
    Ok((measured, config, dtype, model.describe()))
}

/// `llama2 bench`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    if args.model.is_none() && args.shape.is_empty() {
        bail!("give --shape {} or --model FILE", shape_names());
    }
    let (m, config, dtype, backend) = measure(args)?;
    let what = args
        .model
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| args.shape.clone());
    let gbs = m.decode_tps * m.bytes_per_token / 1e9;
    let share = 100.0 * gbs / m.peak_gbs;
    if args.json {
        let line = serde_json::json!({
            "model": what,
            "backend": backend,
            "dtype": dtype.name(),
            "dim": config.dim,
            "n_layers": config.n_layers,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "prefill_tok_s": m.prefill_tps,
            "decode_tok_s": m.decode_tps,
            "sequences": args.sequences,
            "batch_decode_tok_s": m.batch_decode_tps,
            "weight_bytes_per_token": m.bytes_per_token,
            "decode_gb_s": gbs,
            "peak_gb_s": m.peak_gbs,
            "percent_of_peak": share,
        });
        println!("{line}");
        return Ok(());
    }
    println!(
        "model      {what} ({dtype}, {} params) on {backend}",
        config.parameter_count()
    );
    if let Some(p) = m.prefill_tps {
        println!(
            "prefill    {p:10.1} tok/s  ({} prompt tokens)",
            args.prompt_tokens
        );
    }
    println!(
        "decode     {:10.1} tok/s  ({} tokens)",
        m.decode_tps, args.gen_tokens
    );
    if let Some(b) = m.batch_decode_tps {
        println!(
            "batched    {b:10.1} tok/s  ({} sequences decoded together, all of them)",
            args.sequences
        );
    }
    println!(
        "weights    {:10.1} MB per token, {gbs:.1} GB/s = {share:.1}% of the measured {:.1} GB/s",
        m.bytes_per_token / 1e6,
        m.peak_gbs
    );
    Ok(())
}

/// `llama2 synth`: writes a random checkpoint of a named shape.
pub fn synth(args: &crate::args::SynthArgs) -> Result<()> {
    let config = shape_config(&args.shape)?;
    let (dtype, format) = match args.format.as_str() {
        "v0" => (DType::F32, llama2::FileFormat::V0),
        "v1" => (DType::F32, llama2::FileFormat::V1),
        "v2" => (
            DType::F32,
            llama2::FileFormat::V2 {
                group_size: llama2::quant::default_group_size(config.dim, config.hidden_dim),
            },
        ),
        other => bail!("unknown format '{other}': expected v0, v1 or v2"),
    };
    let weights = synth::random_weights(&config, dtype, args.seed);
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    checkpoint::write(&weights, format, &mut out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({}, {})",
        args.out.display(),
        args.shape,
        format.describe()
    );
    Ok(())
}
