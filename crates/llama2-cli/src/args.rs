//! Command-line flags. llama2.c's exact form (`llama2 model.bin -t 0.8 -n 256
//! -i "prompt"`) is the top level; tools are subcommands. Values are parsed
//! here and clamped the way run.c clamps them in `run.rs`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use llama2::cpu::kernels::Level;

/// A float flag: any finite number (run.c's clamping then applies); NaN
/// and infinity are refused, since no clamping rule gives them a meaning.
fn parse_finite(s: &str) -> Result<f32, String> {
    let v: f32 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err("expected a finite number".into())
    }
}

/// `--top-k`: a whole number, 0 meaning off. Parsed here rather than by
/// clap's usize parser so that `-3` gets a message saying what is expected.
fn parse_top_k(s: &str) -> Result<usize, String> {
    s.trim()
        .parse::<usize>()
        .map_err(|_| format!("expected a whole number >= 0 (0 = off), found {s:?}"))
}

/// A finite float within `lo..=hi`, with `what` saying what the bounds mean.
fn parse_in(s: &str, lo: f32, hi: f32, what: &str) -> Result<f32, String> {
    match parse_finite(s) {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected a number from {lo} to {hi} ({what}), found {s:?}"
        )),
    }
}

/// `--min-p`: a fraction of the top probability.
fn parse_min_p(s: &str) -> Result<f32, String> {
    parse_in(s, 0.0, 1.0, "0 = off")
}

/// `--frequency-penalty`, `--presence-penalty`: OpenAI's range.
fn parse_openai_penalty(s: &str) -> Result<f32, String> {
    parse_in(s, -2.0, 2.0, "0 = off")
}

/// `--repeat-penalty`: a divisor of positive logits, so it must be > 0.
fn parse_repeat_penalty(s: &str) -> Result<f32, String> {
    match parse_finite(s) {
        Ok(v) if v > 0.0 => Ok(v),
        _ => Err(format!(
            "expected a number > 0 (1 = off, above 1 discourages repeats), found {s:?}"
        )),
    }
}

/// `--stop`: any non-empty text (an empty one would stop before the first
/// token).
fn parse_stop(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("expected a non-empty text".into())
    } else {
        Ok(s.to_owned())
    }
}

/// `--threads`: 0 (one per core) up to `MAX_THREADS`; each thread is a real
/// OS thread with its own stack, so absurd counts are refused up front.
fn parse_threads(s: &str) -> Result<usize, String> {
    let max = llama2::cpu::MAX_THREADS;
    match s.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        Ok(_) => Err(format!("expected at most {max} (0 means one per core)")),
        Err(e) => Err(format!("{e}")),
    }
}

/// `--isa`: a SIMD level by name; whether this CPU runs it is checked when
/// the backend starts, with the levels it does run in the error.
fn parse_isa(s: &str) -> Result<Level, String> {
    Level::from_name(s).ok_or_else(|| format!("expected {}", Level::choices()))
}

#[derive(Parser, Debug)]
#[command(
    name = "llama2",
    version,
    about = "Run Llama-architecture models (llama2.c, Hugging Face, Meta, GGUF) on CPU or NVIDIA GPUs",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Example: llama2 stories15M.bin -t 0.8 -n 256 -i \"One day, Lily met a Shoggoth\""
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the token ids of a text (BOS first), as generation encodes it.
    Tokenize(TokenizeArgs),
    /// Measure prefill and decode speed on random weights of a standard shape.
    Bench(BenchArgs),
    /// Write a random checkpoint of a standard shape (for timing other engines).
    Synth(SynthArgs),
    /// Perplexity of a text under a model.
    Perplexity(PerplexityArgs),
    /// Compare a GPU's logits with the CPU's on the same tokens.
    Check(CheckArgs),
    /// Convert a model (any form the top level accepts) to llama2.c, Hugging Face or GGUF.
    Export(ExportArgs),
    /// Convert a SentencePiece tokenizer.model to llama2.c's tokenizer.bin.
    ExportTokenizer(ExportTokenizerArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (with a chat page at /).
    Serve(crate::serve::ServeArgs),
    /// Train a Llama-style BPE tokenizer (tokenizer.json and tokenizer.bin) on text.
    TrainTokenizer(TrainTokenizerArgs),
    /// Encode a corpus into uint16 token shards for training (tinystories.py pretokenize).
    Pretokenize(PretokenizeArgs),
    /// Train a model from pretokenized shards (train.py), or check the training math against PyTorch.
    Train(crate::train::TrainArgs),
}

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA when a usable GPU is present, else the CPU (saying why).
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Generate,
    Chat,
}

/// Options shared by every command that loads a model.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Where to run: auto, cpu or cuda.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Weight precision on the device: f32, f16, bf16 or q8 (default: as stored).
    #[arg(long)]
    pub dtype: Option<llama2::DType>,
    /// CPU threads (0: one per core).
    #[arg(long, default_value_t = 0, value_parser = parse_threads)]
    pub threads: usize,
    /// CPU kernels of one instruction-set level: scalar, avx2, avxvnni, avx512, amx
    /// or neon (default: the widest this CPU runs, or $LLAMA2_ISA), to time
    /// or test a narrower level on a wider CPU. Implies the CPU.
    #[arg(long, value_name = "LEVEL", value_parser = parse_isa)]
    pub isa: Option<Level>,
    /// llama2.c's arithmetic exactly: the CPU's scalar reference kernels,
    /// which give run.c's (and for int8 files runq.c's) text bit for bit
    /// for any seed, CPU and thread count, at a fraction of the speed.
    /// Implies the CPU.
    #[arg(long, conflicts_with = "isa")]
    pub exact: bool,
    /// Context length in positions (default: the model's; 4096 for Meta
    /// directories, whose files do not say). At most the model's own.
    #[arg(long, value_name = "N")]
    pub ctx_size: Option<usize>,
    /// How the KV cache stores keys and values: f32 (llama2.c's arithmetic,
    /// the CPU's default) or f16: half the memory per sequence and half the
    /// bytes attention reads per token (llama.cpp's default cache), with
    /// every key and value rounded to f16, so texts can differ from f32's.
    /// On CUDA the default is f16 for f16/bf16 weights, else f32.
    #[arg(long, value_name = "TYPE")]
    pub kv_dtype: Option<llama2::KvDtype>,
    /// Read f32/f16/bf16 weights from the file's memory map in place, as
    /// llama2.c does, instead of copying them into huge pages at load (the
    /// CPU's default while they fit in half the machine's memory): no copy,
    /// and the pages are shared with other processes mapping the same
    /// file, but f32 decode of models larger than the caches is slower
    /// (1.2-1.3x on the stories models on a Zen 4). Q8_0 is always
    /// repacked. CPU only.
    #[arg(long)]
    pub mmap: bool,
}

/// llama2.c's `run` flags.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The model: a llama2.c checkpoint (version 0, 1 or 2), a Hugging Face
    /// or Meta directory, a train.py ckpt.pt, or a GGUF file.
    #[arg(required = true)]
    pub checkpoint: Option<PathBuf>,
    /// Temperature; 0 is greedy, negative becomes 0.
    #[arg(
        short = 't',
        long,
        default_value_t = 1.0,
        allow_negative_numbers = true,
        value_parser = parse_finite
    )]
    pub temperature: f32,
    /// Top-p (nucleus) mass; outside [0, 1] becomes 0.9.
    #[arg(
        short = 'p',
        long,
        default_value_t = 0.9,
        allow_negative_numbers = true,
        value_parser = parse_finite
    )]
    pub topp: f32,
    /// Random seed; 0 uses the current time.
    #[arg(short = 's', long, default_value_t = 0)]
    pub seed: u64,
    /// Positions to run (prompt included); 0 or more than the context means the context.
    #[arg(
        short = 'n',
        long,
        default_value_t = 256,
        allow_negative_numbers = true
    )]
    pub steps: i64,
    /// Prompt (generate) or first user message (chat).
    #[arg(short = 'i', long)]
    pub prompt: Option<String>,
    /// tokenizer.bin or tokenizer.model (default: inside a GGUF file or a
    /// model directory, else beside the checkpoint, then ./tokenizer.bin).
    #[arg(short = 'z', long)]
    pub tokenizer: Option<PathBuf>,
    /// generate or chat.
    #[arg(short = 'm', long, value_enum, default_value_t = Mode::Generate)]
    pub mode: Mode,
    /// System prompt (chat).
    #[arg(short = 'y', long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Sampling beyond llama2.c's. When none is given, llama2.c's sampler runs
/// unchanged; none combines with --exact, which promises run.c's text.
#[derive(Args, Debug, Clone, Default)]
pub struct SamplingArgs {
    /// Sample only among the N most likely tokens (0 = off).
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = parse_top_k, conflicts_with = "exact")]
    pub top_k: Option<usize>,
    /// Drop tokens less likely than P times the most likely one (0 = off, at most 1).
    #[arg(long, value_name = "P", allow_negative_numbers = true,
          value_parser = parse_min_p, conflicts_with = "exact")]
    pub min_p: Option<f32>,
    /// Divide positive logits (multiply negative ones) of tokens already in
    /// the prompt or the output by R (1 = off).
    #[arg(long, value_name = "R", allow_negative_numbers = true,
          value_parser = parse_repeat_penalty, conflicts_with = "exact")]
    pub repeat_penalty: Option<f32>,
    /// Subtract F times a token's count in the output from its logit (-2 to 2).
    #[arg(long, value_name = "F", allow_negative_numbers = true,
          value_parser = parse_openai_penalty, conflicts_with = "exact")]
    pub frequency_penalty: Option<f32>,
    /// Subtract P from the logit of every token already in the output (-2 to 2).
    #[arg(long, value_name = "P", allow_negative_numbers = true,
          value_parser = parse_openai_penalty, conflicts_with = "exact")]
    pub presence_penalty: Option<f32>,
    /// End generation where the output contains TEXT (not printed); repeatable.
    #[arg(long, value_name = "TEXT", value_parser = parse_stop,
          allow_hyphen_values = true, conflicts_with = "exact")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// Whether any flag beyond llama2.c's was given.
    pub fn any(&self) -> bool {
        self.top_k.is_some()
            || self.min_p.is_some()
            || self.repeat_penalty.is_some()
            || self.frequency_penalty.is_some()
            || self.presence_penalty.is_some()
            || !self.stop.is_empty()
    }
}

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// tokenizer.bin to use.
    #[arg(short = 'z', long)]
    pub tokenizer: PathBuf,
    /// Vocabulary size (default: the number of entries in the file).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// The text to encode.
    pub text: String,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model shape: stories260K, stories15M, stories42M, stories110M or llama2-7b.
    #[arg(long, default_value = "stories15M")]
    pub shape: String,
    /// Measure a real model (any form the top level accepts) instead of a
    /// random shape.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Prompt tokens for the prefill measurement (0 skips it).
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 256)]
    pub gen_tokens: usize,
    /// Runs to take the median of.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Also time decoding this many sequences batched into each step (as
    /// `llama2 serve` does with that many requests), in tok/s of all of them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub sequences: usize,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Model shape: stories260K, stories15M, stories42M, stories110M or llama2-7b.
    #[arg(long)]
    pub shape: String,
    /// File format: v0 (llama2.c run), v1 (fp32) or v2 (int8, runq).
    #[arg(long, default_value = "v0")]
    pub format: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Output file.
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// The model (any form the top level accepts).
    pub checkpoint: PathBuf,
    /// The model's tokenizer (found as for generation when not given).
    #[arg(short = 'z', long)]
    pub tokenizer: Option<PathBuf>,
    /// UTF-8 text file to score.
    #[arg(long)]
    pub text: PathBuf,
    /// Window length in tokens (default: the model's context).
    #[arg(long)]
    pub context: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The model (any form the top level accepts), or --shape.
    pub checkpoint: Option<PathBuf>,
    /// Check random weights of a standard shape instead of a file.
    #[arg(long, conflicts_with = "checkpoint")]
    pub shape: Option<String>,
    /// Prompt tokens run as one batch (compared at every position).
    #[arg(long, default_value_t = 8)]
    pub prompt_tokens: usize,
    /// Decode steps after the prompt.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  llama2 export out/ckpt.pt model.bin --version 2\n  \
    llama2 export ./Llama-2-7b-hf llama2-7b-q8.bin --version 2 --group-size 64\n  \
    llama2 export stories15M.bin stories15M-hf --format hf -z tokenizer.bin\n  \
    llama2 export ./Llama-2-7b-hf llama2-7b-q8_0.gguf --format gguf --dtype q8"
)]
pub struct ExportArgs {
    /// The model to convert: llama2.c file, Hugging Face or Meta directory,
    /// train.py ckpt.pt, or GGUF.
    pub input: PathBuf,
    /// The file (llama2c, gguf) or directory (hf) to write.
    pub output: PathBuf,
    /// Output format: llama2c (a .bin of --version), hf (a Hugging Face
    /// directory: model.safetensors, config.json and the tokenizer) or gguf
    /// (llama.cpp, with the tokenizer inside).
    #[arg(long, value_enum, default_value_t = ExportFormat::Llama2c)]
    pub format: ExportFormat,
    /// Weight precision of an hf export (f32, f16 or bf16) or a gguf export
    /// (f32, f16 or q8 = Q8_0); default f32.
    #[arg(long)]
    pub dtype: Option<llama2::DType>,
    /// The model's tokenizer, for hf and gguf exports (default: found as for
    /// generation).
    #[arg(short = 'z', long)]
    pub tokenizer: Option<PathBuf>,
    /// llama2.c format version: 0 (legacy fp32, llama2.c's run), 1 (fp32)
    /// or 2 (int8 Q8_0, llama2.c's runq), as export.py's --version.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub version: u8,
    /// Q8_0 group size for version 2 (default as export.py: 64, halved until
    /// it divides dim).
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Context length to record (default: the model's; Meta: 4096).
    #[arg(long, value_name = "N")]
    pub ctx_size: Option<usize>,
}

/// What `llama2 export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// llama2.c's .bin (version 0, 1 or 2).
    Llama2c,
    /// A Hugging Face directory.
    Hf,
    /// A GGUF file.
    Gguf,
}

#[derive(Args, Debug)]
pub struct ExportTokenizerArgs {
    /// A SentencePiece tokenizer.model.
    pub input: PathBuf,
    /// The tokenizer.bin to write (byte-identical to llama2.c's tokenizer.py).
    pub output: PathBuf,
}

#[derive(Args, Debug)]
pub struct TrainTokenizerArgs {
    /// Training text: .txt (one document per paragraph), .jsonl or .json
    /// (objects with a "story" or "text" field).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Tokens in all, counting <unk>, <s>, </s> and the 256 byte tokens.
    #[arg(long)]
    pub vocab_size: usize,
    /// Directory to write tokenizer.json and tokenizer.bin into.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct PretokenizeArgs {
    /// The tokenizer to encode with (tokenizer.bin, .model or .json).
    #[arg(long, short = 'z')]
    pub tokenizer: PathBuf,
    /// Corpus files: .txt, .jsonl or .json; each becomes its own shard(s).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<PathBuf>,
    /// Directory to write data00.bin, data01.bin, ... into.
    #[arg(long)]
    pub out: PathBuf,
    /// Start a new shard once one holds this many tokens (documents are never split).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub shard_tokens: Option<u64>,
}
