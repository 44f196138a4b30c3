//! Chat templates: the model's own (`chat_template.jinja` or the
//! `chat_template` of `tokenizer_config.json`, beside the model), rendered
//! with minijinja and its Python-compatible string and list methods, or
//! else llama2.c's Llama 2 `[INST]` format. The rendered text is turned
//! into tokens with the special tokens it names (`<s>`, `</s>`, or a
//! tokenizer.json's added tokens) as their ids, not as characters.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use llama2::Tokenizer;
use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

/// The Llama 2 chat format llama2.c's `chat` mode writes, as a template:
/// each user turn `<s>[INST] ... [/INST]`, the system prompt inside the
/// first, each assistant answer followed by `</s>`.
const LLAMA2_TEMPLATE: &str = "\
{% if messages and messages[0].role == 'system' %}\
{% set system = messages[0].content %}{% set turns = messages[1:] %}\
{% else %}{% set turns = messages %}{% endif %}\
{% for message in turns %}\
{% if message.role == 'user' %}{{ bos_token }}[INST] \
{% if loop.first and system is defined %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}\
{{ message.content }} [/INST]\
{% elif message.role == 'assistant' %} {{ message.content }} {{ eos_token }}{% endif %}\
{% endfor %}";

/// A chat template ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where it came from, for the start-up line.
    pub source: String,
    bos_token: String,
    eos_token: String,
}

/// A message as templates see it.
#[derive(serde::Serialize)]
pub struct TemplateMessage {
    pub role: String,
    pub content: String,
}

/// The directory holding the model's side files: the model itself when it
/// is a directory, else the one it lies in.
fn model_dir(model: &Path) -> PathBuf {
    if model.is_dir() {
        model.to_path_buf()
    } else {
        model
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
    }
}

/// A token string of tokenizer_config.json: a string, or an object with
/// its `content`.
fn token_string(config: &Json, key: &str, default: &str) -> String {
    match config.get(key) {
        Some(Json::String(s)) => s.clone(),
        Some(Json::Object(o)) => o
            .get("content")
            .and_then(Json::as_str)
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    }
}

impl ChatTemplate {
    /// The template for the model at `model`: `explicit` when given, else
    /// the model's own files, else the Llama 2 format.
    pub fn find(model: &Path, explicit: Option<&Path>) -> Result<Self> {
        let dir = model_dir(model);
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?,
            Err(_) => Json::Null,
        };
        let bos = token_string(&config, "bos_token", "<s>");
        let eos = token_string(&config, "eos_token", "</s>");
        let jinja = dir.join("chat_template.jinja");
        let (source, text) = if let Some(path) = explicit {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the chat template {}", path.display()))?;
            (path.display().to_string(), text)
        } else if model.is_dir() && jinja.is_file() {
            (
                jinja.display().to_string(),
                std::fs::read_to_string(&jinja)?,
            )
        } else if let Some(t) = model.is_dir().then(|| config_template(&config)).flatten() {
            (config_path.display().to_string(), t)
        } else {
            (
                "llama2.c's Llama 2 [INST] format".to_string(),
                LLAMA2_TEMPLATE.to_string(),
            )
        };
        Self::new(source, text, bos, eos)
    }

    fn new(source: String, text: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned("chat", text)
            .with_context(|| format!("the chat template of {source} does not parse"))?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token,
            eos_token,
        })
    }

    /// The conversation as the model's prompt text, ending where the
    /// assistant's answer begins.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, String> {
        let template = self.env.get_template("chat").map_err(|e| e.to_string())?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid").to_string(),
                _ => format!("the chat template failed: {e}"),
            })
    }

    /// Tokens of rendered text, starting with BOS. A tokenizer.json finds
    /// the special tokens in the text itself (its added tokens); for
    /// llama2.c and SentencePiece tokenizers the BOS and EOS strings become
    /// their ids here and the text between them is encoded without BOS.
    pub fn encode(&self, tok: &Tokenizer, text: &str) -> llama2::Result<Vec<u32>> {
        let (bos, eos) = tok.bos_eos();
        if tok.is_hugging_face() {
            let mut ids = tok.encode_text(text, false, false)?;
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
            return Ok(ids);
        }
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let next = [(&self.bos_token, bos), (&self.eos_token, eos)]
                .into_iter()
                .filter(|(s, _)| !s.is_empty())
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), id)))
                .min();
            let Some((at, len, id)) = next else {
                ids.extend(tok.encode_text(rest, false, false)?);
                break;
            };
            if at > 0 {
                ids.extend(tok.encode_text(&rest[..at], false, false)?);
            }
            ids.push(id);
            rest = &rest[at + len..];
        }
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of named
/// templates of which "default" is the one.
fn config_template(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(String::from)),
        _ => None,
    }
}

/// Checks a template file given by flag exists, for an early error.
pub fn check_explicit(path: Option<&Path>) -> Result<()> {
    if let Some(p) = path {
        if !p.is_file() {
            bail!("the chat template {} does not exist", p.display());
        }
    }
    Ok(())
}
