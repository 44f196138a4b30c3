//! Training a Llama-style BPE tokenizer (llama2.c's tinystories.py
//! `train_vocab`, which runs SentencePiece) with Hugging Face's BPE trainer,
//! configured as SentencePiece's BPE with byte fallback: spaces become "▁"
//! and one is prepended to each text, digits are split, and the vocabulary
//! is `<unk>` `<s>` `</s>`, the 256 `<0xNN>` byte tokens, the merges in the
//! order learned, then the single characters. The result is written both as
//! a tokenizer.json and as llama2.c's tokenizer.bin, whose scores (minus the
//! merge rank) make run.c's greedy encoder follow the same merges.

use std::collections::HashMap;

use serde_json::{json, Value};
use tokenizers::models::bpe::BpeTrainer;
use tokenizers::models::TrainerWrapper;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

/// `<unk>`, `<s>`, `</s>`, in id order.
const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];
/// Specials plus byte tokens: ids below this are fixed.
pub const FIXED_TOKENS: usize = 3 + 256;
/// The smallest vocabulary accepted: room for a few characters and merges.
pub const MIN_VOCAB: usize = FIXED_TOKENS + 8;
/// SentencePiece's default `max_piece_length`.
const MAX_PIECE_CHARS: usize = 16;

/// A trained tokenizer in both file forms.
pub struct Trained {
    /// tokenizer.json text.
    pub json: String,
    /// tokenizer.bin bytes.
    pub bin: Vec<u8>,
    /// Merges learned and single characters kept.
    pub merges: usize,
    pub characters: usize,
}

/// Learns a vocabulary of exactly `vocab_size` tokens from `documents`.
/// Characters beyond half the room left after the fixed tokens are dropped,
/// rarest first (they are spelled with byte tokens), so that a small
/// vocabulary still has room for merges.
pub fn train<I>(documents: I, vocab_size: usize) -> Result<Trained>
where
    I: Iterator<Item = String> + Send,
{
    if vocab_size < MIN_VOCAB {
        return Err(Error::Invalid(format!(
            "a vocabulary of {vocab_size} tokens is too small: {FIXED_TOKENS} are <unk>, <s>, \
             </s> and the 256 byte tokens, so give at least {MIN_VOCAB}"
        )));
    }
    let room = vocab_size - FIXED_TOKENS;
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainer::builder()
            .vocab_size(vocab_size - 256)
            .special_tokens(
                SPECIALS
                    .iter()
                    .map(|s| AddedToken::from(*s, true))
                    .collect(),
            )
            .limit_alphabet(room / 2)
            .max_token_length(Some(MAX_PIECE_CHARS))
            .show_progress(false)
            .build(),
    );
    let skeleton = tokenizer_json(&Value::Object(Default::default()), &[]);
    let mut tokenizer = tokenizers::Tokenizer::from_bytes(skeleton.to_string())
        .map_err(|e| Error::Invalid(format!("cannot set up the BPE trainer: {e}")))?;
    let mut count = 0usize;
    let documents = documents.inspect(|_| count += 1);
    tokenizer
        .train(&mut trainer, documents)
        .map_err(|e| Error::Invalid(format!("BPE training failed: {e}")))?;
    if count == 0 {
        return Err(Error::Invalid("the input holds no text to train on".into()));
    }
    let model = serde_json::to_value(tokenizer.get_model())
        .map_err(|e| Error::Invalid(format!("cannot read the trained model: {e}")))?;
    arrange(&model, vocab_size)
}

/// The trained model's tokens in our order, checked to number `vocab_size`.
fn arrange(model: &Value, vocab_size: usize) -> Result<Trained> {
    let merges = merge_pairs(model)?;
    let trained_vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| Error::Invalid("the trained model has no vocabulary".into()))?;
    let mut characters: Vec<(&str, u64)> = trained_vocab
        .iter()
        .filter(|(t, _)| !SPECIALS.contains(&t.as_str()) && t.chars().count() == 1)
        .map(|(t, id)| (t.as_str(), id.as_u64().unwrap_or(0)))
        .collect();
    characters.sort_by_key(|&(_, id)| id);
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut merge_count = 0;
    for (a, b) in &merges {
        let merged = format!("{a}{b}");
        if !ids.contains_key(&merged) {
            ids.insert(merged.clone(), tokens.len());
            tokens.push(merged);
            merge_count += 1;
        }
    }
    tokens.extend(characters.iter().map(|(c, _)| c.to_string()));
    if tokens.len() != vocab_size {
        return Err(Error::Invalid(format!(
            "the input only has enough text for {} tokens ({merge_count} merges, {} characters), \
             not {vocab_size}: give more text or a smaller --vocab-size",
            tokens.len(),
            characters.len()
        )));
    }
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), json!(id)))
        .collect();
    Ok(Trained {
        json: serde_json::to_string_pretty(&tokenizer_json(&Value::Object(vocab), &merges))
            .expect("JSON values serialize"),
        bin: bin_bytes(&tokens, merge_count),
        merges: merge_count,
        characters: characters.len(),
    })
}

/// The model's merges in rank order; the library writes each as a pair
/// (or, in older versions, as "a b").
fn merge_pairs(model: &Value) -> Result<Vec<(String, String)>> {
    let list = model["merges"]
        .as_array()
        .ok_or_else(|| Error::Invalid("the trained model has no merges".into()))?;
    list.iter()
        .map(|m| match m {
            Value::Array(p) if p.len() == 2 => {
                Some((p[0].as_str()?.to_owned(), p[1].as_str()?.to_owned()))
            }
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Invalid("the trained model's merges are malformed".into()))
}

/// tokenizer.bin for `tokens` (fixed tokens, then `merge_count` merges,
/// then characters), as llama2.c's tokenizer.py writes a SentencePiece
/// model: "▁" as a space, BOS and EOS as "\n<s>\n" and "\n</s>\n". Fixed
/// tokens score 0; the others minus their rank, so run.c merges the
/// earliest-learned pair first, as BPE does.
fn bin_bytes(tokens: &[String], merge_count: usize) -> Vec<u8> {
    debug_assert!(tokens.len() >= FIXED_TOKENS + merge_count);
    let pieces: Vec<Vec<u8>> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| match id {
            1 => b"\n<s>\n".to_vec(),
            2 => b"\n</s>\n".to_vec(),
            _ => t.replace('\u{2581}', " ").into_bytes(),
        })
        .collect();
    let scores = (0..tokens.len()).map(|id| {
        if id < FIXED_TOKENS {
            0.0
        } else {
            -((id - FIXED_TOKENS) as f32)
        }
    });
    let longest = pieces.iter().map(Vec::len).max().unwrap_or(1) as u32;
    crate::tokenizer::bin_bytes(longest, pieces.iter().map(Vec::as_slice).zip(scores))
}

/// A Llama-2-style tokenizer.json around a BPE model of `vocab` and `merges`.
fn tokenizer_json(vocab: &Value, merges: &[(String, String)]) -> Value {
    let added: Vec<Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, s)| {
            json!({"id": id, "content": s, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let merges: Vec<Value> = merges.iter().map(|(a, b)| json!([a, b])).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": true},
            {"type": "Digits", "individual_digits": true}
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    })
}
