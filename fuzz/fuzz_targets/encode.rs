//! Prompts: any bytes encoded with the real tokenizers (tok512 and Llama 2's
//! from shared/models) give ids inside the vocabulary, and valid UTF-8 text
//! without control characters decodes back to itself.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use llama2::tokenizer::{Utf8Stream, BOS};
use llama2::Tokenizer;

fn tokenizers() -> &'static [Tokenizer] {
    static TOKENIZERS: OnceLock<Vec<Tokenizer>> = OnceLock::new();
    TOKENIZERS.get_or_init(|| {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/models");
        ["tok512.bin", "tokenizer.bin"]
            .iter()
            .map(|f| Tokenizer::load_all(&models.join(f)).expect("shared/models tokenizers"))
            .collect()
    })
}

/// Whether `run.c`'s printing rules keep every character of `s`: single
/// control bytes are dropped when they decode from byte tokens.
fn printable(s: &str) -> bool {
    s.bytes()
        .all(|b| b >= 0x20 || b"\t\n\x0b\x0c\r".contains(&b))
        && !s.contains('\u{7f}')
}

fuzz_target!(|data: &[u8]| {
    for tok in tokenizers() {
        let ids = tok.encode_bytes(data, true, false);
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        let mut stream = Utf8Stream::new();
        let mut out = Vec::new();
        let mut prev = BOS;
        for &id in &ids[1..] {
            stream.push(tok.decode(prev, id), &mut out);
            prev = id;
        }
        let text = std::str::from_utf8(&out).expect("decoded output is UTF-8");
        if let Ok(input) = std::str::from_utf8(data) {
            if printable(input) {
                assert_eq!(text, input, "round trip");
            }
        }
    }
});
