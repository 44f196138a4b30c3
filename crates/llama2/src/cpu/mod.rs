//! The CPU backend: the `Backend` ops on host memory, multi-threaded with a
//! rayon pool of the requested size. Weights are used in place from the
//! memory-mapped checkpoint. Tiny products run on the calling thread, since
//! waking threads costs more than a 64x64 matvec.

pub mod kernels;
pub mod reference;

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostMatrix, MatrixData};

/// Multiply-adds below which a product is not worth splitting across threads.
const PARALLEL_WORK: usize = 1 << 15;
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
    /// Storage type matrices are converted to on upload; `None` keeps the file's.
    dtype: Option<DType>,
    /// Quantized activations for Q8 products, reused between calls.
    xq: Vec<i8>, // [rows][cols]
    xs: Vec<f32>, // [rows][cols / gs rounded up]
    /// Transposed product output `[out_rows][rows]` for batched matmuls.
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
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::Backend(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend {
            threads: pool.current_num_threads(),
            pool,
            dtype,
            xq: Vec::new(),
            xs: Vec::new(),
            scratch: Vec::new(),
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// Runs `f` over `chunks` of `out`, in parallel when the work is large enough.
fn for_each_chunk<F>(out: &mut [f32], chunk: usize, work: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if work < PARALLEL_WORK {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// Output rows per parallel task: enough to amortize scheduling, few enough
/// to keep all threads busy.
fn rows_per_task(out_rows: usize, threads: usize) -> usize {
    out_rows.div_ceil(threads * 8).max(4)
}

impl CpuBackend {
    /// `out_t[j][r] = w[j] · x[r]`: the product with a transposed output, so
    /// each task owns whole weight rows and reads each row once for the batch.
    fn product(&mut self, w: &HostMatrix, x: &[f32], rows: usize, out_t: &mut [f32]) {
        let cols = w.cols;
        let task_rows = rows_per_task(w.rows, self.threads);
        let work = w.rows * cols * rows;
        let out_t = &mut out_t[..w.rows * rows];
        match &w.data {
            MatrixData::F32(data) => self.pool.install(|| {
                for_each_chunk(out_t, task_rows * rows, work, |t, chunk| {
                    for (jj, outs) in chunk.chunks_mut(rows).enumerate() {
                        let j = t * task_rows + jj;
                        let wrow = &data[j * cols..(j + 1) * cols];
                        for (r, o) in outs.iter_mut().enumerate() {
                            *o = kernels::dot_f32(wrow, &x[r * cols..(r + 1) * cols]);
                        }
                    }
                })
            }),
            MatrixData::F16(_) | MatrixData::BF16(_) => self.pool.install(|| {
                for_each_chunk(out_t, task_rows * rows, work, |t, chunk| {
                    for (jj, outs) in chunk.chunks_mut(rows).enumerate() {
                        let wrow = w.row_f32(t * task_rows + jj);
                        for (r, o) in outs.iter_mut().enumerate() {
                            *o = kernels::dot_f32(&wrow, &x[r * cols..(r + 1) * cols]);
                        }
                    }
                })
            }),
            MatrixData::Q8(d) => {
                let gs = d.group_size;
                let groups = cols.div_ceil(gs);
                self.xq.resize(rows * cols, 0);
                self.xs.resize(rows * groups, 0.0);
                for r in 0..rows {
                    kernels::quantize_row(
                        &x[r * cols..(r + 1) * cols],
                        gs,
                        &mut self.xq[r * cols..(r + 1) * cols],
                        &mut self.xs[r * groups..(r + 1) * groups],
                    );
                }
                let (xq, xs) = (&self.xq, &self.xs);
                self.pool.install(|| {
                    for_each_chunk(out_t, task_rows * rows, work, |t, chunk| {
                        for (jj, outs) in chunk.chunks_mut(rows).enumerate() {
                            let j = t * task_rows + jj;
                            for (r, o) in outs.iter_mut().enumerate() {
                                *o = kernels::dot_q8(
                                    &d.q,
                                    &d.scales,
                                    gs,
                                    j,
                                    &xq[r * cols..(r + 1) * cols],
                                    &xs[r * groups..(r + 1) * groups],
                                );
                            }
                        }
                    })
                })
            }
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
            Some(dt) => format!("cpu ({} threads, {dt} weights)", self.threads),
            None => format!("cpu ({} threads)", self.threads),
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
        for (w, out) in outs.iter_mut() {
            if rows == 1 {
                self.product(w, x, 1, out);
                continue;
            }
            let mut scratch = std::mem::take(&mut self.scratch);
            scratch.resize(w.rows * rows, 0.0);
            self.product(w, x, rows, &mut scratch);
            for (j, col) in scratch.chunks_exact(rows).enumerate() {
                for (r, &v) in col.iter().enumerate() {
                    out[r * w.rows + j] = v;
                }
            }
            self.scratch = scratch;
        }
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
        let head = |(i, oh): (usize, &mut [f32]), att: &mut Vec<f32>| {
            let (r, h) = (i / c.n_heads, i % c.n_heads);
            let qh = &q[r * d + h * hs..][..hs];
            attend_head(
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
    att.extend((0..=pos).map(|t| kernels::dot_f32(qh, &keys[t * kv + kv_off..][..hs]) / scale));
    reference::softmax(att);
    out.fill(0.0);
    for (t, &a) in att.iter().enumerate() {
        let vt = &values[t * kv + kv_off..][..hs];
        for (o, &v) in out.iter_mut().zip(vt) {
            *o += a * v;
        }
    }
}
