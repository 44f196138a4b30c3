//! Bad input in the foreign formats, through the binary: truncated files,
//! headers that lie about sizes, unknown types, missing config keys, a
//! pickle that asks for a callable, shards that disagree. Each gives one
//! clear error line, never a panic or a hang.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// A copy of the fixture directory `name` in `dir`, to damage.
fn copy_dir(name: &str, dir: &TempDir) -> PathBuf {
    let from = model_path(name);
    let to = dir.path(name.rsplit('/').next().unwrap());
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    to
}

fn run(model: &Path) -> Run {
    llama2(&[
        arg(model),
        "-n".into(),
        "4".into(),
        "--device".into(),
        "cpu".into(),
    ])
}

fn truncate(path: &Path, len: usize) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..len.min(bytes.len())]).unwrap();
}

#[test]
fn damaged_safetensors_directories() {
    let dir = TempDir::new("hf-bad");
    let hf = copy_dir("hf/stories260K", &dir);
    let weights = hf.join("model.safetensors");
    let full = std::fs::read(&weights).unwrap();
    // Truncated in the header, and in the data.
    truncate(&weights, 100);
    run(&hf).fails_with("not a valid safetensors file");
    std::fs::write(&weights, &full[..full.len() - 10]).unwrap();
    run(&hf).fails_with("model.safetensors");
    // A header that lies about where a tensor ends, and an unknown dtype.
    let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&full[8..8 + header_len]).unwrap();
    let lying = header.replacen("[0,131072]", "[0,131076]", 1);
    let mut bytes = full.clone();
    bytes[8..8 + header_len].copy_from_slice(lying.as_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    run(&hf).fails_with("safetensors");
    // I32 has F32's size, so only the type is wrong.
    let unknown = header.replacen("\"F32\"", "\"I32\"", 1);
    let mut bytes = full.clone();
    bytes[8..8 + header_len].copy_from_slice(unknown.as_bytes());
    std::fs::write(&weights, &bytes).unwrap();
    run(&hf).fails_with("supported types are F32, F16 and BF16");
    std::fs::write(&weights, &full).unwrap();
    // config.json with a key missing, a wrong architecture, bad JSON.
    let config = hf.join("config.json");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original.replace("\"num_hidden_layers\"", "\"layers\""),
    )
    .unwrap();
    run(&hf).fails_with("config.json has no num_hidden_layers");
    std::fs::write(&config, original.replace("\"llama\"", "\"mistral\"")).unwrap();
    run(&hf).fails_with("model_type is \"mistral\"");
    std::fs::write(&config, &original[..original.len() / 2]).unwrap();
    run(&hf).fails_with("not valid JSON");
    // A config whose shapes do not match the weights.
    std::fs::write(
        &config,
        original.replace("\"intermediate_size\": 172", "\"intermediate_size\": 200"),
    )
    .unwrap();
    run(&hf).fails_with("the config needs [200, 64]");
}

#[test]
fn sharded_directories_whose_shards_disagree() {
    let dir = TempDir::new("shards-bad");
    let hf = copy_dir("hf/stories260K-bf16-sharded", &dir);
    std::fs::remove_file(hf.join("model-00002-of-00002.safetensors")).unwrap();
    run(&hf).fails_with("model-00002-of-00002.safetensors");
    let index = hf.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(
        &index,
        text.replace("model-00002-of-00002", "../../etc/passwd"),
    )
    .unwrap();
    run(&hf).fails_with("expected a file name in the directory");
    // Meta shards: one shard from another model size.
    let meta = copy_dir("meta/stories260K", &dir);
    truncate(&meta.join("consolidated.01.pth"), 4000);
    run(&meta).fails_with("consolidated.01.pth");
}

#[test]
fn pickles_that_ask_for_code_are_refused() {
    let dir = TempDir::new("pickle-evil");
    // A torch.save-style zip whose data.pkl calls os.system.
    let pickle = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.";
    let path = dir.path("evil.pt");
    write_stored_zip(
        &path,
        &[("archive/data.pkl", pickle), ("archive/version", b"3\n")],
    );
    let r = llama2(&[arg(&path), "-z".into(), arg(&model_path("tok512.bin"))]);
    r.fails_with("os.system");
    assert!(r.stderr.contains("never runs code"), "{}", r.stderr);
    // Truncated torch.save files.
    let ckpt = dir.path("cut.pt");
    std::fs::copy(model_path("stories260K-ckpt.pt"), &ckpt).unwrap();
    truncate(&ckpt, 300_000);
    llama2(&[arg(&ckpt), "-z".into(), arg(&model_path("tok512.bin"))]).fails_with("cut.pt");
}

#[test]
fn damaged_gguf_files() {
    let dir = TempDir::new("gguf-bad");
    let full = std::fs::read(model_path("gguf/stories260K-q8_0.gguf")).unwrap();
    for (name, len) in [
        ("head.gguf", 30),
        ("meta.gguf", 2000),
        ("data.gguf", full.len() - 100),
    ] {
        let path = dir.path(name);
        std::fs::write(&path, &full[..len]).unwrap();
        run(&path).fails_with(name);
    }
}
