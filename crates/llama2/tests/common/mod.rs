//! Shared helpers for the integration tests: the real model files in
//! `shared/models`, temporary directories, and greedy generation through the
//! library.
#![allow(dead_code)]

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use llama2::checkpoint::{self, FileFormat};
use llama2::generate;
use llama2::sampler::Sampler;
use llama2::{CpuBackend, ModelWeights, Tokenizer, Transformer};

/// What llama2.c's `run stories260K.bin -z tok512.bin -t 0.0 -n 200` prints
/// (without the final newline), from shared/models/README.md.
pub const GOLDEN_FP32: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.
Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find it.\"
Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"
Lily didn't want to help her mom, so she";

/// What llama2.c's `runq stories260K_q8_gs4.bin -z tok512.bin -t 0.0 -n 200`
/// prints (without the final newline).
pub const GOLDEN_Q8: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.
Lily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find it.\"
Lily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"
Lily didn't want to help, but she did";

/// The first sentence of `-t 1.0 -p 0.9 -s 133742`.
pub const GOLDEN_TIMMY: &str = "Once upon a time, there was a little boy named Timmy. Timmy loved to play with his toys and eat sandwiches.";

/// A file in shared/models (never copied into the repository).
pub fn model_path(name: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/models"
    ))
    .join(name)
}

pub fn load(name: &str) -> ModelWeights {
    checkpoint::load(&model_path(name)).unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn tok512() -> Tokenizer {
    Tokenizer::load(&model_path("tok512.bin"), 512).expect("tok512.bin")
}

pub fn llama_tokenizer() -> Tokenizer {
    Tokenizer::load(&model_path("tokenizer.bin"), 32000).expect("tokenizer.bin")
}

/// A CPU model of `weights` (one thread: tests run in parallel anyway).
pub fn cpu_model(weights: &ModelWeights) -> Transformer<CpuBackend> {
    Transformer::new(CpuBackend::new(1).expect("cpu backend"), weights).expect("model")
}

/// What `llama2 <model> -t <temperature> -p <topp> -s <seed> -n <steps> -i <prompt>` prints on stdout.
pub fn generate_text(
    weights: &ModelWeights,
    tok: &Tokenizer,
    prompt: &str,
    steps: usize,
    temperature: f32,
    topp: f32,
    seed: u64,
) -> String {
    let mut model = cpu_model(weights);
    let mut sampler = Sampler::new(temperature, topp, seed);
    let mut out = Vec::new();
    generate::generate(
        &mut model,
        tok,
        &mut sampler,
        prompt,
        steps,
        (&mut out, Default::default()),
    )
    .expect("generate");
    String::from_utf8(out).expect("generated text is UTF-8")
}

/// Greedy text, as `-t 0 -n <steps>` prints it.
pub fn greedy_text(weights: &ModelWeights, prompt: &str, steps: usize) -> String {
    generate_text(weights, &tok512(), prompt, steps, 0.0, 0.9, 1)
}

/// A directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "llama2-rs-test-{}-{tag}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `weights` to `path` in `format`.
pub fn write_model(weights: &ModelWeights, format: FileFormat, path: &Path) {
    let mut out = BufWriter::new(File::create(path).expect("create checkpoint"));
    checkpoint::write(weights, format, &mut out).expect("write checkpoint");
}

/// A zip archive of `entries`, stored uncompressed (as torch.save writes).
pub fn write_stored_zip(path: &Path, entries: &[(&str, &[u8])]) {
    let crc = |data: &[u8]| {
        let mut c = !0u32;
        for &b in data {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    };
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let header = |sig: u32, central: bool| {
            let mut h = sig.to_le_bytes().to_vec();
            if central {
                h.extend(20u16.to_le_bytes());
            }
            h.extend(20u16.to_le_bytes()); // version needed
            h.extend(0u16.to_le_bytes()); // flags
            h.extend(0u16.to_le_bytes()); // stored
            h.extend(0u32.to_le_bytes()); // time, date
            h.extend(crc(data).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // extra
            if central {
                h.extend([0u8; 6]); // comment length, disk, internal attributes
                h.extend(0u32.to_le_bytes()); // external attributes
                h.extend(offset.to_le_bytes());
            }
            h.extend(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend_from_slice(data);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_offset = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    std::fs::write(path, out).unwrap();
}

/// A `torch.save` file of a state dict of f32 tensors `(name, shape,
/// values)`, written as torch does (a protocol 2 pickle of an OrderedDict
/// of `_rebuild_tensor_v2` calls over persistent storages), for tests of
/// the pickle reader on files no fixture has.
pub fn write_torch_state_dict(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend((s.len() as u32).to_le_bytes());
        p.extend(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) {
        p.push(b'J');
        p.extend((v as i32).to_le_bytes());
    }
    fn ints(p: &mut Vec<u8>, vs: &[usize]) {
        p.push(b'(');
        vs.iter().for_each(|&v| int(p, v));
        p.push(b't');
    }
    let mut p = b"\x80\x02ccollections\nOrderedDict\n)R".to_vec();
    let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
    for (key, (name, shape, values)) in tensors.iter().enumerate() {
        let key = key.to_string();
        unicode(&mut p, name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.push(b'(');
        unicode(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut p, &key);
        unicode(&mut p, "cpu");
        int(&mut p, values.len());
        p.extend(b"tQ");
        int(&mut p, 0);
        ints(&mut p, shape);
        let mut stride = vec![1; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        ints(&mut p, &stride);
        p.extend(b"\x89ccollections\nOrderedDict\n)RtRs");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        entries.push((format!("archive/data/{key}"), bytes));
    }
    p.push(b'.');
    let mut all: Vec<(&str, &[u8])> = vec![("archive/data.pkl", &p), ("archive/version", b"3\n")];
    all.extend(entries.iter().map(|(n, d)| (n.as_str(), d.as_slice())));
    write_stored_zip(path, &all);
}
