//! `llama2 train`: training, starting with `--check-against DIR`, which runs
//! our forward, backward and AdamW steps on a PyTorch debug folder and
//! compares every number (crate `llama2-train` does the work; this file
//! parses, prints and sets the exit status).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use llama2_train::check::{check_against, DEFAULT_TOLERANCE};

/// `--tolerance`: a positive finite number.
fn parse_tolerance(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number, found {s:?}")),
    }
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A training debug folder from llama2.c's model.py (model.bin,
    /// state.json, tensors.bin): check our loss, logits, gradients and
    /// AdamW steps against it.
    #[arg(long, value_name = "DIR", required = true)]
    pub check_against: Option<PathBuf>,
    /// Largest relative difference accepted for the loss, logits,
    /// gradients and step losses.
    #[arg(long, default_value_t = DEFAULT_TOLERANCE, value_parser = parse_tolerance)]
    pub tolerance: f64,
}

/// `llama2 train`.
pub fn train(args: &TrainArgs) -> Result<()> {
    let Some(dir) = &args.check_against else {
        bail!("training runs are not built yet; give --check-against DIR");
    };
    let report = check_against(dir, args.tolerance)?;
    println!("{report}");
    if !report.passed() {
        bail!(
            "the check against {} failed: {} values over the tolerance {:e} (listed above)",
            dir.display(),
            report.failures().len(),
            args.tolerance
        );
    }
    Ok(())
}
