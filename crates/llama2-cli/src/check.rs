//! `llama2 check`: runs the same tokens through a device and through the
//! CPU reference and compares logits step by step: the largest difference
//! relative to the logits' scale, and whether the argmax agrees. This is how
//! GPU correctness is verified, by users and by our own GPU script; on the
//! CPU (`--device cpu`, `--isa`) it compares a SIMD level with the scalar
//! reference loops.

use anyhow::{bail, Result};
use llama2::cpu::kernels::Isa;
use llama2::sampler::argmax;
use llama2::synth::{self, shape_config, shape_names};
use llama2::{checkpoint, CpuBackend, DType, LanguageModel, ModelWeights, Transformer};

use crate::args::{CheckArgs, Device, DeviceArgs};
use crate::device;

/// Largest relative logit difference accepted for weights stored as `dtype`,
/// when both sides use that same storage (only summation order differs;
/// int8 also re-quantizes activations, which can flip a rounding).
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-3,
        DType::F16 | DType::BF16 => 1e-2,
        DType::Q8 => 5e-2,
    }
}

/// `max |a - b| / max |b|`.
fn relative_difference(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    diff / scale
}

fn load_weights(args: &CheckArgs) -> Result<ModelWeights> {
    match (&args.checkpoint, &args.shape) {
        (Some(path), _) => Ok(checkpoint::open(path, args.device.ctx_size)?),
        (None, Some(shape)) => {
            let config = shape_config(shape)?;
            Ok(synth::random_weights(&config, DType::F32, 1234))
        }
        (None, None) => bail!("give a checkpoint or --shape {}", shape_names()),
    }
}

/// `llama2 check`.
pub fn check(args: &CheckArgs) -> Result<()> {
    let weights = load_weights(args)?;
    let c = weights.config;
    let dtype = args.device.dtype.unwrap_or(weights.layers[0].wq.dtype());
    let tested_args = DeviceArgs {
        dtype: Some(dtype),
        ..args.device.clone()
    };
    let device = device::resolve(&tested_args)?;
    let on_cpu = device == Device::Cpu;
    let cpu_asked = args.device.device == Device::Cpu || args.device.isa.is_some();
    if on_cpu && !cpu_asked {
        bail!("no GPU to check: `check` compares a GPU with the CPU (or, with --device cpu or --isa, a CPU level with the scalar reference)");
    }
    let mut tested = device::load_model_on(&weights, &tested_args, device)?;
    // A GPU is compared with the CPU's fastest kernels; CPU kernels with the
    // scalar reference loops.
    let reference_isa = if on_cpu {
        Isa::scalar()
    } else {
        Isa::configured().map_err(anyhow::Error::msg)?
    };
    let mut reference: Box<dyn LanguageModel> = Box::new(Transformer::new(
        CpuBackend::with_isa(args.device.threads, Some(dtype), reference_isa)?,
        &weights,
    )?);
    // An f16 cache rounds every key and value as f16 weights round theirs.
    let limit = match tested_args.kv_dtype {
        Some(llama2::KvDtype::F16) => tolerance(dtype).max(tolerance(DType::F16)),
        _ => tolerance(dtype),
    };
    let v = c.vocab_size;
    println!(
        "checking {} ({dtype}) against {} with tolerance {limit:e}",
        tested.describe(),
        reference.describe()
    );

    let prompt_len = args.prompt_tokens;
    if prompt_len == 0 || prompt_len + args.steps > c.seq_len {
        bail!(
            "--prompt-tokens {prompt_len} and --steps {} need 1 to {} positions in all (the \
             model's context), with at least one prompt token",
            args.steps,
            c.seq_len
        );
    }
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 1) % v as u32)
        .collect();
    let got = tested.forward_all(&prompt, 0)?.to_vec();
    let want = reference.forward_all(&prompt, 0)?.to_vec();
    let mut worst = 0f64;
    let mut agree = 0;
    let mut steps = 0;
    let mut record = |label: String, a: &[f32], b: &[f32]| {
        let rel = relative_difference(a, b);
        let same = argmax(a) == argmax(b);
        worst = worst.max(rel);
        agree += same as usize;
        steps += 1;
        println!(
            "{label:>14}  rel diff {rel:.3e}  argmax {}",
            if same { "same" } else { "DIFFERENT" }
        );
    };
    for i in 0..prompt_len {
        record(
            format!("prefill {i}"),
            &got[i * v..(i + 1) * v],
            &want[i * v..(i + 1) * v],
        );
    }
    let mut token = argmax(&want[(prompt_len - 1) * v..]);
    for pos in prompt_len..prompt_len + args.steps {
        let a = tested.forward(&[token], pos)?.to_vec();
        let b = reference.forward(&[token], pos)?.to_vec();
        record(format!("decode {pos}"), &a, &b);
        token = argmax(&b);
    }
    println!("largest relative difference {worst:.3e}; argmax agrees on {agree}/{steps} steps");
    if worst > limit {
        bail!("logits differ by {worst:.3e}, more than the {limit:e} allowed for {dtype}");
    }
    println!("check passed");
    Ok(())
}
