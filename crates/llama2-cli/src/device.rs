//! Choosing the device and putting a model on it: `--device cpu|cuda|auto`
//! and `--dtype` turned into a `LanguageModel`. The only place that names
//! concrete backends.

use anyhow::{anyhow, bail, Result};
use llama2::cpu::kernels::Isa;
use llama2::{CpuBackend, DType, KvDtype, LanguageModel, ModelWeights, Transformer};

use crate::args::{Device, DeviceArgs};

/// Which device `args` resolves to, printing why when `auto` falls back.
/// `--exact` and `--isa` choose CPU kernels, so they mean the CPU.
pub fn resolve(args: &DeviceArgs) -> Result<Device> {
    if let Some(flag) = cpu_kernel_flag(args) {
        return match args.device {
            Device::Cuda => bail!(
                "{flag} chooses CPU kernels and cannot run on --device cuda; \
                 drop one of the two"
            ),
            _ => Ok(Device::Cpu),
        };
    }
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

/// The flag of `args` that picks CPU kernels, if any.
fn cpu_kernel_flag(args: &DeviceArgs) -> Option<&'static str> {
    if args.exact {
        Some("--exact")
    } else if args.isa.is_some() {
        Some("--isa")
    } else {
        None
    }
}

/// The CPU kernels `args` asks for: scalar for `--exact`, the `--isa`
/// level, else `LLAMA2_ISA`'s or the widest.
pub fn cpu_isa(args: &DeviceArgs) -> Result<Isa> {
    if args.exact {
        return Ok(Isa::scalar());
    }
    match args.isa {
        Some(level) => Isa::require(level).map_err(|e| anyhow!("--isa {}: {e}", level.name())),
        None => Isa::configured().map_err(|e| anyhow!(e)),
    }
}

/// A CPU backend as `args` asks for it, converting matrices to `dtype`.
pub fn cpu_backend(args: &DeviceArgs, dtype: Option<DType>) -> Result<CpuBackend> {
    let kv = args.kv_dtype.unwrap_or_default();
    if args.exact && kv != KvDtype::F32 {
        bail!(
            "--exact gives llama2.c's arithmetic, whose KV cache is f32; drop --kv-dtype {kv} \
             or --exact"
        );
    }
    let backend = CpuBackend::with_isa(args.threads, dtype, cpu_isa(args)?)?.with_kv_dtype(kv);
    Ok(if args.mmap {
        backend.with_weights_in_place()
    } else {
        backend
    })
}

/// Loads `weights` onto the device `args` asks for.
pub fn load_model(weights: &ModelWeights, args: &DeviceArgs) -> Result<Box<dyn LanguageModel>> {
    load_model_on(weights, args, resolve(args)?)
}

/// Loads `weights` onto `device`, already resolved from `args` (so a
/// command that needs the device first prints `resolve`'s note once).
pub fn load_model_on(
    weights: &ModelWeights,
    args: &DeviceArgs,
    device: Device,
) -> Result<Box<dyn LanguageModel>> {
    Ok(match device {
        Device::Cuda => llama2_cuda::load_model(weights, args.dtype, args.kv_dtype)?,
        _ => Box::new(Transformer::new(cpu_backend(args, args.dtype)?, weights)?),
    })
}
