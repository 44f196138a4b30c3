//! `CudaBackend`: the `Backend` ops on the GPU. Weights live on the device in
//! their storage type (f32, f16, bf16 or Q8_0); activations are f32; the KV
//! cache is f16 for f16/bf16 models and f32 otherwise. A decode step (one
//! token) is recorded once as a CUDA graph and replayed for every later
//! token: the kernels read the token ids and the position from a small device
//! buffer that `step` fills before each launch.
//!
//! Inside a step, a one-row product, a one-row RMS norm and a rope are held
//! back (`Pending`) until the next op, so that op can be fused into the same
//! launch: the residual add and the SwiGLU gate into the product's epilogue,
//! the norm into the product that reads it (for Q8, into the activation
//! quantization), the KV store into the rope. Every other op launches what
//! is pending first. A norm folded into a product leaves its output buffer
//! unwritten: the forward pass reads it only through that product.

use cudarc::driver::{result as driver, sys, CudaGraph, CudaSlice};
use llama2::quant::group_size_for;
use llama2::tensor::MatrixData;
use llama2::{Backend, Config, DType, Error, HostMatrix, Result};

use crate::device::{cuda_err, int, Arg, Device, Pinned};
use crate::gemm::{Gemm, GemmType};

/// Prompt tokens processed together in one batched step.
const MAX_BATCH: usize = 512;
/// Threads per block of the batched matmul kernels: 8 warps, one weight row each.
const MATMUL_THREADS: u32 = 256;
/// Threads per block of the decode matvec kernels: 4 warps, one weight row
/// (or SwiGLU row pair) each; small blocks spread small matrices over more SMs.
const MATVEC_THREADS: u32 = 128;
/// Epilogues of the decode matvec kernels (`kernels/matvec.cu`).
const MODE_PLAIN: i32 = 0;
const MODE_RESIDUAL: i32 = 1;
const MODE_SWIGLU: i32 = 2;
/// Largest read (in f32 values) staged through pinned host memory; longer
/// ones (all-logits prefill reads) copy straight into the caller's slice.
const PINNED_READ_MAX: usize = 1 << 20;
/// Batch rows the `matmul_*` kernels apply each weight chunk to.
const MATMUL_ROWS: usize = 8;
/// Threads per attention block.
const ATTENTION_THREADS: usize = 256;
/// Threads per block of the split decode attention (`attention_split_*`).
const SPLIT_THREADS: usize = 128;
/// Threads of the fused RMS norm + Q8 quantization (one block per row).
const NORM_QUANTIZE_THREADS: u32 = 1024;
/// Shared memory a kernel may use without opting in to more.
const SHARED_LIMIT: usize = 48 * 1024;

/// A weight matrix's device storage.
enum Weights {
    F32(CudaSlice<f32>),  // [rows * cols]
    F16(CudaSlice<u16>),  // [rows * cols] f16 bit patterns
    BF16(CudaSlice<u16>), // [rows * cols] bf16 bit patterns
    Q8 {
        q: CudaSlice<i8>,       // [rows * cols]
        scales: CudaSlice<f32>, // [rows * cols / gs], groups over the flattened matrix
        gs: usize,
    },
}

/// One matrix of a decode matvec launch.
struct MatArgs {
    w: Arg,
    /// The Q8 scales; `None` for the other storage types.
    scales: Option<Arg>,
    /// Output address and row count.
    out: u64,
    n: usize,
}

/// A launch held back until the next op (see the module comment).
enum Pending {
    /// A `matvec_*` launch: up to 3 matrices, then the shared arguments (x
    /// and cols, or xq, xs, cols and gs for Q8), and the RMS norm weights
    /// folded into a float product.
    Matvec {
        kernel: &'static str,
        mats: Vec<MatArgs>,
        tail: Vec<Arg>,
        norm: Option<u64>,
    },
    /// A one-row `rmsnorm_f32` launch: out = rmsnorm(x) * w over `len` values.
    Norm {
        out: u64,
        x: u64,
        w: u64,
        len: usize,
    },
    /// A `rope_f32` launch on q and k (addresses kept to match the attention).
    Rope {
        q: u64,
        k: u64,
        rows: usize,
        args: [Arg; 6],
        grid: (u32, u32),
    },
}

/// A weight matrix `[rows][cols]` on the GPU.
pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    data: Weights,
}

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
    /// The launch held back for fusion with the next op.
    pending: Option<Pending>,
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
    /// Activations rounded to f16/bf16 for GemmEx, grown on demand.
    x16: CudaSlice<u16>, // [rows][cols]
    /// Split decode attention: positions per block, and per-chunk partial
    /// results and per-head finished-chunk counts (sized by `kv_cache`).
    split_chunk: usize,
    split_partial: CudaSlice<f32>, // [heads][ceil(seq_len / split_chunk)][head_size + 2]
    split_done: CudaSlice<u32>,    // [heads], zero between launches
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
        let x16 = dev.zeros(1)?;
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
            pending: None,
            in_step: false,
            xq,
            xs,
            graph: None,
            eager_decodes: 0,
            graphs,
            gemm: None,
            gemm_tried,
            x16,
            split_chunk: 0,
            split_partial,
            split_done,
        })
    }

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

    /// The position of the last uploaded step.
    fn last_pos0(&mut self) -> usize {
        self.step_host.as_mut_slice()[0] as usize
    }

    /// Launches whatever is held back, unfused.
    fn flush(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(Pending::Matvec {
                kernel,
                mats,
                tail,
                norm,
            }) => self.launch_matvec(kernel, &mats, &tail, MODE_PLAIN, None, norm),
            Some(Pending::Norm { out, x, w, len }) => {
                let args = [Arg::Ptr(out), Arg::Ptr(x), Arg::Ptr(w), int(len)?];
                self.dev.launch("rmsnorm_f32", (1, 1), 256, 0, &args)
            }
            Some(Pending::Rope { args, grid, .. }) => {
                self.dev.launch("rope_f32", grid, 256, 0, &args)
            }
        }
    }

    /// One `matvec_*` launch over `mats` with epilogue `mode` (`res` is the
    /// residual stream for MODE_RESIDUAL; `norm` the RMS norm weights folded
    /// into a float product).
    fn launch_matvec(
        &self,
        kernel: &str,
        mats: &[MatArgs],
        tail: &[Arg],
        mode: i32,
        res: Option<u64>,
        norm: Option<u64>,
    ) -> Result<()> {
        let q8 = mats[0].scales.is_some();
        let mut args = Vec::with_capacity(20);
        for m in 0..3 {
            match mats.get(m) {
                Some(a) => {
                    args.push(a.w);
                    args.extend(a.scales);
                    args.push(Arg::Ptr(a.out));
                    args.push(int(a.n)?);
                }
                None => {
                    args.push(Arg::Ptr(0));
                    if q8 {
                        args.push(Arg::Ptr(0));
                    }
                    args.extend([Arg::Ptr(0), Arg::I32(0)]);
                }
            }
        }
        args.extend_from_slice(tail);
        args.push(Arg::Ptr(res.unwrap_or(0)));
        args.push(Arg::I32(mode));
        if !q8 {
            args.push(Arg::Ptr(norm.unwrap_or(0)));
        }
        let warps = if mode == MODE_SWIGLU {
            mats[0].n
        } else {
            mats.iter().map(|m| m.n).sum()
        };
        let blocks = warps.div_ceil((MATVEC_THREADS / 32) as usize) as u32;
        self.dev
            .launch(kernel, (blocks, 1), MATVEC_THREADS, 0, &args)
    }

    /// `out = w · x` for one activation row and each pair of `outs`: one
    /// launch when the matrices share a storage type (and Q8 group size),
    /// held back inside a step for fusion with the next op. `norm` is a held
    /// back RMS norm that wrote x, folded into this launch (or launched first
    /// when the product cannot take it).
    fn matvec(
        &mut self,
        x: &CudaSlice<f32>,
        outs: &mut [(&CudaMatrix, &mut CudaSlice<f32>)],
        norm: Option<Pending>,
    ) -> Result<()> {
        let key = |w: &CudaMatrix| match &w.data {
            Weights::F32(_) => ("matvec_f32", 0),
            Weights::F16(_) => ("matvec_f16", 0),
            Weights::BF16(_) => ("matvec_bf16", 0),
            Weights::Q8 { gs, .. } => {
                let fast = matches!(gs, 16 | 32 | 64) && w.cols.is_multiple_of(*gs);
                ("matvec_q8", if fast { *gs } else { 1 })
            }
        };
        let (kernel, gs) = key(outs[0].0);
        let cols = outs[0].0.cols;
        let fused = outs.len() <= 3
            && gs != 1
            && outs
                .iter()
                .all(|(w, _)| key(w) == (kernel, gs) && w.cols == cols);
        let norm = match norm {
            Some(Pending::Norm { x, w, len, .. }) if fused && len == cols => Some((x, w)),
            other => {
                self.pending = other;
                self.flush()?;
                None
            }
        };
        if !fused {
            let mut quantized = None;
            let mut staged = None;
            for (w, out) in outs.iter_mut() {
                self.product(x, 1, w, out, &mut quantized, &mut staged)?;
            }
            return Ok(());
        }
        let tail = if gs == 0 {
            let input = norm.map_or(self.dev.addr(x), |(raw, _)| raw);
            vec![Arg::Ptr(input), int(cols)?]
        } else {
            if let Some((raw, w)) = norm {
                self.norm_quantize(raw, w, cols, gs)?;
            } else {
                self.quantize(x, 1, cols, gs)?;
            }
            vec![
                self.dev.ptr(&self.xq),
                self.dev.ptr(&self.xs),
                int(cols)?,
                int(gs)?,
            ]
        };
        let mats = outs
            .iter()
            .map(|(m, out)| {
                let (w, scales) = match &m.data {
                    Weights::F32(d) => (self.dev.ptr(d), None),
                    Weights::F16(d) | Weights::BF16(d) => (self.dev.ptr(d), None),
                    Weights::Q8 { q, scales, .. } => (self.dev.ptr(q), Some(self.dev.ptr(scales))),
                };
                MatArgs {
                    w,
                    scales,
                    out: self.dev.addr(out),
                    n: m.rows,
                }
            })
            .collect::<Vec<_>>();
        let norm = if gs == 0 { norm.map(|(_, w)| w) } else { None };
        if self.in_step {
            self.pending = Some(Pending::Matvec {
                kernel,
                mats,
                tail,
                norm,
            });
            Ok(())
        } else {
            self.launch_matvec(kernel, &mats, &tail, MODE_PLAIN, None, norm)
        }
    }

    /// The RMS norm of the row at `x` (weights `w`, `cols` values) quantized
    /// in groups of `gs` into the Q8 scratch, in one launch.
    fn norm_quantize(&mut self, x: u64, w: u64, cols: usize, gs: usize) -> Result<()> {
        self.reserve_q8(1, cols, gs)?;
        let args = [
            self.dev.ptr(&self.xq),
            self.dev.ptr(&self.xs),
            Arg::Ptr(x),
            Arg::Ptr(w),
            int(cols)?,
            int(gs)?,
        ];
        self.dev.launch(
            "rmsnorm_quantize_q8",
            (1, 1),
            NORM_QUANTIZE_THREADS,
            0,
            &args,
        )
    }

    /// Quantizes `rows` x `cols` of x in groups of `gs` into the Q8 scratch.
    fn quantize(&mut self, x: &CudaSlice<f32>, rows: usize, cols: usize, gs: usize) -> Result<()> {
        self.reserve_q8(rows, cols, gs)?;
        // One warp per group.
        let warps = rows * cols.div_ceil(gs);
        let args = [
            self.dev.ptr(&self.xq),
            self.dev.ptr(&self.xs),
            self.dev.ptr(x),
            int(rows)?,
            int(cols)?,
            int(gs)?,
        ];
        let blocks = warps.div_ceil(8) as u32;
        self.dev.launch("quantize_q8", (blocks, 1), 256, 0, &args)
    }

    /// Outside `step`, ops are called one by one: the position then comes
    /// from the call instead of the step buffer.
    fn ensure_pos(&mut self, pos0: usize) -> Result<()> {
        if self.in_step {
            return Ok(());
        }
        self.upload_step(None, pos0)
    }

    /// A device matrix of `rows` x `cols` in `dtype` from f32 values on the
    /// device, converted there.
    fn convert_on_device(
        &mut self,
        f32s: CudaSlice<f32>,
        rows: usize,
        cols: usize,
        dtype: DType,
        gs: usize,
    ) -> Result<CudaMatrix> {
        let n = rows * cols;
        let src = self.dev.ptr(&f32s);
        let data = match dtype {
            DType::F32 => Weights::F32(f32s),
            DType::F16 | DType::BF16 => {
                let out = self.dev.zeros::<u16>(n)?;
                let kernel = if dtype == DType::F16 {
                    "convert_f16"
                } else {
                    "convert_bf16"
                };
                let args = [self.dev.ptr(&out), src, Arg::U64(n as u64)];
                self.dev.launch_1d(kernel, n, &args)?;
                if dtype == DType::F16 {
                    Weights::F16(out)
                } else {
                    Weights::BF16(out)
                }
            }
            DType::Q8 => {
                let q = self.dev.zeros::<i8>(n)?;
                let scales = self.dev.zeros::<f32>(n / gs)?;
                let groups = (n / gs) as u64;
                let args = [
                    self.dev.ptr(&q),
                    self.dev.ptr(&scales),
                    src,
                    Arg::U64(groups),
                    int(gs)?,
                ];
                self.dev.launch_1d("convert_q8", n / gs, &args)?;
                Weights::Q8 { q, scales, gs }
            }
        };
        // The temporary f32 copy is freed when this returns; finish using it.
        self.dev
            .stream
            .synchronize()
            .map_err(cuda_err("weight conversion"))?;
        Ok(CudaMatrix { rows, cols, data })
    }

    /// Uploads a host matrix as it is stored.
    fn upload_as_is(&mut self, m: &HostMatrix) -> Result<CudaMatrix> {
        let data = match &m.data {
            MatrixData::F32(d) => Weights::F32(self.dev.upload(d)?),
            MatrixData::F16(d) => Weights::F16(self.dev.upload(bytemuck::cast_slice::<_, u16>(d))?),
            MatrixData::BF16(d) => {
                Weights::BF16(self.dev.upload(bytemuck::cast_slice::<_, u16>(d))?)
            }
            MatrixData::Q8(d) => Weights::Q8 {
                q: self.dev.upload(&d.q)?,
                scales: self.dev.upload(&d.scales)?,
                gs: d.group_size,
            },
        };
        Ok(CudaMatrix {
            rows: m.rows,
            cols: m.cols,
            data,
        })
    }

    /// Grows the Q8 activation scratch to hold `rows` x `cols` in groups of
    /// `gs`. A recorded graph holds the old addresses, so it is dropped.
    fn reserve_q8(&mut self, rows: usize, cols: usize, gs: usize) -> Result<()> {
        let (nq, ns) = (rows * cols, rows * cols.div_ceil(gs));
        if self.xq.len() < nq || self.xs.len() < ns {
            self.xq = self.dev.zeros(nq.max(self.xq.len()))?;
            self.xs = self.dev.zeros(ns.max(self.xs.len()))?;
            self.graph = None;
            self.eager_decodes = 0;
        }
        Ok(())
    }

    /// `out[r] = w · x[r]` for one matrix, one launch on its own; `quantized`
    /// says which group size x is already quantized with in the Q8 scratch,
    /// `staged` which type x is already rounded to in `x16` (shared inputs).
    fn product(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        out: &mut CudaSlice<f32>,
        quantized: &mut Option<usize>,
        staged: &mut Option<GemmType>,
    ) -> Result<()> {
        let warps = (MATMUL_THREADS / 32) as usize;
        let blocks = w.rows.div_ceil(warps) as u32;
        let (batched, row_blocks) = if rows == 1 {
            (false, 1)
        } else {
            (true, rows.div_ceil(MATMUL_ROWS) as u32)
        };
        let dims = [int(w.rows)?, int(w.cols)?, int(rows)?];
        let (op, wptr) = match &w.data {
            Weights::F32(d) => ("f32", self.dev.ptr(d)),
            Weights::F16(d) => ("f16", self.dev.ptr(d)),
            Weights::BF16(d) => ("bf16", self.dev.ptr(d)),
            Weights::Q8 { q, scales, gs } => {
                return self.product_q8(x, rows, w, (q, scales, *gs), out, quantized)
            }
        };
        if !batched {
            let mats = [MatArgs {
                w: wptr,
                scales: None,
                out: self.dev.addr(out),
                n: w.rows,
            }];
            let tail = [self.dev.ptr(x), dims[1]];
            let kernel = match op {
                "f16" => "matvec_f16",
                "bf16" => "matvec_bf16",
                _ => "matvec_f32",
            };
            return self.launch_matvec(kernel, &mats, &tail, MODE_PLAIN, None, None);
        }
        if self.gemm_product(op, wptr, x, rows, w, out, staged)? {
            return Ok(());
        }
        let args = [
            self.dev.ptr(out),
            wptr,
            self.dev.ptr(x),
            dims[0],
            dims[1],
            dims[2],
        ];
        self.dev.launch(
            &format!("matmul_{op}"),
            (blocks, row_blocks),
            MATMUL_THREADS,
            0,
            &args,
        )
    }

    /// The batched product through cuBLAS; false when cuBLAS is unavailable.
    #[allow(clippy::too_many_arguments)]
    fn gemm_product(
        &mut self,
        op: &str,
        wptr: Arg,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        out: &mut CudaSlice<f32>,
        staged: &mut Option<GemmType>,
    ) -> Result<bool> {
        if !self.gemm_tried {
            self.gemm_tried = true;
            self.gemm = Gemm::new(self.dev.stream.clone()).ok();
        }
        if self.gemm.is_none() {
            return Ok(false);
        }
        let (ty, convert) = match op {
            "f16" => (GemmType::F16, Some("convert_f16")),
            "bf16" => (GemmType::BF16, Some("convert_bf16")),
            _ => (GemmType::F32, None),
        };
        let n = rows * w.cols;
        let xin = match convert {
            None => self.dev.addr(x),
            Some(kernel) => {
                if *staged != Some(ty) {
                    if self.x16.len() < n {
                        self.x16 = self.dev.zeros(n)?;
                    }
                    let args = [self.dev.ptr(&self.x16), self.dev.ptr(x), Arg::U64(n as u64)];
                    self.dev.launch_1d(kernel, n, &args)?;
                    *staged = Some(ty);
                }
                self.dev.addr(&self.x16)
            }
        };
        let Arg::Ptr(waddr) = wptr else {
            return Err(Error::Backend("weight argument is not an address".into()));
        };
        let gemm = self.gemm.as_ref().expect("checked above");
        // SAFETY: the weight holds w.rows * w.cols values, x (or its rounded
        // copy) rows * cols, out rows * w.rows (the model's buffer shapes).
        unsafe { gemm.run(ty, waddr, xin, self.dev.addr(out), w.rows, w.cols, rows) }?;
        Ok(true)
    }

    /// The W8A8 product: quantize x (once per group size), then int8 dots.
    fn product_q8(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        w: &CudaMatrix,
        (q, scales, gs): (&CudaSlice<i8>, &CudaSlice<f32>, usize),
        out: &mut CudaSlice<f32>,
        quantized: &mut Option<usize>,
    ) -> Result<()> {
        let cols = w.cols;
        if *quantized != Some(gs) {
            self.quantize(x, rows, cols, gs)?;
            *quantized = Some(gs);
        }
        let args = [
            self.dev.ptr(out),
            self.dev.ptr(q),
            self.dev.ptr(scales),
            self.dev.ptr(&self.xq),
            self.dev.ptr(&self.xs),
            int(w.rows)?,
            int(cols)?,
            int(gs)?,
            int(rows)?,
        ];
        let fast = matches!(gs, 16 | 32 | 64) && cols.is_multiple_of(gs);
        if !fast {
            let n = w.rows * rows;
            return self.dev.launch(
                "matvec_q8_generic",
                (n.div_ceil(128) as u32, 1),
                128,
                0,
                &args,
            );
        }
        if rows == 1 {
            let mats = [MatArgs {
                w: self.dev.ptr(q),
                scales: Some(self.dev.ptr(scales)),
                out: self.dev.addr(out),
                n: w.rows,
            }];
            let tail = [
                self.dev.ptr(&self.xq),
                self.dev.ptr(&self.xs),
                int(cols)?,
                int(gs)?,
            ];
            return self.launch_matvec("matvec_q8", &mats, &tail, MODE_PLAIN, None, None);
        }
        let blocks = w.rows.div_ceil((MATMUL_THREADS / 32) as usize) as u32;
        let row_blocks = rows.div_ceil(MATMUL_ROWS) as u32;
        self.dev
            .launch("matmul_q8", (blocks, row_blocks), MATMUL_THREADS, 0, &args)
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

    /// The kernel arguments naming a cache's key and value arrays.
    fn cache_ptrs(&self, cache: &CudaKvCache) -> (Arg, Arg, &'static str) {
        match cache {
            CudaKvCache::F32 { keys, values } => (self.dev.ptr(keys), self.dev.ptr(values), "f32"),
            CudaKvCache::F16 { keys, values } => (self.dev.ptr(keys), self.dev.ptr(values), "f16"),
        }
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
        let Some(dtype) = self.dtype else {
            return self.upload_as_is(m);
        };
        let gs = group_size_for(m.cols);
        let same_groups = match &m.data {
            MatrixData::Q8(d) => d.group_size == gs,
            _ => true,
        };
        if dtype == m.dtype() && same_groups {
            return self.upload_as_is(m);
        }
        match &m.data {
            MatrixData::F32(d) => {
                let f32s = self.dev.upload(d)?;
                self.convert_on_device(f32s, m.rows, m.cols, dtype, gs)
            }
            _ => self.upload_as_is(&m.convert(dtype, gs)),
        }
    }

    fn random_matrix(&mut self, rows: usize, cols: usize, seed: u64) -> Result<CudaMatrix> {
        let n = rows * cols;
        let f32s = self.dev.zeros::<f32>(n)?;
        let scale = (3.0 / cols as f32).sqrt();
        let args = [
            self.dev.ptr(&f32s),
            Arg::U64(n as u64),
            Arg::U64(seed),
            Arg::F32(scale),
        ];
        self.dev.launch_1d("random_f32", n, &args)?;
        let dtype = self.dtype.unwrap_or(DType::F32);
        self.convert_on_device(f32s, rows, cols, dtype, group_size_for(cols))
    }

    fn upload_vector(&mut self, v: &[f32]) -> Result<CudaSlice<f32>> {
        self.dev.upload(v)
    }

    fn buffer(&mut self, len: usize) -> Result<CudaSlice<f32>> {
        self.dev.zeros(len)
    }

    fn kv_cache(&mut self, c: &Config) -> Result<CudaKvCache> {
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

    fn step(
        &mut self,
        tokens: &[u32],
        pos0: usize,
        ops: &mut dyn FnMut(&mut Self) -> Result<()>,
    ) -> Result<()> {
        self.flush()?;
        self.upload_step(Some(tokens), pos0)?;
        self.in_step = true;
        // The step's last op may have been held back: launch it inside the step.
        let mut run = |b: &mut Self| {
            ops(b)?;
            b.flush()
        };
        let result = if tokens.len() != 1 || !self.graphs {
            run(self)
        } else if let Some(graph) = &self.graph {
            graph.launch().map_err(cuda_err("graph launch"))
        } else if self.eager_decodes == 0 {
            self.eager_decodes += 1;
            run(self)
        } else {
            self.capture(&mut run)
        };
        self.in_step = false;
        self.pending = None;
        result
    }

    fn embed(
        &mut self,
        out: &mut CudaSlice<f32>,
        table: &CudaMatrix,
        tokens: &[u32],
    ) -> Result<()> {
        self.flush()?;
        if !self.in_step {
            let pos0 = self.last_pos0();
            self.upload_step(Some(tokens), pos0)?;
        }
        let d = table.cols;
        let (out_p, step) = (self.dev.ptr(out), self.dev.ptr(&self.step_buf));
        let grid = (d.div_ceil(256) as u32, tokens.len() as u32);
        let (name, args) = match &table.data {
            Weights::F32(t) => ("embed_f32", vec![out_p, self.dev.ptr(t), step, int(d)?]),
            Weights::F16(t) => ("embed_f16", vec![out_p, self.dev.ptr(t), step, int(d)?]),
            Weights::BF16(t) => ("embed_bf16", vec![out_p, self.dev.ptr(t), step, int(d)?]),
            Weights::Q8 { q, scales, gs } => (
                "embed_q8",
                vec![
                    out_p,
                    self.dev.ptr(q),
                    self.dev.ptr(scales),
                    int(*gs)?,
                    step,
                    int(d)?,
                ],
            ),
        };
        self.dev.launch(name, grid, 256, 0, &args)
    }

    fn rmsnorm(
        &mut self,
        out: &mut CudaSlice<f32>,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<()> {
        self.flush()?;
        if self.in_step && rows == 1 {
            self.pending = Some(Pending::Norm {
                out: self.dev.addr(out),
                x: self.dev.addr(x),
                w: self.dev.addr(weight),
                len: weight.len(),
            });
            return Ok(());
        }
        let args = [
            self.dev.ptr(out),
            self.dev.ptr(x),
            self.dev.ptr(weight),
            int(weight.len())?,
        ];
        self.dev
            .launch("rmsnorm_f32", (rows as u32, 1), 256, 0, &args)
    }

    fn matmul(
        &mut self,
        x: &CudaSlice<f32>,
        rows: usize,
        outs: &mut [(&CudaMatrix, &mut CudaSlice<f32>)],
    ) -> Result<()> {
        if rows == 1 && !outs.is_empty() {
            let norm = match self.pending.take() {
                Some(Pending::Norm {
                    out,
                    x: raw,
                    w,
                    len,
                }) if out == self.dev.addr(x) => Some(Pending::Norm {
                    out,
                    x: raw,
                    w,
                    len,
                }),
                other => {
                    self.pending = other;
                    self.flush()?;
                    None
                }
            };
            return self.matvec(x, outs, norm);
        }
        self.flush()?;
        let mut quantized = None;
        let mut staged = None;
        for (w, out) in outs.iter_mut() {
            self.product(x, rows, w, out, &mut quantized, &mut staged)?;
        }
        Ok(())
    }

    fn rope(
        &mut self,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        rows: usize,
        pos0: usize,
        c: &Config,
    ) -> Result<()> {
        self.flush()?;
        self.ensure_pos(pos0)?;
        let args = [
            self.dev.ptr(q),
            self.dev.ptr(k),
            self.dev.ptr(&self.step_buf),
            int(c.dim)?,
            int(c.kv_dim())?,
            int(c.head_size())?,
        ];
        let grid = ((c.dim / 2).div_ceil(256) as u32, rows as u32);
        self.pending = Some(Pending::Rope {
            q: self.dev.addr(q),
            k: self.dev.addr(k),
            rows,
            args,
            grid,
        });
        if self.in_step {
            Ok(())
        } else {
            self.flush()
        }
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
        let (kv, hs) = (c.kv_dim(), c.head_size());
        let layer_off = Arg::U64((layer * c.seq_len * kv) as u64);
        let (kc, vc, ty) = self.cache_ptrs(cache);
        let step = self.dev.ptr(&self.step_buf);
        let roped = matches!(self.pending, Some(Pending::Rope { q: pq, k: pk, rows: pr, .. })
            if pq == self.dev.addr(q) && pk == self.dev.addr(k) && pr == rows);
        if roped && kv.is_multiple_of(2) {
            // Rope and KV store in one launch (the rope's own grid).
            let Some(Pending::Rope { args, grid, .. }) = self.pending.take() else {
                unreachable!("matched above")
            };
            let fused = [
                kc,
                vc,
                args[0],
                args[1],
                self.dev.ptr(v),
                step,
                layer_off,
                args[3],
                args[4],
                args[5],
            ];
            self.dev
                .launch(&format!("rope_kv_store_{ty}"), grid, 256, 0, &fused)?;
        } else {
            self.flush()?;
            self.ensure_pos(pos0)?;
            let store = [
                kc,
                vc,
                self.dev.ptr(k),
                self.dev.ptr(v),
                step,
                layer_off,
                int(kv)?,
                int(rows)?,
            ];
            self.dev.launch(
                &format!("kv_store_{ty}"),
                ((rows * kv).div_ceil(256) as u32, 1),
                256,
                0,
                &store,
            )?;
        }
        if rows == 1 && self.split_chunk > 0 {
            let chunk = self.split_chunk;
            let args = [
                self.dev.ptr(out),
                self.dev.ptr(q),
                kc,
                vc,
                step,
                layer_off,
                int(kv)?,
                int(hs)?,
                int(c.kv_group())?,
                self.dev.ptr(&self.split_partial),
                self.dev.ptr(&self.split_done),
                int(chunk)?,
            ];
            let shared = ((hs + 4 * SPLIT_THREADS + chunk) * 4) as u32;
            let grid = (c.n_heads as u32, c.seq_len.div_ceil(chunk) as u32);
            return self.dev.launch(
                &format!("attention_split_{ty}"),
                grid,
                SPLIT_THREADS as u32,
                shared,
                &args,
            );
        }
        let args = [
            self.dev.ptr(out),
            self.dev.ptr(q),
            kc,
            vc,
            step,
            layer_off,
            int(c.dim)?,
            int(kv)?,
            int(hs)?,
            int(c.kv_group())?,
        ];
        let shared = ((hs + 4 * ATTENTION_THREADS + c.seq_len) * 4) as u32;
        let grid = (c.n_heads as u32, rows as u32);
        self.dev.launch(
            &format!("attention_{ty}"),
            grid,
            ATTENTION_THREADS as u32,
            shared,
            &args,
        )
    }

    fn silu_mul(
        &mut self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        len: usize,
    ) -> Result<()> {
        let pair = matches!(&self.pending, Some(Pending::Matvec { mats, .. })
            if mats.len() == 2
                && mats[0].out == self.dev.addr(gate)
                && mats[1].out == self.dev.addr(up)
                && mats[0].n == len
                && mats[1].n == len);
        if pair {
            let Some(Pending::Matvec {
                kernel,
                mats,
                tail,
                norm,
            }) = self.pending.take()
            else {
                unreachable!("matched above")
            };
            return self.launch_matvec(kernel, &mats, &tail, MODE_SWIGLU, None, norm);
        }
        self.flush()?;
        let args = [self.dev.ptr(gate), self.dev.ptr(up), int(len)?];
        self.dev.launch_1d("silu_mul_f32", len, &args)
    }

    fn add(&mut self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, len: usize) -> Result<()> {
        let single = matches!(&self.pending, Some(Pending::Matvec { mats, .. })
            if mats.len() == 1 && mats[0].out == self.dev.addr(y) && mats[0].n == len);
        if single {
            let Some(Pending::Matvec {
                kernel,
                mats,
                tail,
                norm,
            }) = self.pending.take()
            else {
                unreachable!("matched above")
            };
            let res = Some(self.dev.addr(x));
            return self.launch_matvec(kernel, &mats, &tail, MODE_RESIDUAL, res, norm);
        }
        self.flush()?;
        let args = [self.dev.ptr(x), self.dev.ptr(y), int(len)?];
        self.dev.launch_1d("add_f32", len, &args)
    }

    fn copy_row(
        &mut self,
        dst: &mut CudaSlice<f32>,
        src: &CudaSlice<f32>,
        row: usize,
        width: usize,
    ) -> Result<()> {
        self.flush()?;
        let from = src.slice(row * width..(row + 1) * width);
        let mut to = dst.slice_mut(..width);
        self.dev
            .stream
            .memcpy_dtod(&from, &mut to)
            .map_err(cuda_err("row copy"))
    }

    fn read(&mut self, src: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        self.flush()?;
        let n = out.len();
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
            if src.len() < n {
                return Err(Error::Backend("read past the end of a buffer".into()));
            }
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
}
