//! The OpenAI wire format: the request bodies of `/v1/completions` and
//! `/v1/chat/completions` as clients send them, their validation into the
//! engine's `Job` settings, and the response and stream-chunk objects.
//! Unknown fields are accepted and ignored, as OpenAI's clients send
//! fields that a small server has no use for (`user`, `metadata`, ...).

use llama2::sampling::{SamplingParams, MAX_TOP_LOGPROBS};
use serde::Deserialize;
use serde_json::{json, Value};

/// The most stop strings a request may give (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// A request refused as the client sent it: HTTP 400 with this message
/// and the offending parameter.
#[derive(Debug)]
pub struct Invalid {
    pub message: String,
    pub param: Option<&'static str>,
}

pub fn invalid(param: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        message: message.into(),
        param: Some(param),
    }
}

/// `stop`: one string or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: a string, a list holding one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub struct Sampling {
    pub max_tokens: Option<u64>,
    /// The chat endpoint's newer name for `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub ignore_eos: bool,
    pub n: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// The number of most likely tokens to return with each token.
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: bool,
}

/// A chat message's `content`: a string or a list of typed parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(flatten)]
    pub sampling: Sampling,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u64>,
}

impl Message {
    /// The text of the message; image or audio parts are refused.
    pub fn text(&self) -> Result<String, Invalid> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(invalid(
                                "messages",
                                format!(
                                    "message parts of type {kind:?} are not supported: this \
                                     model reads text parts only"
                                ),
                            ))
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

/// What the engine needs of a request's settings, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    pub params: SamplingParams,
    /// `None`: until the context is full (or the server's limit).
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub ignore_eos: bool,
}

fn finite(
    param: &'static str,
    v: Option<f32>,
    range: (f32, f32),
    default: f32,
) -> Result<f32, Invalid> {
    let v = v.unwrap_or(default);
    if !v.is_finite() || v < range.0 || v > range.1 {
        return Err(invalid(
            param,
            format!(
                "{param} must be between {} and {}, got {v}",
                range.0, range.1
            ),
        ));
    }
    Ok(v)
}

impl Sampling {
    /// Checks every field and turns them into engine settings, with
    /// OpenAI's defaults (temperature 1, top_p 1) where a field is absent.
    pub fn settings(&self, top_logprobs: Option<usize>) -> Result<Settings, Invalid> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(invalid(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k < 0 => {
                // -1 is "off" in llama.cpp and vLLM; accept it as such.
                if k == -1 {
                    0
                } else {
                    return Err(invalid(
                        "top_k",
                        format!("top_k must be 0 or more, got {k}"),
                    ));
                }
            }
            Some(k) => k as usize,
        };
        let seed = match self.seed {
            Some(s) => s as u64,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64 | 1),
        };
        let params = SamplingParams {
            temperature: finite("temperature", self.temperature, (0.0, 2.0), 1.0)?,
            top_p: finite("top_p", self.top_p, (0.0, 1.0), 1.0)?,
            top_k,
            min_p: finite("min_p", self.min_p, (0.0, 1.0), 0.0)?,
            repetition_penalty: finite(
                "repetition_penalty",
                self.repetition_penalty,
                (0.01, 10.0),
                1.0,
            )?,
            frequency_penalty: finite(
                "frequency_penalty",
                self.frequency_penalty,
                (-2.0, 2.0),
                0.0,
            )?,
            presence_penalty: finite("presence_penalty", self.presence_penalty, (-2.0, 2.0), 0.0)?,
            seed,
            top_logprobs,
        };
        params.validate().map_err(|m| Invalid {
            message: m,
            param: None,
        })?;
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > MAX_STOPS || stops.iter().any(|s| s.is_empty()) {
            return Err(invalid(
                "stop",
                format!("stop takes 1 to {MAX_STOPS} non-empty strings, got {stops:?}"),
            ));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => return Err(invalid("max_tokens", "max_tokens must be at least 1")),
            m => m.map(|m| m.min(usize::MAX as u64) as usize),
        };
        Ok(Settings {
            params,
            max_tokens,
            stops,
            ignore_eos: self.ignore_eos,
        })
    }
}

/// `logprobs` / `top_logprobs` counts checked against the limit.
pub fn top_logprobs(param: &'static str, n: Option<u64>) -> Result<Option<usize>, Invalid> {
    match n {
        Some(n) if n as usize > MAX_TOP_LOGPROBS => Err(invalid(
            param,
            format!("{param} must be at most {MAX_TOP_LOGPROBS}, got {n}"),
        )),
        n => Ok(n.map(|n| n as usize)),
    }
}

/// Why a choice ended, as OpenAI names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The body of an error answer.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": param, "code": code } })
}
