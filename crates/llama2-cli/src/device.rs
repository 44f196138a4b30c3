//! Choosing the device and putting a model on it: `--device cpu|cuda|auto`
//! and `--dtype` turned into a `LanguageModel`. The only place that names
//! concrete backends.

use anyhow::{bail, Result};
use llama2::{CpuBackend, LanguageModel, ModelWeights, Transformer};

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

/// Loads `weights` onto the device `args` asks for.
pub fn load_model(weights: &ModelWeights, args: &DeviceArgs) -> Result<Box<dyn LanguageModel>> {
    Ok(match resolve(args)? {
        Device::Cuda => llama2_cuda::load_model(weights, args.dtype)?,
        _ => Box::new(Transformer::new(
            CpuBackend::with_dtype(args.threads, args.dtype)?,
            weights,
        )?),
    })
}
