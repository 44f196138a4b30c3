//! The sampling flags beyond llama2.c's on stories260K: --top-k 1 is
//! greedy, penalties change the text, --stop cuts it, neutral values keep
//! run.c's text, and bad values or --exact give clear usage errors.

mod common;

use common::*;

#[test]
fn top_k_1_is_greedy() {
    let greedy = stories(&["-t", "0", "-n", "200"]);
    let top1 = stories(&["--top-k", "1", "-t", "1", "-s", "7", "-n", "200"]);
    assert_eq!(top1.ok(), greedy.ok());
    assert_eq!(greedy.ok(), format!("{GOLDEN_FP32}\n"));
}

#[test]
fn neutral_values_keep_run_c_s_text() {
    let plain = stories(&["-t", "1.0", "-p", "0.9", "-s", "133742"]);
    let neutral = stories(&[
        "-t",
        "1.0",
        "-p",
        "0.9",
        "-s",
        "133742",
        "--top-k",
        "0",
        "--min-p",
        "0",
        "--repeat-penalty",
        "1",
        "--frequency-penalty",
        "0",
        "--presence-penalty",
        "0",
    ]);
    assert_eq!(neutral.ok(), plain.ok());
    assert!(plain.ok().starts_with(GOLDEN_TIMMY));
}

#[test]
fn penalties_change_the_greedy_text() {
    let greedy = stories(&["-t", "0", "-n", "200"]);
    for flag in [
        "--repeat-penalty",
        "--frequency-penalty",
        "--presence-penalty",
    ] {
        let penalized = stories(&["-t", "0", "-n", "200", flag, "1.5"]);
        let text = penalized.ok();
        assert_ne!(text, greedy.ok(), "{flag}");
        // Same start: penalties only act once tokens repeat.
        assert!(text.starts_with("Once upon a time"), "{flag}: {text}");
    }
}

#[test]
fn stop_cuts_the_text_before_the_stop_string() {
    let full = stories(&["-t", "0", "-n", "200"]);
    let full = full.ok();
    let at = full.find("Lily").expect("the golden text names Lily");
    let cut = stories(&["-t", "0", "-n", "200", "--stop", "Lily"]);
    assert_eq!(cut.ok(), format!("{}\n", &full[..at]));
    // Several stops: the earliest wins, wherever it is in the list; one that
    // never occurs changes nothing.
    let park = full.find("park").unwrap();
    let both = stories(&["-t", "0", "-n", "200", "--stop", "park", "--stop", "Lily"]);
    assert_eq!(both.ok(), format!("{}\n", &full[..at.min(park)]));
    let never = stories(&["-t", "0", "-n", "200", "--stop", "Shoggoth"]);
    assert_eq!(never.ok(), full);
    // A stop string in the prompt does not end generation; only output counts.
    let prompted = stories(&["-t", "0", "-n", "60", "-i", "Lily", "--stop", "Lily"]);
    let out = prompted.ok();
    assert!(
        out.starts_with("Lily") && out.len() > "Lily\n".len(),
        "{out}"
    );
}

/// A usage error: exit code 2, the flag and `want` named on the first line.
fn usage_error(extra: &[&str], want: &str) {
    let r = stories(extra);
    assert_eq!(r.code, Some(2), "{extra:?}: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    let first = r.stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{}", r.stderr);
    assert!(first.contains(want), "expected {want:?} in: {first}");
    assert!(r.stdout.is_empty());
}

#[test]
fn bad_values_are_clear_usage_errors() {
    usage_error(&["--top-k", "-3"], "expected a whole number >= 0");
    usage_error(&["--top-k", "many"], "'--top-k <N>'");
    usage_error(&["--min-p", "1.5"], "expected a number from 0 to 1");
    usage_error(&["--min-p", "-0.1"], "'--min-p <P>'");
    usage_error(&["--repeat-penalty", "0"], "expected a number > 0");
    usage_error(&["--repeat-penalty", "nan"], "'--repeat-penalty <R>'");
    usage_error(&["--frequency-penalty", "3"], "from -2 to 2");
    usage_error(&["--presence-penalty", "-2.5"], "from -2 to 2");
    usage_error(&["--stop", ""], "expected a non-empty text");
}

#[test]
fn new_flags_are_refused_with_exact() {
    for flag in [
        &["--top-k", "5"][..],
        &["--min-p", "0.1"],
        &["--repeat-penalty", "1.1"],
        &["--frequency-penalty", "0.5"],
        &["--presence-penalty", "0.5"],
        &["--stop", "x"],
    ] {
        let mut args = flag.to_vec();
        args.push("--exact");
        usage_error(&args, "cannot be used with '--exact'");
    }
}

#[test]
fn stop_is_refused_in_chat() {
    stories(&["-m", "chat", "--stop", "x"]).fails_with("--stop works in generate mode only");
}

#[test]
fn sampling_flags_work_in_chat() {
    let r = llama2_stdin(
        &[
            arg(&model_path("stories260K.bin")),
            "-z".into(),
            arg(&model_path("tok512.bin")),
            "--device".into(),
            "cpu".into(),
            "-m".into(),
            "chat".into(),
            "-y".into(),
            "".into(),
            "-n".into(),
            "100".into(),
            "--top-k".into(),
            "1".into(),
            "--repeat-penalty".into(),
            "1.2".into(),
        ],
        Some("hello\n"),
    );
    assert!(r.ok().contains("Assistant: "), "{}", r.stdout);
}
