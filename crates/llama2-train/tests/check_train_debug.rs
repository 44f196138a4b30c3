//! The check against PyTorch on the shared `train-debug` folder: our loss,
//! logits, gradients and AdamW steps within f32 tolerance of model.py's.

use std::path::PathBuf;

use llama2_train::check::{check_against, DEFAULT_TOLERANCE};

fn train_debug() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models/train-debug")
}

#[test]
fn matches_pytorch_on_train_debug() {
    let report = check_against(&train_debug(), DEFAULT_TOLERANCE).expect("load train-debug");
    println!("{report}");
    assert!(report.passed(), "{report}");
    assert_eq!(report.grads.len(), 1 + 9 * 2 + 1);
    assert_eq!(report.steps.len(), 10);
}
