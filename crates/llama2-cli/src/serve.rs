//! `llama2 serve`: the flags of the OpenAI-compatible server, and the model
//! loading it runs on its engine thread while already listening (so
//! `/health` answers 503 until the model is in memory).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use llama2::checkpoint;
use llama2_server::template::ChatTemplate;
use llama2_server::{Loaded, Options};

use crate::args::DeviceArgs;
use crate::device;

/// Bytes in a MiB, for --max-body.
const MIB: usize = 1 << 20;

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  llama2 serve stories15M.bin -z tokenizer.bin
  llama2 serve hf/TinyLlama --dtype q8 --port 9000 --api-key secret
  curl -s localhost:8080/v1/completions -H 'content-type: application/json' \\
      -d '{\"prompt\": \"Once upon a time\", \"max_tokens\": 40}'

The chat page is at http://HOST:PORT/; /health, /metrics and /v1/models
are there too. docs/SERVING.md explains scheduling and deployment.")]
pub struct ServeArgs {
    /// The model: any path the top level takes (llama2.c file, Hugging Face or
    /// Meta directory, ckpt.pt, GGUF).
    pub model: PathBuf,
    /// Tokenizer (default: found as for generation).
    #[arg(short = 'z', long)]
    pub tokenizer: Option<PathBuf>,
    /// Chat template file (Jinja) for /v1/chat/completions (default: the
    /// model directory's chat_template.jinja or tokenizer_config.json, else
    /// llama2.c's Llama 2 [INST] format).
    #[arg(long, value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
    /// Address to listen on; 0.0.0.0 for every interface.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (also $LLAMA2_API_KEY).
    #[arg(long, env = "LLAMA2_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow browser pages of this origin to call the API (repeatable; `*`
    /// for any). Without it no CORS headers are sent.
    #[arg(long, value_name = "ORIGIN")]
    pub cors: Vec<String>,
    /// The model id /v1/models reports (default: the model file's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// Requests generated at once, batched into every step.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub parallel: u16,
    /// KV cache positions all running requests share (default: --parallel
    /// whole contexts). A request is admitted when its prompt plus
    /// max_tokens fits in what is free.
    #[arg(long, value_name = "POSITIONS")]
    pub kv_cache: Option<usize>,
    /// Requests waiting for a slot before new ones get HTTP 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest max_tokens a request may ask for, and the default (default:
    /// the context length).
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Largest request body, in MiB.
    #[arg(long, default_value_t = 1, value_name = "MIB")]
    pub max_body: usize,
    /// Seconds running requests may go on after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub shutdown_grace: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    if !args.model.exists() {
        anyhow::bail!("the model {} does not exist", args.model.display());
    }
    llama2_server::template::check_explicit(args.chat_template.as_deref())?;
    let model_name = args.model_name.clone().unwrap_or_else(|| {
        let name = args.model.file_stem().or(args.model.file_name());
        name.map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let options = Options {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        cors: args.cors.clone(),
        model_name,
        max_body: args.max_body.saturating_mul(MIB),
        max_queue: args.max_queue,
        max_tokens: args.max_tokens.unwrap_or(usize::MAX),
        parallel: args.parallel as usize,
        kv_cache: args.kv_cache,
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    let (model, tokenizer, template, device) = (
        args.model.clone(),
        args.tokenizer.clone(),
        args.chat_template.clone(),
        args.device.clone(),
    );
    llama2_server::run(options, move || load(&model, tokenizer, template, &device))
}

/// Opens the model, its tokenizer and chat template, and loads the weights
/// onto the device.
fn load(
    path: &std::path::Path,
    tokenizer: Option<PathBuf>,
    template: Option<PathBuf>,
    device: &DeviceArgs,
) -> Result<Loaded> {
    let started = std::time::Instant::now();
    let weights = checkpoint::open(path, device.ctx_size)
        .with_context(|| format!("cannot load {}", path.display()))?;
    let tokenizer = llama2::tokenizer::find(tokenizer.as_deref(), path, &weights.config)?;
    let template = ChatTemplate::find(path, template.as_deref())?;
    let model = device::load_model(&weights, device)?;
    eprintln!(
        "loaded {} ({}) in {:.0} ms on {}; chat template: {}",
        path.display(),
        weights.format.describe(),
        started.elapsed().as_secs_f64() * 1e3,
        model.describe(),
        template.source
    );
    Ok(Loaded {
        model,
        tokenizer,
        template,
    })
}
