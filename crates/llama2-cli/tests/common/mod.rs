//! Shared helpers for the CLI integration tests: everything the library's
//! tests share (model paths, golden texts, temp dirs, greedy generation),
//! plus running the built `llama2` binary.
#![allow(dead_code)]

#[path = "../../../llama2/tests/common/mod.rs"]
mod library;

use std::path::Path;

pub use library::*;

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
    llama2_bytes(args, input.map(str::as_bytes))
}

/// Runs the binary with `args` and raw bytes on stdin (closed when `None`).
/// Stdin is fed from a thread, so a program that stops reading early (as
/// it should on a too-long line) does not block the test.
pub fn llama2_bytes<S: AsRef<std::ffi::OsStr>>(args: &[S], input: Option<&[u8]>) -> Run {
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
    let feeder = input.map(|bytes| {
        let mut stdin = child.stdin.take().unwrap();
        let bytes = bytes.to_vec();
        std::thread::spawn(move || {
            // A closed pipe means the program has read all it wanted.
            let _ = stdin.write_all(&bytes);
        })
    });
    let out = child.wait_with_output().expect("run llama2");
    if let Some(f) = feeder {
        f.join().unwrap();
    }
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

/// Runs `llama2` on the CPU with a shared stories260K-family `model` and
/// tok512, plus `extra` flags.
pub fn stories_model(model: &str, extra: &[&str]) -> Run {
    let mut args = vec![
        arg(&model_path(model)),
        "-z".into(),
        arg(&model_path("tok512.bin")),
        "--device".into(),
        "cpu".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    llama2(&args)
}

/// `stories_model` on stories260K.bin.
pub fn stories(extra: &[&str]) -> Run {
    stories_model("stories260K.bin", extra)
}
