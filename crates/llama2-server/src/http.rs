//! The HTTP side: axum routes, the API key check, error answers in
//! OpenAI's shape, and the handlers that turn a request into an engine
//! `Job` and the job's events into a JSON answer or an SSE stream.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::api::{self, ChatRequest, CompletionRequest, FinishReason, Invalid, Prompt, Settings};
use crate::engine::{reservation, Event, Job, Piece};
use crate::template::TemplateMessage;
use crate::{Ready, Shared};

const PAGE: &str = include_str!("../static/index.html");

/// An error answer: status and OpenAI's error body.
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.message,
            param: e.param,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::INTERNAL_SERVER_ERROR => "server_error",
            _ => "invalid_request_error",
        };
        let body = api::error_body(&self.message, kind, self.param, None);
        (self.status, Json(body)).into_response()
    }
}

/// Routes of the server, with `state` shared by all handlers.
pub fn router(state: Arc<Shared>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_oversized,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// Bodies declared larger than this are refused without reading them.
const DRAIN_LIMIT: u64 = 64 << 20;

/// How long an oversized body may take to arrive before it is cut off.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers 413 to a body whose `Content-Length` exceeds `--max-body`, after
/// reading and dropping it (up to `DRAIN_LIMIT` bytes and `DRAIN_TIME`).
/// Answering first and closing would leave the client's unsent bytes
/// unread, and a socket closed with unread data is reset: the client
/// would see a broken connection instead of the 413. Bodies without a
/// length are cut off by the extractor's limit as before.
async fn refuse_oversized(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(len) = declared.filter(|&len| len > s.options.max_body as u64) else {
        return next.run(req).await;
    };
    let endpoint = match req.uri().path() {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        _ => "other",
    };
    if len <= DRAIN_LIMIT {
        let mut data = req.into_body().into_data_stream();
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(Ok(_)) = tokio_stream::StreamExt::next(&mut data).await {}
        });
        let _ = drained.await;
    }
    s.metrics.request(endpoint, 413);
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body ({len} bytes) is larger than the server's --max-body limit ({} bytes)",
            s.options.max_body
        ),
    )
    .into_response()
}

/// Refuses requests without the server's API key, when it has one.
async fn authorize(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.options.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            s.metrics.request("auth", 401);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key: send it as `Authorization: Bearer KEY`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    if let Some(e) = s.load_error.get() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "error": e})),
        )
            .into_response();
    }
    match s.ready.get() {
        Some(_) if !s.shutting_down.load(Ordering::Relaxed) => {
            Json(json!({"status": "ok"})).into_response()
        }
        Some(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "shutting down"})),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading"})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let headers = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
    (headers, s.metrics.render()).into_response()
}

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.options.model_name,
            "object": "model",
            "created": s.started,
            "owned_by": "llama2-rs",
        }],
    }))
}

/// The loaded model, or 503 while loading or shutting down.
fn ready(s: &Shared) -> Result<&Ready, ApiError> {
    if s.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    s.ready.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading; retry shortly",
        )
    })
}

/// Parses a JSON body, mapping every failure to a 400 or 413 answer.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server's --max-body limit".to_string()
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::new(status, message)
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// What both endpoints share: validation of the prompt's length and the
/// limits, queueing, and the id.
struct Submitted {
    id: String,
    events: mpsc::UnboundedReceiver<Event>,
}

fn submit(
    s: &Shared,
    r: &Ready,
    prompt: Vec<u32>,
    mut settings: Settings,
    (prefix, streamed): (&str, bool),
) -> Result<Submitted, ApiError> {
    let seq_len = r.config.seq_len;
    if prompt.len() >= seq_len {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "the prompt is {} tokens and the model's context is {seq_len}: shorten it to at \
                 most {} tokens",
                prompt.len(),
                seq_len - 1
            ),
            param: Some("prompt"),
        });
    }
    let limit = s.options.max_tokens;
    match settings.max_tokens {
        Some(m) if m > limit => {
            return Err(api::invalid(
                "max_tokens",
                format!("max_tokens is {m}; this server allows at most {limit}"),
            )
            .into())
        }
        Some(_) => {}
        None => settings.max_tokens = Some(limit),
    }
    let (_, blocks) = reservation(prompt.len(), settings.max_tokens, seq_len);
    if blocks > r.kv_blocks {
        return Err(api::invalid(
            "max_tokens",
            format!(
                "the prompt and max_tokens need {blocks} KV cache blocks and the server has {}: \
                 lower max_tokens",
                r.kv_blocks
            ),
        )
        .into());
    }
    // Reserve a place in the queue, or refuse when it is full.
    let queued = s.pending.fetch_add(1, Ordering::Relaxed);
    if queued >= s.options.max_queue {
        s.pending.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{queued} requests are already waiting; retry later"),
        ));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        prompt,
        settings,
        events: tx,
        received: Instant::now(),
        streamed,
    };
    let sent = s
        .jobs
        .lock()
        .ok()
        .and_then(|j| j.as_ref().map(|j| j.send(job).is_ok()));
    if sent != Some(true) {
        s.pending.fetch_sub(1, Ordering::Relaxed);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        ));
    }
    Ok(Submitted {
        id: format!("{prefix}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        events: rx,
    })
}

/// Which endpoint is answering, for the shapes of its objects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// How one request's answer is written.
struct Reply {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    /// Logprobs were asked for (the count of alternatives is the engine's).
    logprobs: bool,
    include_usage: bool,
    tokenizer: Arc<llama2::Tokenizer>,
}

impl Reply {
    /// How request `sub` is answered: `(kind, logprobs asked for, stream
    /// options)`, named `model` as the client named it (else the server's
    /// name).
    fn new(
        (kind, logprobs, stream_options): (Kind, bool, &Option<api::StreamOptions>),
        sub: &Submitted,
        model: Option<&str>,
        s: &Shared,
        r: &Ready,
    ) -> Self {
        Reply {
            kind,
            id: sub.id.clone(),
            model: model.unwrap_or(&s.options.model_name).to_string(),
            created: created(),
            logprobs,
            include_usage: stream_options.as_ref().is_some_and(|o| o.include_usage),
            tokenizer: r.tokenizer.clone(),
        }
    }

    fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.tokenizer.piece(id)).into_owned()
    }

    /// A chunk's or a choice's `logprobs` for some pieces.
    fn logprobs(&self, pieces: &[Piece]) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Completion => {
                let tokens: Vec<String> = pieces.iter().map(|p| self.token_text(p.token)).collect();
                let lps: Vec<Option<f32>> = pieces.iter().map(|p| p.logprob).collect();
                let tops: Vec<Value> = pieces
                    .iter()
                    .map(|p| {
                        let m: serde_json::Map<String, Value> = p
                            .top_logprobs
                            .iter()
                            .map(|&(t, lp)| (self.token_text(t), json!(lp)))
                            .collect();
                        Value::Object(m)
                    })
                    .collect();
                let mut offset = 0;
                let offsets: Vec<usize> = pieces
                    .iter()
                    .map(|p| {
                        let at = offset;
                        offset += p.text.len();
                        at
                    })
                    .collect();
                json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
            }
            Kind::Chat => {
                let entry = |t: u32, lp: f32| {
                    let text = self.token_text(t);
                    json!({"token": text, "logprob": lp, "bytes": self.tokenizer.piece(t)})
                };
                let content: Vec<Value> = pieces
                    .iter()
                    .map(|p| {
                        let mut e = entry(p.token, p.logprob.unwrap_or(0.0));
                        let tops: Vec<Value> =
                            p.top_logprobs.iter().map(|&(t, lp)| entry(t, lp)).collect();
                        e["top_logprobs"] = json!(tops);
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.kind, streaming) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// A whole answer.
    fn full(&self, text: String, pieces: &[Piece], finish: FinishReason, usage: Value) -> Value {
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": self.logprobs(pieces),
                "finish_reason": finish.as_str(),
            }),
            Kind::Chat => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": self.logprobs(pieces), "finish_reason": finish.as_str(),
            }),
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created,
            "model": self.model, "choices": [choice], "usage": usage,
        })
    }

    /// One stream chunk: `text` with its pieces, or the last chunk.
    fn chunk(&self, text: Option<&str>, pieces: &[Piece], finish: Option<FinishReason>) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": self.logprobs(pieces),
                "finish_reason": finish,
            }),
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "logprobs": self.logprobs(pieces), "finish_reason": finish})
            }
        };
        self.envelope(json!([choice]))
    }

    fn envelope(&self, choices: Value) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created,
            "model": self.model, "choices": choices,
        })
    }
}

fn finish_metrics(s: &Shared, endpoint: &'static str, status: u16) {
    s.metrics.request(endpoint, status);
}

/// Collects a job's events into one answer.
async fn collect(
    s: Arc<Shared>,
    endpoint: &'static str,
    reply: Reply,
    mut sub: Submitted,
) -> Response {
    let mut text = String::new();
    let mut pieces = Vec::new();
    while let Some(event) = sub.events.recv().await {
        match event {
            Event::Token(p) => {
                text.push_str(&p.text);
                pieces.push(p);
            }
            Event::Done {
                reason,
                prompt_tokens,
                completion_tokens,
                held,
            } => {
                for p in held {
                    text.push_str(&p.text);
                    pieces.push(p);
                }
                finish_metrics(&s, endpoint, 200);
                let usage = api::usage(prompt_tokens, completion_tokens);
                return Json(reply.full(text, &pieces, reason, usage)).into_response();
            }
            Event::Failed(message) => {
                finish_metrics(&s, endpoint, 500);
                return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message).into_response();
            }
        }
    }
    finish_metrics(&s, endpoint, 500);
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the engine stopped").into_response()
}

/// Streams a job's events as server-sent events, ending with `[DONE]`.
fn stream(s: Arc<Shared>, endpoint: &'static str, reply: Reply, mut sub: Submitted) -> Response {
    let (tx, rx) = mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    tokio::spawn(async move {
        if reply.kind == Kind::Chat {
            let first = reply.envelope(json!([{
                "index": 0, "delta": {"role": "assistant", "content": ""},
                "logprobs": null, "finish_reason": null,
            }]));
            if tx.send(data(first)).is_err() {
                return;
            }
        }
        let mut status = 500;
        while let Some(event) = sub.events.recv().await {
            let chunk = match event {
                Event::Token(p) => {
                    if p.text.is_empty() && !reply.logprobs {
                        continue;
                    }
                    let text = p.text.clone();
                    reply.chunk(Some(&text), &[p], None)
                }
                Event::Done {
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    ..
                } => {
                    status = 200;
                    let last = reply.chunk(None, &[], Some(reason));
                    let _ = tx.send(data(last));
                    if reply.include_usage {
                        let mut u = reply.envelope(json!([]));
                        u["usage"] = api::usage(prompt_tokens, completion_tokens);
                        let _ = tx.send(data(u));
                    }
                    break;
                }
                Event::Failed(message) => {
                    let _ = tx.send(data(api::error_body(&message, "server_error", None, None)));
                    break;
                }
            };
            // The client has gone: dropping `sub` tells the engine.
            if tx.send(data(chunk)).is_err() {
                finish_metrics(&s, endpoint, 499);
                return;
            }
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
        finish_metrics(&s, endpoint, status);
    });
    Sse::new(UnboundedReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let endpoint = "completions";
    let result = async {
        let r = ready(&s)?;
        let req: CompletionRequest = parse(body)?;
        if req.echo {
            return Err(api::invalid("echo", "echo is not supported").into());
        }
        let top = api::top_logprobs("logprobs", req.logprobs)?;
        let settings = req.sampling.settings(top)?;
        let prompt = match &req.prompt {
            Prompt::Text(t) => r.tokenizer.encode_text(t, true, false),
            Prompt::Texts(v) if v.len() == 1 => r.tokenizer.encode_text(&v[0], true, false),
            Prompt::Texts(v) => {
                return Err(api::invalid(
                    "prompt",
                    format!("prompt must be one string, got a list of {}", v.len()),
                )
                .into())
            }
            Prompt::Tokens(ids) => check_tokens(ids, r.config.vocab_size),
        }
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        let sub = submit(&s, r, prompt, settings, ("cmpl", req.stream))?;
        let how = (Kind::Completion, top.is_some(), &req.stream_options);
        let reply = Reply::new(how, &sub, req.model.as_deref(), &s, r);
        Ok::<_, ApiError>((reply, sub, req.stream))
    }
    .await;
    respond(s, endpoint, result).await
}

/// Token-id prompts: each id in the vocabulary.
fn check_tokens(ids: &[u32], vocab: usize) -> llama2::Result<Vec<u32>> {
    match ids.iter().find(|&&t| t as usize >= vocab) {
        Some(t) => Err(llama2::Error::Invalid(format!(
            "prompt token {t} is outside the model's vocabulary of {vocab}"
        ))),
        None if ids.is_empty() => Err(llama2::Error::Invalid("the prompt holds no tokens".into())),
        None => Ok(ids.to_vec()),
    }
}

async fn chat(State(s): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Response {
    let endpoint = "chat";
    let result = async {
        let r = ready(&s)?;
        let req: ChatRequest = parse(body)?;
        if req.messages.is_empty() {
            return Err(api::invalid("messages", "messages must hold at least one message").into());
        }
        let top = match (
            req.logprobs,
            api::top_logprobs("top_logprobs", req.top_logprobs)?,
        ) {
            (false, Some(_)) => {
                return Err(
                    api::invalid("top_logprobs", "top_logprobs needs logprobs: true").into(),
                )
            }
            (false, None) => None,
            (true, n) => Some(n.unwrap_or(0)),
        };
        let settings = req.sampling.settings(top)?;
        let messages = req
            .messages
            .iter()
            .map(|m| {
                Ok(TemplateMessage {
                    role: m.role.clone(),
                    content: m.text()?,
                })
            })
            .collect::<Result<Vec<_>, Invalid>>()?;
        let text = r
            .template
            .render(&messages)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
        let prompt = r
            .template
            .encode(&r.tokenizer, &text)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
        let sub = submit(&s, r, prompt, settings, ("chatcmpl", req.stream))?;
        let how = (Kind::Chat, top.is_some(), &req.stream_options);
        let reply = Reply::new(how, &sub, req.model.as_deref(), &s, r);
        Ok::<_, ApiError>((reply, sub, req.stream))
    }
    .await;
    respond(s, endpoint, result).await
}

async fn respond(
    s: Arc<Shared>,
    endpoint: &'static str,
    result: Result<(Reply, Submitted, bool), ApiError>,
) -> Response {
    match result {
        Ok((reply, sub, true)) => stream(s, endpoint, reply, sub),
        Ok((reply, sub, false)) => collect(s, endpoint, reply, sub).await,
        Err(e) => {
            finish_metrics(&s, endpoint, e.status.as_u16());
            e.into_response()
        }
    }
}
