//! The ops of Llama training, each as a forward and a hand-written backward
//! side by side, on row-major f32 buffers. Rows are tokens: `N = B * T`
//! rows of a batch `[B][T]`, the batch's first sequence first.
//!
//! Conventions: a backward returns the gradient of its input as a new
//! buffer, and *adds* parameter gradients into the buffers it is given, so
//! a parameter used twice (the tied embedding) gets the sum of both uses.

pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod gemm;
pub mod matmul;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;

use std::sync::OnceLock;

use llama2::cpu::kernels::Isa;

/// The inference library's kernel level the ops run at, chosen once:
/// `LLAMA2_ISA` when it names one this CPU runs, else the widest.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| Isa::configured().unwrap_or_else(|_| Isa::best()))
}
