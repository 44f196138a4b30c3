//! Shared helpers for the integration tests: the real model files in
//! `shared/models`, temporary directories, and greedy generation through the
//! library.
#![allow(dead_code)]

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use llama2::checkpoint::{self, FileFormat};
use llama2::generate;
use llama2::sampler::Sampler;
use llama2::{CpuBackend, ModelWeights, Tokenizer, Transformer};

/// What llama2.c's `run stories260K.bin -z tok512.bin -t 0.0 -n 200` prints
/// (without the final newline), from shared/models/README.md.
pub const GOLDEN_FP32: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.
Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find it.\"
Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"
Lily didn't want to help her mom, so she";

/// What llama2.c's `runq stories260K_q8_gs4.bin -z tok512.bin -t 0.0 -n 200`
/// prints (without the final newline).
pub const GOLDEN_Q8: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.
Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find it.\"
Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"
Lily didn't want to help, but she did";

/// The first sentence of `-t 1.0 -p 0.9 -s 133742`.
pub const GOLDEN_TIMMY: &str = "Once upon a time, there was a little boy named Timmy. Timmy loved to play with his toys and eat sandwiches.";

/// A file in shared/models (never copied into the repository).
pub fn model_path(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models"
    ))
    .join(name)
}

pub fn load(name: &str) -> ModelWeights {
    checkpoint::load(&model_path(name)).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn tok512() -> Tokenizer {
    Tokenizer::load(&model_path("tok512.bin"), 512).expect("tok512.bin")
}

pub fn llama_tokenizer() -> Tokenizer {
    Tokenizer::load(&model_path("tokenizer.bin"), 32000).expect("tokenizer.bin")
}

/// A CPU model of `weights` (one thread: tests run in parallel anyway).
pub fn cpu_model(weights: &ModelWeights) -> Transformer<CpuBackend> {
    Transformer::new(CpuBackend::new(1).expect("cpu backend"), weights).expect("model")
}

/// What `llama2 <model> -t <temperature> -p <topp> -s <seed> -n <steps> -i <prompt>` prints on stdout.
pub fn generate_text(
    weights: &ModelWeights,
    tok: &Tokenizer,
    prompt: &str,
    steps: usize,
    temperature: f32,
    topp: f32,
    seed: u64,
) -> String {
    let mut model = cpu_model(weights);
    let mut sampler = Sampler::new(temperature, topp, seed);
    let mut out = Vec::new();
    generate::generate(&mut model, tok, &mut sampler, prompt, steps, &mut out).expect("generate");
    String::from_utf8(out).expect("generated text is UTF-8")
}

/// Greedy text, as `-t 0 -n <steps>` prints it.
pub fn greedy_text(weights: &ModelWeights, prompt: &str, steps: usize) -> String {
    generate_text(weights, &tok512(), prompt, steps, 0.0, 0.9, 1)
}

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "llama2-rs-test-{}-{tag}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `weights` to `path` in `format`.
pub fn write_model(weights: &ModelWeights, format: FileFormat, path: &Path) {
    let mut out = BufWriter::new(File::create(path).expect("create checkpoint"));
    checkpoint::write(weights, format, &mut out).expect("write checkpoint");
}

// ---------------------------------------------------------------------------
// Running the built `llama2` binary

/// The result of one run of the binary.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts a clean success and returns stdout.
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "stderr: {}", self.stderr);
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        &self.stdout
    }

    /// Asserts a clean failure: exit code 1, one line on stderr starting
    /// with "error:" (which must mention `needle`), no panic.
    pub fn fails_with(&self, needle: &str) {
        assert!(!self.stderr.contains("panicked"), "{}", self.stderr);
        assert_eq!(self.code, Some(1), "stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr: {}", self.stderr);
        assert!(lines[0].starts_with("error: "), "stderr: {}", self.stderr);
        assert!(
            lines[0].to_lowercase().contains(&needle.to_lowercase()),
            "expected {needle:?} in: {}",
            self.stderr
        );
    }
}

pub fn llama2_command() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_llama2"))
}

/// Runs the binary with `args`, stdin closed.
pub fn llama2<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    llama2_stdin(args, None)
}

/// Runs the binary with `args` and `input` on stdin (closed when `None`).
pub fn llama2_stdin<S: AsRef<std::ffi::OsStr>>(args: &[S], input: Option<&str>) -> Run {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = llama2_command()
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start llama2");
    if let Some(text) = input {
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().expect("run llama2");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `path` as a command-line argument.
pub fn arg(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_owned()
}
