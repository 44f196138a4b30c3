//! Corrupted headers never panic the loader: every header byte of the fp32
//! and int8 files, changed in several ways, gives either an error or a model
//! that runs.

mod common;

use common::*;
use llama2::checkpoint;
use llama2::sampler::Sampler;

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
                        llama2::generate::generate(&mut m, &tok, &mut sampler, "Hi", 4, &mut out)
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
fn nan_weights_generate_without_panicking() {
    let mut w = load("stories260K.bin");
    w.rms_final = llama2::tensor::Storage::owned(vec![f32::NAN; w.config.dim]);
    let tok = tok512();
    for (t, p) in [(0.0, 0.9), (1.0, 0.9), (1.0, 1.0)] {
        let text = generate_text(&w, &tok, "Once", 20, t, p, 9);
        assert!(text.starts_with("Once"), "{text:?}");
    }
}
