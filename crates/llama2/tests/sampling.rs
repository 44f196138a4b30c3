//! The extended sampling API: `SequenceSampler` against llama2.c's
//! `Sampler` on defaults, each stage (top-k, min-p, the three penalties,
//! logprobs) on small hand-checked cases, `SamplingParams::validate`, and
//! `StopMatcher` across token boundaries.

use llama2::sampler::{argmax, Rng, Sampler};
use llama2::sampling::{Sampled, SamplingParams, SequenceSampler, StopMatcher};

/// Logits of `n` tokens with spread `scale`, roughly normal.
fn random_logits(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.next_f32() - 0.5).sum::<f32>() * scale)
        .collect()
}

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        seed: 42,
        ..SamplingParams::default()
    };
    f(&mut p);
    p
}

/// Greedy draws from fixed logits, `n` times.
fn greedy_sequence(p: &SamplingParams, prompt: &[u32], logits: &[f32], n: usize) -> Vec<u32> {
    let mut s = SequenceSampler::new(p, prompt);
    (0..n)
        .map(|_| s.sample(&mut logits.to_vec()).token)
        .collect()
}

#[test]
fn defaults_are_llama2c() {
    let d = SamplingParams::default();
    assert_eq!(
        (d.temperature, d.top_p, d.top_k, d.min_p),
        (1.0, 0.9, 0, 0.0)
    );
    assert_eq!(
        (
            d.repetition_penalty,
            d.frequency_penalty,
            d.presence_penalty
        ),
        (1.0, 0.0, 0.0)
    );
    assert_eq!(d.top_logprobs, None);
    assert_eq!(d.validate(), Ok(()));
}

/// Token streams of `SequenceSampler` with `p` and of run.c's `Sampler`.
fn both_streams(p: &SamplingParams, logits: &[Vec<f32>]) -> (Vec<u32>, Vec<u32>) {
    let mut ours = SequenceSampler::new(p, &[1, 2, 3]);
    let mut theirs = Sampler::new(p.temperature, p.top_p, p.seed);
    logits
        .iter()
        .map(|l| {
            (
                ours.sample(&mut l.clone()).token,
                theirs.sample(&mut l.clone()),
            )
        })
        .unzip()
}

#[test]
fn llama2c_settings_give_the_sampler_s_tokens_bit_for_bit() {
    let mut gen = Rng::new(0xabc);
    for n in [2usize, 512, 32000] {
        let draws = if n == 32000 { 20 } else { 100 };
        for scale in [0.5f32, 4.0, 20.0] {
            let logits: Vec<Vec<f32>> = (0..draws)
                .map(|_| random_logits(&mut gen, n, scale))
                .collect();
            for (t, top_p) in [(1.0, 0.9), (0.7, 0.5), (1.3, 0.0), (1.0, 1.0), (0.0, 0.9)] {
                for logprobs in [None, Some(5)] {
                    let seed = 1 + gen.next_u32() as u64;
                    let p = params(|p| {
                        (p.temperature, p.top_p, p.seed) = (t, top_p, seed);
                        p.top_logprobs = logprobs;
                    });
                    let (ours, theirs) = both_streams(&p, &logits);
                    assert_eq!(ours, theirs, "n {n} scale {scale} t {t} p {top_p}");
                }
            }
        }
    }
}

#[test]
fn the_extended_pipeline_without_cuts_is_llama2c_too() {
    // top_k at least the vocabulary cuts nothing but takes the extended
    // path: its softmax, nucleus and draw must be run.c's.
    let mut gen = Rng::new(77);
    let logits: Vec<Vec<f32>> = (0..200)
        .map(|_| random_logits(&mut gen, 300, 5.0))
        .collect();
    for (t, top_p) in [(1.0, 0.9), (0.8, 0.3), (1.0, 0.0)] {
        let p = params(|p| {
            (p.temperature, p.top_p, p.top_k) = (t, top_p, 300);
        });
        let (ours, theirs) = both_streams(&p, &logits);
        assert_eq!(ours, theirs, "t {t} p {top_p}");
    }
}

#[test]
fn top_k_1_is_argmax() {
    let mut gen = Rng::new(5);
    for case in 0..200 {
        let mut logits = random_logits(&mut gen, 1000, 3.0);
        if case % 4 == 0 {
            // Ties: the first maximum wins, as in argmax.
            logits.iter_mut().for_each(|l| *l = l.round());
        }
        let want = argmax(&logits);
        let p = params(|p| {
            (p.top_k, p.temperature, p.seed) = (1, 1.5, 1 + case);
        });
        let mut s = SequenceSampler::new(&p, &[]);
        assert_eq!(s.sample(&mut logits.clone()).token, want, "case {case}");
    }
}

#[test]
fn top_k_samples_only_the_k_most_likely_in_proportion() {
    // Probabilities 1:2:3:4 (tokens 0..4); top-k 2 keeps tokens 3 and 2,
    // renormalized to 4/7 and 3/7.
    let logits = [0f32, 2f32.ln(), 3f32.ln(), 4f32.ln()];
    let p = params(|p| (p.top_k, p.top_p) = (2, 1.0));
    let mut s = SequenceSampler::new(&p, &[]);
    let n = 50_000;
    let mut counts = [0usize; 4];
    for _ in 0..n {
        counts[s.sample(&mut logits.to_vec()).token as usize] += 1;
    }
    assert_eq!(counts[0] + counts[1], 0, "{counts:?}");
    let share = counts[3] as f64 / n as f64;
    assert!((share - 4.0 / 7.0).abs() < 0.01, "{counts:?}");
}

#[test]
fn min_p_drops_tokens_below_its_share_of_the_top() {
    // Probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 cuts below 0.1.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let p = params(|p| (p.min_p, p.top_p) = (0.2, 1.0));
    let mut s = SequenceSampler::new(&p, &[]);
    let mut counts = [0usize; 4];
    for _ in 0..20_000 {
        counts[s.sample(&mut logits.clone()).token as usize] += 1;
    }
    assert_eq!(counts[3], 0, "{counts:?}");
    assert!(counts[2] > 0, "{counts:?}");
    // min_p 1 keeps only the most likely token.
    let p = params(|p| p.min_p = 1.0);
    assert_eq!(greedy_sequence(&p, &[], &logits, 50), vec![0; 50]);
}

#[test]
fn repetition_penalty_counts_prompt_and_output_both_signs() {
    let greedy = |r: f32, prompt: &[u32], logits: &[f32]| {
        let p = params(|p| (p.temperature, p.repetition_penalty) = (0.0, r));
        greedy_sequence(&p, prompt, logits, 1)[0]
    };
    // Positive logits are divided: 2.0 / 1.2 = 1.67 < 1.9.
    assert_eq!(greedy(1.0, &[0], &[2.0, 1.9]), 0);
    assert_eq!(greedy(1.2, &[0], &[2.0, 1.9]), 1);
    // Negative logits are multiplied: -1.0 * 1.2 = -1.2 < -1.1.
    assert_eq!(greedy(1.2, &[0], &[-1.0, -1.1]), 1);
    // Tokens neither in the prompt nor generated are untouched.
    assert_eq!(greedy(1.2, &[5], &[2.0, 1.9]), 0);
    // Generated tokens count too: the first pick is penalized next time,
    // once (both seen: 1.67 against 1.58).
    let p = params(|p| (p.temperature, p.repetition_penalty) = (0.0, 1.2));
    assert_eq!(greedy_sequence(&p, &[], &[2.0, 1.9], 3), vec![0, 1, 0]);
}

#[test]
fn frequency_penalty_grows_with_each_repeat() {
    // 1.0, 0.8, 0.5 less 0.3 per earlier pick of the same token.
    let p = params(|p| (p.temperature, p.frequency_penalty) = (0.0, 0.3));
    let logits = [1.0f32, 0.8, 0.5];
    assert_eq!(greedy_sequence(&p, &[], &logits, 5), vec![0, 1, 0, 1, 2]);
    // The prompt does not count.
    assert_eq!(greedy_sequence(&p, &[0, 0, 0], &logits, 1), vec![0]);
}

#[test]
fn presence_penalty_is_paid_once() {
    let p = params(|p| (p.temperature, p.presence_penalty) = (0.0, 0.3));
    let logits = [1.0f32, 0.8, 0.5];
    assert_eq!(greedy_sequence(&p, &[], &logits, 5), vec![0, 1, 0, 0, 0]);
    // Negative values encourage repeats.
    let p = params(|p| (p.temperature, p.presence_penalty) = (0.0, -0.5));
    assert_eq!(greedy_sequence(&p, &[], &[0.8, 1.0], 3), vec![1, 1, 1]);
}

/// Natural-log softmax, in f64, as the reference.
fn log_softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + l.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    l.iter().map(|&x| x as f64 - lse).collect()
}

fn sample_with_logprobs(p: &SamplingParams, logits: &[f32]) -> Sampled {
    SequenceSampler::new(p, &[]).sample(&mut logits.to_vec())
}

#[test]
fn logprobs_are_normalized_sorted_and_include_the_choice() {
    let mut gen = Rng::new(9);
    for case in 0..100 {
        let logits = random_logits(&mut gen, 20, 6.0);
        let p = params(|p| {
            p.top_logprobs = Some(20);
            p.seed = 1 + case;
            p.top_k = if case % 2 == 0 { 0 } else { 3 };
        });
        let s = sample_with_logprobs(&p, &logits);
        assert_eq!(s.top_logprobs.len(), 20);
        let total: f64 = s
            .top_logprobs
            .iter()
            .map(|&(_, lp)| (lp as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-5, "{total}");
        assert!(s.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        let want = log_softmax(&logits);
        for &(id, lp) in &s.top_logprobs {
            assert!((lp as f64 - want[id as usize]).abs() < 1e-5);
        }
        let chosen = s.top_logprobs.iter().find(|t| t.0 == s.token).unwrap();
        assert_eq!(s.logprob, Some(chosen.1));
    }
}

#[test]
fn logprobs_are_before_temperature_and_truncation_after_penalties() {
    let logits = [3.0f32, 2.0, 1.0, 0.0, -1.0];
    let base = params(|p| p.top_logprobs = Some(2));
    let plain = sample_with_logprobs(&base, &logits);
    assert_eq!(plain.top_logprobs.len(), 2);
    assert_eq!(plain.top_logprobs[0].0, 0);
    assert_eq!(plain.top_logprobs[1].0, 1);
    for f in [
        |p: &mut SamplingParams| p.temperature = 0.3,
        |p: &mut SamplingParams| p.top_k = 1,
        |p: &mut SamplingParams| p.min_p = 0.5,
        |p: &mut SamplingParams| p.top_p = 0.2,
    ] {
        let mut p = base.clone();
        f(&mut p);
        assert_eq!(
            sample_with_logprobs(&p, &logits).top_logprobs,
            plain.top_logprobs
        );
    }
    // A penalty changes what the logprobs report.
    let p = params(|p| (p.top_logprobs, p.repetition_penalty) = (Some(2), 3.0));
    let s = SequenceSampler::new(&p, &[0]).sample(&mut logits.to_vec());
    let want = log_softmax(&[1.0, 2.0, 1.0, 0.0, -1.0]);
    assert_eq!(s.top_logprobs[0].0, 1);
    assert!((s.top_logprobs[0].1 as f64 - want[1]).abs() < 1e-5);
    // Without the option there are none.
    let s = sample_with_logprobs(&params(|_| {}), &logits);
    assert_eq!((s.logprob, s.top_logprobs.len()), (None, 0));
}

#[test]
fn broken_logits_do_not_panic() {
    for logits in [
        vec![f32::NAN; 8],
        vec![f32::INFINITY; 8],
        vec![f32::NEG_INFINITY; 8],
        vec![0.0, f32::NAN, 1.0, f32::INFINITY],
        vec![],
    ] {
        let p = params(|p| {
            (p.top_k, p.min_p, p.repetition_penalty) = (3, 0.1, 1.1);
            p.top_logprobs = Some(3);
        });
        let token = SequenceSampler::new(&p, &[0, 9999])
            .sample(&mut logits.clone())
            .token;
        assert!((token as usize) < logits.len().max(1));
    }
}

#[test]
fn validate_names_the_field_and_what_was_found() {
    let cases: Vec<(SamplingParams, &str)> = vec![
        (params(|p| p.temperature = -1.0), "temperature"),
        (params(|p| p.temperature = f32::NAN), "temperature"),
        (params(|p| p.top_p = f32::NAN), "top_p"),
        (params(|p| p.min_p = 1.5), "min_p"),
        (params(|p| p.min_p = -0.1), "min_p"),
        (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
        (params(|p| p.frequency_penalty = 2.5), "frequency_penalty"),
        (
            params(|p| p.presence_penalty = f32::INFINITY),
            "presence_penalty",
        ),
        (params(|p| p.top_logprobs = Some(21)), "top_logprobs"),
    ];
    for (p, field) in cases {
        let err = p.validate().unwrap_err();
        assert!(err.starts_with(field), "{err}");
        assert!(err.contains("found"), "{err}");
    }
    let fine = params(|p| {
        (p.top_k, p.min_p, p.top_p) = (40, 0.05, 7.0);
        p.top_logprobs = Some(20);
    });
    assert_eq!(fine.validate(), Ok(()));
}

/// Pushes `pieces` one by one; returns everything emitted (finish
/// included) and after how many pieces a stop was hit.
fn run_stops(stops: &[&str], pieces: &[&str]) -> (String, Option<usize>) {
    let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
    let mut out = String::new();
    for (i, piece) in pieces.iter().enumerate() {
        let (text, hit) = m.push(piece);
        out.push_str(&text);
        if hit {
            return (out, Some(i + 1));
        }
    }
    out.push_str(&m.finish());
    (out, None)
}

#[test]
fn stop_strings_span_token_boundaries() {
    let (out, hit) = run_stops(&["world"], &["Hel", "lo wo", "r", "ld and more"]);
    assert_eq!((out.as_str(), hit), ("Hello ", Some(4)));
    // Within one piece, with text after it.
    let (out, hit) = run_stops(&["\n\n"], &["one\n\ntwo"]);
    assert_eq!((out.as_str(), hit), ("one", Some(1)));
}

#[test]
fn possible_starts_are_held_back_then_released() {
    let mut m = StopMatcher::new(vec!["world".into()]);
    assert_eq!(m.push("Hello wo"), ("Hello ".to_string(), false));
    assert_eq!(m.push("r"), (String::new(), false));
    assert_eq!(m.push("ds"), ("words".to_string(), false));
    assert_eq!(m.push(" w"), (" ".to_string(), false));
    // Generation ends without a stop: the held text comes out.
    assert_eq!(m.finish(), "w");
    assert_eq!(m.finish(), "");
}

#[test]
fn the_earliest_of_several_stops_wins() {
    let (out, hit) = run_stops(&["END", "b c"], &["xa", "b c END"]);
    assert_eq!((out.as_str(), hit), ("xa", Some(2)));
    let (out, _) = run_stops(&["at", "cat"], &["a cat"]);
    assert_eq!(out, "a ");
    // Nothing after a hit.
    let mut m = StopMatcher::new(vec!["x".into()]);
    assert_eq!(m.push("ax"), ("a".to_string(), true));
    assert_eq!(m.push("more"), (String::new(), true));
    assert_eq!(m.finish(), "");
}

#[test]
fn overlapping_prefixes_are_found() {
    // "ababc" one character at a time: the first "ab" cannot start
    // "abc" once the second "a" arrives, but the second one does.
    let (out, hit) = run_stops(&["abc"], &["a", "b", "a", "b", "c"]);
    assert_eq!((out.as_str(), hit), ("ab", Some(5)));
    let (out, hit) = run_stops(&["aab"], &["a", "a", "a", "b"]);
    assert_eq!((out.as_str(), hit), ("a", Some(4)));
}

#[test]
fn unicode_text_and_stops() {
    let (out, hit) = run_stops(&["🦙!"], &["Ü", "🦙", "?", "🦙", "!"]);
    assert_eq!((out.as_str(), hit), ("Ü🦙?", Some(5)));
    // A held multi-byte prefix comes back whole.
    let mut m = StopMatcher::new(vec!["ïcö".into()]);
    assert_eq!(m.push("Ünï"), ("Ün".to_string(), false));
    assert_eq!(m.push("c"), (String::new(), false));
    assert_eq!(m.push("x"), ("ïcx".to_string(), false));
    // No stops, or only empty ones: everything passes at once.
    let (out, hit) = run_stops(&[""], &["a", "b"]);
    assert_eq!((out.as_str(), hit), ("ab", None));
}
