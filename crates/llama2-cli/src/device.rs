//! Choosing the device and putting a model on it: `--device cpu|cuda|auto`
//! and `--dtype` turned into a `LanguageModel`. The only place that names
//! concrete backends.

use anyhow::{bail, Result};
use llama2::{CpuBackend, DType, LanguageModel, ModelWeights, Transformer};

use crate::args::{Device, DeviceArgs};

/// Which device `args` resolves to, printing why when `auto` falls back.
pub fn resolve(args: &DeviceArgs) -> Result<Device> {
    match args.device {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda => match llama2_cuda::unavailable_reason() {
            None => Ok(Device::Cuda),
            Some(why) => bail!("--device cuda: {why}; use --device cpu"),
        },
        Device::Auto => match llama2_cuda::unavailable_reason() {
            None => Ok(Device::Cuda),
            Some(why) => {
                eprintln!("note: running on the CPU: {why}");
                Ok(Device::Cpu)
            }
        },
    }
}

/// Converts the weights' matrices to `dtype` for the CPU, which computes
/// with whatever storage the matrices have.
fn convert_for_cpu(weights: &ModelWeights, dtype: DType) -> ModelWeights {
    let gs = llama2::quant::default_group_size(weights.config.dim, weights.config.hidden_dim);
    let mut w = weights.clone();
    let convert = |m: &mut llama2::HostMatrix| *m = m.convert(dtype, gs);
    for l in &mut w.layers {
        for m in [
            &mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w1, &mut l.w2, &mut l.w3,
        ] {
            convert(m);
        }
    }
    convert(&mut w.token_embedding);
    if let Some(c) = &mut w.classifier {
        convert(c);
    }
    w
}

/// Loads `weights` onto the device `args` asks for.
pub fn load_model(weights: &ModelWeights, args: &DeviceArgs) -> Result<Box<dyn LanguageModel>> {
    Ok(match resolve(args)? {
        Device::Cuda => llama2_cuda::load_model(weights, args.dtype)?,
        _ => {
            let backend = CpuBackend::new(args.threads)?;
            match args.dtype {
                Some(dt) if dt != weights.token_embedding.dtype() => {
                    Box::new(Transformer::new(backend, &convert_for_cpu(weights, dt))?)
                }
                _ => Box::new(Transformer::new(backend, weights)?),
            }
        }
    })
}
