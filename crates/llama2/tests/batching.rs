//! Many sequences in one step: `forward_batch` over interleaved prompts and
//! decode rows gives each sequence the logits it gets alone, for fp32 and
//! int8 models at every SIMD level, and refuses batches that would read
//! positions never written.

mod common;

use common::*;
use llama2::cpu::kernels::Isa;
use llama2::sampler::argmax;
use llama2::{Chunk, Config, CpuBackend, DType, KvDtype, LanguageModel, ModelWeights, Transformer};

/// Prompts of different lengths (token ids of tok512), so that prefill
/// chunks and decode rows of other sequences share steps; enough of them
/// that the later steps decode more rows than the CPU backend attends
/// head by head (4 per thread), so both task shapes are checked.
const PROMPTS: [&[u32]; 10] = [
    &[1, 403, 407, 261, 378],
    &[1, 300],
    &[
        1, 270, 280, 290, 300, 310, 320, 330, 340, 350, 360, 370, 380,
    ],
    &[1],
    &[1, 412],
    &[1, 263, 300, 401],
    &[1, 500, 17],
    &[1, 333, 334, 335, 336, 337, 338],
    &[1, 280],
    &[1, 290, 291],
];
/// Greedy tokens decoded after each prompt.
const DECODE: usize = 24;

/// Each sequence alone on the model's own cache: the logits after its prompt
/// and after each greedy token, `[DECODE + 1][V]`, and the tokens.
fn alone(model: &mut dyn LanguageModel, prompt: &[u32]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let mut logits = vec![model.forward(prompt, 0).unwrap().to_vec()];
    let mut tokens = Vec::new();
    for i in 0..DECODE {
        let next = argmax(logits.last().unwrap());
        tokens.push(next);
        logits.push(model.forward(&[next], prompt.len() + i).unwrap().to_vec());
    }
    (logits, tokens)
}

/// All sequences together: prompts fed in chunks of at most `chunk` tokens,
/// a newly started sequence each step while older ones decode.
fn together(model: &mut dyn LanguageModel, chunk: usize) -> Vec<(Vec<Vec<f32>>, Vec<u32>)> {
    struct Seq {
        id: llama2::SequenceId,
        fed: usize,
        tokens: Vec<u32>,
        logits: Vec<Vec<f32>>,
    }
    let mut seqs: Vec<Seq> = Vec::new();
    let v = model.config().vocab_size;
    loop {
        if seqs.len() < PROMPTS.len() {
            let id = model.new_sequence().unwrap();
            seqs.push(Seq {
                id,
                fed: 0,
                tokens: Vec::new(),
                logits: Vec::new(),
            });
        }
        // Each unfinished sequence's next input: a prompt chunk or its last token.
        let inputs: Vec<(usize, Vec<u32>, usize)> = seqs
            .iter()
            .enumerate()
            .filter(|(_, s)| s.logits.len() <= DECODE)
            .map(|(i, s)| {
                let p = PROMPTS[i];
                if s.fed < p.len() {
                    let end = p.len().min(s.fed + chunk);
                    (i, p[s.fed..end].to_vec(), s.fed)
                } else {
                    (
                        i,
                        vec![*s.tokens.last().unwrap()],
                        p.len() + s.tokens.len() - 1,
                    )
                }
            })
            .collect();
        if inputs.is_empty() {
            break;
        }
        let chunks: Vec<Chunk> = inputs
            .iter()
            .map(|(i, t, pos0)| Chunk {
                sequence: seqs[*i].id,
                tokens: t,
                pos0: *pos0,
            })
            .collect();
        let logits = model.forward_batch(&chunks).unwrap().to_vec();
        for ((i, t, _), row) in inputs.iter().zip(logits.chunks(v)) {
            let s = &mut seqs[*i];
            s.fed += t.len();
            if s.fed >= PROMPTS[*i].len() {
                s.logits.push(row.to_vec());
                if s.tokens.len() < DECODE {
                    s.tokens.push(argmax(row));
                }
            }
        }
    }
    for s in &seqs {
        model.free_sequence(s.id);
    }
    seqs.into_iter().map(|s| (s.logits, s.tokens)).collect()
}

fn assert_same_as_alone(weights: &ModelWeights, isa: Isa, chunk: usize) {
    assert_same_as_alone_with(weights, (isa, KvDtype::F32), chunk, 1e-4)
}

/// `assert_same_as_alone` with caches of `kv`, within `limit` relative.
fn assert_same_as_alone_with(
    weights: &ModelWeights,
    (isa, kv): (Isa, KvDtype),
    chunk: usize,
    limit: f32,
) {
    let backend = CpuBackend::with_isa(2, None, isa)
        .unwrap()
        .with_kv_dtype(kv);
    let mut model = Transformer::new(backend, weights).unwrap();
    let mut want = Vec::new();
    for p in PROMPTS {
        want.push(alone(&mut model, p));
    }
    let got = together(&mut model, chunk);
    for (s, ((want_l, want_t), (got_l, got_t))) in want.iter().zip(&got).enumerate() {
        assert_eq!(
            want_t, got_t,
            "{isa:?} chunk {chunk}: tokens of sequence {s}"
        );
        assert_eq!(want_l.len(), got_l.len());
        for (step, (w, g)) in want_l.iter().zip(got_l).enumerate() {
            let worst = w
                .iter()
                .zip(g)
                .map(|(a, b)| (a - b).abs() / a.abs().max(1.0))
                .fold(0f32, f32::max);
            assert!(
                worst < limit,
                "{isa:?} chunk {chunk}: sequence {s} step {step} differs by {worst}"
            );
        }
    }
}

#[test]
fn batched_sequences_match_each_alone_fp32() {
    let w = load("stories260K.bin");
    for isa in Isa::all() {
        for chunk in [1, 4, 64] {
            assert_same_as_alone(&w, isa, chunk);
        }
    }
}

#[test]
fn batched_sequences_match_each_alone_q8() {
    let w = load("stories260K_q8_gs4.bin");
    for isa in Isa::all() {
        assert_same_as_alone(&w, isa, 3);
    }
}

/// An f16 cache batches as exactly as an f32 one: block and dot attention
/// over its rows, decoded rows by head and by whole row.
#[test]
fn batched_sequences_match_each_alone_f16_cache() {
    // f32 products of a batch and of one row may differ in the last bit,
    // which the cache can round to values one f16 step apart; int8
    // products are exact, so an int8 model's rows are not.
    for (file, limit) in [("stories260K.bin", 1e-2), ("stories260K_q8_gs4.bin", 1e-4)] {
        let w = load(file);
        for isa in Isa::all() {
            for chunk in [1, 64] {
                assert_same_as_alone_with(&w, (isa, KvDtype::F16), chunk, limit);
            }
        }
    }
}

/// Grouped KV heads, decoded rows attended whole or in shares at every
/// level: heads of 16 sharing KV heads in pairs, and heads of 8 sharing
/// them by eights, more query heads than one pass scores together (4), so
/// a group's queries go in two passes over its keys. Int8 products are
/// exact and attention rounds as one sequence's does, so the logits must
/// be the same bits alone or batched, for either cache.
#[test]
fn whole_rows_of_grouped_heads_batch_exactly() {
    let shapes = [
        Config::llama2c(64, 96, 2, 4, 2, 512, 64, true),
        Config::llama2c(128, 96, 2, 16, 2, 512, 64, true),
    ];
    for c in shapes {
        let w = llama2::synth::random_weights(&c, DType::Q8, 7);
        for isa in Isa::all() {
            for kv in [KvDtype::F32, KvDtype::F16] {
                assert_same_as_alone_with(&w, (isa, kv), 2, f32::MIN_POSITIVE);
            }
        }
    }
}

/// An f16 cache's logits stay within f16 rounding of the f32 cache's over a
/// prompt and 100 greedy tokens, and pick the same tokens.
#[test]
fn f16_cache_stays_close_to_f32() {
    let w = load("stories260K.bin");
    let model = |kv| Transformer::new(CpuBackend::new(2).unwrap().with_kv_dtype(kv), &w).unwrap();
    let (mut a, mut b) = (model(KvDtype::F32), model(KvDtype::F16));
    assert!(b.describe().contains("f16 KV cache"), "{}", b.describe());
    let prompt = PROMPTS[2];
    let (mut la, mut lb) = (
        a.forward(prompt, 0).unwrap().to_vec(),
        b.forward(prompt, 0).unwrap().to_vec(),
    );
    for pos in prompt.len()..prompt.len() + 100 {
        let scale = la.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = la
            .iter()
            .zip(&lb)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(worst <= 1e-2 * scale, "position {pos}: {worst} of {scale}");
        let next = argmax(&la);
        assert_eq!(next, argmax(&lb), "greedy token at position {pos}");
        la = a.forward(&[next], pos).unwrap().to_vec();
        lb = b.forward(&[next], pos).unwrap().to_vec();
    }
}

#[test]
fn freed_sequences_are_reused_and_refused() {
    let w = load("stories260K.bin");
    let mut model = cpu_model(&w);
    let a = model.new_sequence().unwrap();
    let chunk = |sequence, tokens: &'static [u32], pos0| Chunk {
        sequence,
        tokens,
        pos0,
    };
    model.forward_batch(&[chunk(a, &[1, 300], 0)]).unwrap();
    // Position 5 was never written: refused, not read as zeros.
    let err = model.forward_batch(&[chunk(a, &[300], 5)]).unwrap_err();
    assert!(err.to_string().contains("holds 2 positions"), "{err}");
    let err = model
        .forward_batch(&[chunk(a, &[300], 2), chunk(a, &[301], 3)])
        .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
    model.free_sequence(a);
    let err = model.forward_batch(&[chunk(a, &[1], 0)]).unwrap_err();
    assert!(err.to_string().contains("not a live sequence"), "{err}");
    let b = model.new_sequence().unwrap();
    assert_eq!(a, b, "the freed slot is reused");
    let long: Vec<u32> = vec![300; model.max_batch() + 1];
    let long: &'static [u32] = long.leak();
    let err = model.forward_batch(&[chunk(b, long, 0)]).unwrap_err();
    assert!(err.to_string().contains("tokens in all"), "{err}");
    let past = model.config().seq_len;
    let err = model.forward_batch(&[chunk(b, &[1], past)]).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
}
