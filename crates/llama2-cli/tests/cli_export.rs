//! `llama2 export` and `export-tokenizer` against llama2.c's export.py and
//! tokenizer.py: byte-identical where those are right (the SHA-256 of
//! export.py's outputs is in shared/models/reference), and round trips from
//! every input format back to the same text.

mod common;

use common::*;
use sha2::{Digest, Sha256};

fn sha256(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn export_py_sha(version: &str) -> String {
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(model_path("reference/export_py_sha256.json")).unwrap(),
    )
    .unwrap();
    json[version].as_str().unwrap().to_owned()
}

fn export(input: &str, output: &std::path::Path, extra: &[&str]) {
    let mut args = vec!["export".to_string(), arg(&model_path(input)), arg(output)];
    args.extend(extra.iter().map(|s| s.to_string()));
    let r = llama2(&args);
    r.ok();
    assert!(r.stderr.contains("wrote"), "{}", r.stderr);
}

/// `llama2 MODEL -t 0 -n 200 EXTRA...`: the greedy text, trailing newline
/// dropped.
fn greedy(model: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec![
        arg(model),
        "-t".into(),
        "0".into(),
        "-n".into(),
        "200".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    llama2(&args).ok().trim_end().to_string()
}

#[test]
fn train_checkpoint_exports_byte_identical_to_export_py() {
    let dir = TempDir::new("export");
    for v in ["1", "2"] {
        let out = dir.path(&format!("v{v}.bin"));
        export("stories260K-ckpt.pt", &out, &["--version", v]);
        assert_eq!(sha256(&out), export_py_sha(&format!("v{v}")), "version {v}");
    }
    // Version 0: identical except the legacy RoPE tables, within 1e-6.
    let out = dir.path("v0.bin");
    export("stories260K-ckpt.pt", &out, &["--version", "0"]);
    let ours = std::fs::read(&out).unwrap();
    let theirs = std::fs::read(model_path("stories260K.bin")).unwrap();
    assert_eq!(export_py_sha("v0"), sha256(&model_path("stories260K.bin")));
    assert_eq!(ours.len(), theirs.len());
    let c = load("stories260K.bin").config;
    let (d, h, l, v, kv) = (c.dim, c.hidden_dim, c.n_layers, c.vocab_size, c.kv_dim());
    let before_tables = 28 + 4 * (v * d + l * (2 * d + 2 * d * d + 2 * kv * d + 3 * d * h) + d);
    let tables = 4 * c.seq_len * c.head_size();
    assert_eq!(ours[..before_tables], theirs[..before_tables]);
    assert_eq!(
        ours[before_tables + tables..],
        theirs[before_tables + tables..]
    );
    let floats = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (a, b) = (
        floats(&ours[before_tables..before_tables + tables]),
        floats(&theirs[before_tables..before_tables + tables]),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-6, "RoPE tables differ by {worst}");
}

#[test]
fn sentencepiece_models_export_to_the_shared_tokenizer_bins() {
    let dir = TempDir::new("export-tok");
    for (model, bin) in [
        ("tok512.model", "tok512.bin"),
        ("tokenizer.model", "tokenizer.bin"),
    ] {
        let out = dir.path(bin);
        llama2(&["export-tokenizer", &arg(&model_path(model)), &arg(&out)]).ok();
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(model_path(bin)).unwrap()
        );
    }
}

#[test]
fn every_format_round_trips_through_every_version_to_the_same_text() {
    let dir = TempDir::new("roundtrip");
    let tok = arg(&model_path("tok512.bin"));
    let greedy = |model: &std::path::Path| greedy(model, &["-z", &tok, "--device", "cpu"]);
    for input in [
        "stories260K.bin",
        "hf/stories260K",
        "meta/stories260K",
        "stories260K-ckpt.pt",
        "gguf/stories260K-f32.gguf",
    ] {
        for v in ["0", "1"] {
            let out = dir.path("m.bin");
            export(input, &out, &["--version", v, "--ctx-size", "512"]);
            assert_eq!(greedy(&out), GOLDEN_FP32, "{input} -> v{v}");
        }
        // int8 with groups of 4 is llama2.c runq's file, and its text.
        let out = dir.path("q.bin");
        export(
            input,
            &out,
            &["--version", "2", "--group-size", "4", "--ctx-size", "512"],
        );
        assert_eq!(greedy(&out), GOLDEN_Q8, "{input} -> v2");
    }
}

#[test]
fn hyper_parameters_survive_versions_1_and_2_and_version_0_refuses_them() {
    let dir = TempDir::new("export-theta");
    let out = dir.path("theta.bin");
    export("hf/stories260K-theta1e6", &out, &["--version", "1"]);
    let w = llama2::checkpoint::load(&out).unwrap();
    assert_eq!(w.config.rope_theta, 1e6);
    let direct = llama2::checkpoint::open(&model_path("hf/stories260K-theta1e6"), None).unwrap();
    assert_eq!(w.config, direct.config);
    let out = dir.path("llama3.bin");
    export("hf/llama3-tiny-random", &out, &["--version", "2"]);
    let w = llama2::checkpoint::load(&out).unwrap();
    let direct = llama2::checkpoint::open(&model_path("hf/llama3-tiny-random"), None).unwrap();
    assert_eq!(w.config, direct.config);
    let r = llama2(&[
        "export",
        &arg(&model_path("hf/stories260K-theta1e6")),
        &arg(&dir.path("v0.bin")),
    ]);
    r.fails_with("version 0 cannot store this model's RoPE base 1000000");
    assert!(!dir.path("v0.bin").exists(), "no partial output");
}

#[test]
fn hugging_face_export_matches_transformers_files_and_round_trips() {
    let dir = TempDir::new("export-hf");
    // From llama2.c's file: the same safetensors bytes transformers wrote
    // for the fixture (rotate-half rows restored, same names and order).
    let out = dir.path("hf");
    let args = [
        "export".to_string(),
        arg(&model_path("stories260K.bin")),
        arg(&out),
        "--format".into(),
        "hf".into(),
        "-z".into(),
        arg(&model_path("tok512.bin")),
    ];
    llama2(&args).ok();
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(model_path("hf/stories260K/model.safetensors")).unwrap()
    );
    assert_eq!(greedy(&out, &[]), GOLDEN_FP32);
    // Every other format through a Hugging Face directory and back.
    for input in [
        "meta/stories260K",
        "gguf/stories260K-f32.gguf",
        "hf/stories260K",
        "stories260K-ckpt.pt",
    ] {
        let out = dir.path(&input.replace('/', "-"));
        // A train.py checkpoint has no tokenizer of its own beside it.
        let tok = arg(&model_path("tok512.bin"));
        let mut args = vec!["--format", "hf", "--ctx-size", "512"];
        if input.ends_with(".pt") {
            args.extend(["-z", tok.as_str()]);
        }
        export(input, &out, &args);
        assert_eq!(greedy(&out, &[]), GOLDEN_FP32, "{input} -> hf");
    }
    // Llama 3 in bf16 keeps its config and its tokenizer.json.
    let out = dir.path("llama3");
    export(
        "hf/llama3-tiny-random",
        &out,
        &["--format", "hf", "--dtype", "bf16"],
    );
    let back = llama2::checkpoint::open(&out, None).unwrap();
    let direct = llama2::checkpoint::open(&model_path("hf/llama3-tiny-random"), None).unwrap();
    assert_eq!(back.config, direct.config);
    assert_eq!(back.layers[1].wq.to_f32(), direct.layers[1].wq.to_f32());
    assert!(out.join("tokenizer.json").is_file());
    // An existing output is not overwritten.
    let r = llama2(&[
        "export",
        &arg(&model_path("stories260K.bin")),
        &arg(&out),
        "--format",
        "hf",
    ]);
    r.fails_with("exists");
}

#[test]
fn gguf_export_writes_llama_cpp_converter_data() {
    let dir = TempDir::new("export-gguf");
    for (dtype, fixture) in [
        ("f32", "stories260K-f32.gguf"),
        ("q8", "stories260K-q8_0.gguf"),
    ] {
        let out = dir.path(&format!("{dtype}.gguf"));
        export(
            "hf/stories260K",
            &out,
            &["--format", "gguf", "--dtype", dtype],
        );
        // Every tensor's type, shape and bytes equal those of llama.cpp's
        // convert_hf_to_gguf.py output for the same directory (Q8_0 rows of
        // 172 values are F16 there too).
        let ours = llama2::checkpoint::gguf::open(&out).unwrap();
        let theirs =
            llama2::checkpoint::gguf::open(&model_path(&format!("gguf/{fixture}"))).unwrap();
        assert_eq!(ours.tensors().len(), theirs.tensors().len());
        for t in theirs.tensors() {
            let o = ours
                .tensor(&t.name)
                .unwrap()
                .unwrap_or_else(|| panic!("{}", t.name));
            assert_eq!((o.dtype, &o.shape), (t.dtype, &t.shape), "{}", t.name);
            assert_eq!(o.bytes(), t.bytes(), "{dtype}: {}", t.name);
        }
        assert_eq!(
            ours.vocabulary().unwrap().pieces,
            theirs.vocabulary().unwrap().pieces
        );
        let want = if dtype == "f32" {
            GOLDEN_FP32.to_string()
        } else {
            greedy(&model_path(&format!("gguf/{fixture}")), &[])
        };
        assert_eq!(greedy(&out, &[]), want, "{dtype}");
    }
    // Every input format through GGUF and back (f32 and f16 keep the text).
    for input in [
        "stories260K.bin",
        "meta/stories260K",
        "stories260K-ckpt.pt",
        "hf/stories260K-bf16-sharded",
    ] {
        for dtype in ["f32", "f16"] {
            let out = dir.path(&format!("{}-{dtype}.gguf", input.replace('/', "-")));
            let args = ["--format", "gguf", "--dtype", dtype, "--ctx-size", "512"];
            let mut args = args.to_vec();
            let tok = arg(&model_path("tok512.bin"));
            if !input.starts_with("hf/") {
                args.extend(["-z", tok.as_str()]);
            }
            export(input, &out, &args);
            let want = if input.contains("bf16") {
                greedy(&model_path(input), &[])
            } else {
                GOLDEN_FP32.to_string()
            };
            assert_eq!(greedy(&out, &[]), want, "{input} -> gguf {dtype}");
        }
    }
    // What GGUF export cannot write yet is refused by name.
    let r = llama2(&[
        "export",
        &arg(&model_path("hf/llama3-tiny-random")),
        &arg(&dir.path("l3.gguf")),
        "--format",
        "gguf",
    ]);
    r.fails_with("Llama 3 RoPE scaling is not supported yet");
}
