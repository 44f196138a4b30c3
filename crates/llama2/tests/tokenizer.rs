//! The tokenizer: encoding against ids computed with SentencePiece from
//! shared/models/tokenizer.model and tok512.model (checked against the
//! encode algorithm in shared/docs/FORMATS.md, which wins where the two
//! differ), decoding, and `Utf8Stream`'s byte handling.

mod common;

use common::*;
use llama2::tokenizer::{Utf8Stream, BOS, EOS};
use llama2::Tokenizer;

include!("common/tokenizer_cases.rs");

fn check_cases(tok: &Tokenizer, cases: &[(&str, &[u32])]) {
    for (text, want) in cases {
        assert_eq!(&tok.encode(text, true, false), want, "encoding {text:?}");
    }
}

#[test]
fn llama2_tokenizer_matches_sentencepiece() {
    check_cases(&llama_tokenizer(), LLAMA_CASES);
}

#[test]
fn tok512_matches_sentencepiece_and_run_c() {
    check_cases(&tok512(), TOK512_CASES);
}

#[test]
fn bos_and_eos_flags() {
    let tok = tok512();
    let body = &tok.encode("Hello world", true, false)[1..];
    assert_eq!(tok.encode("Hello world", false, false), body);
    let mut with_eos = body.to_vec();
    with_eos.push(EOS);
    assert_eq!(tok.encode("Hello world", false, true), with_eos);
    assert_eq!(tok.encode("", false, false), Vec::<u32>::new());
    assert_eq!(tok.encode("", true, true), vec![BOS, EOS]);
}

/// Decoding every token of an encoding with `Utf8Stream` gives the text back
/// (the dummy-prefix space is dropped after BOS), byte-fallback characters included.
fn round_trip(tok: &Tokenizer, text: &str) -> String {
    let ids = tok.encode(text, true, false);
    let mut stream = Utf8Stream::new();
    let mut out = Vec::new();
    for pair in ids.windows(2) {
        stream.push(tok.decode(pair[0], pair[1]), &mut out);
    }
    String::from_utf8(out).unwrap()
}

#[test]
fn decode_round_trips() {
    for (tok, cases) in [(llama_tokenizer(), LLAMA_CASES), (tok512(), TOK512_CASES)] {
        for (text, _) in cases {
            assert_eq!(round_trip(&tok, text), *text);
        }
    }
}

#[test]
fn decode_rules() {
    let tok = llama_tokenizer();
    // The leading space of a piece is dropped right after BOS only.
    assert_eq!(tok.piece(15043), b" Hello");
    assert_eq!(tok.decode(BOS, 15043), b"Hello");
    assert_eq!(tok.decode(3186, 15043), b" Hello");
    // Byte-fallback tokens decode to their raw byte: id = byte + 3.
    assert_eq!(tok.piece(13), b"<0x0A>");
    assert_eq!(tok.decode(BOS, 13), b"\n");
    for b in 0..=255u32 {
        assert_eq!(tok.decode(5, b + 3), &[b as u8], "byte {b:#x}");
    }
    assert_eq!(tok.piece(BOS), b"\n<s>\n");
    assert_eq!(tok.piece(EOS), b"\n</s>\n");
    assert_eq!(tok.max_token_length(), 27);
    assert_eq!(tok512().max_token_length(), 7);
}

#[test]
fn vocab_size_must_match_the_file() {
    let path = model_path("tokenizer.bin");
    let err = Tokenizer::load(&path, 512).unwrap_err().to_string();
    assert!(err.contains("larger"), "{err}");
    let err = Tokenizer::load(&model_path("tok512.bin"), 32000)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("too short for the model's 32000 tokens"),
        "{err}"
    );
    assert_eq!(Tokenizer::load_all(&path).unwrap().vocab_size(), 32000);
    assert_eq!(
        Tokenizer::load_all(&model_path("tok512.bin"))
            .unwrap()
            .vocab_size(),
        512
    );
    // Truncated anywhere: an error, never a panic.
    let bytes = std::fs::read(model_path("tok512.bin")).unwrap();
    for cut in [0, 3, 4, 7, 8, 100, bytes.len() - 1] {
        assert!(
            Tokenizer::parse(&bytes[..cut], 512).is_err(),
            "cut at {cut}"
        );
    }
    // A negative or absurd length.
    let mut bad = bytes.clone();
    bad[8..12].copy_from_slice(&(-5i32).to_le_bytes());
    assert!(Tokenizer::parse(&bad, 512).is_err());
    bad[8..12].copy_from_slice(&i32::MAX.to_le_bytes());
    assert!(Tokenizer::parse(&bad, 512).is_err());
}

#[test]
fn invalid_utf8_bytes_encode_as_byte_tokens() {
    let tok = tok512();
    // A lone continuation byte and an invalid lead byte fall back to bytes.
    assert_eq!(
        tok.encode_bytes(b"\x80\xff", true, false),
        vec![BOS, 410, 0x80 + 3, 0xff + 3]
    );
}

// ---------------------------------------------------------------------------
// Utf8Stream

fn stream(pieces: &[&[u8]]) -> Vec<u8> {
    let mut s = Utf8Stream::new();
    let mut out = Vec::new();
    for p in pieces {
        s.push(p, &mut out);
    }
    out
}

#[test]
fn utf8_stream_joins_byte_fallback_characters() {
    let llama = "🦙".as_bytes();
    assert_eq!(llama.len(), 4);
    // One byte per piece: nothing is printed until the character is whole.
    let mut s = Utf8Stream::new();
    let mut out = Vec::new();
    for (i, b) in llama.iter().enumerate() {
        s.push(&[*b], &mut out);
        if i < 3 {
            assert!(out.is_empty(), "printed a partial character");
        }
    }
    assert_eq!(out, llama);
    let two = "é".as_bytes();
    let three = "中".as_bytes();
    assert_eq!(
        stream(&[
            b"a",
            &two[..1],
            &two[1..],
            &three[..1],
            &three[1..2],
            &three[2..],
            b"b"
        ]),
        "aé中b".as_bytes()
    );
}

#[test]
fn utf8_stream_drops_broken_characters() {
    let llama = "🦙".as_bytes();
    // A character cut short by an ASCII byte or a whole piece: the partial
    // bytes are dropped, what follows is kept.
    assert_eq!(stream(&[&llama[..1], &llama[1..2], b"x"]), b"x");
    assert_eq!(
        stream(&[&llama[..1], &llama[1..2], &llama[2..3], b" word"]),
        b" word"
    );
    assert_eq!(stream(&[&llama[..1], b" word"]), b" word");
    // A new lead byte restarts the character.
    assert_eq!(
        stream(&[
            &llama[..1],
            &llama[..1],
            &llama[1..2],
            &llama[2..3],
            &llama[3..]
        ]),
        llama
    );
    // Lone continuation bytes and bytes that never start UTF-8.
    for b in [0x80u8, 0xBF, 0xC0, 0xC1, 0xF5, 0xF8, 0xFE, 0xFF] {
        assert_eq!(stream(&[&[b], b"k"]), b"k", "byte {b:#x}");
    }
    // Overlong, surrogate and beyond-U+10FFFF sequences are not printed.
    for bad in [
        &[0xE0u8, 0x80, 0x80][..],
        &[0xED, 0xA0, 0x80],
        &[0xF4, 0x90, 0x80, 0x80],
        &[0xF0, 0x80, 0x80, 0x80],
    ] {
        let pieces: Vec<&[u8]> = bad.chunks(1).collect();
        assert_eq!(stream(&pieces), b"", "{bad:x?}");
    }
}

#[test]
fn utf8_stream_control_and_whitespace_bytes() {
    // Whitespace bytes are printed (C isspace), other control bytes dropped,
    // as llama2.c's safe_printf does.
    for b in [b' ', b'\t', b'\n', 0x0B, 0x0C, b'\r'] {
        assert_eq!(stream(&[&[b]]), [b], "byte {b:#x}");
    }
    for b in (0u8..0x20).chain([0x7F]) {
        if ![b'\t', b'\n', 0x0B, 0x0C, b'\r'].contains(&b) {
            assert_eq!(stream(&[&[b]]), b"", "byte {b:#x}");
        }
    }
    for b in 0x21u8..0x7F {
        assert_eq!(stream(&[&[b]]), [b]);
    }
    // Multi-byte pieces are printed as they are (as llama2.c does; real
    // vocabularies hold only valid UTF-8 strings), dropping a pending partial character.
    assert_eq!(
        stream(&[b" hello", "é".as_bytes(), b"\n\n"]),
        " helloé\n\n".as_bytes()
    );
    assert_eq!(stream(&[&[0xC3], b" hi"]), b" hi");
}

/// tokenizer.bin bytes for `pieces` (scores 0), header = longest piece.
fn tokenizer_bytes(pieces: &[&[u8]]) -> Vec<u8> {
    let longest = pieces.iter().map(|p| p.len()).max().unwrap_or(1).max(1);
    let mut bytes = (longest as i32).to_le_bytes().to_vec();
    for p in pieces {
        bytes.extend(0f32.to_le_bytes());
        bytes.extend((p.len() as i32).to_le_bytes());
        bytes.extend_from_slice(p);
    }
    bytes
}

#[test]
fn small_vocabularies_never_index_past_their_table() {
    // Three tokens: no byte tokens, no space. Every character falls back to
    // a byte id that does not exist, and becomes <unk>.
    let tok = Tokenizer::parse(&tokenizer_bytes(&[b"<unk>", b"<s>", b"</s>"]), 3).unwrap();
    let ids = tok.encode("Hé 🦙 \u{0}", true, true);
    assert!(ids.iter().all(|&id| id < 3), "{ids:?}");
    assert_eq!(ids.first(), Some(&BOS));
    assert_eq!(ids.last(), Some(&EOS));
    // Decoding any id, in range or not, gives bytes or nothing, never a panic.
    for id in [0, 1, 2, 3, 258, u32::MAX] {
        let _ = tok.decode(BOS, id);
        let _ = tok.piece(id);
    }
    // Fewer than three tokens, or more asked for than the file can hold.
    assert!(Tokenizer::parse(&tokenizer_bytes(&[b"a", b"b"]), 2).is_err());
    let three = tokenizer_bytes(&[b"a", b"b", b"c"]);
    let err = Tokenizer::parse(&three, usize::MAX).err().unwrap();
    assert!(err.contains("too short"), "{err}");
}

#[test]
fn tokenizer_header_must_bound_every_entry() {
    let mut bytes = tokenizer_bytes(&[b"<unk>", b"<s>", b"</s>", b"abcdef"]);
    assert!(Tokenizer::parse(&bytes, 4).is_ok());
    for (value, needle) in [
        (0i32, "as 0 bytes"),
        (-7, "as -7 bytes"),
        (1 << 20, "1048576"),
    ] {
        bytes[..4].copy_from_slice(&value.to_le_bytes());
        let err = Tokenizer::parse(&bytes, 4).err().unwrap();
        assert!(err.contains(needle), "{err}");
    }
    bytes[..4].copy_from_slice(&5i32.to_le_bytes());
    let err = Tokenizer::parse(&bytes, 4).err().unwrap();
    assert!(err.contains("entry 3 is 6 bytes long"), "{err}");
}

/// What `Utf8Stream` prints for `pieces`, checked to be valid UTF-8.
fn stream_text(pieces: &[&[u8]]) -> String {
    String::from_utf8(stream(pieces)).expect("Utf8Stream output is UTF-8")
}

#[test]
fn utf8_stream_output_is_always_valid() {
    // Valid pieces pass through unchanged.
    assert_eq!(stream_text(&["héllo".as_bytes(), b" world"]), "héllo world");
    // A character split across multi-byte pieces is printed whole.
    assert_eq!(stream_text(&[b"a\xE2\x82", b"\xACb"]), "a€b");
    assert_eq!(stream_text(&[b"\xF0\x9F", b"\xA6", b"\x99!"]), "🦙!");
    // Byte tokens complete a character begun in a longer piece, and back.
    assert_eq!(stream_text(&[b"x\xC3", b"\xA9"]), "xé");
    assert_eq!(stream_text(&[b"\xE2", b"\x82\xACz"]), "€z");
    // Junk is dropped: stray continuations, lone leads, overlong forms,
    // surrogates, bytes that never start a character.
    assert_eq!(stream_text(&[b"\x80\x80ab"]), "ab");
    assert_eq!(stream_text(&[b"\xE2\x82ab"]), "ab");
    assert_eq!(stream_text(&[b"\xC0\xAFok"]), "ok");
    assert_eq!(stream_text(&[b"\xED\xA0\x80ok"]), "ok");
    assert_eq!(stream_text(&[b"\xFF\xFEok", b"\xF5\x80"]), "ok");
    // Control characters in a single-byte piece are dropped (llama2.c's
    // rule); inside a longer valid piece they are kept, as llama2.c does.
    assert_eq!(stream_text(&[b"\x01", b"a", b"\t"]), "a\t");
    assert_eq!(stream_text(&[b"a\x01"]), "a\u{1}");
    // Every byte sequence at all, in pieces of every length: valid output.
    let mut rng = llama2::sampler::Rng::new(7);
    for _ in 0..2000 {
        let bytes: Vec<u8> = (0..rng.next_u32() % 12)
            .map(|_| rng.next_u32() as u8)
            .collect();
        let cut = (rng.next_u32() as usize % (bytes.len() + 1)).min(bytes.len());
        stream_text(&[&bytes[..cut], &bytes[cut..]]);
    }
}
