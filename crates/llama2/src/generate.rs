//! The generation and chat loops of llama2.c, independent of the backend.
//! They print exactly what `run.c` prints for the same flags and seed (plus
//! the UTF-8 characters it drops), but feed each prompt through the model as
//! one batch instead of one token at a time. Any `NextToken` samples:
//! llama2.c's `Sampler`, or a `SequenceSampler` with the settings beyond
//! run.c's; stop strings end generation.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::LanguageModel;
use crate::sampling::{NextToken, StopMatcher};
use crate::tokenizer::{Printing, Tokenizer, Utf8Stream};

/// Timings of one generation, for the report on stderr.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// Prompt tokens fed in the first (batched) step.
    pub prompt_tokens: usize,
    /// Time of that first step.
    pub prefill: Duration,
    /// Single-token steps after the first step.
    pub decoded_tokens: usize,
    /// Time of those steps.
    pub decode: Duration,
}

impl Stats {
    /// Decode speed, timed from after the first step as run.c does.
    pub fn decode_tokens_per_second(&self) -> Option<f64> {
        (self.decoded_tokens > 0 && !self.decode.is_zero())
            .then(|| self.decoded_tokens as f64 / self.decode.as_secs_f64())
    }
}

/// Writes one decoded piece, keeping the output valid UTF-8, and flushes.
fn emit(
    out: &mut dyn Write,
    stream: &mut Utf8Stream,
    tok: &Tokenizer,
    prev: u32,
    next: u32,
) -> Result<()> {
    let mut bytes = Vec::new();
    stream.push(tok.decode(prev, next), &mut bytes);
    if !bytes.is_empty() {
        out.write_all(&bytes)?;
        out.flush()?;
    }
    Ok(())
}

/// Whether generation stops at `token`: at BOS, as run.c stops, and at the
/// model's EOS tokens for models whose files declare them.
fn ends_generation(c: &crate::config::Config, token: u32) -> bool {
    token == c.bos || (c.eos_ends_generation && c.eos.contains(token))
}

/// Encodes `text` with BOS and checks it fits in `room` positions.
fn encode_prompt(tok: &Tokenizer, text: &str, room: usize, context: usize) -> Result<Vec<u32>> {
    let tokens = tok.encode_text(text, true, false)?;
    if tokens.len() > room {
        return Err(Error::PromptTooLong {
            tokens: tokens.len() + (context - room),
            context,
        });
    }
    Ok(tokens)
}

/// run.c's `generate`: echo the prompt, then sample until BOS or `steps`
/// positions. `steps` must already be clamped to 1..=seq_len.
pub fn generate(
    model: &mut dyn LanguageModel,
    tok: &Tokenizer,
    sampler: &mut dyn NextToken,
    prompt: &str,
    steps: usize,
    out: (&mut dyn Write, Printing),
) -> Result<Stats> {
    generate_until(model, tok, sampler, prompt, steps, &[], out)
}

/// `generate`, also ending at the first of `stops` in the generated text
/// (the prompt's echo is never matched), which is not printed. Text that
/// could begin a stop string is held back until it cannot. With no stops
/// the output is `generate`'s, byte for byte.
pub fn generate_until(
    model: &mut dyn LanguageModel,
    tok: &Tokenizer,
    sampler: &mut dyn NextToken,
    prompt: &str,
    steps: usize,
    stops: &[String],
    (out, printing): (&mut dyn Write, Printing),
) -> Result<Stats> {
    let seq_len = model.config().seq_len;
    let prompt_tokens = encode_prompt(tok, prompt, seq_len, seq_len)?;
    let np = prompt_tokens.len();
    let n_pre = np.min(steps);
    let mut stats = Stats {
        prompt_tokens: n_pre,
        ..Stats::default()
    };
    let mut stream = Utf8Stream::printing(printing);
    let mut matcher = (!stops.is_empty()).then(|| StopMatcher::new(stops.to_vec()));
    sampler.feed_prompt(&prompt_tokens);

    let started = Instant::now();
    let mut logits = model.forward(&prompt_tokens[..n_pre], 0)?.to_vec();
    stats.prefill = started.elapsed();
    let decode_start = Instant::now();

    let mut token = prompt_tokens[0];
    for pos in 0..steps {
        if pos >= n_pre {
            logits.copy_from_slice(model.forward(&[token], pos)?);
            stats.decoded_tokens += 1;
        }
        let in_prompt = pos + 1 < np;
        let next = if in_prompt {
            prompt_tokens[pos + 1]
        } else {
            sampler.next_token(&mut logits)
        };
        if ends_generation(model.config(), next) {
            break;
        }
        match matcher.as_mut().filter(|_| !in_prompt) {
            Some(m) => {
                if emit_until_stop(out, &mut stream, m, tok.decode(token, next))? {
                    break;
                }
            }
            None => emit(out, &mut stream, tok, token, next)?,
        }
        token = next;
    }
    if let Some(m) = matcher.as_mut() {
        out.write_all(m.finish().as_bytes())?;
    }
    out.write_all(b"\n")?;
    out.flush()?;
    stats.decode = decode_start.elapsed();
    Ok(stats)
}

/// Writes what `matcher` lets through of one decoded piece and flushes;
/// returns whether a stop string was hit.
fn emit_until_stop(
    out: &mut dyn Write,
    stream: &mut Utf8Stream,
    matcher: &mut StopMatcher,
    piece: &[u8],
) -> Result<bool> {
    let mut bytes = Vec::new();
    stream.push(piece, &mut bytes);
    // Characters printing always gives whole UTF-8 characters; llama2.c's
    // printing may pass a lone byte, which lossy decoding keeps visible.
    let (text, hit) = matcher.push(&String::from_utf8_lossy(&bytes));
    if !text.is_empty() {
        out.write_all(text.as_bytes())?;
        out.flush()?;
    }
    Ok(hit)
}

/// Where chat turns come from.
pub struct ChatInput<'a> {
    /// System prompt from the command line (`-y`); asked for when absent.
    pub system: Option<String>,
    /// First user turn from the command line (`-i`); asked for when absent.
    pub user: Option<String>,
    /// Further turns, one per line.
    pub lines: &'a mut dyn BufRead,
}

/// Reads one line of at most `limit` bytes after printing `guide`; `None`
/// when input has ended. A longer line is refused without being read whole
/// (stdin may be endless), as is one that is not UTF-8.
fn read_line(
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    guide: &str,
    limit: usize,
) -> Result<Option<String>> {
    out.write_all(guide.as_bytes())?;
    out.flush()?;
    let mut line = Vec::new();
    let read = std::io::Read::take(input, limit as u64 + 1)
        .read_until(b'\n', &mut line)
        .map_err(|e| Error::Invalid(format!("cannot read chat input: {e}")))?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    if line.len() > limit {
        return Err(Error::Invalid(format!(
            "a chat message of more than {limit} bytes cannot fit in the model's context: \
             shorten it"
        )));
    }
    String::from_utf8(line).map(Some).map_err(|e| {
        Error::Invalid(format!(
            "chat input is not valid UTF-8 (at byte {} of the line); send UTF-8 text",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// The longest line worth reading when `room` positions are left: no token
/// stands for more than `longest_piece` bytes of text, so anything longer
/// cannot fit.
fn line_limit(tok: &Tokenizer, room: usize) -> usize {
    room.saturating_mul(tok.longest_piece().max(1))
}

/// The Llama 2 chat template for one user turn.
fn render_turn(system: Option<&str>, user: &str) -> String {
    match system {
        Some(sys) if !sys.is_empty() => {
            format!("[INST] <<SYS>>\n{sys}\n<</SYS>>\n\n{user} [/INST]")
        }
        _ => format!("[INST] {user} [/INST]"),
    }
}

/// run.c's `chat`: user turns in the Llama 2 template, the assistant's
/// answer streamed until EOS, for up to `steps` positions or until the input
/// ends. Like run.c, a token is sampled at every position (also inside the
/// prompt, which consumes random numbers) and the token after EOS is printed.
pub fn chat(
    model: &mut dyn LanguageModel,
    tok: &Tokenizer,
    sampler: &mut dyn NextToken,
    input: ChatInput<'_>,
    steps: usize,
    (out, printing): (&mut dyn Write, Printing),
) -> Result<Stats> {
    let seq_len = model.config().seq_len;
    let eos = model.config().eos;
    let mut stats = Stats::default();
    let mut stream = Utf8Stream::printing(printing);
    let mut system = input.system;
    let mut first_user = input.user;
    let mut pos = 0;
    let mut user_turn = true;
    let mut next = 0u32;
    let mut logits = Vec::new();
    let decode_start = Instant::now();
    while pos < steps {
        if user_turn {
            if pos == 0 && system.is_none() {
                let limit = line_limit(tok, seq_len);
                system = read_line(input.lines, out, "Enter system prompt (optional): ", limit)?;
                if system.is_none() {
                    break;
                }
            }
            let user = match first_user.take().filter(|_| pos == 0) {
                Some(u) => u,
                None => {
                    match read_line(input.lines, out, "User: ", line_limit(tok, seq_len - pos))? {
                        Some(u) => u,
                        None => break,
                    }
                }
            };
            let rendered = render_turn(system.as_deref().filter(|_| pos == 0), &user);
            let prompt = encode_prompt(tok, &rendered, seq_len - pos, seq_len)?;
            out.write_all(b"Assistant: ")?;
            user_turn = false;
            let n = prompt.len().min(steps - pos);
            let started = Instant::now();
            let all = model.forward_all(&prompt[..n], pos)?;
            stats.prompt_tokens += n;
            stats.prefill += started.elapsed();
            let vocab = tok.vocab_size();
            sampler.feed_prompt(&prompt[..n]);
            for (i, &token) in prompt[..n].iter().enumerate() {
                if eos.contains(token) {
                    user_turn = true;
                }
                logits.clear();
                logits.extend_from_slice(&all[i * vocab..(i + 1) * vocab]);
                // Only the last prompt position's token is the answer's
                // first; the others are drawn (as run.c does) and dropped.
                next = if i + 1 == prompt.len() {
                    sampler.next_token(&mut logits)
                } else {
                    sampler.sample_discarded(&mut logits)
                };
                pos += 1;
                if i + 1 == prompt.len() && !eos.contains(next) {
                    emit(out, &mut stream, tok, token, next)?;
                }
                if eos.contains(next) {
                    out.write_all(b"\n")?;
                }
            }
            continue;
        }
        let token = next;
        if eos.contains(token) {
            user_turn = true;
        }
        logits.clear();
        logits.extend_from_slice(model.forward(&[token], pos)?);
        stats.decoded_tokens += 1;
        next = sampler.next_token(&mut logits);
        pos += 1;
        if !eos.contains(next) {
            emit(out, &mut stream, tok, token, next)?;
        } else {
            out.write_all(b"\n")?;
        }
    }
    out.write_all(b"\n")?;
    out.flush()?;
    stats.decode = decode_start.elapsed().saturating_sub(stats.prefill);
    Ok(stats)
}
