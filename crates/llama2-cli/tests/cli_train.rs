//! `llama2 train --check-against`: passes on the shared train-debug folder,
//! and a damaged copy of it (truncated tensors, broken or inconsistent
//! state.json, a missing model) is one clear error line and exit 1.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn train_debug() -> PathBuf {
    model_path("train-debug")
}

/// A writable copy of train-debug in `tmp` (the shared files are read-only).
fn copy_train_debug(tmp: &TempDir) -> PathBuf {
    let dir = tmp.path("train-debug");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["model.bin", "state.json", "tensors.bin"] {
        let to = dir.join(name);
        std::fs::copy(train_debug().join(name), &to).unwrap();
        let mut perms = std::fs::metadata(&to).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&to, perms).unwrap();
    }
    dir
}

fn check(dir: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["train".to_string(), "--check-against".into(), arg(dir)];
    args.extend(extra.iter().map(|s| s.to_string()));
    llama2(&args)
}

/// Rewrites state.json's array `name` with `edit`.
fn edit_array(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let arrays = state["arrays"].as_array_mut().unwrap();
    let entry = arrays.iter_mut().find(|a| a["name"] == name).unwrap();
    edit(entry);
    std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
}

#[test]
fn matches_pytorch_on_train_debug() {
    let out = check(&train_debug(), &[]).ok().to_owned();
    assert!(out.contains("all within 1e-4"), "{out}");
    assert!(
        out.contains("grad.layers.1.feed_forward.w2.weight"),
        "{out}"
    );
    assert!(out.contains("step  9:"), "{out}");
}

#[test]
fn a_tighter_tolerance_than_f32_allows_fails() {
    let run = check(&train_debug(), &["--tolerance", "1e-12"]);
    assert!(run.stdout.contains("over the tolerance"), "{}", run.stdout);
    run.fails_with("over the tolerance");
}

#[test]
fn truncated_tensors_are_an_error() {
    let tmp = TempDir::new("train-truncated");
    let dir = copy_train_debug(&tmp);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("tensors.bin"))
        .unwrap();
    file.set_len(300_000).unwrap();
    check(&dir, &[]).fails_with("runs past the end");
}

#[test]
fn broken_state_json_is_an_error() {
    let tmp = TempDir::new("train-json");
    let dir = copy_train_debug(&tmp);
    std::fs::write(dir.join("state.json"), "{\"config\": [").unwrap();
    check(&dir, &[]).fails_with("malformed state.json");
}

#[test]
fn a_wrong_shape_is_an_error() {
    let tmp = TempDir::new("train-shape");
    let dir = copy_train_debug(&tmp);
    edit_array(&dir, "grad.norm.weight", |a| {
        a["shape"] = serde_json::json!([65])
    });
    check(&dir, &[]).fails_with("grad.norm.weight has shape [65]");
}

#[test]
fn an_offset_past_the_end_is_an_error() {
    let tmp = TempDir::new("train-offset");
    let dir = copy_train_debug(&tmp);
    edit_array(&dir, "logits", |a| {
        a["offset"] = serde_json::json!(u64::MAX - 1)
    });
    check(&dir, &[]).fails_with("logits (offset");
}

#[test]
fn missing_files_are_errors() {
    let tmp = TempDir::new("train-missing");
    let dir = copy_train_debug(&tmp);
    std::fs::remove_file(dir.join("model.bin")).unwrap();
    check(&dir, &[]).fails_with("model.bin is missing");
    let dir = copy_train_debug(&tmp);
    std::fs::remove_file(dir.join("tensors.bin")).unwrap();
    check(&dir, &[]).fails_with("cannot read tensors.bin");
    check(&tmp.path("nowhere"), &[]).fails_with("not a directory");
}
