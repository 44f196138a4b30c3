//! End-to-end text through the library: the known outputs of llama2.c's
//! `run` and `runq` on stories260K, and batched prompt prefill against
//! feeding the prompt one token at a time.

mod common;

use common::*;
use llama2::sampler::argmax;
use llama2::tokenizer::{Utf8Stream, BOS};
use llama2::{LanguageModel, ModelWeights};

#[test]
fn fp32_greedy_matches_run_c() {
    let w = load("stories260K.bin");
    assert_eq!(greedy_text(&w, "", 200), format!("{GOLDEN_FP32}\n"));
}

#[test]
fn q8_greedy_matches_runq_c() {
    let w = load("stories260K_q8_gs4.bin");
    assert_eq!(greedy_text(&w, "", 200), format!("{GOLDEN_Q8}\n"));
}

#[test]
fn top_p_sampling_matches_run_c() {
    let w = load("stories260K.bin");
    let text = generate_text(&w, &tok512(), "", 256, 1.0, 0.9, 133742);
    assert!(text.starts_with(GOLDEN_TIMMY), "got: {text}");
}

/// Greedy tokens after `prompt` for `steps` positions (run.c's loop), feeding
/// the prompt in one batched call. Returns BOS, the prompt and what follows.
fn greedy_batched(model: &mut dyn LanguageModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    assert!(prompt.len() <= steps);
    let mut tokens = prompt.to_vec();
    let mut logits = model.forward(prompt, 0).unwrap().to_vec();
    let mut pos = prompt.len() - 1;
    while pos < steps {
        let next = argmax(&logits);
        tokens.push(next);
        pos += 1;
        if next == BOS || pos == steps {
            break;
        }
        logits = model.forward(&[next], pos).unwrap().to_vec();
    }
    tokens
}

/// The same, one token per forward call as run.c does.
fn greedy_one_by_one(model: &mut dyn LanguageModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut tokens = vec![prompt[0]];
    for pos in 0..steps {
        let logits = model.forward(&[tokens[pos]], pos).unwrap();
        let next = if pos + 1 < prompt.len() {
            prompt[pos + 1]
        } else {
            argmax(logits)
        };
        tokens.push(next);
        if next == BOS {
            break;
        }
    }
    tokens
}

fn check_prompt_paths(model_name: &str) {
    let w = load(model_name);
    let tok = tok512();
    let prompt = "Once upon a time";
    let ids = tok.encode(prompt, true, false);
    // More prompt tokens than the CPU's batch, too.
    let long_prompt = "Lily and Ben went to the park. They saw a big dog. The dog was brown and had a long tail. \
                       Lily wanted to pet the dog, but Ben was scared. He said, \"No, Lily, the dog might bite!\" \
                       Lily said, \"It is a nice dog, look, it wags its tail.\"";
    let long_ids = tok.encode(long_prompt, true, false);
    assert!(long_ids.len() > 64, "{} tokens", long_ids.len());
    assert_prefill_logits_match(model_name, &w, &long_ids);
    for (text, ids, steps) in [(prompt, &ids, 120), (long_prompt, &long_ids, 160)] {
        let batched = greedy_batched(&mut cpu_model(&w), ids, steps);
        let single = greedy_one_by_one(&mut cpu_model(&w), ids, steps);
        assert_eq!(
            batched, single,
            "{model_name}: batched prefill vs one by one"
        );
        assert_eq!(&batched[..ids.len()], &ids[..]);

        // generate() prints exactly the decoded tokens.
        let mut stream = Utf8Stream::new();
        let mut expected = Vec::new();
        for pair in single.windows(2) {
            if pair[1] == BOS {
                break;
            }
            stream.push(tok.decode(pair[0], pair[1]), &mut expected);
        }
        expected.push(b'\n');
        let printed = greedy_text(&w, text, steps);
        assert_eq!(printed.as_bytes(), &expected[..], "{model_name}");
        assert!(printed.starts_with(text), "{printed}");
    }
}

/// A prompt's last logits fed at once and one token at a time. An int8
/// model's products are exact integer sums and its attention rounds as the
/// one-token path does, so its two are the same bits: greedy text never
/// depends on how a prompt was batched, and a near-tie flipped by a
/// rounding change fails here rather than behind a lucky prompt. A float
/// model's batched products round differently from one token's, so its
/// two agree to a few ulp.
fn assert_prefill_logits_match(model_name: &str, w: &ModelWeights, ids: &[u32]) {
    let batched = cpu_model(w).forward(ids, 0).unwrap().to_vec();
    let mut model = cpu_model(w);
    for (pos, &t) in ids[..ids.len() - 1].iter().enumerate() {
        model.forward(&[t], pos).unwrap();
    }
    let single = model.forward(&ids[ids.len() - 1..], ids.len() - 1).unwrap();
    if model_name.contains("q8") {
        let first = batched
            .iter()
            .zip(single)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            first, None,
            "{model_name}: batched prompt logits differ from one by one"
        );
    } else {
        let err = rel_err(&batched, single);
        assert!(
            err < 1e-5,
            "{model_name}: batched prompt logits off by {err}"
        );
    }
}

#[test]
fn prompt_prefill_matches_one_by_one_fp32() {
    check_prompt_paths("stories260K.bin");
}

#[test]
fn prompt_prefill_matches_one_by_one_q8() {
    check_prompt_paths("stories260K_q8_gs4.bin");
}

#[test]
fn forward_all_rows_match_forward() {
    let w = load("stories260K.bin");
    let tok = tok512();
    let ids = tok.encode("The cat sat on the mat.", true, false);
    let mut a = cpu_model(&w);
    let all = a.forward_all(&ids, 0).unwrap().to_vec();
    let v = w.config.vocab_size;
    assert_eq!(all.len(), ids.len() * v);
    let mut b = cpu_model(&w);
    for (pos, &t) in ids.iter().enumerate() {
        let one = b.forward(&[t], pos).unwrap();
        let row = &all[pos * v..(pos + 1) * v];
        let err = rel_err(row, one);
        assert!(err < 1e-4, "position {pos}: relative error {err}");
        assert_eq!(argmax(row), argmax(one), "position {pos}");
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

#[test]
fn steps_limit_and_context_errors() {
    let w = load("stories260K.bin");
    let tok = tok512();
    // Steps count positions, the prompt (and BOS) included: each position
    // prints the token that follows it.
    assert_eq!(greedy_text(&w, "", 1), "Once\n");
    let ids = tok.encode("Once upon a time", true, false);
    let mut want = String::new();
    for pair in ids[..4].windows(2) {
        want.push_str(std::str::from_utf8(tok.decode(pair[0], pair[1])).unwrap());
    }
    assert_eq!(greedy_text(&w, "Once upon a time", 3), format!("{want}\n"));
    // A prompt longer than the context is an error, not a panic.
    let long = "a ".repeat(700);
    assert!(tok.encode(&long, true, false).len() > w.config.seq_len);
    let mut model = cpu_model(&w);
    let mut sampler = llama2::sampler::Sampler::new(0.0, 0.9, 1);
    let mut out = Vec::new();
    let err = llama2::generate::generate(
        &mut model,
        &tok,
        &mut sampler,
        &long,
        512,
        (&mut out, Default::default()),
    )
    .expect_err("prompt longer than the context");
    assert!(err.to_string().contains("context"), "{err}");
    // forward past the context or with an out-of-vocabulary token: errors.
    assert!(model.forward(&[1], 512).is_err());
    assert!(model.forward(&[512], 0).is_err());
    assert!(model.forward(&[], 0).is_err());
}
