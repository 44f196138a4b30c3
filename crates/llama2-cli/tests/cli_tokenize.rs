//! `llama2 tokenize`: the ids of texts with both tokenizers, against ids
//! computed with SentencePiece (see crates/llama2/tests/common/tokenizer_cases.rs).

mod common;

use common::*;

include!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../llama2/tests/common/tokenizer_cases.rs"
));

fn check(tokenizer: &str, cases: &[(&str, &[u32])]) {
    let path = arg(&model_path(tokenizer));
    for (text, ids) in cases {
        let want: Vec<String> = ids.iter().map(u32::to_string).collect();
        let r = llama2(&["tokenize", "-z", &path, "--", text]);
        assert_eq!(
            r.ok(),
            format!("{}\n", want.join(" ")),
            "{tokenizer}: {text:?}"
        );
    }
}

#[test]
fn tokenize_with_llama2_tokenizer() {
    check("tokenizer.bin", LLAMA_CASES);
}

#[test]
fn tokenize_with_tok512() {
    check("tok512.bin", TOK512_CASES);
}

#[test]
fn tokenize_with_explicit_vocab() {
    let r = llama2(&[
        "tokenize",
        "-z",
        &arg(&model_path("tok512.bin")),
        "--vocab",
        "512",
        "Hello world",
    ]);
    assert_eq!(r.ok(), "1 346 306 414 263 304 341\n");
    // Text that looks like a flag, after --.
    let r = llama2(&[
        "tokenize",
        "-z",
        &arg(&model_path("tokenizer.bin")),
        "--",
        "-t 0",
    ]);
    assert_eq!(r.ok().split(' ').next(), Some("1"));
}
