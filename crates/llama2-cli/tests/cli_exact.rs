//! `llama2 --exact` against llama2.c itself: every case of `exact/cases.tsv`
//! must print byte for byte what run.c (fp32) or runq.c (int8) printed,
//! sampled texts included, at several thread counts. The expected texts
//! come from `scripts/exact-reference.sh`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::*;

/// One line of `cases.tsv`.
struct Case {
    name: String,
    model: String,
    tokenizer: String,
    flags: Vec<String>,
}

fn exact_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/exact")
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(exact_dir().join("cases.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 5, "cases.tsv line {l:?}");
            Case {
                name: f[0].into(),
                model: f[1].into(),
                tokenizer: f[2].into(),
                flags: f[4].split(' ').map(String::from).collect(),
            }
        })
        .collect()
}

/// The model file of `spec`: a shared file, or a random checkpoint written
/// once per `synth:SHAPE:FORMAT` into `dir`.
fn model_file(spec: &str, dir: &TempDir, made: &mut HashMap<String, PathBuf>) -> PathBuf {
    let Some(synth) = spec.strip_prefix("synth:") else {
        return model_path(spec);
    };
    made.entry(spec.to_string())
        .or_insert_with(|| {
            let (shape, format) = synth.split_once(':').expect("synth:SHAPE:FORMAT");
            let path = dir.path(&format!("{shape}-{format}.bin"));
            let args = [
                "synth", "--shape", shape, "--format", format, "--seed", "42",
            ];
            let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            args.push(arg(&path));
            llama2(&args).ok();
            path
        })
        .clone()
}

#[test]
fn exact_matches_llama2_c_on_every_case() {
    let dir = TempDir::new("exact");
    let mut made = HashMap::new();
    let mut failures = Vec::new();
    for (i, case) in cases().iter().enumerate() {
        let want = std::fs::read_to_string(exact_dir().join(format!("{}.txt", case.name))).unwrap();
        // Thread counts differ from case to case: the result must not depend on them.
        let threads = ["1", "2", "3"][i % 3];
        let mut args = vec![
            arg(&model_file(&case.model, &dir, &mut made)),
            "-z".into(),
            arg(&model_path(&case.tokenizer)),
            "--exact".into(),
            "--threads".into(),
            threads.into(),
        ];
        args.extend(case.flags.iter().cloned());
        let got = llama2(&args);
        if got.ok() != want {
            let at = got
                .ok()
                .bytes()
                .zip(want.bytes())
                .take_while(|(a, b)| a == b)
                .count();
            failures.push(format!(
                "{} ({threads} threads): differs from byte {at}:\n  got  {:?}\n  want {:?}",
                case.name,
                &got.ok()[at.min(got.ok().len())..]
                    .chars()
                    .take(60)
                    .collect::<String>(),
                &want[at.min(want.len())..]
                    .chars()
                    .take(60)
                    .collect::<String>(),
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn exact_and_isa_choose_the_cpu() {
    let model = arg(&model_path("stories260K.bin"));
    let tok = arg(&model_path("tok512.bin"));
    let base = [model.as_str(), "-z", tok.as_str(), "-t", "0", "-n", "200"];
    for extra in [
        &["--exact"][..],
        &["--isa", "scalar"],
        &["--device", "auto", "--exact"],
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        assert_eq!(llama2(&args).ok(), format!("{GOLDEN_FP32}\n"), "{extra:?}");
    }
    let args: Vec<&str> = base
        .iter()
        .chain(&["--device", "cuda", "--exact"])
        .copied()
        .collect();
    llama2(&args).fails_with("--exact chooses CPU kernels and cannot run on --device cuda");
    for (extra, needle) in [
        (
            &["--isa", "avx9"][..],
            "expected one of scalar, avx2, avxvnni, avx512, amx, neon",
        ),
        (&["--exact", "--isa", "avx2"], "cannot be used with"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let r = llama2(&args);
        assert_eq!(r.code, Some(2), "{extra:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{extra:?}: {}", r.stderr);
    }
}

/// Every level this CPU runs, forced by flag or by `LLAMA2_ISA`, gives the
/// golden greedy texts; a level it does not run is a clear error.
#[test]
fn every_supported_level_can_be_forced() {
    use llama2::cpu::kernels::{Isa, Level};
    let tok = arg(&model_path("tok512.bin"));
    for level in Level::ALL {
        let name = level.name();
        for (model, golden) in [
            ("stories260K.bin", GOLDEN_FP32),
            ("stories260K_q8_gs4.bin", GOLDEN_Q8),
        ] {
            let m = arg(&model_path(model));
            let args = [
                m.as_str(),
                "-z",
                tok.as_str(),
                "-t",
                "0",
                "-n",
                "200",
                "--isa",
                name,
            ];
            let by_flag = llama2(&args);
            let mut cmd = llama2_command();
            cmd.args(&args[..7]).env("LLAMA2_ISA", name);
            let by_env = cmd.output().unwrap();
            if Isa::new(level).is_some() {
                assert_eq!(by_flag.ok(), format!("{golden}\n"), "--isa {name} {model}");
                assert_eq!(
                    String::from_utf8_lossy(&by_env.stdout),
                    format!("{golden}\n")
                );
            } else {
                by_flag.fails_with(&format!(
                    "--isa {name}: this CPU cannot run the {name} kernels"
                ));
                let err = String::from_utf8_lossy(&by_env.stderr);
                assert!(err.contains(&format!("LLAMA2_ISA={name}")), "{err}");
                assert!(!by_env.status.success());
            }
        }
    }
}
