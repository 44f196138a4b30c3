//! Architecture-specific kernels, chosen at compile time by target
//! architecture (this file is the only `cfg` switch) and at run time by the
//! `Isa` the caller detected. Each architecture module offers the same
//! functions; each returns `None`/`false` when it has nothing faster than the
//! scalar loop for that level, and `kernels.rs` then runs the scalar loop.

#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
pub use x86::*;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::*;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod portable;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub use portable::*;
