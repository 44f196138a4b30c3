//! SentencePiece `tokenizer.model` files (protobuf `ModelProto`): any bytes
//! are refused with an error or give at least one piece, BOS and EOS ids
//! that name control pieces "<s>" and "</s>", and a tokenizer.bin laid out
//! as llama2.c's tokenizer.py writes it (header, then score, length and
//! text of every piece, "▁" written as a space, BOS and EOS as "\n<s>\n"
//! and "\n</s>\n"). When the model has at least 3 pieces and its longest
//! written piece is 1 to 65536 bytes, as tokenizer.bin requires, that file
//! parses back to the same pieces and encodes text to ids inside them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama2::sentencepiece::{PieceKind, SentencePieceModel};
use llama2::Tokenizer;

/// The longest piece tokenizer.bin readers accept.
const MAX_PIECE_BYTES: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = SentencePieceModel::parse(data) else {
        return;
    };
    let n = model.pieces.len();
    assert!(n > 0, "a model that parses has pieces");
    let (bos, eos) = (model.bos_id(), model.eos_id());
    for (id, text) in [(bos, "<s>"), (eos, "</s>")] {
        if let Some(id) = id {
            let p = &model.pieces[id];
            assert!(p.kind == PieceKind::Control && p.text == text, "{p:?}");
        }
    }
    let written: Vec<String> = model
        .pieces
        .iter()
        .enumerate()
        .map(|(id, p)| match Some(id) {
            i if i == bos => "\n<s>\n".to_string(),
            i if i == eos => "\n</s>\n".to_string(),
            _ => p.text.replace('\u{2581}', " "),
        })
        .collect();
    let longest = written.iter().map(String::len).max().unwrap_or(0);

    let bin = model.to_tokenizer_bin();
    assert_eq!(bin[..4], (longest as i32).to_le_bytes());
    let mut at = 4;
    for (p, text) in model.pieces.iter().zip(&written) {
        assert_eq!(bin[at..at + 4], p.score.to_le_bytes());
        assert_eq!(bin[at + 4..at + 8], (text.len() as i32).to_le_bytes());
        assert_eq!(&bin[at + 8..at + 8 + text.len()], text.as_bytes());
        at += 8 + text.len();
    }
    assert_eq!(at, bin.len(), "tokenizer.bin has bytes after its pieces");

    if n < 3 || !(1..=MAX_PIECE_BYTES).contains(&longest) {
        return;
    }
    let tok = Tokenizer::parse_all(&bin).expect("the converted tokenizer.bin parses");
    assert_eq!(tok.vocab_size(), n);
    assert_eq!(tok.max_token_length() as usize, longest);
    assert_eq!(tok.longest_piece(), longest);
    for (id, text) in written.iter().enumerate() {
        assert_eq!(tok.piece(id as u32), text.as_bytes(), "piece {id}");
    }
    let ids = tok.encode("Once upon a time, Ünïcödé 🦙", true, true);
    assert!(ids.iter().all(|&id| (id as usize) < n), "{ids:?}");
});
