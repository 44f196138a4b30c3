//! Corrupted headers never panic the loader: every header byte of the fp32
//! and int8 files, changed in several ways, gives either an error or a model
//! that runs.

mod common;

use common::*;
use llama2::checkpoint;
use llama2::sampler::Sampler;
use llama2::{CpuBackend, LanguageModel, Transformer};

fn corrupt_each_header_byte(model: &str, header_bytes: usize) {
    let original = std::fs::read(model_path(model)).unwrap();
    let dir = TempDir::new("corrupt");
    let path = dir.path("c.bin");
    let tok = tok512();
    let (mut errors, mut loaded) = (0, 0);
    for at in 0..header_bytes {
        let b = original[at];
        for v in [0x00, 0xFF, b ^ 0x01, b ^ 0x80] {
            if v == b {
                continue;
            }
            let mut bytes = original.clone();
            bytes[at] = v;
            std::fs::write(&path, &bytes).unwrap();
            match checkpoint::load(&path) {
                Err(e) => {
                    assert!(e.to_string().contains("c.bin"), "{e}");
                    errors += 1;
                }
                Ok(w) => {
                    loaded += 1;
                    if w.config.vocab_size == 512 {
                        let mut sampler = Sampler::new(1.0, 0.9, 5);
                        let mut out = Vec::new();
                        let mut m = cpu_model(&w);
                        llama2::generate::generate(
                            &mut m,
                            &tok,
                            &mut sampler,
                            "Hi",
                            4,
                            (&mut out, Default::default()),
                        )
                        .unwrap();
                    }
                }
            }
        }
    }
    assert!(errors > 0 && errors + loaded > 0);
}

#[test]
fn corrupted_version0_headers() {
    corrupt_each_header_byte("stories260K.bin", 28);
}

#[test]
fn corrupted_version2_headers() {
    // Bytes 41..256 are padding: corrupting them is harmless.
    corrupt_each_header_byte("stories260K_q8_gs4.bin", 48);
}

#[test]
fn non_finite_values_are_errors_not_text() {
    let tok = tok512();
    // A NaN norm gain is refused when the model is built.
    let mut w = load("stories260K.bin");
    w.rms_final = llama2::tensor::Storage::owned(vec![f32::NAN; w.config.dim]);
    let err = Transformer::new(CpuBackend::new(1).unwrap(), &w)
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("weight rms_final holds NaN"),
        "{err}"
    );
    // A NaN inside a matrix surfaces in the logits, with the position.
    let mut w = load("stories260K.bin");
    let mut emb = w.token_embedding.to_f32();
    let dim = w.config.dim;
    let once = tok.encode("Once", true, false)[1] as usize;
    emb[once * dim + 3] = f32::NAN;
    w.token_embedding = llama2::HostMatrix::from_f32(w.config.vocab_size, dim, emb);
    for (t, p) in [(0.0, 0.9), (1.0, 0.9), (1.0, 1.0)] {
        let mut model = cpu_model(&w);
        let mut sampler = Sampler::new(t, p, 9);
        let mut out = Vec::new();
        let err = llama2::generate::generate(
            &mut model,
            &tok,
            &mut sampler,
            "Once",
            20,
            (&mut out, Default::default()),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("non-finite logits at position 1"),
            "{err}"
        );
    }
    // Batched sequences too (the CPU hands their logits out in place):
    // the NaN is in the shared classifier's row of "Once" as well, so every
    // sequence's logits hold it, and the first (at position 0) is named.
    let mut model = cpu_model(&w);
    let (a, b) = (model.new_sequence().unwrap(), model.new_sequence().unwrap());
    let (bos, other) = ([1u32], [1u32, 300, once as u32]);
    let chunks = [
        llama2::Chunk {
            sequence: a,
            tokens: &bos,
            pos0: 0,
        },
        llama2::Chunk {
            sequence: b,
            tokens: &other,
            pos0: 0,
        },
    ];
    let err = model.forward_batch(&chunks).unwrap_err();
    assert!(
        err.to_string().contains("non-finite logits at position 0"),
        "{err}"
    );
}

#[test]
fn kv_caches_beyond_physical_memory_are_refused() {
    let Some(total) = llama2::files::physical_memory() else {
        return;
    };
    // A tiny model with the longest context accepted and enough layers that
    // its f32 KV cache (keys and values, 8 values per position) exceeds this
    // machine's memory.
    let per_layer = 2 * 4 * (1u64 << 20) * 8;
    if total / per_layer >= 4096 {
        return; // more memory than the most layers a config may have can fill
    }
    let layers = (total / per_layer + 1) as usize;
    let config = llama2::Config::llama2c(16, 16, layers, 2, 1, 8, 1 << 20, true);
    let weights = llama2::synth::random_weights(&config, llama2::DType::F32, 1);
    let err = Transformer::new(CpuBackend::new(1).unwrap(), &weights)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(msg.contains("not enough memory: the KV cache"), "{msg}");
    assert!(msg.contains("context length"), "{msg}");
}

#[test]
fn thread_counts_are_bounded() {
    let err = CpuBackend::new(1 << 32).err().unwrap();
    assert!(err.to_string().contains("at most 1024"), "{err}");
}
