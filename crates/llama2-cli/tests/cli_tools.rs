//! The tool subcommands end to end: perplexity, bench, check, and the clear
//! error when a GPU is asked for on a machine without one.

mod common;

use common::{arg, llama2, model_path, TempDir};

/// A short story in the style stories260K was trained on.
const STORY: &str = "Once upon a time, there was a little girl named Lily. She loved to play \
outside in the park. One day, she saw a big, red ball. She wanted to play with it. \
Lily's mom said, \"Let's go to the park.\" Lily was happy and they played all day.\n";

/// The perplexity `llama2 perplexity` prints for `model` on `text`.
fn perplexity(model: &str, text: &std::path::Path, extra: &[&str]) -> f64 {
    let mut args = vec![
        "perplexity".to_string(),
        arg(&model_path(model)),
        "-z".into(),
        arg(&model_path("tok512.bin")),
        "--text".into(),
        arg(text),
        "--device".into(),
        "cpu".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let run = llama2(&args);
    let out = run.ok();
    let value = out
        .split_whitespace()
        .skip_while(|w| *w != "perplexity")
        .nth(1)
        .unwrap_or_else(|| panic!("no perplexity in {out:?}"));
    value.parse().expect("a number")
}

#[test]
fn perplexity_of_a_story_is_low_and_int8_costs_little() {
    let dir = TempDir::new("ppl");
    let text = dir.path("story.txt");
    std::fs::write(&text, STORY.repeat(12)).unwrap();
    let fp32 = perplexity("stories260K.bin", &text, &[]);
    let int8 = perplexity("stories260K_q8_gs4.bin", &text, &[]);
    let windows = perplexity("stories260K.bin", &text, &["--context", "64"]);
    // A model trained on such stories finds them far from random (vocab 512).
    assert!(fp32 > 1.0 && fp32 < 20.0, "fp32 perplexity {fp32}");
    assert!(
        (int8 / fp32 - 1.0).abs() < 0.05,
        "int8 {int8} vs fp32 {fp32}"
    );
    // Shorter windows see less history, so they cannot predict better.
    assert!(windows > fp32 * 0.98, "context 64: {windows} vs {fp32}");
}

#[test]
fn perplexity_rejects_an_empty_or_missing_text() {
    let dir = TempDir::new("ppl-empty");
    let empty = dir.path("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let base = |text: &str| {
        llama2(&[
            "perplexity",
            &arg(&model_path("stories260K.bin")),
            "-z",
            &arg(&model_path("tok512.bin")),
            "--text",
            text,
            "--device",
            "cpu",
        ])
    };
    base(&arg(&empty)).fails_with("no text");
    base(&arg(&dir.path("missing.txt"))).fails_with("cannot open");
}

#[test]
fn bench_prints_one_json_line_with_speeds() {
    let run = llama2(&[
        "bench",
        "--device",
        "cpu",
        "--shape",
        "stories260K",
        "--dtype",
        "q8",
        "--prompt-tokens",
        "32",
        "--gen-tokens",
        "16",
        "--runs",
        "1",
        "--threads",
        "1",
        "--json",
    ]);
    let out = run.ok();
    let line = out.trim();
    assert_eq!(line.lines().count(), 1, "{out}");
    for key in [
        "\"decode_tok_s\":",
        "\"prefill_tok_s\":",
        "\"decode_gb_s\":",
        "\"peak_gb_s\":",
        "\"dtype\":\"q8\"",
    ] {
        assert!(line.contains(key), "{key} missing in {line}");
    }
}

#[test]
fn bench_names_the_shapes_when_given_an_unknown_one() {
    llama2(&["bench", "--device", "cpu", "--shape", "gpt5"]).fails_with("stories15M");
}

#[test]
fn check_on_the_cpu_compares_like_with_like_and_passes() {
    let run = llama2(&[
        "check",
        &arg(&model_path("stories260K.bin")),
        "--device",
        "cpu",
        "--dtype",
        "q8",
        "--prompt-tokens",
        "4",
        "--steps",
        "4",
    ]);
    let out = run.ok();
    assert!(out.contains("argmax agrees on 8/8 steps"), "{out}");
    assert!(out.contains("check passed"), "{out}");
}

/// `check --kv-dtype f16` compares an f16-cache model with the f32-cache
/// reference, within f16's tolerance.
#[test]
fn check_of_an_f16_kv_cache_passes_within_f16_tolerance() {
    let run = llama2(&[
        "check",
        &arg(&model_path("stories260K.bin")),
        "--device",
        "cpu",
        "--kv-dtype",
        "f16",
        "--prompt-tokens",
        "4",
        "--steps",
        "8",
    ]);
    let out = run.ok();
    assert!(out.contains("f16 KV cache"), "{out}");
    assert!(out.contains("tolerance 1e-2"), "{out}");
    assert!(out.contains("check passed"), "{out}");
}

/// `check --isa LEVEL` compares that level's kernels with the scalar
/// reference loops, for every level this CPU runs.
#[test]
fn check_compares_each_cpu_level_with_the_scalar_reference() {
    for isa in llama2::cpu::kernels::Isa::all() {
        for dtype in ["f32", "q8"] {
            let run = llama2(&[
                "check",
                &arg(&model_path("stories260K.bin")),
                "--isa",
                isa.level().name(),
                "--dtype",
                dtype,
                "--prompt-tokens",
                "4",
                "--steps",
                "4",
            ]);
            let out = run.ok();
            assert!(
                out.contains(&format!("{}, {dtype} weights", isa.level().name())),
                "{out}"
            );
            assert!(out.contains("scalar"), "{out}");
            assert!(out.contains("check passed"), "{out}");
        }
    }
}

#[test]
fn asking_for_a_gpu_without_one_is_a_clear_error() {
    if llama2_cuda::unavailable_reason().is_none() {
        return; // this machine has a GPU: nothing to test here
    }
    let model = arg(&model_path("stories260K.bin"));
    let tok = arg(&model_path("tok512.bin"));
    llama2(&[&model, "-z", &tok, "--device", "cuda"]).fails_with("--device cpu");
    llama2(&["check", &model, "--device", "cuda"]).fails_with("--device cpu");
    llama2(&["bench", "--device", "cuda", "--shape", "stories15M"]).fails_with("--device cpu");
}

#[test]
fn auto_device_falls_back_to_the_cpu_and_says_why() {
    if llama2_cuda::unavailable_reason().is_none() {
        return;
    }
    let run = llama2(&[
        &arg(&model_path("stories260K.bin")),
        "-z",
        &arg(&model_path("tok512.bin")),
        "-t",
        "0",
        "-n",
        "20",
    ]);
    assert!(run.ok().starts_with("Once upon a time"));
    assert!(
        run.stderr.contains("note: running on the CPU"),
        "{}",
        run.stderr
    );
    // `bench` and `check` need the device before loading: still one note.
    let bench = llama2(&[
        "bench",
        "--model",
        &arg(&model_path("stories260K.bin")),
        "--prompt-tokens",
        "4",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
    ]);
    bench.ok();
    let notes = bench.stderr.matches("note: running on the CPU").count();
    assert_eq!(notes, 1, "{}", bench.stderr);
}

#[test]
fn synth_rejects_unknown_shapes_and_formats() {
    let dir = TempDir::new("synth-bad");
    let out = arg(&dir.path("x.bin"));
    llama2(&["synth", "--shape", "tiny", &out]).fails_with("unknown shape");
    llama2(&["synth", "--shape", "stories260K", "--format", "v9", &out])
        .fails_with("unknown format");
}

#[test]
fn perplexity_of_every_stories260k_copy_matches_transformers() {
    // The reference text: its ids decoded with tok512, then scored by each
    // copy of the model as `perplexity` encodes it.
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model_path("reference/stories260K.json")).unwrap())
            .unwrap();
    let ids: Vec<u32> = r["text_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let tok = common::tok512();
    let mut stream = llama2::tokenizer::Utf8Stream::new();
    let mut text = Vec::new();
    for pair in ids.windows(2) {
        stream.push(tok.decode(pair[0], pair[1]), &mut text);
    }
    assert_eq!(
        tok.encode(std::str::from_utf8(&text).unwrap(), true, false),
        ids
    );
    let dir = TempDir::new("ppl-ref");
    let file = dir.path("story.txt");
    std::fs::write(&file, &text).unwrap();
    let want = r["text_mean_nll"].as_f64().unwrap();
    for (model, z) in [
        ("stories260K.bin", Some("tok512.bin")),
        ("hf/stories260K", None),
        ("meta/stories260K", None),
        ("gguf/stories260K-f32.gguf", None),
    ] {
        let mut args = vec![
            "perplexity".to_string(),
            arg(&model_path(model)),
            "--text".into(),
            arg(&file),
            "--device".into(),
            "cpu".into(),
        ];
        if let Some(z) = z {
            args.extend(["-z".to_string(), arg(&model_path(z))]);
        }
        let out = llama2(&args).ok().to_string();
        let nll: f64 = out.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!(
            (nll - want).abs() <= 1e-4 * want,
            "{model}: {nll} vs {want}"
        );
    }
}
