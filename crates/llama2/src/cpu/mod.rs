//! The CPU backend: the `Backend` ops on host memory, multi-threaded with a
//! persistent `Team` of the requested size whose helpers spin during a
//! forward step. Weights are used in place
//! from the memory-mapped checkpoint. Products run the SIMD kernels of the
//! widest instruction set detected at start-up (`kernels::Isa`); small ones
//! run on the calling thread, since waking threads costs more than a 64x64
//! matvec.

mod attention;
pub mod kernels;
pub mod packed;
pub mod reference;
mod simd;
mod team;

pub use attention::{CpuKvCache, KV_BLOCK};
use attention::{Inputs, RopeTable};

use crate::arena::Arena;
use crate::backend::{all_finite, Backend, KvDtype, Segment};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostMatrix};
use kernels::{Isa, Prepared, Q8Acts, TokenBlocks};
use packed::CpuMatrix;
use std::sync::atomic::{AtomicBool, Ordering};
use team::Team;

/// Multiply-adds below which a product or attention is not worth splitting
/// across threads: a few microseconds of vector work, several times what
/// handing it to a spinning helper costs.
pub(crate) const PARALLEL_WORK: usize = 1 << 15;
/// Values below which an element-wise op (rmsnorm, silu, add, activation
/// quantization, copies) over a batch runs on the calling thread: splitting
/// it costs more than it saves. One decoded token's rows (288 to 2048
/// values for the stories models) stay whole; 16 sequences' rows (4,608 to
/// 12,288 on stories15M, quantized with a division per value) are split,
/// where 1 << 14 left them to one thread while the others spun (+3% per
/// 16-sequence step, 11 of 12 alternating runs faster).
const ELEMENTWISE_WORK: usize = 1 << 12;
/// Tasks per thread in a product: enough to even out uneven row ranges,
/// few enough that each task amortizes its scheduling.
const TASKS_PER_THREAD: usize = 8;
/// Row ranges of a product are multiples of this (the largest tile height)
/// unless its float batch tiles are of another height.
const TILE_ROWS: usize = 16;
/// Most CPU threads a backend starts. Machines today have at most a few
/// hundred cores; each thread costs a stack and a share of every product.
pub const MAX_THREADS: usize = 1024;
/// Prompt tokens processed together in one batched step. Each step reads
/// every weight once (from memory, for models beyond the caches), so longer
/// steps read less per token: 256-token prompts of stories15M/42M/110M f32
/// prefilled 1.4-1.6x / 1.2-1.3x / 1.1-1.4x faster in one step than in
/// four of 64 on a Zen 3 EPYC, Q8 about the same.
const CPU_BATCH: usize = 256;
/// Most sequences one step holds: a server's running requests, each a row
/// or more of the batch.
const MAX_SEQUENCES: usize = 64;

/// The most bytes of float weights copied out of their file's map into
/// huge pages: half the machine's memory. Past it (a model too large to
/// hold twice, as page cache and as copy, comfortably) they are read from
/// the map in place; where the memory is unknown, always.
fn copy_budget() -> usize {
    crate::files::physical_memory().map_or(0, |bytes| (bytes / 2).min(usize::MAX as u64) as usize)
}

/// Host-memory backend.
pub struct CpuBackend {
    team: Team,
    threads: usize,
    isa: Isa,
    /// Storage type matrices are converted to on upload; `None` keeps the file's.
    dtype: Option<DType>,
    /// The input of the current product quantized for each Q8 group size in
    /// use (usually one), reused between calls.
    acts: Vec<Q8Acts>,
    /// The input of the current batched product in token blocks, when the
    /// level's float tiles take them (`kernels::takes_token_blocks`).
    blocks: TokenBlocks,
    /// Product outputs of all matrices of one `matmul`, task by task: each
    /// task's rows as `[tokens][its rows]`, a contiguous slice it owns.
    scratch: Vec<f32>,
    /// Batched attention's scratch: per (query block, head) task, its scores
    /// then its outputs (see `attention`).
    att: Vec<f32>,
    /// Rotary factors of the positions seen so far, and the frequencies.
    rope: RopeTable,
    /// The prepared model's RMSNorm epsilon.
    norm_eps: f32,
    /// How new KV caches store keys and values.
    kv_dtype: KvDtype,
    /// Huge-page memory the matrices are repacked or copied into.
    arena: Arena,
}

impl CpuBackend {
    /// A backend running on `threads` threads (0: one per core), keeping
    /// weights in their file's storage type.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_dtype(threads, None)
    }

    /// A backend that converts matrices to `dtype` as they are loaded, on
    /// the widest SIMD level (or the one `LLAMA2_ISA` forces).
    pub fn with_dtype(threads: usize, dtype: Option<DType>) -> Result<Self> {
        Self::with_isa(threads, dtype, Isa::configured().map_err(Error::Invalid)?)
    }

    /// A backend using `isa`'s kernels rather than the widest detected
    /// (tests compare levels; benchmarks measure them).
    pub fn with_isa(threads: usize, dtype: Option<DType>, isa: Isa) -> Result<Self> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS)),
            n if n > MAX_THREADS => {
                return Err(Error::Invalid(format!(
                    "{n} CPU threads asked for; at most {MAX_THREADS} are supported"
                )))
            }
            n => n,
        };
        let team = Team::new(threads)
            .map_err(|e| Error::Backend(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend {
            threads: team.threads(),
            team,
            isa,
            dtype,
            acts: Vec::new(),
            blocks: TokenBlocks::default(),
            scratch: Vec::new(),
            att: Vec::new(),
            rope: RopeTable::default(),
            norm_eps: crate::config::LLAMA2C_NORM_EPS,
            kv_dtype: KvDtype::F32,
            arena: Arena::with_budget(copy_budget()),
        })
    }

    /// Makes the KV caches of sequences started from now on store `dtype`
    /// (f32 unless set: llama2.c's arithmetic).
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    /// Makes matrices loaded from now on that need no repacking stay where
    /// they are (a file's map) instead of being copied into huge pages:
    /// zero copies and memory shared with other processes mapping the same
    /// file, at the cost of slower decode (docs/PERF.md).
    pub fn with_weights_in_place(mut self) -> Self {
        self.arena = Arena::with_budget(0);
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Attention of a batch of segments, with this backend's team and scratch.
    fn attend(
        &mut self,
        out: &mut [f32],
        inputs: Inputs<'_>,
        caches: &mut [&mut CpuKvCache],
        layer: usize,
        segments: &[Segment],
        c: &Config,
    ) -> Result<()> {
        let run = (&self.team, self.threads, self.isa);
        attention::attend(run, &mut self.att, out, inputs, caches, layer, segments, c)
    }

    /// The instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// How many of `rows` rows of `width` values one task of an element-wise
    /// op takes: all of them (one task, on this thread) when the op is too
    /// small to split, else an even share per thread.
    fn rows_per_task(&self, rows: usize, width: usize) -> usize {
        if rows * width < ELEMENTWISE_WORK || self.threads == 1 {
            rows.max(1)
        } else {
            rows.div_ceil(self.threads)
        }
    }

    /// Quantizes `x` once for every Q8 group size among `ws`; returns how
    /// many entries of `self.acts` are current.
    fn quantize_inputs(&mut self, x: &[f32], n: usize, ws: &[&CpuMatrix]) -> usize {
        let mut used = 0;
        for w in ws {
            let Some(gs) = w.q8_group_size() else {
                continue;
            };
            if self.acts[..used].iter().any(|a| a.gs == gs) {
                continue;
            }
            if self.acts.len() == used {
                self.acts.push(Q8Acts::default());
            }
            // Batches quantize their tokens in parallel, as an element-wise op.
            let per = self.rows_per_task(n, w.cols());
            let (team, isa) = (&self.team, self.isa);
            self.acts[used].quantize_split(isa, x, (n, w.cols(), gs), per, |parts, f| {
                team.for_each_chunk(parts, 1, |_, p| f(&mut p[0]))
            });
            used += 1;
        }
        used
    }

    /// The rows a product task's range is a multiple of: the level's float
    /// batch tile for float batches (12 rows at AVX-512, where ranges of 16
    /// rows ended in a padded tile: an eighth of the tiles of stories15M's
    /// `wqkv`, `wo` and `w2` computed rows that were dropped), else
    /// `TILE_ROWS`.
    fn task_rows_unit(&self, n: usize, ws: &[&CpuMatrix]) -> usize {
        let floats = ws.iter().all(|w| w.q8_group_size().is_none());
        match kernels::batch_tile_rows(self.isa, n) {
            Some(rows) if floats => rows,
            _ => TILE_ROWS,
        }
    }

    /// Lays `x` out in token blocks, in parallel, when a float matrix among
    /// `ws` will read them; returns whether it did.
    fn block_inputs(&mut self, x: &[f32], n: usize, ws: &[&CpuMatrix]) -> bool {
        let floats = ws.iter().any(|w| w.q8_group_size().is_none());
        if !floats || !kernels::takes_token_blocks(self.isa, n) {
            return false;
        }
        let team = &self.team;
        let cols = ws[0].cols();
        self.blocks
            .pack_split(self.isa, x, (n, cols), |data, per, f| {
                team.for_each_chunk(data, per, f)
            });
        true
    }

    /// The products of the matrices `ws` stacked on top of each other with
    /// the `n` rows of `x`, across the team, into `out`: each task's rows as
    /// `[n][its rows]`, contiguous, task after task (for one token that is
    /// `[total rows]` itself). Returns the rows a task took.
    fn products(&mut self, x: &[f32], n: usize, ws: &[&CpuMatrix], out: &mut Vec<f32>) -> usize {
        let used = self.quantize_inputs(x, n, ws);
        let blocked = self.block_inputs(x, n, ws);
        let total: usize = ws.iter().map(|w| w.rows()).sum();
        let work = total * ws.first().map_or(0, |w| w.cols()) * n;
        let out = grow_to(out, total * n);
        let isa = self.isa;
        let inputs = (&self.acts[..used], blocked.then_some(&self.blocks));
        if work < PARALLEL_WORK || self.threads == 1 {
            product_range(isa, ws, inputs, x, n, 0, out);
            return total;
        }
        let unit = self.task_rows_unit(n, ws);
        let tiles = total.div_ceil(unit);
        let chunk = tiles.div_ceil(self.threads * TASKS_PER_THREAD) * unit;
        self.team.for_each_chunk(out, chunk * n, |k, out| {
            product_range(isa, ws, inputs, x, n, k * chunk, out)
        });
        chunk
    }

    /// `products` of `ws` into the scratch, then its results spread over
    /// the outputs `dsts` (`[n][rows of ws[i]]`) in one parallel loop over
    /// tokens for all of them (at 16 rows these copies were a loop each,
    /// and the helpers wait between loops): `put` copies or adds each
    /// stretch, then `finish(outs, i)` runs on the task's outputs once their
    /// `i`-th rows are in.
    fn products_to(
        &mut self,
        (x, n): (&[f32], usize),
        ws: &[&CpuMatrix],
        dsts: &mut [&mut [f32]],
        put: fn(&mut [f32], &[f32]),
        finish: impl Fn(&mut [&mut [f32]], usize) + Sync,
    ) {
        let mut scratch = std::mem::take(&mut self.scratch);
        let chunk = self.products(x, n, ws, &mut scratch);
        let total: usize = ws.iter().map(|w| w.rows()).sum();
        for (dst, w) in dsts.iter_mut().zip(ws) {
            *dst = &mut std::mem::take(dst)[..n * w.rows()];
        }
        let dims = (n, chunk, total);
        let per = self.rows_per_task(n, total);
        if per >= n {
            // One task (a decoded token): on this thread, nothing to split.
            spread_rows(&scratch, dims, (ws, dsts), put, &finish, 0);
        } else {
            let mut parts: Vec<Vec<&mut [f32]>> =
                (0..n.div_ceil(per)).map(|_| Vec::new()).collect();
            for (dst, w) in dsts.iter_mut().zip(ws) {
                for (k, part) in dst.chunks_mut(per * w.rows()).enumerate() {
                    parts[k].push(part);
                }
            }
            self.team.for_each_chunk(&mut parts, 1, |k, part| {
                spread_rows(&scratch, dims, (ws, &mut part[0]), put, &finish, k * per)
            });
        }
        self.scratch = scratch;
    }
}

/// The spreading of `CpuBackend::products_to` for one task: its outputs
/// `outs` hold tokens `t0..` of the batch.
fn spread_rows(
    scratch: &[f32],
    dims: (usize, usize, usize),
    (ws, outs): (&[&CpuMatrix], &mut [&mut [f32]]),
    put: fn(&mut [f32], &[f32]),
    finish: &(impl Fn(&mut [&mut [f32]], usize) + Sync),
    t0: usize,
) {
    for i in 0..outs[0].len() / ws[0].rows() {
        let mut offset = 0;
        for (out, w) in outs.iter_mut().zip(ws) {
            let width = w.rows();
            let row = &mut out[i * width..(i + 1) * width];
            gather_row(scratch, dims, (t0 + i, offset), row, put);
            offset += width;
        }
        finish(outs, i);
    }
}

/// The quantized input matching `w`'s group size, if `w` is Q8.
fn acts_for<'a>(acts: &'a [Q8Acts], w: &CpuMatrix) -> Option<&'a Q8Acts> {
    let gs = w.q8_group_size()?;
    acts.iter().find(|a| a.gs == gs)
}

/// Computes global rows `g0..g0 + out.len() / n` of the matrices of `ws`
/// stacked on top of each other, into `out` `[n][rows]`.
fn product_range(
    isa: Isa,
    ws: &[&CpuMatrix],
    (acts, blocks): (&[Q8Acts], Option<&TokenBlocks>),
    x: &[f32],
    n: usize,
    g0: usize,
    out: &mut [f32],
) {
    let ld = out.len() / n;
    let g1 = g0 + ld;
    let mut offset = 0;
    for w in ws {
        let (lo, hi) = (g0.max(offset), g1.min(offset + w.rows()));
        if lo < hi {
            let out = &mut out[lo - g0..];
            let (rows, a) = (lo - offset..hi - offset, acts_for(acts, w));
            match w {
                CpuMatrix::Host(m) => {
                    let prepared = Prepared { q8: a, blocks };
                    kernels::product(isa, m, x, n, prepared, rows, out, ld)
                }
                CpuMatrix::PackedQ8(p) => {
                    let a = a.expect("Q8 products need quantized activations");
                    packed::product_packed(isa, p, a, rows, out, ld)
                }
            }
        }
        offset += w.rows();
    }
}

/// Puts token `t`'s results for global rows `offset..offset + dst.len()`
/// (one output matrix of a stacked product) from `scratch` into `dst`,
/// stretch by stretch (`put` copies or adds), where the task for rows `k *
/// chunk..` of the `total` left them as `[n][its rows]` starting at `k *
/// chunk * n`.
fn gather_row(
    scratch: &[f32],
    (n, chunk, total): (usize, usize, usize),
    (t, offset): (usize, usize),
    dst: &mut [f32],
    put: fn(&mut [f32], &[f32]),
) {
    let end = offset + dst.len();
    for k in offset / chunk..end.div_ceil(chunk) {
        let g0 = k * chunk;
        let len = chunk.min(total - g0);
        let (lo, hi) = (g0.max(offset), (g0 + len).min(end));
        let src = &scratch[g0 * n + t * len..][..len];
        put(&mut dst[lo - offset..hi - offset], &src[lo - g0..hi - g0]);
    }
}

fn copy(dst: &mut [f32], src: &[f32]) {
    dst.copy_from_slice(src)
}

fn add_to(dst: &mut [f32], src: &[f32]) {
    for (a, &b) in dst.iter_mut().zip(src) {
        *a += b;
    }
}

/// `v[..len]`, growing `v` first if it is shorter. Scratch buffers are
/// reused at many sizes; shrinking them with `Vec::resize` would make every
/// regrowth zero-fill megabytes.
pub(crate) fn grow_to<T: Clone + Default>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::default());
    }
    &mut v[..len]
}

impl Backend for CpuBackend {
    type Matrix = CpuMatrix;
    type Vector = Vec<f32>;
    type Buffer = Vec<f32>;
    type KvCache = CpuKvCache;

    fn describe(&self) -> String {
        let mut parts = vec![
            format!("{} threads", self.threads),
            self.isa.level().name().to_string(),
        ];
        if let Some(dt) = self.dtype {
            parts.push(format!("{dt} weights"));
        }
        if self.kv_dtype != KvDtype::F32 {
            parts.push(format!("{} KV cache", self.kv_dtype));
        }
        format!("cpu ({})", parts.join(", "))
    }

    fn max_sequences(&self) -> usize {
        MAX_SEQUENCES
    }

    fn max_batch(&self) -> usize {
        CPU_BATCH
    }

    fn prepare(&mut self, config: &Config) -> Result<()> {
        self.norm_eps = config.norm_eps;
        self.rope = RopeTable::new(config.rope_frequencies());
        Ok(())
    }

    fn upload_matrix(&mut self, m: &HostMatrix) -> Result<CpuMatrix> {
        let m = match self.dtype {
            Some(dt) => m.convert(dt, crate::quant::group_size_for(m.cols))?,
            None => m.clone(),
        };
        Ok(CpuMatrix::new(self.isa, m, &mut self.arena))
    }

    fn step(
        &mut self,
        tokens: &[u32],
        segments: &[Segment],
        ops: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        let _ = (tokens, segments);
        self.team.set_active(true);
        let r = ops(self);
        self.team.set_active(false);
        r
    }

    fn upload_vector(&mut self, v: &[f32]) -> Result<Vec<f32>> {
        Ok(v.to_vec())
    }

    fn buffer(&mut self, len: usize) -> Result<Vec<f32>> {
        crate::files::check_allocation(
            4 * len as u64,
            "an activation buffer",
            "the model's dimensions are too large for this machine",
        )?;
        Ok(vec![0.0; len])
    }

    fn kv_cache(&mut self, c: &Config, _positions: usize) -> Result<CpuKvCache> {
        CpuKvCache::new(c, self.kv_dtype)
    }

    fn embed(&mut self, out: &mut Vec<f32>, table: &CpuMatrix, tokens: &[u32]) -> Result<()> {
        let d = table.cols();
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
        let per = self.rows_per_task(rows, d);
        let eps = self.norm_eps;
        self.team
            .for_each_chunk(&mut out[..rows * d], per * d, |k, out| {
                for (r, o) in out.chunks_exact_mut(d).enumerate() {
                    let at = (k * per + r) * d;
                    reference::rmsnorm(o, &x[at..at + d], w, eps);
                }
            });
        Ok(())
    }

    fn matmul(
        &mut self,
        x: &Vec<f32>,
        rows: usize,
        outs: &mut [(&CpuMatrix, &mut Vec<f32>)],
    ) -> Result<()> {
        let ws: Vec<&CpuMatrix> = outs.iter().map(|(w, _)| *w).collect();
        // One token through one matrix (the classifier, when decoding): the
        // task layout is the output itself, so nothing is copied after.
        if rows == 1 && outs.len() == 1 {
            self.products(x, 1, &ws, outs[0].1);
            return Ok(());
        }
        let mut dsts: Vec<&mut [f32]> = outs.iter_mut().map(|(_, o)| &mut o[..]).collect();
        self.products_to((x, rows), &ws, &mut dsts, copy, |_, _| {});
        Ok(())
    }

    fn matmul_add(
        &mut self,
        x: &Vec<f32>,
        rows: usize,
        w: &CpuMatrix,
        proj: &mut Vec<f32>,
        residual: &mut Vec<f32>,
        c: &Config,
    ) -> Result<()> {
        if rows == 1 {
            self.matmul(x, 1, &mut [(w, proj)])?;
            return self.add(residual, proj, c.dim);
        }
        // A batch adds its products to the residual as it gathers them.
        self.products_to((x, rows), &[w], &mut [&mut residual[..]], add_to, |_, _| {});
        Ok(())
    }

    fn norm_swiglu(
        &mut self,
        x: &Vec<f32>,
        weight: &Vec<f32>,
        rows: usize,
        normed: &mut Vec<f32>,
        (w1, w3): (&CpuMatrix, &CpuMatrix),
        gate: &mut Vec<f32>,
        up: &mut Vec<f32>,
        c: &Config,
    ) -> Result<()> {
        self.rmsnorm(normed, x, weight, rows)?;
        // SiLU runs on each row as soon as its gate and up halves are in.
        let (h, isa) = (c.hidden_dim, self.isa);
        let dsts = &mut [&mut gate[..], &mut up[..]];
        self.products_to((normed, rows), &[w1, w3], dsts, copy, |outs, i| {
            let (g, u) = outs.split_at_mut(1);
            kernels::silu_mul(
                isa,
                &mut g[0][i * h..(i + 1) * h],
                &u[0][i * h..(i + 1) * h],
            );
        });
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
        let segments = [Segment::single(rows, pos0)];
        self.rope.apply((q, k), &segments, c)
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
        let segments = [Segment::single(rows, pos0)];
        self.attend(out, Inputs { q, k, v }, &mut [cache], layer, &segments, c)
    }

    fn silu_mul(&mut self, gate: &mut Vec<f32>, up: &Vec<f32>, len: usize) -> Result<()> {
        let per = self.rows_per_task(len, 1);
        let isa = self.isa;
        self.team.for_each_chunk(&mut gate[..len], per, |k, gate| {
            kernels::silu_mul(isa, gate, &up[k * per..][..gate.len()])
        });
        Ok(())
    }

    fn add(&mut self, x: &mut Vec<f32>, y: &Vec<f32>, len: usize) -> Result<()> {
        let per = self.rows_per_task(len, 1);
        self.team.for_each_chunk(&mut x[..len], per, |k, x| {
            for (a, &b) in x.iter_mut().zip(&y[k * per..]) {
                *a += b;
            }
        });
        Ok(())
    }

    fn copy_row(
        &mut self,
        (dst, to): (&mut Vec<f32>, usize),
        (src, from): (&Vec<f32>, usize),
        width: usize,
    ) -> Result<()> {
        dst[to * width..(to + 1) * width].copy_from_slice(&src[from * width..(from + 1) * width]);
        Ok(())
    }

    fn rope_attention_segments(
        &mut self,
        out: &mut Vec<f32>,
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        v: &Vec<f32>,
        caches: &mut [&mut CpuKvCache],
        layer: usize,
        segments: &[Segment],
        c: &Config,
    ) -> Result<()> {
        self.rope.apply((q, k), segments, c)?;
        self.attend(out, Inputs { q, k, v }, caches, layer, segments, c)
    }

    fn read(&mut self, src: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        self.read_finite(src, out).map(|_| ())
    }

    fn buffers_on_host(&self) -> bool {
        true
    }

    fn finite_in_place<'a>(
        &mut self,
        src: &'a mut Vec<f32>,
        len: usize,
    ) -> Result<(&'a mut [f32], bool)> {
        // Checked in parts, as `read_finite` checks its copy.
        let values = &mut src[..len];
        let per = self.rows_per_task(len, 1);
        let finite = AtomicBool::new(true);
        self.team.for_each_chunk(values, per, |_, part| {
            if !all_finite(part) {
                finite.store(false, Ordering::Relaxed);
            }
        });
        Ok((values, finite.into_inner()))
    }

    fn read_finite(&mut self, src: &Vec<f32>, out: &mut [f32]) -> Result<bool> {
        // Split like an element-wise op: a server step's logits are
        // megabytes (16 sequences x 32000), which one thread copied and
        // checked while the others waited. Each part is checked by the
        // thread that copied it, while it is in that core's cache.
        let per = self.rows_per_task(out.len(), 1);
        let finite = AtomicBool::new(true);
        self.team.for_each_chunk(out, per, |k, dst| {
            dst.copy_from_slice(&src[k * per..][..dst.len()]);
            if !all_finite(dst) {
                finite.store(false, Ordering::Relaxed);
            }
        });
        Ok(finite.into_inner())
    }
}
