//! Bad input of every kind gives one clear "error:" line on stderr and a
//! non-zero exit (2 for usage errors), never a panic.

mod common;

use common::*;
use llama2::checkpoint::FileFormat;
use llama2::sampler::Rng;

/// Runs `llama2 <checkpoint> -z tok512.bin --device cpu <extra>`.
fn run_model(checkpoint: &std::path::Path, extra: &[&str]) -> Run {
    let mut args = vec![
        arg(checkpoint),
        "-z".into(),
        arg(&model_path("tok512.bin")),
        "--device".into(),
        "cpu".into(),
        "-n".into(),
        "8".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    llama2(&args)
}

fn v0_header(dims: [i32; 7]) -> Vec<u8> {
    dims.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn v12_header(version: i32, dims: [i32; 7], shared: u8, group_size: i32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(0x616b_3432u32.to_le_bytes());
    h.extend(version.to_le_bytes());
    h.extend(dims.iter().flat_map(|v| v.to_le_bytes()));
    h.push(shared);
    h.extend(group_size.to_le_bytes());
    h.resize(256, 0);
    h
}

const STORIES: [i32; 7] = [64, 172, 5, 8, 4, 512, 512];

/// Writes `bytes` to a file in `dir`, runs the model on it and checks the error.
fn check_file(dir: &TempDir, name: &str, bytes: &[u8], needle: &str) {
    let path = dir.path(name);
    std::fs::write(&path, bytes).unwrap();
    let r = run_model(&path, &[]);
    assert!(r.stdout.is_empty(), "{name}: {}", r.stdout);
    r.fails_with(needle);
    assert!(
        r.stderr.contains(name),
        "the error names the file: {}",
        r.stderr
    );
}

#[test]
fn missing_empty_truncated_oversized_random() {
    let dir = TempDir::new("badfiles");
    run_model(&dir.path("nope.bin"), &[]).fails_with("cannot open");
    check_file(&dir, "empty.bin", b"", "shorter than any checkpoint header");
    let full = std::fs::read(model_path("stories260K.bin")).unwrap();
    check_file(&dir, "half.bin", &full[..full.len() / 2], "truncated");
    check_file(&dir, "minus1.bin", &full[..full.len() - 1], "truncated");
    let mut longer = full.clone();
    longer.extend([0u8; 12]);
    check_file(&dir, "longer.bin", &longer, "longer than its header says");
    let q8 = std::fs::read(model_path("stories260K_q8_gs4.bin")).unwrap();
    check_file(&dir, "q8half.bin", &q8[..q8.len() / 2], "truncated");
    let mut q8_longer = q8.clone();
    q8_longer.push(0);
    check_file(
        &dir,
        "q8long.bin",
        &q8_longer,
        "longer than its header says",
    );
    let mut rng = Rng::new(12345);
    let random: Vec<u8> = (0..1 << 20).map(|_| rng.next_u32() as u8).collect();
    check_file(&dir, "random.bin", &random, "not a valid checkpoint");
    // A directory that is no model directory says what it lacks.
    run_model(&dir.path(""), &[]).fails_with("neither config.json");
}

#[test]
fn bad_version0_headers() {
    let dir = TempDir::new("v0hdr");
    let with = |i: usize, v: i32| {
        let mut d = STORIES;
        d[i] = v;
        v0_header(d)
    };
    check_file(&dir, "dim0.bin", &with(0, 0), "dim is 0");
    check_file(&dir, "hidden_neg.bin", &with(1, -5), "hidden_dim is -5");
    check_file(&dir, "layers0.bin", &with(2, 0), "n_layers is 0");
    check_file(&dir, "heads_neg.bin", &with(3, -8), "n_heads is -8");
    check_file(&dir, "kv0.bin", &with(4, 0), "n_kv_heads is 0");
    check_file(&dir, "seq0.bin", &with(6, 0), "seq_len is 0");
    check_file(&dir, "vocab0.bin", &with(5, 0), "vocab_size is 0");
    check_file(
        &dir,
        "vocabmin.bin",
        &with(5, i32::MIN),
        "vocab_size is -2147483648",
    );
    for i in 0..7 {
        let name = format!("max{i}.bin");
        check_file(&dir, &name, &with(i, i32::MAX), "expected a value between");
    }
    check_file(&dir, "heads7.bin", &with(3, 7), "does not divide dim");
    check_file(&dir, "kv3.bin", &with(4, 3), "does not divide n_heads");
    check_file(&dir, "kv16.bin", &with(4, 16), "does not divide n_heads");
    // Large but plausible dimensions: the size check catches the short file
    // without allocating anything.
    check_file(
        &dir,
        "huge.bin",
        &v0_header([1 << 14, 1 << 16, 1 << 12, 1 << 7, 1 << 7, 1 << 17, 1 << 20]),
        "truncated",
    );
    // Only part of a header.
    check_file(&dir, "short.bin", &v0_header(STORIES)[..20], "shorter");
}

#[test]
fn bad_version1_and_2_headers() {
    let dir = TempDir::new("v2hdr");
    check_file(
        &dir,
        "gs0.bin",
        &v12_header(2, STORIES, 1, 0),
        "group size is 0",
    );
    check_file(
        &dir,
        "gsneg.bin",
        &v12_header(2, STORIES, 1, -4),
        "group size is -4",
    );
    check_file(
        &dir,
        "gs3.bin",
        &v12_header(2, STORIES, 1, 3),
        "group size 3",
    );
    check_file(
        &dir,
        "v7.bin",
        &v12_header(7, STORIES, 1, 4),
        "unknown version 7",
    );
    check_file(
        &dir,
        "v0magic.bin",
        &v12_header(0, STORIES, 1, 4),
        "unknown version 0",
    );
    check_file(
        &dir,
        "shared2.bin",
        &v12_header(1, STORIES, 2, 0),
        "shared_classifier",
    );
    check_file(
        &dir,
        "v1trunc.bin",
        &v12_header(1, STORIES, 1, 0),
        "truncated",
    );
    check_file(
        &dir,
        "v2trunc.bin",
        &v12_header(2, STORIES, 1, 4),
        "truncated",
    );
    let mut neg_vocab = STORIES;
    neg_vocab[5] = -512;
    check_file(
        &dir,
        "v1negvocab.bin",
        &v12_header(1, neg_vocab, 1, 0),
        "vocab_size is -512",
    );
    let mut bad_heads = STORIES;
    bad_heads[3] = 5;
    check_file(
        &dir,
        "v1heads.bin",
        &v12_header(1, bad_heads, 1, 0),
        "does not divide dim",
    );
    check_file(
        &dir,
        "magiconly.bin",
        &v12_header(1, STORIES, 1, 0)[..100],
        "256-byte header",
    );
}

#[test]
fn tokenizer_problems() {
    let model = arg(&model_path("stories260K.bin"));
    // The Llama 2 tokenizer with a 512-token model.
    let r = llama2(&[
        &model,
        "-z",
        &arg(&model_path("tokenizer.bin")),
        "--device",
        "cpu",
    ]);
    r.fails_with("tokenizer");
    assert!(r.stderr.contains("-z"), "{}", r.stderr);
    // Truncated tokenizer.
    let dir = TempDir::new("tok");
    let tok = std::fs::read(model_path("tok512.bin")).unwrap();
    let cut = dir.path("cut.bin");
    std::fs::write(&cut, &tok[..tok.len() / 2]).unwrap();
    llama2(&[&model, "-z", &arg(&cut), "--device", "cpu"]).fails_with("truncated");
    let empty = dir.path("empty.bin");
    std::fs::write(&empty, b"").unwrap();
    llama2(&[&model, "-z", &arg(&empty), "--device", "cpu"]).fails_with("tokenizer");
    // Missing tokenizer file.
    llama2(&[
        &model,
        "-z",
        &arg(&dir.path("missing.bin")),
        "--device",
        "cpu",
    ])
    .fails_with("cannot open");
    // No -z: tokenizer.bin beside the checkpoint is tried (here the Llama 2
    // one, which does not fit stories260K).
    llama2(&[&model, "--device", "cpu"]).fails_with("tokenizer");
    // No -z and no tokenizer.bin anywhere.
    let lone = dir.path("lone.bin");
    write_model(&load("stories260K.bin"), FileFormat::V0, &lone);
    let out = llama2_command()
        .current_dir(dir.path(""))
        .args([&arg(&lone), "--device", "cpu"])
        .output()
        .unwrap();
    let r = Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    };
    r.fails_with("no tokenizer given");
    // tokenize with a bad or mismatched file.
    llama2(&["tokenize", "-z", &arg(&cut), "hi"]).fails_with("tokenizer");
    llama2(&["tokenize", "-z", &arg(&dir.path("missing.bin")), "hi"]).fails_with("cannot open");
    llama2(&[
        "tokenize",
        "-z",
        &arg(&model_path("tok512.bin")),
        "--vocab",
        "32000",
        "hi",
    ])
    .fails_with("too short for the model's 32000 tokens");
    // A checkpoint given as the tokenizer.
    llama2(&["tokenize", "-z", &model, "hi"]).fails_with("tokenizer");
}

#[test]
fn prompt_longer_than_the_context() {
    let prompt = "The cat sat on a mat. ".repeat(60);
    let n = tok512().encode(&prompt, true, false).len();
    assert!(n > 600 && n < 1000, "{n} tokens");
    let r = run_model(&model_path("stories260K.bin"), &["-i", &prompt]);
    r.fails_with("context");
    assert!(r.stderr.contains("512"), "{}", r.stderr);
    // Chat too.
    let r = run_model(
        &model_path("stories260K.bin"),
        &["-m", "chat", "-y", "s", "-i", &prompt],
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        r.stderr.lines().last().unwrap().starts_with("error: "),
        "{}",
        r.stderr
    );
}

fn usage_error(args: &[&str], needle: &str) {
    let r = llama2(args);
    assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stderr.starts_with("error:"), "{}", r.stderr);
    assert!(r.stderr.contains("Usage"), "{}", r.stderr);
    assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    assert!(r.stdout.is_empty());
}

#[test]
fn usage_errors_exit_with_2() {
    let m = arg(&model_path("stories260K.bin"));
    usage_error(&[&m, "-t", "abc"], "abc");
    usage_error(&[&m, "--bogus"], "--bogus");
    usage_error(&[&m, "-m", "foo"], "foo");
    usage_error(&[&m, "-n", "1.5"], "1.5");
    usage_error(&[&m, "-s", "-3"], "-3");
    usage_error(&[&m, "--device", "tpu"], "tpu");
    usage_error(&[&m, "--dtype", "f8"], "f8");
    usage_error(&[&m, "-t"], "-t");
    usage_error(&[], "CHECKPOINT");
    usage_error(&["tokenize", "hi"], "--tokenizer");
}
