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
pub mod matmul;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
