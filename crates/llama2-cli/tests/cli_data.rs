//! `llama2 train-tokenizer` and `llama2 pretokenize` end to end: a small
//! vocabulary trained on text our own stories260K model writes, both of its
//! files loaded and agreeing, shards decoding to the expected ids, and the
//! errors users can cause.

mod common;

use std::path::Path;

use common::*;
use llama2::tokenizer;

/// Stories from stories260K (seeds 1..=n), separated by blank lines.
fn generated_text(n: u64) -> String {
    let mut stories = Vec::new();
    for seed in 1..=n {
        let r = llama2(&[
            arg(&model_path("stories260K.bin")),
            "-z".into(),
            arg(&model_path("tok512.bin")),
            "--device".into(),
            "cpu".into(),
            "-t".into(),
            "1".into(),
            "-s".into(),
            seed.to_string(),
            "-n".into(),
            "256".into(),
        ]);
        stories.push(r.ok().trim().replace("\n\n", "\n"));
    }
    stories.join("\n\n") + "\n"
}

/// Trains a `vocab`-token tokenizer on generated text into `dir/tok`.
fn train(dir: &TempDir, vocab: usize) -> String {
    let text = dir.path("stories.txt");
    std::fs::write(&text, generated_text(20)).unwrap();
    let out = dir.path("tok");
    llama2(&[
        "train-tokenizer".into(),
        "--input".into(),
        arg(&text),
        "--vocab-size".into(),
        vocab.to_string(),
        "--out".into(),
        arg(&out),
    ])
    .ok()
    .to_owned()
}

fn tokenize(tokenizer: &Path, text: &str) -> String {
    llama2(&["tokenize", "-z", &arg(tokenizer), "--", text])
        .ok()
        .to_owned()
}

const SENTENCES: [&str; 5] = [
    "Once upon a time, there was a little girl named Lily.",
    "Tim saw a big, shiny bug in the park and said, \"Look!\"",
    "They were 3 friends with 12 toys.",
    "Ünïcödé 🦙 and 日本語 fall back to bytes",
    "two  spaces\tand a tab\nand a newline",
];

#[test]
fn trained_tokenizer_files_load_and_agree() {
    let dir = TempDir::new("train-tokenizer");
    let stdout = train(&dir, 300);
    assert!(stdout.contains("300 tokens"), "{stdout}");
    assert!(
        stdout.contains("same ids on 20 of the first 20"),
        "{stdout}"
    );
    let (json, bin) = (
        dir.path("tok/tokenizer.json"),
        dir.path("tok/tokenizer.bin"),
    );
    let by_json = tokenizer::open(&json, None).unwrap();
    let by_bin = tokenizer::open(&bin, None).unwrap();
    assert_eq!((by_json.vocab_size(), by_bin.vocab_size()), (300, 300));
    assert_eq!(by_bin.piece(3), b"<0x00>");
    assert_eq!(by_bin.piece(258), b"<0xFF>");
    for text in SENTENCES {
        let ids = tokenize(&bin, text);
        assert!(ids.starts_with("1 "), "{ids}");
        assert_eq!(ids, tokenize(&json, text), "{text:?}");
    }
}

#[test]
fn shards_hold_each_document_with_bos_as_uint16() {
    let dir = TempDir::new("pretokenize");
    train(&dir, 320);
    let bin = dir.path("tok/tokenizer.bin");
    let jsonl = dir.path("a.jsonl");
    std::fs::write(
        &jsonl,
        "{\"story\": \"  Lily saw a dog.\\n\"}\n{\"story\": \"\"}\n\n{\"text\": \"Tim ran 3 times.\"}\n",
    )
    .unwrap();
    let text = dir.path("b.txt");
    std::fs::write(&text, "The sun was warm.\nThey smiled.\n\n\nThe end.\n").unwrap();
    let array = dir.path("c.json");
    std::fs::write(&array, "[{\"story\": \"A cat.\"}]").unwrap();
    let docs: [&[&str]; 3] = [
        &["Lily saw a dog.", "Tim ran 3 times."],
        &["The sun was warm.\nThey smiled.", "The end."],
        &["A cat."],
    ];
    let tok = tokenizer::open(&bin, None).unwrap();
    let expected = |docs: &[&str]| -> Vec<u32> {
        docs.iter()
            .flat_map(|d| tok.encode(d, true, false))
            .collect()
    };
    let out = dir.path("shards");
    let inputs = [arg(&jsonl), arg(&text), arg(&array)];
    let stdout = pretokenize(&bin, &inputs, &out, &[]);
    let total: usize = docs.iter().map(|d| expected(d).len()).sum();
    assert!(stdout.contains("wrote 3 shards"), "{stdout}");
    assert!(
        stdout.contains(&format!("{total} tokens in 5 documents")),
        "{stdout}"
    );
    for (i, d) in docs.iter().enumerate() {
        let ids = read_shard(&out.join(format!("data{i:02}.bin")));
        assert_eq!(ids, expected(d), "shard {i}");
        let bos = ids.iter().filter(|&&id| id == tokenizer::BOS).count();
        assert_eq!(bos, d.len(), "shard {i}");
    }
    // One document per shard with --shard-tokens 1.
    let split = dir.path("split");
    let stdout = pretokenize(&bin, &inputs, &split, &["--shard-tokens", "1"]);
    assert!(stdout.contains("wrote 5 shards"), "{stdout}");
    let flat: Vec<&str> = docs.iter().flat_map(|d| d.iter().copied()).collect();
    for (i, d) in flat.iter().enumerate() {
        let ids = read_shard(&split.join(format!("data{i:02}.bin")));
        assert_eq!(ids, tok.encode(d, true, false), "document {i}");
    }
}

fn pretokenize(tokenizer: &Path, inputs: &[String], out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "pretokenize".into(),
        "-z".into(),
        arg(tokenizer),
        "--input".into(),
    ];
    args.extend(inputs.iter().cloned());
    args.extend(["--out".into(), arg(out)]);
    args.extend(extra.iter().map(|s| s.to_string()));
    llama2(&args).ok().to_owned()
}

fn read_shard(path: &Path) -> Vec<u32> {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect()
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = TempDir::new("data-errors");
    let text = dir.path("t.txt");
    std::fs::write(&text, "Once upon a time there was a cat.\n").unwrap();
    let empty = dir.path("empty.txt");
    std::fs::write(&empty, "\n\n  \n").unwrap();
    let bad_json = dir.path("bad.jsonl");
    std::fs::write(&bad_json, "{\"story\": \"ok\"}\n{\"title\": 1}\n").unwrap();
    let out = arg(&dir.path("out"));
    let train = |input: &Path, vocab: &str| {
        llama2(&[
            "train-tokenizer",
            "--input",
            &arg(input),
            "--vocab-size",
            vocab,
            "--out",
            &out,
        ])
    };
    train(&text, "100").fails_with("too small");
    train(&empty, "300").fails_with("no text");
    train(&dir.path("missing.txt"), "300").fails_with("cannot open");
    train(&bad_json, "300").fails_with("line 2: expected an object with a \"story\"");
    train(&text, "5000").fails_with("only has enough text");
    let usage = llama2(&["train-tokenizer", "--input", &arg(&text), "--out", &out]);
    assert_eq!(usage.code, Some(2), "{}", usage.stderr);

    let big = dir.path("big.bin");
    let pieces: Vec<Vec<u8>> = (0..65537u32).map(|i| i.to_string().into_bytes()).collect();
    let entries = pieces.iter().map(|p| (p.as_slice(), 0.0));
    std::fs::write(&big, tokenizer::bin_bytes(8, entries)).unwrap();
    let tok512 = model_path("tok512.bin");
    let run = |tok: &Path, input: &Path| {
        llama2(&[
            "pretokenize",
            "-z",
            &arg(tok),
            "--input",
            &arg(input),
            "--out",
            &out,
        ])
    };
    run(&big, &text).fails_with("at most 65536");
    run(&tok512, &empty).fails_with("no documents");
    run(&tok512, &bad_json).fails_with("line 2");
    run(&tok512, &dir.path("missing.jsonl")).fails_with("cannot open");
}
