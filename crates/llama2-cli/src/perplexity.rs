//! `llama2 perplexity`: mean negative log-likelihood and perplexity of a text
//! under a model. The text is encoded once (with BOS) and scored in windows
//! of the model's context; each window starts with BOS and predicts every
//! following token, so no token is scored without its window's history.

use anyhow::{anyhow, bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use llama2::checkpoint;

use crate::args::PerplexityArgs;
use crate::device;

/// Largest text scored. Its tokens and the encoder's working memory take
/// about 50 bytes per byte of text, so this keeps the worst case near 3 GiB.
const MAX_TEXT_BYTES: u64 = 64 << 20;

/// `-log softmax(logits)[target]`, computed stably in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target as usize] as f64
}

/// `llama2 perplexity`.
pub fn perplexity(args: &PerplexityArgs) -> Result<()> {
    let weights = checkpoint::open(&args.checkpoint, args.device.ctx_size)?;
    let tokenizer =
        llama2::tokenizer::find(args.tokenizer.as_deref(), &args.checkpoint, &weights.config)?;
    let bytes = llama2::files::read_bounded(&args.text, "text to score", MAX_TEXT_BYTES)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{} is not UTF-8 text (invalid bytes at offset {})",
            args.text.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let tokens = tokenizer.encode_text(&text, false, false)?;
    let bos = weights.config.bos;
    if tokens.is_empty() {
        bail!("{} holds no text to score", args.text.display());
    }
    let seq_len = weights.config.seq_len;
    let context = args.context.unwrap_or(seq_len);
    if !(2..=seq_len).contains(&context) {
        bail!("--context {context}: expected 2 to {seq_len} (the model's context)");
    }
    let mut model = device::load_model(&weights, &args.device)?;
    let vocab = weights.config.vocab_size;

    let bar = ProgressBar::new(tokens.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tokens  {per_sec}  eta {eta}")
            .expect("valid template"),
    );
    let mut total = 0f64;
    let mut window = Vec::with_capacity(context);
    for targets in tokens.chunks(context - 1) {
        window.clear();
        window.push(bos);
        window.extend_from_slice(targets);
        let logits = model.forward_all(&window[..window.len() - 1], 0)?;
        for (i, &target) in targets.iter().enumerate() {
            total += nll(&logits[i * vocab..(i + 1) * vocab], target);
        }
        bar.inc(targets.len() as u64);
    }
    bar.finish_and_clear();
    let mean = total / tokens.len() as f64;
    println!(
        "tokens {}  mean nll {mean:.6}  perplexity {:.4}  ({}, context {context})",
        tokens.len(),
        mean.exp(),
        model.describe()
    );
    Ok(())
}
