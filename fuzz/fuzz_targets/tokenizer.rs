//! tokenizer.bin files: any bytes are refused or give a tokenizer that
//! encodes any text to ids inside its vocabulary and decodes them to valid
//! UTF-8. The first byte picks how the file is read (all entries, or a
//! vocabulary size as a model would give), the next two give the length of
//! the text at the end (little-endian); the bytes between are the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama2::tokenizer::{Utf8Stream, BOS};
use llama2::Tokenizer;

fuzz_target!(|data: &[u8]| {
    let [mode, lo, hi, rest @ ..] = data else {
        return;
    };
    let text_len = (u16::from_le_bytes([*lo, *hi]) as usize).min(rest.len());
    let (file, text) = rest.split_at(rest.len() - text_len);
    let parsed = match mode % 4 {
        0 => Tokenizer::parse_all(file),
        1 => Tokenizer::parse(file, 512),
        2 => Tokenizer::parse(file, 32000),
        _ => Tokenizer::parse(file, text.len()),
    };
    let Ok(tok) = parsed else {
        return;
    };
    let ids = tok.encode_bytes(text, true, true);
    let mut stream = Utf8Stream::new();
    let mut out = Vec::new();
    let mut prev = BOS;
    for &id in &ids {
        assert!(
            (id as usize) < tok.vocab_size(),
            "id {id} outside the vocabulary"
        );
        stream.push(tok.decode(prev, id), &mut out);
        prev = id;
    }
    assert!(
        std::str::from_utf8(&out).is_ok(),
        "decoded output is not UTF-8"
    );
});
