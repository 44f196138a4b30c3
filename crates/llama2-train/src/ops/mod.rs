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

use std::mem::MaybeUninit;
use std::sync::{Mutex, OnceLock};

use llama2::cpu::kernels::Isa;
use rayon::prelude::*;

/// Values per task of the element-wise loops that run on the pool: a few
/// microseconds of work each.
pub(crate) const CHUNK: usize = 1 << 14;

/// Rows per task of the row-wise ops (RMSNorm, RoPE, the embedding).
pub(crate) const ROWS_PER_TASK: usize = 64;

/// Buffers from this many values are filled by the pool.
const PARALLEL_FILL: usize = 1 << 16;

/// `len` zeros. A step's buffers come back from the allocator dirty, so
/// `vec![0.0; len]` zeroes them on the calling thread while the pool
/// waits; at the stories15M shape (the logits alone are 262 MB) that was
/// 2% of a step's CPU time on a 2-core Zen 3, and twice that of its wall
/// time. Large buffers are zeroed by every thread instead.
pub fn zeroed(len: usize) -> Vec<f32> {
    if len < PARALLEL_FILL {
        return vec![0.0; len];
    }
    filled_by_pool(len, |_, dst| dst.fill(MaybeUninit::new(0.0)))
}

/// Buffers given back by `recycle`, for `for_overwrite`.
static SPARES: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of `len` values for a result that writes every one of them: a
/// spare of that length given back by `recycle` (holding whatever it
/// held), else `zeroed`. A step's products have the same sizes every step,
/// so from the second on none is zeroed first: the zeroing of the logits
/// and the other products' outputs was 1-2% of a stories15M step.
pub fn for_overwrite(len: usize) -> Vec<f32> {
    let spare = {
        let mut spares = SPARES.lock().unwrap_or_else(|e| e.into_inner());
        let found = spares.iter().position(|v| v.len() == len);
        found.map(|i| spares.swap_remove(i))
    };
    spare.unwrap_or_else(|| zeroed(len))
}

/// Gives back a buffer `for_overwrite` handed out, once its values are no
/// longer needed. Only its buffers come back, each at most once, so the
/// spares never hold more than a step took.
pub fn recycle(v: Vec<f32>) {
    SPARES.lock().unwrap_or_else(|e| e.into_inner()).push(v);
}

/// Fills every spare with NaN, so a result that left a value unwritten
/// shows it.
#[cfg(test)]
pub(crate) fn poison_spares() {
    for v in SPARES.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
        v.fill(f32::NAN);
    }
}

/// A copy of `src`, made by every thread when large (as `zeroed`).
pub fn copied(src: &[f32]) -> Vec<f32> {
    if src.len() < PARALLEL_FILL {
        return src.to_vec();
    }
    filled_by_pool(src.len(), |c, dst| {
        for (d, &s) in dst.iter_mut().zip(&src[c * CHUNK..]) {
            d.write(s);
        }
    })
}

/// `len` values, chunk `c` of `CHUNK` written by `fill(c, chunk)` on the
/// pool, which must write all of it.
fn filled_by_pool(len: usize, fill: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(c, dst)| fill(c, dst));
    // SAFETY: the capacity is at least `len`, and `fill` wrote every one of
    // the first `len` values (both callers above do).
    unsafe { v.set_len(len) };
    v
}

/// The inference library's kernel level the ops run at, chosen once:
/// `LLAMA2_ISA` when it names one this CPU runs, else the widest.
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| Isa::configured().unwrap_or_else(|_| Isa::best()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_filled_buffers_are_whole() {
        // Above the parallel threshold and not a whole number of chunks.
        let len = PARALLEL_FILL + 3 * CHUNK + 7;
        assert!(zeroed(len).iter().all(|&v| v == 0.0) && zeroed(len).len() == len);
        let src = crate::gradcheck::random(len, 4, 1.0);
        assert_eq!(copied(&src), src);
        assert_eq!(copied(&src[..5]), &src[..5]);
    }
}
