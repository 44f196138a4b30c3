//! Weight matrices on the GPU: uploaded in the file's storage type or
//! converted to the backend's, converted on the device from f32, and random
//! matrices for benchmarks built in place (no host copy of a 7B model).

use cudarc::driver::CudaSlice;
use llama2::quant::group_size_for;
use llama2::tensor::MatrixData;
use llama2::{DType, HostMatrix, Result};

use super::CudaBackend;
use crate::device::{cuda_err, int, Arg, Device};

/// A weight matrix's device storage.
pub(super) enum Weights {
    F32(CudaSlice<f32>),  // [rows * cols]
    F16(CudaSlice<u16>),  // [rows * cols] f16 bit patterns
    BF16(CudaSlice<u16>), // [rows * cols] bf16 bit patterns
    Q8 {
        q: CudaSlice<i8>,       // [rows * cols]
        scales: CudaSlice<f32>, // [rows * cols / gs], groups over the flattened matrix
        gs: usize,
    },
}

/// A weight matrix `[rows][cols]` on the GPU.
pub struct CudaMatrix {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) data: Weights,
}

impl CudaMatrix {
    /// The device address of the values (Q8: the int8 values).
    pub(super) fn values_addr(&self, dev: &Device) -> u64 {
        match &self.data {
            Weights::F32(d) => dev.addr(d),
            Weights::F16(d) | Weights::BF16(d) => dev.addr(d),
            Weights::Q8 { q, .. } => dev.addr(q),
        }
    }

    /// The kernel arguments naming the values, and the Q8 scales (`None`
    /// for the other storage types).
    pub(super) fn args(&self, dev: &Device) -> (Arg, Option<Arg>) {
        match &self.data {
            Weights::F32(d) => (dev.ptr(d), None),
            Weights::F16(d) | Weights::BF16(d) => (dev.ptr(d), None),
            Weights::Q8 { q, scales, .. } => (dev.ptr(q), Some(dev.ptr(scales))),
        }
    }
}

impl CudaBackend {
    /// `m` on the device in the backend's storage type (the file's when the
    /// backend has none), Q8 in groups of `group_size_for(cols)`.
    pub(super) fn matrix_from_host(&mut self, m: &HostMatrix) -> Result<CudaMatrix> {
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
                llama2::tensor::check_representable(d, m.cols, dtype)?;
                let f32s = self.dev.upload(d)?;
                self.convert_on_device(f32s, m.rows, m.cols, dtype, gs)
            }
            _ => self.upload_as_is(&m.convert(dtype, gs)?),
        }
    }

    /// A random `[rows][cols]` matrix (uniform in ±sqrt(3 / cols)) generated
    /// on the device in f32, then converted to the backend's storage type.
    pub(super) fn random_on_device(
        &mut self,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> Result<CudaMatrix> {
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

    /// A device matrix of `rows` x `cols` in `dtype` from f32 values on the
    /// device, converted there.
    fn convert_on_device(
        &mut self,
        f32s: CudaSlice<f32>, // [rows * cols]
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
}
