//! The KV cache and the attention side of a layer (`kernels/rope.cu`,
//! `kernels/attention.cu`): rope, the KV store (alone or in one launch with
//! the rope), and causal attention, split over position chunks when
//! decoding so that models with few heads still fill the GPU.

use cudarc::driver::CudaSlice;
use llama2::{Config, Error, Result};

use super::CudaBackend;
use crate::device::{int, Arg};

/// Threads per block of the one-block-per-(head, row) attention.
const ATTENTION_THREADS: usize = 256;
/// Threads per block of the split decode attention (`attention_split_*`).
const SPLIT_THREADS: usize = 128;
/// Threads per block of the rope and KV store kernels.
const ELEMENT_THREADS: u32 = 256;
/// Shared memory a kernel may use without opting in to more.
const SHARED_LIMIT: usize = 48 * 1024;

/// The key and value caches of all layers, `[L][S][KV]` each.
pub enum CudaKvCache {
    F32 {
        keys: CudaSlice<f32>,   // [L][S][KV]
        values: CudaSlice<f32>, // [L][S][KV]
    },
    F16 {
        keys: CudaSlice<u16>,   // [L][S][KV] f16 bit patterns
        values: CudaSlice<u16>, // [L][S][KV] f16 bit patterns
    },
}

/// A cache's key and value arrays as kernel arguments, and the kernel
/// name suffix of its storage type.
struct CacheArgs {
    keys: Arg,
    values: Arg,
    ty: &'static str,
    /// The first element of the layer's `[S][KV]` slice.
    layer_off: Arg,
}

impl CudaBackend {
    /// Zeroed caches for `c` (f16 when the backend stores keys and values
    /// in f16), and the split attention's scratch sized for them.
    pub(super) fn new_kv_cache(&mut self, c: &Config) -> Result<CudaKvCache> {
        let shared = (c.head_size() + 4 * ATTENTION_THREADS + c.seq_len) * 4;
        if shared > SHARED_LIMIT {
            return Err(Error::Backend(format!(
                "a context of {} positions does not fit the CUDA attention kernel's shared memory",
                c.seq_len
            )));
        }
        // Few heads (small models) get short chunks, so enough blocks are busy.
        self.split_chunk = if c.n_heads >= 24 { 64 } else { 32 };
        let chunks = c.seq_len.div_ceil(self.split_chunk);
        self.split_partial = self.dev.zeros(c.n_heads * chunks * (c.head_size() + 2))?;
        self.split_done = self.dev.zeros(c.n_heads)?;
        let len = c.n_layers * c.seq_len * c.kv_dim();
        Ok(if self.kv_f16 {
            CudaKvCache::F16 {
                keys: self.dev.zeros(len)?,
                values: self.dev.zeros(len)?,
            }
        } else {
            CudaKvCache::F32 {
                keys: self.dev.zeros(len)?,
                values: self.dev.zeros(len)?,
            }
        })
    }

    fn cache_args(&self, cache: &CudaKvCache, layer: usize, c: &Config) -> CacheArgs {
        let layer_off = Arg::U64((layer * c.seq_len * c.kv_dim()) as u64);
        let (keys, values, ty) = match cache {
            CudaKvCache::F32 { keys, values } => (self.dev.ptr(keys), self.dev.ptr(values), "f32"),
            CudaKvCache::F16 { keys, values } => (self.dev.ptr(keys), self.dev.ptr(values), "f16"),
        };
        CacheArgs {
            keys,
            values,
            ty,
            layer_off,
        }
    }

    /// Rotary embedding of q `[rows][D]` and k `[rows][KV]` in place, at the
    /// step buffer's positions.
    pub(super) fn rope_in_place(
        &mut self,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        rows: usize,
        c: &Config,
    ) -> Result<()> {
        let args = [
            self.dev.ptr(q),
            self.dev.ptr(k),
            self.dev.ptr(&self.step_buf),
            int(c.dim)?,
            int(c.kv_dim())?,
            int(c.head_size())?,
            self.rope_freqs_arg()?,
        ];
        self.dev
            .launch("rope_f32", rope_grid(rows, c), ELEMENT_THREADS, 0, &args)
    }

    /// Stores k and v `[rows][KV]` into `layer` of the cache at the step
    /// buffer's positions.
    pub(super) fn kv_store(
        &mut self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut CudaKvCache,
        layer: usize,
        rows: usize,
        c: &Config,
    ) -> Result<()> {
        let cache = self.cache_args(cache, layer, c);
        let kv = c.kv_dim();
        let args = [
            cache.keys,
            cache.values,
            self.dev.ptr(k),
            self.dev.ptr(v),
            self.dev.ptr(&self.step_buf),
            cache.layer_off,
            int(kv)?,
            int(rows)?,
        ];
        let blocks = (rows * kv).div_ceil(ELEMENT_THREADS as usize) as u32;
        let kernel = format!("kv_store_{}", cache.ty);
        self.dev
            .launch(&kernel, (blocks, 1), ELEMENT_THREADS, 0, &args)
    }

    /// `rope_in_place` and `kv_store` in one launch (one thread per rotated
    /// pair, so KV must be even).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rope_kv_store(
        &mut self,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut CudaKvCache,
        layer: usize,
        rows: usize,
        c: &Config,
    ) -> Result<()> {
        let cache = self.cache_args(cache, layer, c);
        let args = [
            cache.keys,
            cache.values,
            self.dev.ptr(q),
            self.dev.ptr(k),
            self.dev.ptr(v),
            self.dev.ptr(&self.step_buf),
            cache.layer_off,
            int(c.dim)?,
            int(c.kv_dim())?,
            int(c.head_size())?,
            self.rope_freqs_arg()?,
        ];
        let kernel = format!("rope_kv_store_{}", cache.ty);
        self.dev
            .launch(&kernel, rope_grid(rows, c), ELEMENT_THREADS, 0, &args)
    }

    /// Causal attention of q `[rows][D]` over the cached positions
    /// `0..=pos0 + r` of `layer` into out `[rows][D]` (the keys and values
    /// of the batch already stored).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &mut self,
        out: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        cache: &CudaKvCache,
        layer: usize,
        rows: usize,
        c: &Config,
    ) -> Result<()> {
        if rows == 1 && self.split_chunk > 0 {
            return self.attend_split(out, q, cache, layer, c);
        }
        let cache = self.cache_args(cache, layer, c);
        let hs = c.head_size();
        let args = [
            self.dev.ptr(out),
            self.dev.ptr(q),
            cache.keys,
            cache.values,
            self.dev.ptr(&self.step_buf),
            cache.layer_off,
            int(c.dim)?,
            int(c.kv_dim())?,
            int(hs)?,
            int(c.kv_group())?,
        ];
        // Shared: q [hs], partial value sums [4 * threads], scores [seq_len].
        let shared = ((hs + 4 * ATTENTION_THREADS + c.seq_len) * 4) as u32;
        let grid = (c.n_heads as u32, rows as u32);
        let kernel = format!("attention_{}", cache.ty);
        let threads = ATTENTION_THREADS as u32;
        self.dev.launch(&kernel, grid, threads, shared, &args)
    }

    /// Decode attention over blocks of (head, chunk of positions); the
    /// last block of each head combines the chunks (flash-decoding).
    fn attend_split(
        &mut self,
        out: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        cache: &CudaKvCache,
        layer: usize,
        c: &Config,
    ) -> Result<()> {
        let cache = self.cache_args(cache, layer, c);
        let (hs, chunk) = (c.head_size(), self.split_chunk);
        let args = [
            self.dev.ptr(out),
            self.dev.ptr(q),
            cache.keys,
            cache.values,
            self.dev.ptr(&self.step_buf),
            cache.layer_off,
            int(c.kv_dim())?,
            int(hs)?,
            int(c.kv_group())?,
            self.dev.ptr(&self.split_partial),
            self.dev.ptr(&self.split_done),
            int(chunk)?,
        ];
        // Shared: q [hs], partial value sums [4 * threads], scores [chunk].
        let shared = ((hs + 4 * SPLIT_THREADS + chunk) * 4) as u32;
        let grid = (c.n_heads as u32, c.seq_len.div_ceil(chunk) as u32);
        let kernel = format!("attention_split_{}", cache.ty);
        let threads = SPLIT_THREADS as u32;
        self.dev.launch(&kernel, grid, threads, shared, &args)
    }
}

/// The grid of the rope kernels: one thread per rotated pair of q, one
/// block row per batch row.
fn rope_grid(rows: usize, c: &Config) -> (u32, u32) {
    let pairs = c.dim / 2;
    (pairs.div_ceil(ELEMENT_THREADS as usize) as u32, rows as u32)
}
