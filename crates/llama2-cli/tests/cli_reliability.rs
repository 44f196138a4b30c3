//! The reliability classes of bad input, each through the real binary:
//! special files, endless and huge inputs, non-finite numbers and flags,
//! invalid UTF-8 in and out, benchmarks asked for work they cannot do, and
//! the wording of OS errors. Each gives one clear error (or, for valid
//! input, a correct result), never a panic, a hang or an allocation failure.

mod common;

use std::time::{Duration, Instant};

use common::*;
use llama2::checkpoint::FileFormat;

fn model() -> String {
    arg(&model_path("stories260K.bin"))
}

fn tok() -> String {
    arg(&model_path("tok512.bin"))
}

/// `llama2 stories260K.bin -z TOK --device cpu EXTRA...`.
fn generate_with(tokenizer: &str, extra: &[&str]) -> Run {
    let mut args = vec![model(), "-z".into(), tokenizer.into()];
    args.extend(["--device", "cpu"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    llama2(&args)
}

fn usage_error(args: &[&str], needle: &str) {
    let r = llama2(args);
    assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
}

/// Runs `f` and fails if it takes longer than `limit` (a hang shows up as a
/// failure with a message, not as a stuck test run).
fn within<T>(limit: Duration, what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    assert!(start.elapsed() < limit, "{what} took {:?}", start.elapsed());
    r
}

#[test]
fn special_files_are_refused_without_blocking() {
    let dir = TempDir::new("special");
    let fifo = dir.path("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let fifo = arg(&fifo);
    let limit = Duration::from_secs(20);
    within(limit, "FIFO checkpoint", || {
        llama2(&[&fifo, "-z", &tok(), "--device", "cpu"])
            .fails_with("is a named pipe (FIFO), not a regular file")
    });
    within(limit, "FIFO tokenizer", || {
        generate_with(&fifo, &[]).fails_with("is a named pipe (FIFO), not a regular file")
    });
    within(limit, "FIFO text", || {
        llama2(&[
            "perplexity",
            &model(),
            "-z",
            &tok(),
            "--text",
            &fifo,
            "--device",
            "cpu",
        ])
        .fails_with("named pipe")
    });
    for dev in ["/dev/zero", "/dev/urandom", "/dev/null"] {
        within(limit, dev, || {
            llama2(&[dev, "-z", &tok(), "--device", "cpu"]).fails_with("character device");
            generate_with(dev, &[]).fails_with("character device");
            llama2(&["tokenize", "-z", dev, "hi"]).fails_with("character device");
        });
    }
    generate_with(&arg(&dir.path("")), &[]).fails_with("is a directory");
}

#[test]
fn oversized_inputs_are_refused_before_reading() {
    let dir = TempDir::new("huge");
    // Sparse files: huge on paper, nothing on disk.
    let sparse = |name: &str, len: u64| {
        let path = dir.path(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        arg(&path)
    };
    let huge_tok = sparse("huge-tok.bin", 1 << 40);
    within(Duration::from_secs(20), "huge tokenizer", || {
        generate_with(&huge_tok, &[]).fails_with("more than the 268435456 bytes a tokenizer")
    });
    let huge_text = sparse("huge.txt", 1 << 40);
    within(Duration::from_secs(20), "huge text", || {
        llama2(&[
            "perplexity",
            &model(),
            "-z",
            &tok(),
            "--text",
            &huge_text,
            "--device",
            "cpu",
        ])
        .fails_with("bytes a text to score may have")
    });
    // A checkpoint whose header asks for more bytes than the (sparse) file
    // holds: refused from the header, before anything is mapped.
    let mut bytes = std::fs::read(model_path("stories260K.bin")).unwrap();
    bytes[24..28].copy_from_slice(&(1i32 << 20).to_le_bytes()); // seq_len
    let path = dir.path("long-context.bin");
    std::fs::write(&path, &bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(1 << 40).unwrap();
    within(Duration::from_secs(20), "sparse checkpoint", || {
        llama2(&[&arg(&path), "-z", &tok(), "--device", "cpu"])
            .fails_with("longer than its header says")
    });
}

#[test]
fn tokenizer_headers_that_lie_are_refused() {
    let dir = TempDir::new("tokhdr");
    let original = std::fs::read(model_path("tok512.bin")).unwrap();
    for (name, value, needle) in [
        ("neg.bin", -1i32, "longest token as -1 bytes"),
        ("huge.bin", i32::MAX, "longest token as 2147483647 bytes"),
        (
            "short.bin",
            3,
            "but the header says no token is longer than 3",
        ),
    ] {
        let mut bytes = original.clone();
        bytes[..4].copy_from_slice(&value.to_le_bytes());
        let path = dir.path(name);
        std::fs::write(&path, &bytes).unwrap();
        generate_with(&arg(&path), &[]).fails_with(needle);
    }
    // tokenize --vocab with an absurd size: an error, no allocation.
    llama2(&[
        "tokenize",
        "-z",
        &tok(),
        "--vocab",
        "18446744073709551615",
        "hi",
    ])
    .fails_with("too short for the model's 18446744073709551615 tokens");
    llama2(&["tokenize", "-z", &tok(), "--vocab", "2", "hi"]).fails_with("no room for");
}

#[test]
fn non_finite_and_absurd_flags_are_usage_errors() {
    let m = model();
    for t in ["nan", "NaN", "inf", "-inf", "infinity"] {
        usage_error(&[&m, &format!("--temperature={t}")], "finite");
        usage_error(&[&m, &format!("--topp={t}")], "finite");
    }
    usage_error(&[&m, "--threads", "4294967296"], "at most 1024");
    usage_error(&["bench", "--threads", "100000"], "at most 1024");
}

#[test]
fn tiny_temperatures_are_greedy() {
    let greedy = generate_with(&tok(), &["-t", "0", "-n", "40"])
        .ok()
        .to_string();
    for t in ["1e-38", "1e-45", "1e-40"] {
        let r = generate_with(&tok(), &["-t", t, "-n", "40", "-s", "7"]);
        assert_eq!(r.ok(), greedy, "-t {t}");
    }
}

/// stories260K with one value of layer 0's wq replaced.
fn poisoned_model(dir: &TempDir, value: f32, format: FileFormat) -> String {
    let mut w = load("stories260K.bin");
    let mut values = w.layers[0].wq.to_f32();
    values[5] = value;
    w.layers[0].wq = llama2::HostMatrix::from_f32(w.config.dim, w.config.dim, values);
    let path = dir.path(&format!("poisoned-{value}.bin"));
    write_model(&w, format, &path);
    arg(&path)
}

#[test]
fn non_finite_weights_stop_with_the_position() {
    let dir = TempDir::new("nan");
    let nan = poisoned_model(&dir, f32::NAN, FileFormat::V0);
    let r = llama2(&[&nan, "-z", &tok(), "--device", "cpu", "-t", "0"]);
    r.fails_with("non-finite logits at position 0");
    // int8 conversion refuses the NaN instead of absorbing it.
    let r = llama2(&[&nan, "-z", &tok(), "--device", "cpu", "--dtype", "q8"]);
    r.fails_with("weight layers[0].wq: cannot convert to q8: row 0, column 5 holds NaN");
    // f16 cannot hold 1e6.
    let big = poisoned_model(&dir, 1e6, FileFormat::V0);
    let r = llama2(&[&big, "-z", &tok(), "--device", "cpu", "--dtype", "f16"]);
    r.fails_with("beyond f16's range");
    // perplexity reports the position instead of printing NaN.
    let text = dir.path("story.txt");
    std::fs::write(&text, "Once upon a time, there was a cat.").unwrap();
    let r = llama2(&[
        "perplexity",
        &nan,
        "-z",
        &tok(),
        "--text",
        &arg(&text),
        "--device",
        "cpu",
    ]);
    r.fails_with("non-finite logits at position 0");
}

#[test]
fn non_finite_norms_and_scales_are_refused_at_load() {
    let dir = TempDir::new("nannorm");
    let mut w = load("stories260K.bin");
    let mut gains = w.layers[3].rms_ffn.to_vec();
    gains[7] = f32::INFINITY;
    w.layers[3].rms_ffn = llama2::tensor::Storage::owned(gains);
    let path = dir.path("norm.bin");
    write_model(&w, FileFormat::V1, &path);
    llama2(&[&arg(&path), "-z", &tok(), "--device", "cpu"])
        .fails_with("weight layers[3].rms_ffn holds inf at index 7");
    // A Q8 scale: the first scale of wq in layer 0 of the int8 file.
    let mut q8 = std::fs::read(model_path("stories260K_q8_gs4.bin")).unwrap();
    let c = load("stories260K_q8_gs4.bin").config;
    let norms = (2 * c.n_layers + 1) * c.dim * 4;
    let embedding = c.vocab_size * c.dim;
    let wq_scales = 256 + norms + 2 * embedding + c.dim * c.dim; // int8 values, then f32 scales
    q8[wq_scales..wq_scales + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = dir.path("scale.bin");
    std::fs::write(&path, &q8).unwrap();
    llama2(&[&arg(&path), "-z", &tok(), "--device", "cpu"])
        .fails_with("weight layers[0].wq (Q8 scales) holds NaN at index 0");
}

#[test]
fn output_is_valid_utf8_whatever_the_pieces() {
    // tok512 with every piece that stories260K's greedy text uses most
    // replaced by bytes that are no UTF-8: a lone continuation byte, a lead
    // byte without its continuation, an overlong form, a surrogate.
    let dir = TempDir::new("badutf8");
    let mut bytes = std::fs::read(model_path("tok512.bin")).unwrap();
    let junk: [&[u8]; 4] = [b"\x80", b"\xE2\x82", b"\xC0\xAF", b"\xED\xA0\x80"];
    let mut at = 4;
    let mut id = 0;
    while at < bytes.len() {
        let len = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let piece = &mut bytes[at + 8..at + 8 + len];
        // Tokens past the specials and byte tokens, long enough to hold junk.
        if id > 258 && len >= 4 && id % 2 == 0 {
            let j = junk[id % junk.len()];
            piece[..j.len()].copy_from_slice(j);
        }
        at += 8 + len;
        id += 1;
    }
    let path = dir.path("junk.bin");
    std::fs::write(&path, &bytes).unwrap();
    for t in ["0", "1"] {
        // `Run` decodes stdout with from_utf8 and fails on invalid bytes.
        let r = generate_with(&arg(&path), &["-t", t, "-n", "200", "-s", "3"]);
        assert!(!r.ok().is_empty());
    }
}

#[test]
fn chat_input_is_bounded_and_checked() {
    let args = [
        model(),
        "-z".into(),
        tok(),
        "--device".into(),
        "cpu".into(),
        "-m".into(),
        "chat".into(),
        "-y".into(),
        "".into(),
    ];
    // Invalid UTF-8 on stdin: said so, not "cannot write output".
    let r = llama2_bytes(&args, Some(b"hello \xFF\xFE there\n"));
    r.fails_with("chat input is not valid UTF-8 (at byte 6 of the line)");
    // An endless line: refused after reading what could fit, quickly.
    let endless = vec![b'a'; 64 << 20];
    let r = within(Duration::from_secs(30), "a 64 MiB line", || {
        llama2_bytes(&args, Some(&endless))
    });
    let stderr = r.stderr.lines().last().unwrap_or_default().to_string();
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(
        stderr.contains("cannot fit in the model's context"),
        "{stderr}"
    );
}

#[test]
fn bench_refuses_work_it_would_not_do() {
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "--device", "cpu", "--model"];
        let m = model();
        args.push(&m);
        args.extend(extra);
        llama2(&args)
    };
    bench(&["--gen-tokens", "600"]).fails_with("--gen-tokens 600 needs 601 positions");
    bench(&["--gen-tokens", "512"]).fails_with("give at most 511");
    bench(&["--gen-tokens", "0"]).fails_with("--gen-tokens 0");
    bench(&["--prompt-tokens", "513"]).fails_with("--prompt-tokens 513");
    bench(&["--runs", "0"]).fails_with("--runs 0");
    // The largest counts the context allows run and are reported as given.
    let r = bench(&[
        "--gen-tokens",
        "511",
        "--prompt-tokens",
        "512",
        "--runs",
        "1",
        "--json",
    ]);
    let line: serde_json::Value = serde_json::from_str(r.ok().trim()).unwrap();
    assert_eq!(line["gen_tokens"], 511);
    assert_eq!(line["prompt_tokens"], 512);
    llama2(&["check", &model(), "--device", "cpu", "--prompt-tokens", "0"])
        .fails_with("at least one prompt token");
    llama2(&["check", &model(), "--device", "cpu", "--steps", "600"]).fails_with("positions");
}

#[test]
fn os_errors_are_worded_once() {
    let dir = TempDir::new("oserr");
    let r = llama2(&[&arg(&dir.path("missing.bin")), "-z", &tok()]);
    r.fails_with("cannot open");
    assert_eq!(r.stderr.matches("os error").count(), 1, "{}", r.stderr);
    let r = generate_with(&arg(&dir.path("missing-tok.bin")), &[]);
    assert_eq!(r.stderr.matches("os error").count(), 1, "{}", r.stderr);
}
