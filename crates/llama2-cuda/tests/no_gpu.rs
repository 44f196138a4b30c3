//! On a machine without a usable GPU, every entry point reports why as an
//! error and nothing panics. Skipped where a GPU is present.

use llama2::{synth, DType};

#[test]
fn without_a_gpu_entry_points_return_errors() {
    let Some(reason) = llama2_cuda::unavailable_reason() else {
        eprintln!("note: a CUDA GPU is present; nothing to check");
        return;
    };
    assert!(!reason.is_empty());
    let config = synth::shape_config("stories260K").expect("known shape");
    let weights = synth::random_weights(&config, DType::F32, 1);
    assert!(llama2_cuda::load_model(&weights, None, None).is_err());
    assert!(llama2_cuda::synthetic_model(&config, DType::F16, None, 1).is_err());
    assert!(llama2_cuda::device_info().is_err());
    assert!(llama2_cuda::copy_bandwidth_gbs().is_err());
}
