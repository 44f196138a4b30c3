//! Checkpoint files (versions 0, 1 and 2): header, size check and body
//! layout. Any input either is refused with an error or loads as weights
//! whose shapes match the config; small models that load are also run for
//! two tokens, in f32 and converted to int8, which must give logits or an
//! error (non-finite values are errors), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llama2::{checkpoint, CpuBackend, DType, LanguageModel, Transformer};

/// Models at most this many parameters and cached values are run.
const RUN_LIMIT: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let Ok(weights) = checkpoint::from_bytes(data) else {
        return;
    };
    weights
        .check_shapes()
        .expect("a loaded checkpoint has the shapes its header gives");
    let c = weights.config;
    let cache = (c.n_layers * c.seq_len * c.kv_dim()) as u64;
    if c.parameter_count() > RUN_LIMIT || cache > RUN_LIMIT {
        return;
    }
    for dtype in [None, Some(DType::Q8)] {
        let backend = CpuBackend::with_dtype(1, dtype).expect("one thread");
        let Ok(mut model) = Transformer::new(backend, &weights) else {
            continue;
        };
        let tokens = [1, 2 % c.vocab_size as u32];
        let n = tokens.len().min(c.seq_len);
        if let Ok(logits) = model.forward(&tokens[..n], 0) {
            assert_eq!(logits.len(), c.vocab_size);
            assert!(logits.iter().all(|l| l.is_finite()));
        }
    }
});
