//! Hugging Face `tokenizer.json` files, encoded by Hugging Face's own
//! `tokenizers` library (so every pre-tokenizer, normalizer and added token
//! behaves exactly as in transformers) and decoded through our own
//! per-token byte table, so that generated text streams through the same
//! UTF-8-safe path as llama2.c's tokenizer. Two families are understood:
//!
//! - SentencePiece-style BPE with byte fallback (Llama 1/2, TinyLlama):
//!   pieces spell spaces as "▁" and bytes as `<0xXX>`; the leading space
//!   after BOS is dropped, as llama2.c does;
//! - byte-level BPE (Llama 3.x, SmolLM): every token is a run of bytes in
//!   GPT-2's printable byte alphabet, mapped back here.
//!
//! Other decoders are refused by name.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::files;

/// Largest tokenizer.json read (Llama 3's is 17 MB).
const MAX_BYTES: u64 = 256 << 20;

/// What a tokenizer.json gives the rest of the program.
pub struct HfVocabulary {
    pub encoder: tokenizers::Tokenizer,
    /// The bytes each token stands for, by id (specials as their text).
    pub pieces: Vec<Vec<u8>>,
    /// Whether a leading space is dropped right after BOS (SentencePiece).
    pub strip_space_after_bos: bool,
}

/// Reads the tokenizer.json at `path`.
pub fn load(path: &Path) -> Result<HfVocabulary> {
    let bytes = files::read_bounded(path, "tokenizer.json", MAX_BYTES)?;
    let bad = |reason: String| Error::tokenizer(path, reason);
    let json: Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let byte_level = decoder_kind(&json).map_err(bad)?;
    let encoder = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| bad(format!("the tokenizers library cannot read it: {e}")))?;
    let size = encoder.get_vocab_size(true);
    let pieces = (0..size as u32)
        .map(|id| {
            let token = encoder.id_to_token(id).unwrap_or_default();
            if byte_level {
                byte_level_bytes(&token)
            } else {
                token.replace('\u{2581}', " ").into_bytes()
            }
        })
        .collect();
    Ok(HfVocabulary {
        encoder,
        pieces,
        strip_space_after_bos: !byte_level,
    })
}

/// BOS and EOS ids for a tokenizer.json used without a model: the
/// `bos_token` / `eos_token` of the tokenizer_config.json beside it, else
/// the first of the usual special tokens the vocabulary has, else 1 and 2.
pub fn special_ids(path: &Path, encoder: &tokenizers::Tokenizer) -> (u32, u32) {
    let config = path.with_file_name("tokenizer_config.json");
    let json: Option<Value> = files::read_bounded(&config, "tokenizer_config.json", 1 << 24)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let named = |key: &str| -> Option<u32> {
        let v = json.as_ref()?.get(key)?;
        let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
        encoder.token_to_id(text)
    };
    let first = |names: &[&str], default: u32| {
        names
            .iter()
            .find_map(|n| encoder.token_to_id(n))
            .unwrap_or(default)
    };
    let bos = named("bos_token").unwrap_or_else(|| first(&["<s>", "<|begin_of_text|>"], 1));
    let eos = named("eos_token").unwrap_or_else(|| first(&["</s>", "<|end_of_text|>"], 2));
    (bos, eos)
}

/// Whether the file's decoder is byte-level (true) or SentencePiece-style
/// (false); anything else is an error naming it.
fn decoder_kind(json: &Value) -> std::result::Result<bool, String> {
    let decoder = json.get("decoder").unwrap_or(&Value::Null);
    let kind = |d: &Value| {
        d.get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let kinds: Vec<String> = match kind(decoder).as_str() {
        "Sequence" => decoder
            .get("decoders")
            .and_then(Value::as_array)
            .map(|ds| ds.iter().map(kind).collect())
            .unwrap_or_default(),
        k => vec![k.to_owned()],
    };
    if kinds.iter().any(|k| k == "ByteLevel") {
        Ok(true)
    } else if kinds.iter().any(|k| k == "ByteFallback" || k == "Replace") {
        Ok(false)
    } else {
        Err(format!(
            "its decoder is {kinds:?}; supported are byte-level BPE (Llama 3) and \
             SentencePiece-style BPE with byte fallback (Llama 2)"
        ))
    }
}

/// The raw bytes of a byte-level token: GPT-2 spells each byte as one
/// printable character (bytes that are printable Latin-1 as themselves,
/// the others as U+0100 + n in order). Characters outside that alphabet
/// (special tokens such as `<|eot_id|>`) are kept as their UTF-8.
fn byte_level_bytes(token: &str) -> Vec<u8> {
    let reverse = byte_level_reverse();
    let mut out = Vec::with_capacity(token.len());
    for ch in token.chars() {
        match reverse.get(ch as usize).copied().flatten() {
            Some(b) => out.push(b),
            None => out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

/// The byte each character of the byte-level alphabet stands for, indexed
/// by code point (the alphabet lies below U+0200).
fn byte_level_reverse() -> &'static [Option<u8>; 0x200] {
    static REVERSE: std::sync::OnceLock<[Option<u8>; 0x200]> = std::sync::OnceLock::new();
    REVERSE.get_or_init(|| {
        let mut reverse = [None; 0x200];
        for (b, &c) in byte_level_table().iter().enumerate() {
            reverse[c as usize] = Some(b as u8);
        }
        reverse
    })
}

/// GPT-2's byte-to-character table: index = byte.
fn byte_level_table() -> &'static [char; 256] {
    static TABLE: std::sync::OnceLock<[char; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let printable = |b: u32| {
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        let mut table = ['\0'; 256];
        let mut next = 0x100;
        for b in 0..256u32 {
            table[b as usize] = if printable(b) {
                char::from_u32(b).expect("Latin-1")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below U+0200")
            };
        }
        table
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_alphabet_round_trips_every_byte() {
        let table = byte_level_table();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'A' as usize], 'A');
        for b in 0..=255u8 {
            assert_eq!(byte_level_bytes(&table[b as usize].to_string()), [b]);
        }
        assert_eq!(byte_level_bytes("ĠOnce"), b" Once");
        assert_eq!(byte_level_bytes("<|eot_id|>"), b"<|eot_id|>");
    }
}
