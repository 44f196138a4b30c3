//! `CudaBackend`: the `Backend` ops on the GPU. Weights live on the device in
//! their storage type (f32, f16, bf16 or Q8_0); activations are f32; the KV
//! cache is f16 for f16/bf16 models and f32 otherwise.
//!
//! Every op launches its kernels when called and leaves nothing behind for
//! the next op. The primitive ops are plain launches; the fused ops are
//! overridden where one kernel does the work of several:
//!
//! | op                      | launches                                             |
//! |-------------------------|------------------------------------------------------|
//! | `norm_matmul`, one row  | the norm folded into the matvec (Q8: norm + quantize, then matvec) |
//! | `rope_attention`        | rope + KV store, then attention                      |
//! | `matmul_add`, one row   | matvec with the residual add as epilogue             |
//! | `norm_swiglu`, one row  | the norm folded into the w1/w3 matvec, SwiGLU epilogue |
//! | any of them, many rows  | the primitive chain (products through cuBLAS, Q8 too) |
//!
//! A decode step (one token) is recorded once as a CUDA graph and replayed
//! for every later token: the kernels read the token ids and the position
//! from a small device buffer that `step` fills before each launch.
//!
//! | submodule      | owns                                                     |
//! |----------------|----------------------------------------------------------|
//! | `weights.rs`   | `CudaMatrix`: upload, conversion, random matrices        |
//! | `matvec.rs`    | one-row products, up to 3 matrices, fused epilogues      |
//! | `matmul.rs`    | one matrix at a time: batched (cuBLAS) and odd layouts   |
//! | `quantize.rs`  | activations to Q8 for the W8A8 products                  |
//! | `attention.rs` | `CudaKvCache`, rope, KV store, attention                 |

mod attention;
mod matmul;
mod matvec;
mod quantize;
mod weights;

use cudarc::driver::{result as driver, sys, CudaGraph, CudaSlice};
use llama2::{Backend, Config, DType, Error, HostMatrix, Result, Segment};

use crate::device::{cuda_err, int, Arg, Device, Pinned};
use crate::gemm::Gemm;
use matvec::{one_launch, Epilogue, Outs, Row};

pub use attention::CudaKvCache;
pub use weights::CudaMatrix;
use weights::Weights;

/// Prompt tokens processed together in one batched step.
const MAX_BATCH: usize = 512;
/// Largest read (in f32 values) staged through pinned host memory; longer
/// ones (all-logits prefill reads) copy straight into the caller's slice.
const PINNED_READ_MAX: usize = 1 << 20;
/// Threads per block of the row-wise and element-wise kernels.
const THREADS: u32 = 256;

/// Backend over CUDA device 0.
pub struct CudaBackend {
    dev: Device,
    name: String,
    /// Storage type matrices are converted to on upload; `None` keeps the file's.
    dtype: Option<DType>,
    /// Whether the KV cache is stored in f16.
    kv_f16: bool,
    /// Step parameters read by kernels: [0] = pos0, [1 + r] = token of row r.
    step_buf: CudaSlice<i32>, // [1 + MAX_BATCH]
    step_host: Pinned<i32>, // [1 + MAX_BATCH], staging for step_buf
    /// Whether a copy from `step_host` may still be queued on the stream.
    step_copy_queued: bool,
    /// Pinned staging for `read`, grown on demand.
    read_host: Pinned<f32>, // [up to PINNED_READ_MAX]
    /// Whether ops run inside `step` (which uploaded the step parameters).
    in_step: bool,
    /// Quantized activations for Q8 products, grown on demand.
    xq: CudaSlice<i8>, // [rows][cols]
    xs: CudaSlice<f32>, // [rows][ceil(cols / gs)]
    /// The recorded decode step, replayed for every later token.
    graph: Option<CudaGraph>,
    /// Uncaptured decode steps since the graph was (re)set: the first runs
    /// eagerly so lazy allocations happen outside a capture.
    eager_decodes: usize,
    /// False when LLAMA2_CUDA_GRAPHS=0: every step runs eagerly.
    graphs: bool,
    /// cuBLAS for batched f32/f16/bf16 products, created on first use;
    /// `None` after a failed start (the matmul kernels are used instead).
    gemm: Option<Gemm>,
    gemm_tried: bool,
    /// Activations in f16/bf16 for GemmEx (rounded, or Q8-quantized and
    /// dequantized), grown on demand.
    x16: CudaSlice<u16>, // [rows][cols]
    /// A Q8 matrix dequantized to f16 for GemmEx, grown on demand.
    w16: CudaSlice<u16>, // [n_out][cols]
    /// Split decode attention: positions per block, and per-chunk partial
    /// results and per-head finished-chunk counts (sized by `kv_cache`).
    split_chunk: usize,
    split_partial: CudaSlice<f32>, // [heads][ceil(seq_len / split_chunk)][head_size + 2]
    split_done: CudaSlice<u32>,    // [heads], zero between launches
    /// The prepared model's RMSNorm epsilon.
    norm_eps: f32,
    /// The prepared model's rotary frequencies, computed on the host so the
    /// GPU rotates by exactly the CPU's angles' frequencies.
    rope_freqs: Option<CudaSlice<f32>>, // [head_size / 2]
}

impl CudaBackend {
    /// Opens the GPU; matrices are converted to `dtype` on upload (`None`
    /// keeps each matrix's own type), the KV cache is f16 when `kv_f16`.
    pub fn new(dtype: Option<DType>, kv_f16: bool) -> Result<Self> {
        let dev = Device::open()?;
        let name = dev.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let step_buf = dev.zeros(1 + MAX_BATCH)?;
        let (xq, xs) = (dev.zeros(1)?, dev.zeros(1)?);
        let graphs = std::env::var("LLAMA2_CUDA_GRAPHS").map_or(true, |v| v != "0");
        // LLAMA2_CUDA_CUBLAS=0 keeps prefill on the built-in kernels.
        let gemm_tried = std::env::var("LLAMA2_CUDA_CUBLAS").is_ok_and(|v| v == "0");
        let (x16, w16) = (dev.zeros(1)?, dev.zeros(1)?);
        let (split_partial, split_done) = (dev.zeros(1)?, dev.zeros(1)?);
        Ok(CudaBackend {
            dev,
            name,
            dtype,
            kv_f16,
            step_buf,
            step_host: Pinned::new(1 + MAX_BATCH)?,
            step_copy_queued: false,
            read_host: Pinned::new(1)?,
            in_step: false,
            xq,
            xs,
            graph: None,
            eager_decodes: 0,
            graphs,
            gemm: None,
            gemm_tried,
            x16,
            w16,
            split_chunk: 0,
            split_partial,
            split_done,
            norm_eps: llama2::config::LLAMA2C_NORM_EPS,
            rope_freqs: None,
        })
    }

    /// The rotary frequency table as a kernel argument.
    pub(super) fn rope_freqs_arg(&self) -> Result<Arg> {
        match &self.rope_freqs {
            Some(f) => Ok(self.dev.ptr(f)),
            None => Err(Error::Backend(
                "rope before the backend was prepared for a model".into(),
            )),
        }
    }

    // ------------------------------------------------------------------
    // Steps and graphs

    /// Copies pos0 and the tokens into the step buffer.
    fn upload_step(&mut self, tokens: Option<&[u32]>, pos0: usize) -> Result<()> {
        if self.step_copy_queued {
            // The previous upload may not have read the staging buffer yet.
            self.dev
                .stream
                .synchronize()
                .map_err(cuda_err("step parameter upload"))?;
        }
        let host = self.step_host.as_mut_slice();
        host[0] = pos0 as i32;
        let n = tokens.map_or(0, |t| t.len());
        if let Some(tokens) = tokens {
            for (h, &t) in host[1..].iter_mut().zip(tokens) {
                *h = t as i32;
            }
        }
        let dst = self.dev.addr(&self.step_buf);
        // SAFETY: step_buf holds 1 + MAX_BATCH values and n <= MAX_BATCH
        // (the model's batches); the pinned source is not written again until
        // the stream has passed this copy (step_copy_queued).
        unsafe { driver::memcpy_htod_async(dst, &host[..1 + n], self.dev.stream.cu_stream()) }
            .map_err(cuda_err("step parameter upload"))?;
        self.step_copy_queued = true;
        Ok(())
    }

    /// Outside `step`, ops are called one by one: the position then comes
    /// from the call instead of the step buffer.
    fn ensure_pos(&mut self, pos0: usize) -> Result<()> {
        if self.in_step {
            return Ok(());
        }
        self.upload_step(None, pos0)
    }

    /// Runs a step's ops: a decode step (`decode`, one token) from the
    /// recorded graph, recording it on the second decode; anything else
    /// eagerly.
    fn run_step(
        &mut self,
        decode: bool,
        ops: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        if !decode || !self.graphs {
            return ops(self);
        }
        if let Some(graph) = &self.graph {
            return graph.launch().map_err(cuda_err("graph launch"));
        }
        if self.eager_decodes == 0 {
            self.eager_decodes += 1;
            return ops(self);
        }
        self.capture(ops)
    }

    /// Runs `ops` recorded into a CUDA graph, then launches the graph.
    fn capture(&mut self, ops: &mut dyn FnMut(&mut Self) -> Result<()>) -> Result<()> {
        let stream = self.dev.stream.clone();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(cuda_err("graph capture start"))?;
        let recorded = ops(self);
        // Capture must end even when an op failed, or the stream stays unusable.
        let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        recorded?;
        let graph = ended
            .map_err(cuda_err("graph capture"))?
            .ok_or_else(|| Error::Backend("CUDA graph capture recorded nothing".into()))?;
        graph.launch().map_err(cuda_err("graph launch"))?;
        self.graph = Some(graph);
        Ok(())
    }

    /// Drops the recorded decode step (after a scratch buffer it uses moved).
    fn forget_graph(&mut self) {
        self.graph = None;
        self.eager_decodes = 0;
    }
}

impl Backend for CudaBackend {
    type Matrix = CudaMatrix;
    type Vector = CudaSlice<f32>;
    type Buffer = CudaSlice<f32>;
    type KvCache = CudaKvCache;

    fn describe(&self) -> String {
        let weights = self.dtype.map_or("file's".into(), |d| d.to_string());
        let graphs = if self.graphs { "graphs" } else { "no graphs" };
        format!("cuda ({}, {weights} weights, {graphs})", self.name)
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn upload_matrix(&mut self, m: &HostMatrix) -> Result<CudaMatrix> {
        self.matrix_from_host(m)
    }

    fn random_matrix(&mut self, rows: usize, cols: usize, seed: u64) -> Result<CudaMatrix> {
        self.random_on_device(rows, cols, seed)
    }

    fn prepare(&mut self, config: &Config) -> Result<()> {
        self.norm_eps = config.norm_eps;
        self.rope_freqs = Some(self.dev.upload(&config.rope_frequencies())?);
        self.forget_graph();
        Ok(())
    }

    fn upload_vector(&mut self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.dev.upload(v)
    }

    fn buffer(&mut self, len: usize) -> Result<CudaSlice<f32>> {
        self.dev.zeros(len)
    }

    /// The whole context, whatever `positions` says: device caches do not
    /// grow.
    fn kv_cache(&mut self, c: &Config, _positions: usize) -> Result<CudaKvCache> {
        self.new_kv_cache(c)
    }

    fn step(
        &mut self,
        tokens: &[u32],
        segments: &[Segment],
        ops: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        // Kernels read one position and one cache per step (`max_sequences`
        // is 1), so a step is one segment from row 0.
        let pos0 = match segments {
            [s] if s.rows == (0..tokens.len()) => s.pos0,
            _ => {
                return Err(Error::Backend(format!(
                    "the CUDA backend runs one sequence per step, not {}",
                    segments.len()
                )))
            }
        };
        self.upload_step(Some(tokens), pos0)?;
        self.in_step = true;
        let result = self.run_step(tokens.len() == 1, ops);
        self.in_step = false;
        result
    }

    // ------------------------------------------------------------------
    // Primitive ops: one plain launch each (a product may quantize first)

    fn embed(
        &mut self,
        out: &mut CudaSlice<f32>,
        table: &CudaMatrix,
        tokens: &[u32],
    ) -> Result<()> {
        if !self.in_step {
            let pos0 = self.step_host.as_mut_slice()[0] as usize;
            self.upload_step(Some(tokens), pos0)?;
        }
        let d = table.cols;
        let (out_p, step) = (self.dev.ptr(out), self.dev.ptr(&self.step_buf));
        let (values, scales) = table.args(&self.dev);
        let (name, args) = match &table.data {
            Weights::F32(_) => ("embed_f32", vec![out_p, values, step, int(d)?]),
            Weights::F16(_) => ("embed_f16", vec![out_p, values, step, int(d)?]),
            Weights::BF16(_) => ("embed_bf16", vec![out_p, values, step, int(d)?]),
            Weights::Q8 { gs, .. } => {
                let scales = scales.expect("Q8 matrices have scales");
                let args = vec![out_p, values, scales, int(*gs)?, step, int(d)?];
                ("embed_q8", args)
            }
        };
        let grid = (d.div_ceil(THREADS as usize) as u32, tokens.len() as u32);
        self.dev.launch(name, grid, THREADS, 0, &args)
    }

    fn rmsnorm(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<()> {
        let args = [
            self.dev.ptr(out),
            self.dev.ptr(x),
            self.dev.ptr(weight),
            int(weight.len())?,
            Arg::F32(self.norm_eps),
        ];
        self.dev
            .launch("rmsnorm_f32", (rows as u32, 1), THREADS, 0, &args)
    }

    fn matmul(&mut self, x: &CudaSlice<f32>, rows: usize, outs: &mut Outs) -> Result<()> {
        match one_launch(outs.iter().map(|(w, _)| *w)) {
            Some(kernel) if rows == 1 => self.matvec(kernel, Row::Plain(x), outs, Epilogue::Store),
            _ => self.products(x, rows, outs),
        }
    }

    fn rope(
        &mut self,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        rows: usize,
        pos0: usize,
        c: &Config,
    ) -> Result<()> {
        self.ensure_pos(pos0)?;
        self.rope_in_place(q, k, rows, c)
    }

    fn attention(
        &mut self,
        out: &mut CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut CudaKvCache,
        layer: usize,
        rows: usize,
        pos0: usize,
        c: &Config,
    ) -> Result<()> {
        self.ensure_pos(pos0)?;
        self.kv_store(k, v, cache, layer, rows, c)?;
        self.attend(out, q, cache, layer, rows, c)
    }

    fn silu_mul(
        &mut self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        len: usize,
    ) -> Result<()> {
        let args = [self.dev.ptr(gate), self.dev.ptr(up), int(len)?];
        self.dev.launch_1d("silu_mul_f32", len, &args)
    }

    fn add(&mut self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, len: usize) -> Result<()> {
        let args = [self.dev.ptr(x), self.dev.ptr(y), int(len)?];
        self.dev.launch_1d("add_f32", len, &args)
    }

    fn copy_row(
        &mut self,
        (dst, to): (&mut CudaSlice<f32>, usize),
        (src, from): (&CudaSlice<f32>, usize),
        width: usize,
    ) -> Result<()> {
        let from = src.slice(from * width..(from + 1) * width);
        let mut to = dst.slice_mut(to * width..(to + 1) * width);
        self.dev
            .stream
            .memcpy_dtod(&from, &mut to)
            .map_err(cuda_err("row copy"))
    }

    fn read(&mut self, src: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        let n = out.len();
        if src.len() < n {
            return Err(Error::Backend("read past the end of a buffer".into()));
        }
        if n > PINNED_READ_MAX {
            let from = src.slice(..n);
            self.dev
                .stream
                .memcpy_dtoh(&from, out)
                .map_err(cuda_err("device-to-host copy"))?;
        } else {
            if self.read_host.len() < n {
                self.read_host = Pinned::new(n)?;
            }
            let host = &mut self.read_host.as_mut_slice()[..n];
            // SAFETY: src holds at least n values (checked); the pinned
            // destination stays untouched until the synchronize below.
            unsafe {
                driver::memcpy_dtoh_async(host, self.dev.addr(src), self.dev.stream.cu_stream())
            }
            .map_err(cuda_err("device-to-host copy"))?;
        }
        self.dev.stream.synchronize().map_err(cuda_err("step"))?;
        self.step_copy_queued = false;
        if n <= PINNED_READ_MAX {
            out.copy_from_slice(&self.read_host.as_mut_slice()[..n]);
        }
        Ok(())
    }

    // ------------------------------------------------------------------
    // Fused ops: one launch where a kernel can do the work of several

    fn norm_matmul(
        &mut self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
        normed: &mut CudaSlice<f32>,
        outs: &mut Outs,
    ) -> Result<()> {
        let kernel = one_launch(outs.iter().map(|(w, _)| *w));
        match kernel {
            Some(kernel) if rows == 1 && weight.len() == outs[0].0.cols => {
                let row = Row::Normed { x, weight };
                self.matvec(kernel, row, outs, Epilogue::Store)
            }
            _ => {
                self.rmsnorm(normed, x, weight, rows)?;
                self.matmul(normed, rows, outs)
            }
        }
    }

    fn rope_attention(
        &mut self,
        out: &mut CudaSlice<f32>,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut CudaKvCache,
        layer: usize,
        rows: usize,
        pos0: usize,
        c: &Config,
    ) -> Result<()> {
        self.ensure_pos(pos0)?;
        if c.kv_dim().is_multiple_of(2) {
            self.rope_kv_store(q, k, v, cache, layer, rows, c)?;
        } else {
            self.rope_in_place(q, k, rows, c)?;
            self.kv_store(k, v, cache, layer, rows, c)?;
        }
        self.attend(out, q, cache, layer, rows, c)
    }

    fn matmul_add(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        proj: &mut CudaSlice<f32>,
        residual: &mut CudaSlice<f32>,
        c: &Config,
    ) -> Result<()> {
        match one_launch([w]) {
            Some(kernel) if rows == 1 && w.rows == c.dim => {
                let epilogue = Epilogue::Residual(residual);
                self.matvec(kernel, Row::Plain(x), &mut [(w, proj)], epilogue)
            }
            _ => {
                self.matmul(x, rows, &mut [(w, &mut *proj)])?;
                self.add(residual, proj, rows * c.dim)
            }
        }
    }

    fn norm_swiglu(
        &mut self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
        normed: &mut CudaSlice<f32>,
        (w1, w3): (&CudaMatrix, &CudaMatrix),
        gate: &mut CudaSlice<f32>,
        up: &mut CudaSlice<f32>,
        c: &Config,
    ) -> Result<()> {
        let pair = w1.rows == c.hidden_dim && w3.rows == c.hidden_dim;
        match one_launch([w1, w3]) {
            Some(kernel) if rows == 1 && pair && weight.len() == w1.cols => {
                let row = Row::Normed { x, weight };
                self.matvec(kernel, row, &mut [(w1, gate), (w3, up)], Epilogue::SwiGlu)
            }
            _ => {
                let outs = &mut [(w1, &mut *gate), (w3, &mut *up)];
                self.norm_matmul(x, weight, rows, normed, outs)?;
                self.silu_mul(gate, up, rows * c.hidden_dim)
            }
        }
    }
}
