//! The check against PyTorch: our forward and backward on a debug folder's
//! batch, compared with model.py's loss, logits and every gradient, then
//! train.py's AdamW steps (with clipping) compared loss by loss.

use std::fmt;
use std::path::Path;

use crate::debug_state::{self, DebugState};
use crate::error::Result;
use crate::model::{backward, forward};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};

/// The default tolerance: f32 on both sides, only summation order differs.
pub const DEFAULT_TOLERANCE: f64 = 1e-4;

/// How one tensor of ours compares with PyTorch's.
#[derive(Clone, Debug)]
pub struct Comparison {
    pub name: String,
    /// `max |ours - ref| / max |ref|`: what is checked.
    pub relative: f64,
    /// The element with the largest `|ours - ref| / |ref|` (see
    /// `element_relative`), for diagnosis.
    pub worst_index: usize,
    pub worst_ours: f32,
    pub worst_ref: f32,
    /// Its `|ours - ref| / max(|ref|, 1e-3 max |ref|)`: the floor keeps
    /// elements that are nearly zero in PyTorch from dominating.
    pub element_relative: f64,
}

impl Comparison {
    /// Compares `ours` with `reference` (same length).
    pub fn new(name: &str, ours: &[f32], reference: &[f32]) -> Comparison {
        let scale = reference.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
        let max_diff = ours
            .iter()
            .zip(reference)
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        let floor = (scale * 1e-3).max(f64::MIN_POSITIVE);
        let (element_relative, worst_index) = ours
            .iter()
            .zip(reference)
            .map(|(&a, &b)| (a as f64 - b as f64).abs() / (b.abs() as f64).max(floor))
            .enumerate()
            .fold((0f64, 0), |m, (i, r)| if r > m.0 { (r, i) } else { m });
        Comparison {
            name: name.to_owned(),
            relative: relative(max_diff, scale),
            worst_index,
            worst_ours: ours.get(worst_index).copied().unwrap_or(0.0),
            worst_ref: reference.get(worst_index).copied().unwrap_or(0.0),
            element_relative,
        }
    }
}

/// `diff / scale`, with an exact match of zeros counting as 0 and any
/// difference from an all-zero reference as infinite.
fn relative(diff: f64, scale: f64) -> f64 {
    if diff == 0.0 {
        0.0
    } else if scale == 0.0 {
        f64::INFINITY
    } else {
        diff / scale
    }
}

/// One AdamW step's loss, ours and PyTorch's.
#[derive(Clone, Copy, Debug)]
pub struct StepLoss {
    pub ours: f32,
    pub reference: f32,
    /// The gradient norm before clipping, ours.
    pub grad_norm: f32,
}

impl StepLoss {
    pub fn relative(&self) -> f64 {
        relative(
            (self.ours as f64 - self.reference as f64).abs(),
            self.reference.abs() as f64,
        )
    }
}

/// Everything the check measured.
#[derive(Clone, Debug)]
pub struct CheckReport {
    pub loss_ours: f32,
    pub loss_ref: f32,
    pub logits: Comparison,
    /// One per parameter, model.py's names prefixed `grad.`.
    pub grads: Vec<Comparison>,
    pub steps: Vec<StepLoss>,
    pub tolerance: f64,
}

impl CheckReport {
    pub fn loss_relative(&self) -> f64 {
        relative(
            (self.loss_ours as f64 - self.loss_ref as f64).abs(),
            self.loss_ref.abs() as f64,
        )
    }

    /// What exceeded the tolerance, one line each; empty when all passed.
    /// NaN counts as a failure.
    pub fn failures(&self) -> Vec<String> {
        let within = |r: f64| r <= self.tolerance;
        let mut out = Vec::new();
        if !within(self.loss_relative()) {
            out.push(format!(
                "loss: relative difference {:.3e}",
                self.loss_relative()
            ));
        }
        for c in std::iter::once(&self.logits).chain(&self.grads) {
            if !within(c.relative) {
                out.push(format!(
                    "{}: relative difference {:.3e}",
                    c.name, c.relative
                ));
            }
        }
        for (i, s) in self.steps.iter().enumerate() {
            if !within(s.relative()) {
                out.push(format!(
                    "AdamW step {i}: loss relative difference {:.3e}",
                    s.relative()
                ));
            }
        }
        out
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "loss: ours {:.7} reference {:.7} (relative {:.2e})",
            self.loss_ours,
            self.loss_ref,
            self.loss_relative()
        )?;
        writeln!(
            f,
            "{:<40} {:>10}  worst element (|diff| / |ref|): index ours ref",
            "tensor", "max rel"
        )?;
        for c in std::iter::once(&self.logits).chain(&self.grads) {
            writeln!(
                f,
                "{:<40} {:>10.2e}  {:.2e}: [{}] {:.6e} {:.6e}",
                c.name, c.relative, c.element_relative, c.worst_index, c.worst_ours, c.worst_ref
            )?;
        }
        writeln!(
            f,
            "AdamW steps (loss before each step, grad norm before clipping):"
        )?;
        for (i, s) in self.steps.iter().enumerate() {
            writeln!(
                f,
                "  step {i:>2}: ours {:.7} reference {:.7} (relative {:.2e}), grad norm {:.5}",
                s.ours,
                s.reference,
                s.relative(),
                s.grad_norm
            )?;
        }
        let failures = self.failures();
        if failures.is_empty() {
            write!(f, "all within {:.0e}", self.tolerance)
        } else {
            write!(
                f,
                "{} over the tolerance {:.0e}: {}",
                failures.len(),
                self.tolerance,
                failures.join("; ")
            )
        }
    }
}

/// Loads the debug folder `dir` and checks against it.
pub fn check_against(dir: &Path, tolerance: f64) -> Result<CheckReport> {
    let state = debug_state::load(dir)?;
    Ok(check_state(&state, tolerance))
}

/// Runs the check on a loaded debug state.
pub fn check_state(state: &DebugState, tolerance: f64) -> CheckReport {
    let (p, batch) = (&state.params, &state.batch);
    let acts = forward(p, batch);
    let (loss_ours, logits) = (
        acts.loss,
        Comparison::new("logits", &acts.logits, &state.logits),
    );
    let grads = backward(p, batch, acts);
    let grads = p
        .infos()
        .iter()
        .zip(grads.tensors())
        .zip(&state.grads)
        .map(|((info, ours), reference)| {
            Comparison::new(&format!("grad.{}", info.name), ours, reference)
        })
        .collect();
    CheckReport {
        loss_ours,
        loss_ref: state.loss,
        logits,
        grads,
        steps: adamw_steps(state),
        tolerance,
    }
}

/// train.py's loop on one batch: forward, backward, clip, AdamW, for each
/// recorded step, with each step's loss (before its update).
fn adamw_steps(state: &DebugState) -> Vec<StepLoss> {
    let h = state.hyper;
    let mut params = state.params.clone();
    let config = AdamWConfig {
        lr: h.learning_rate,
        beta1: h.beta1,
        beta2: h.beta2,
        eps: h.eps,
        weight_decay: h.weight_decay,
    };
    let mut opt = AdamW::new(config, &params);
    state
        .adamw_losses
        .iter()
        .map(|&reference| {
            let acts = forward(&params, &state.batch);
            let loss = acts.loss;
            let mut grads = backward(&params, &state.batch, acts);
            let grad_norm = if h.grad_clip > 0.0 {
                clip_grad_norm(&mut grads, h.grad_clip)
            } else {
                f32::NAN
            };
            opt.step(&mut params, &grads);
            StepLoss {
                ours: loss,
                reference,
                grad_norm,
            }
        })
        .collect()
}
