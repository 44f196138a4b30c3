//! The CPU backend: the `Backend` ops on host memory, multi-threaded with a
//! persistent rayon pool of the requested size. Weights are used in place
//! from the memory-mapped checkpoint. Products run the SIMD kernels of the
//! widest instruction set detected at start-up (`kernels::Isa`); small ones
//! run on the calling thread, since waking threads costs more than a 64x64
//! matvec.

pub mod kernels;
pub mod reference;
mod simd;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostMatrix, MatrixData};
use kernels::{Isa, Q8Acts};

/// Multiply-adds below which a product or attention is not worth splitting
/// across threads: about 10 microseconds of vector work.
const PARALLEL_WORK: usize = 1 << 17;
/// Tasks per thread in a product: enough to even out uneven row ranges,
/// few enough that each task amortizes its scheduling.
const TASKS_PER_THREAD: usize = 4;
/// Row ranges of a product are multiples of this (the largest tile height).
const TILE_ROWS: usize = 16;
/// Prompt tokens processed together in one batched step.
const CPU_BATCH: usize = 64;

/// The key and value caches of all layers.
pub struct CpuKvCache {
    keys: Vec<f32>,   // [L][S][KV]
    values: Vec<f32>, // [L][S][KV]
    layer_len: usize, // S * KV
}

/// Host-memory backend.
pub struct CpuBackend {
    pool: ThreadPool,
    threads: usize,
    isa: Isa,
    /// Storage type matrices are converted to on upload; `None` keeps the file's.
    dtype: Option<DType>,
    /// The input of the current product quantized for each Q8 group size in
    /// use (usually one), reused between calls.
    acts: Vec<Q8Acts>,
    /// Product outputs of all matrices of one `matmul`, transposed:
    /// `[sum of rows][tokens]`, so each task owns a contiguous slice.
    scratch: Vec<f32>,
}

impl CpuBackend {
    /// A backend running on `threads` threads (0: one per core), keeping
    /// weights in their file's storage type.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_dtype(threads, None)
    }

    /// A backend that converts matrices to `dtype` as they are loaded.
    pub fn with_dtype(threads: usize, dtype: Option<DType>) -> Result<Self> {
        Self::with_isa(threads, dtype, Isa::best())
    }

    /// A backend using `isa`'s kernels rather than the widest detected
    /// (tests compare levels; benchmarks measure them).
    pub fn with_isa(threads: usize, dtype: Option<DType>, isa: Isa) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Backend(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend {
            threads: pool.current_num_threads(),
            pool,
            isa,
            dtype,
            acts: Vec::new(),
            scratch: Vec::new(),
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Quantizes `x` once for every Q8 group size among `outs`' matrices;
    /// returns how many entries of `self.acts` are current.
    fn quantize_inputs(
        &mut self,
        x: &[f32],
        n: usize,
        outs: &[(&HostMatrix, &mut Vec<f32>)],
    ) -> usize {
        let mut used = 0;
        for (w, _) in outs {
            let MatrixData::Q8(d) = &w.data else { continue };
            if self.acts[..used].iter().any(|a| a.gs == d.group_size) {
                continue;
            }
            if self.acts.len() == used {
                self.acts.push(Q8Acts::default());
            }
            self.acts[used].quantize(self.isa, x, n, w.cols, d.group_size);
            used += 1;
        }
        used
    }
}

/// The quantized input matching `w`'s group size, if `w` is Q8.
fn acts_for<'a>(acts: &'a [Q8Acts], w: &HostMatrix) -> Option<&'a Q8Acts> {
    match &w.data {
        MatrixData::Q8(d) => acts.iter().find(|a| a.gs == d.group_size),
        _ => None,
    }
}

/// Computes global rows `g0..g0 + out_t.len() / n` of the matrices of `ws`
/// stacked on top of each other, into `out_t` `[rows][n]`.
fn product_range(
    isa: Isa,
    ws: &[(&HostMatrix, &mut Vec<f32>)],
    acts: &[Q8Acts],
    x: &[f32],
    n: usize,
    g0: usize,
    out_t: &mut [f32],
) {
    let g1 = g0 + out_t.len() / n;
    let mut offset = 0;
    for (w, _) in ws {
        let (lo, hi) = (g0.max(offset), g1.min(offset + w.rows));
        if lo < hi {
            let out = &mut out_t[(lo - g0) * n..(hi - g0) * n];
            kernels::product(
                isa,
                w,
                x,
                n,
                acts_for(acts, w),
                lo - offset..hi - offset,
                out,
            );
        }
        offset += w.rows;
    }
}

/// Copies matrix `j`-major results `src` `[rows][n]` to `dst` `[n][rows]`.
fn untranspose(src: &[f32], n: usize, rows: usize, dst: &mut [f32]) {
    if n == 1 {
        dst[..rows].copy_from_slice(src);
        return;
    }
    for (j, col) in src.chunks_exact(n).enumerate() {
        for (t, &v) in col.iter().enumerate() {
            dst[t * rows + j] = v;
        }
    }
}

impl Backend for CpuBackend {
    type Matrix = HostMatrix;
    type Vector = Vec<f32>;
    type Buffer = Vec<f32>;
    type KvCache = CpuKvCache;

    fn describe(&self) -> String {
        match self.dtype {
            Some(dt) => format!(
                "cpu ({} threads, {}, {dt} weights)",
                self.threads,
                self.isa.level().name()
            ),
            None => format!(
                "cpu ({} threads, {})",
                self.threads,
                self.isa.level().name()
            ),
        }
    }

    fn max_batch(&self) -> usize {
        CPU_BATCH
    }

    fn upload_matrix(&mut self, m: &HostMatrix) -> Result<HostMatrix> {
        Ok(match self.dtype {
            Some(dt) => m.convert(dt, crate::quant::group_size_for(m.cols)),
            None => m.clone(),
        })
    }

    fn upload_vector(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn buffer(&mut self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn kv_cache(&mut self, c: &Config) -> Result<CpuKvCache> {
        let layer_len = c.seq_len * c.kv_dim();
        let total = layer_len
            .checked_mul(c.n_layers)
            .ok_or_else(|| Error::Config(format!("a KV cache of {c:?} does not fit in memory")))?;
        Ok(CpuKvCache {
            keys: vec![0.0; total],
            values: vec![0.0; total],
            layer_len,
        })
    }

    fn embed(&mut self, out: &mut Vec<f32>, table: &HostMatrix, tokens: &[u32]) -> Result<()> {
        let d = table.cols;
        for (r, &t) in tokens.iter().enumerate() {
            out[r * d..(r + 1) * d].copy_from_slice(&table.row_f32(t as usize));
        }
        Ok(())
    }

    fn rmsnorm(
        &mut self,
        out: &mut Vec<f32>,
        x: &Vec<f32>,
        w: &Vec<f32>,
        rows: usize,
    ) -> Result<()> {
        let d = w.len();
        for r in 0..rows {
            reference::rmsnorm(&mut out[r * d..(r + 1) * d], &x[r * d..(r + 1) * d], w);
        }
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &Vec<f32>,
        rows: usize,
        outs: &mut [(&HostMatrix, &mut Vec<f32>)],
    ) -> Result<()> {
        let n = rows;
        let used = self.quantize_inputs(x, n, outs);
        let total: usize = outs.iter().map(|(w, _)| w.rows).sum();
        let work = total * outs.first().map_or(0, |(w, _)| w.cols) * n;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(total * n, 0.0);
        let ws = &*outs;
        let (isa, acts, x) = (self.isa, &self.acts[..used], &x[..]);
        if work < PARALLEL_WORK || self.threads == 1 {
            product_range(isa, ws, acts, x, n, 0, &mut scratch);
        } else {
            let tasks = self.threads * TASKS_PER_THREAD;
            let chunk = total.div_ceil(tasks).next_multiple_of(TILE_ROWS);
            self.pool.install(|| {
                scratch
                    .par_chunks_mut(chunk * n)
                    .enumerate()
                    .for_each(|(k, out_t)| product_range(isa, ws, acts, x, n, k * chunk, out_t))
            });
        }
        let mut offset = 0;
        for (w, out) in outs.iter_mut() {
            untranspose(&scratch[offset * n..(offset + w.rows) * n], n, w.rows, out);
            offset += w.rows;
        }
        self.scratch = scratch;
        Ok(())
    }

    fn rope(
        &mut self,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        rows: usize,
        pos0: usize,
        c: &Config,
    ) -> Result<()> {
        let (d, kv) = (c.dim, c.kv_dim());
        for r in 0..rows {
            reference::rope(
                &mut q[r * d..(r + 1) * d],
                &mut k[r * kv..(r + 1) * kv],
                pos0 + r,
                c.head_size(),
            );
        }
        Ok(())
    }

    fn attention(
        &mut self,
        out: &mut Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cache: &mut CpuKvCache,
        layer: usize,
        rows: usize,
        pos0: usize,
        c: &Config,
    ) -> Result<()> {
        let (d, kv, hs) = (c.dim, c.kv_dim(), c.head_size());
        let base = layer * cache.layer_len;
        let at = base + pos0 * kv;
        cache.keys[at..at + rows * kv].copy_from_slice(&k[..rows * kv]);
        cache.values[at..at + rows * kv].copy_from_slice(&v[..rows * kv]);
        let keys = &cache.keys[base..base + cache.layer_len];
        let values = &cache.values[base..base + cache.layer_len];
        let work = rows * c.n_heads * (pos0 + rows) * hs * 2;
        let isa = self.isa;
        let head = |(i, oh): (usize, &mut [f32]), att: &mut Vec<f32>| {
            let (r, h) = (i / c.n_heads, i % c.n_heads);
            let qh = &q[r * d + h * hs..][..hs];
            attend_head(
                isa,
                oh,
                att,
                qh,
                keys,
                values,
                pos0 + r,
                (h / c.kv_group()) * hs,
                c,
            );
        };
        let out = &mut out[..rows * d];
        if work < PARALLEL_WORK {
            let mut att = Vec::new();
            out.chunks_mut(hs)
                .enumerate()
                .for_each(|p| head(p, &mut att));
        } else {
            self.pool.install(|| {
                out.par_chunks_mut(hs)
                    .enumerate()
                    .for_each_init(Vec::new, |att, p| head(p, att))
            });
        }
        Ok(())
    }

    fn silu_mul(&mut self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        for (g, &u) in gate[..len].iter_mut().zip(&up[..len]) {
            *g = reference::silu(*g) * u;
        }
        Ok(())
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        for (a, &b) in x[..len].iter_mut().zip(&y[..len]) {
            *a += b;
        }
        Ok(())
    }

    fn copy_row(
        &mut self,
        dst: &mut Vec<f32>,
        src: &Vec<f32>,
        row: usize,
        width: usize,
    ) -> Result<()> {
        dst[..width].copy_from_slice(&src[row * width..(row + 1) * width]);
        Ok(())
    }

    fn read(&mut self, src: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        out.copy_from_slice(&src[..out.len()]);
        Ok(())
    }
}

/// One head of one token: scores against keys `0..=pos`, softmax, weighted
/// sum of values into `out` `[hs]`. `att` is scratch for the scores.
#[allow(clippy::too_many_arguments)]
fn attend_head(
    isa: Isa,
    out: &mut [f32],
    att: &mut Vec<f32>,
    qh: &[f32],
    keys: &[f32],
    values: &[f32],
    pos: usize,
    kv_off: usize,
    c: &Config,
) {
    let (hs, kv) = (c.head_size(), c.kv_dim());
    let scale = (hs as f32).sqrt();
    att.clear();
    att.extend(
        (0..=pos).map(|t| kernels::dot_f32(isa, qh, &keys[t * kv + kv_off..][..hs]) / scale),
    );
    reference::softmax(att);
    out.fill(0.0);
    for (t, &a) in att.iter().enumerate() {
        kernels::axpy(isa, out, a, &values[t * kv + kv_off..][..hs]);
    }
}
