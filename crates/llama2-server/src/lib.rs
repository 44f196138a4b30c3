//! llama2-server: `llama2 serve`, an OpenAI-compatible HTTP server over the
//! llama2 library, with continuous batching of all running requests.
//!
//! | file          | owns                                                      |
//! |---------------|-----------------------------------------------------------|
//! | `lib.rs`      | options, start-up (model loading while already listening), shutdown |
//! | `http.rs`     | routes, API key, error answers, JSON and SSE responses    |
//! | `api.rs`      | the OpenAI request and response shapes, validation        |
//! | `engine.rs`   | the engine thread: admission, batching, sampling, events  |
//! | `template.rs` | chat templates (the model's own, or Llama 2's `[INST]`)   |
//! | `metrics.rs`  | counters and histograms, Prometheus text                  |
//!
//! The server keeps no state beyond the requests in flight, so more
//! throughput is more replicas behind a load balancer (docs/SERVING.md).

pub mod api;
pub(crate) mod engine;
mod http;
pub mod metrics;
pub mod template;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use llama2::{Config, LanguageModel, Tokenizer};

use engine::{Engine, Job, Limits};
use metrics::Metrics;
use template::ChatTemplate;

/// How the server runs, from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    pub host: String,
    pub port: u16,
    /// Requests to `/v1/*` must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Origins allowed to call the API from a browser page of theirs
    /// (`*` for any); none: no CORS headers.
    pub cors: Vec<String>,
    /// The `model` name `/v1/models` reports.
    pub model_name: String,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Requests waiting for a sequence slot before new ones get 429.
    pub max_queue: usize,
    /// Largest `max_tokens` a request may ask for, and the default.
    pub max_tokens: usize,
    /// Sequences generated at once.
    pub parallel: usize,
    /// KV cache positions all sequences share; `None`: `parallel` whole
    /// contexts.
    pub kv_cache: Option<usize>,
    /// How long running requests may go on after SIGTERM or Ctrl-C.
    pub shutdown_grace: Duration,
}

/// What the loader hands the engine.
pub struct Loaded {
    pub model: Box<dyn LanguageModel>,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

/// What handlers need once the model is loaded.
pub(crate) struct Ready {
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    pub config: Config,
    /// KV blocks the engine may use.
    pub kv_blocks: usize,
}

/// State shared by the HTTP handlers and the engine thread.
pub(crate) struct Shared {
    pub options: Options,
    pub metrics: Metrics,
    pub ready: OnceLock<Ready>,
    pub load_error: OnceLock<String>,
    /// The engine's queue; `None` once shutting down.
    pub jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// Requests sent to the engine and not yet admitted.
    pub pending: AtomicUsize,
    pub shutting_down: AtomicBool,
    /// Set when the shutdown grace period is over: the engine ends all jobs.
    pub cancel_all: AtomicBool,
    /// Unix time the server started, for `/v1/models`.
    pub started: u64,
}

/// KV blocks for `positions` positions in all, and the default: `parallel`
/// whole contexts.
fn kv_blocks(options: &Options, seq_len: usize) -> usize {
    let positions = options
        .kv_cache
        .unwrap_or(options.parallel.saturating_mul(seq_len));
    engine::blocks_for(positions).max(1)
}

/// Runs the server until SIGTERM or Ctrl-C. It listens at once (answering
/// `/health` with 503) while `load` loads the model on the engine thread.
pub fn run(options: Options, load: impl FnOnce() -> Result<Loaded> + Send + 'static) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (tx, rx) = mpsc::channel::<Job>();
    let shared = Arc::new(Shared {
        options,
        metrics: Metrics::default(),
        ready: OnceLock::new(),
        load_error: OnceLock::new(),
        jobs: Mutex::new(Some(tx)),
        pending: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        cancel_all: AtomicBool::new(false),
        started: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    });
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<()>();
    let engine = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("llama2-engine".into())
            .spawn(move || engine_thread(shared, load, rx, failed_tx))
            .context("cannot start the engine thread")?
    };
    let served = runtime.block_on(serve(shared.clone(), failed_rx));
    // No more jobs: the engine finishes what runs and returns.
    shared.jobs.lock().map(|mut j| j.take()).ok();
    shared.cancel_all.store(true, Ordering::Relaxed);
    let _ = engine.join();
    served?;
    match shared.load_error.get() {
        Some(e) => anyhow::bail!("{e}"),
        None => Ok(()),
    }
}

fn engine_thread(
    shared: Arc<Shared>,
    load: impl FnOnce() -> Result<Loaded>,
    jobs: mpsc::Receiver<Job>,
    failed: tokio::sync::oneshot::Sender<()>,
) {
    let loaded = match load() {
        Ok(l) => l,
        Err(e) => {
            let _ = shared.load_error.set(format!("{e:#}"));
            let _ = failed.send(());
            return;
        }
    };
    let tokenizer = Arc::new(loaded.tokenizer);
    let config = *loaded.model.config();
    let limits = Limits {
        parallel: shared.options.parallel,
        kv_blocks: kv_blocks(&shared.options, config.seq_len),
    };
    let engine = Engine::new(loaded.model, tokenizer.clone(), limits, shared.clone());
    let _ = shared.ready.set(Ready {
        tokenizer,
        template: loaded.template,
        config,
        kv_blocks: limits.kv_blocks,
    });
    eprintln!("ready: the model is loaded");
    engine.run(jobs);
}

async fn serve(shared: Arc<Shared>, load_failed: tokio::sync::oneshot::Receiver<()>) -> Result<()> {
    let o = &shared.options;
    let addr: SocketAddr = format!("{}:{}", o.host, o.port)
        .parse()
        .or_else(|_| {
            use std::net::ToSocketAddrs;
            (o.host.as_str(), o.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or(())
        })
        .map_err(|_| anyhow::anyhow!("cannot resolve --host {}", o.host))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}: is another server using the port?"))?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    let app = http::router(shared.clone())
        .layer(axum::extract::DefaultBodyLimit::max(o.max_body))
        .layer(cors(&o.cors)?);
    let (hard_stop, stopped) = tokio::sync::oneshot::channel();
    let shutdown = shutdown_signal(shared.clone(), load_failed, hard_stop);
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    // A client that stops reading would hold its connection open forever:
    // past the grace period (and a margin for the last events), stop anyway.
    tokio::select! {
        served = server => served.context("the HTTP server failed"),
        Ok(()) = stopped => {
            eprintln!("stopping: connections still open after the grace period are closed");
            Ok(())
        }
    }
}

/// The CORS layer: nothing allowed unless origins are given.
fn cors(origins: &[String]) -> Result<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return Ok(CorsLayer::new());
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| {
                o.parse()
                    .with_context(|| format!("--cors {o:?} is not a valid origin"))
            })
            .collect::<Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods(Any)
        .allow_headers(Any))
}

/// Resolves on SIGTERM, Ctrl-C or a failed load. New requests are then
/// refused; running ones may finish within the grace period, after which
/// the engine ends them.
async fn shutdown_signal(
    shared: Arc<Shared>,
    load_failed: tokio::sync::oneshot::Receiver<()>,
    hard_stop: tokio::sync::oneshot::Sender<()>,
) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    let failed = async {
        if load_failed.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
        _ = failed => return,
    }
    eprintln!(
        "shutting down: finishing running requests (at most {} s)",
        shared.options.shutdown_grace.as_secs()
    );
    shared.shutting_down.store(true, Ordering::Relaxed);
    shared.jobs.lock().map(|mut j| j.take()).ok();
    let grace = shared.options.shutdown_grace;
    let s = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        s.cancel_all.store(true, Ordering::Relaxed);
        tokio::time::sleep(HARD_STOP_MARGIN).await;
        let _ = hard_stop.send(());
    });
}

/// How long after the grace period connections may still drain the events
/// of requests the engine ended.
const HARD_STOP_MARGIN: Duration = Duration::from_secs(2);
