//! `llama2 train --data DIR`: a tiny model learns a synthetic counting
//! pattern, a run split in two by `--init-from resume` ends bit-identical
//! to one straight run, the exported model.bin generates, and bad flags or
//! data are one clear error line.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// Two shards of documents that count up from a random start (mod 62,
/// ids 2..64) after a BOS: every next token follows from the previous
/// one, so a tiny model learns it fast.
fn write_counting_data(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut state = 12345u64;
    let mut next = move |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    for shard in 0..2 {
        let mut ids: Vec<u16> = Vec::new();
        while ids.len() < 8000 {
            let (start, len) = (next(62), 20 + next(40));
            ids.push(1);
            ids.extend((0..len).map(|i| ((start + i) % 62 + 2) as u16));
        }
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("data{shard:02}.bin")), bytes).unwrap();
    }
}

/// The tiny model's flags: dim 32, 2 layers, vocab 64, seq 16.
const TINY: &[&str] = &[
    "--dim",
    "32",
    "--n-layers",
    "2",
    "--n-heads",
    "4",
    "--n-kv-heads",
    "2",
    "--vocab-size",
    "64",
    "--max-seq-len",
    "16",
    "--multiple-of",
    "8",
    "--batch-size",
    "8",
    "--learning-rate",
    "1e-2",
    "--warmup-iters",
    "3",
    "--eval-iters",
    "4",
    "--threads",
    "2",
];

fn train(data: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "train".to_string(),
        "--data".into(),
        arg(data),
        "--out-dir".into(),
        arg(out),
    ];
    // TINY's flags, less those `extra` sets (clap refuses a flag twice).
    for pair in TINY.chunks(2) {
        if !extra.contains(&pair[0]) {
            args.extend(pair.iter().map(|s| s.to_string()));
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    llama2(&args)
}

/// The val loss printed at `step N:`.
fn val_loss(out: &str, step: u64) -> f32 {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("step {step}:")))
        .unwrap_or_else(|| panic!("no eval at step {step} in: {out}"));
    line.split("val loss ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn data_dir(tmp: &TempDir) -> PathBuf {
    let d = tmp.path("data");
    write_counting_data(&d);
    d
}

#[test]
fn loss_falls_and_model_bin_generates() {
    let tmp = TempDir::new("train-loop");
    let (data, out) = (data_dir(&tmp), tmp.path("out"));
    let run = train(
        &data,
        &out,
        &[
            "--max-iters",
            "30",
            "--eval-interval",
            "10",
            "--gradient-accumulation-steps",
            "1",
        ],
    );
    let text = run.ok();
    let (first, last) = (val_loss(text, 0), val_loss(text, 30));
    // ln 64 = 4.16 at the start; the counting pattern is nearly free.
    assert!(
        first > 3.9 && last < 0.6 * first,
        "val loss {first} -> {last}: {text}"
    );
    assert!(text.contains("done: 30 steps"), "{text}");
    // A llama2.c tokenizer.bin for the 64 ids, so the export runs.
    let mut tok = 8u32.to_le_bytes().to_vec();
    for id in 0..64u32 {
        let piece = match id {
            0 => "<unk>".to_string(),
            1 => "<s>".into(),
            2 => "</s>".into(),
            _ => format!("t{id} "),
        };
        tok.extend(0f32.to_le_bytes());
        tok.extend((piece.len() as u32).to_le_bytes());
        tok.extend(piece.as_bytes());
    }
    let tokenizer = tmp.path("tok64.bin");
    std::fs::write(&tokenizer, tok).unwrap();
    let model = arg(&out.join("model.bin"));
    let gen = llama2(&[model.as_str(), "-z", &arg(&tokenizer), "-t", "0", "-n", "8"]);
    assert!(!gen.ok().trim().is_empty(), "{}", gen.stderr);
}

#[test]
fn resume_continues_bit_for_bit() {
    let tmp = TempDir::new("train-resume");
    let data = data_dir(&tmp);
    let common = [
        "--eval-interval",
        "5",
        "--always-save-checkpoint",
        "--lr-decay-iters",
        "20",
        "--gradient-accumulation-steps",
        "2",
    ];
    let (straight, split) = (tmp.path("straight"), tmp.path("split"));
    fn with<'a>(common: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [common, extra].concat()
    }
    train(&data, &straight, &with(&common, &["--max-iters", "20"])).ok();
    train(&data, &split, &with(&common, &["--max-iters", "10"])).ok();
    let resumed = train(
        &data,
        &split,
        &with(&common, &["--max-iters", "20", "--init-from", "resume"]),
    );
    assert!(
        resumed.stderr.contains("resuming from"),
        "{}",
        resumed.stderr
    );
    assert!(
        resumed.ok().contains("done: 10 steps to iteration 20"),
        "{}",
        resumed.stdout
    );
    for name in ["model.bin", "ckpt.bin"] {
        let (a, b) = (
            std::fs::read(straight.join(name)).unwrap(),
            std::fs::read(split.join(name)).unwrap(),
        );
        assert!(
            a == b,
            "{name} differs between the straight and the resumed run"
        );
    }
}

#[test]
fn bad_flags_and_data_are_clear_errors() {
    let tmp = TempDir::new("train-bad");
    let data = data_dir(&tmp);
    let out = tmp.path("out");
    let run = train(&data, &out, &["--dropout", "0.1"]);
    assert!(
        run.code == Some(2) && run.stderr.contains("only dropout 0"),
        "{}",
        run.stderr
    );
    let run = train(&data, &out, &["--eval-interval", "0"]);
    assert!(
        run.code == Some(2) && run.stderr.contains("positive"),
        "{}",
        run.stderr
    );
    train(&tmp.path("missing"), &out, &["--max-iters", "1"]).fails_with("missing");
    let empty = tmp.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    train(&empty, &out, &["--max-iters", "1"]).fails_with("no *.bin token shards");
    train(&data, &out, &["--max-iters", "1", "--vocab-size", "32"])
        .fails_with("outside the vocabulary");
    train(&data, &out, &["--max-iters", "1", "--max-seq-len", "9000"])
        .fails_with("fewer than one window");
    train(&data, &out, &["--init-from", "resume", "--max-iters", "1"]).fails_with("ckpt.bin");
    // One long shard (its last 10% still holds a window); the attention probabilities alone
    // are then 8 * 4 * 25 * 10^8 floats per layer.
    let long = tmp.path("long");
    std::fs::create_dir_all(&long).unwrap();
    std::fs::write(long.join("a.bin"), [1u8, 0].repeat(600_000)).unwrap();
    train(&long, &out, &["--max-iters", "1", "--max-seq-len", "50000"]).fails_with("activations");
}
