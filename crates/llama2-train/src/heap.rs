//! Keeping freed memory in the process between training steps.
//!
//! A step allocates most of a gigabyte of activations at the stories15M
//! shape (the logits alone, which become their own gradient, are
//! `[B*T][32000]`) and frees
//! it at the end. glibc hands every block above 32 MB back to the kernel,
//! so the next step faults each page in again, zeroed, and the unmaps cost
//! TLB shootdowns on every core: 22% of a stories15M step was spent in the
//! kernel so. With mmap'd blocks off and trimming at 2 GB, freed memory
//! stays in the heap for the next step. Other allocators are left alone.

/// Makes the allocator keep freed memory for reuse (glibc on Linux; a
/// no-op elsewhere). Call once, before training.
pub fn keep_freed_memory() {
    imp::keep_freed_memory()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    pub fn keep_freed_memory() {
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before the training threads start allocating.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn keep_freed_memory() {}
}
