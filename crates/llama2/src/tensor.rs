//! Host-side weight storage. A weight knows its own type: f32, half precision,
//! or Q8_0 with its group size, so a matmul dispatches on the weight itself
//! and mixed models need no global settings. Data is borrowed straight from
//! the memory-mapped checkpoint when it is aligned, and copied once when not.

use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;

use crate::arena::Region;

/// A read-only array of `T`: a window of a mapped file, an owned vector, or
/// a region of huge pages (`arena`). Clones are cheap (reference counted) in all cases.
#[derive(Clone)]
pub enum Storage<T: Pod> {
    /// `len` elements starting at byte `offset` of `map`; `offset` is
    /// checked to be aligned for `T` when the window is created.
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    Owned(Arc<Vec<T>>),
    /// A region of the CPU backend's huge pages (`arena`).
    Resident(Region),
}

impl<T: Pod> Storage<T> {
    /// A window of `len` elements at `offset` in `map`, borrowed when aligned
    /// and copied otherwise. The caller has checked that it lies in the map.
    pub fn from_map(map: &Arc<Mmap>, offset: usize, len: usize) -> Self {
        let bytes = &map[offset..offset + len * std::mem::size_of::<T>()];
        if bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0 {
            Storage::Mapped {
                map: map.clone(),
                offset,
                len,
            }
        } else {
            Storage::Owned(Arc::new(bytemuck::pod_collect_to_vec(bytes)))
        }
    }

    /// Takes ownership of `data`.
    pub fn owned(data: Vec<T>) -> Self {
        Storage::Owned(Arc::new(data))
    }

    /// Whether the array lies in the CPU backend's huge pages (`arena`).
    pub fn is_resident(&self) -> bool {
        matches!(self, Storage::Resident(_))
    }
}

impl<T: Pod> Deref for Storage<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Storage::Mapped { map, offset, len } => {
                bytemuck::cast_slice(&map[*offset..*offset + len * std::mem::size_of::<T>()])
            }
            Storage::Owned(v) => v,
            Storage::Resident(region) => bytemuck::cast_slice(region.bytes()),
        }
    }
}

impl<T: Pod + std::fmt::Debug> std::fmt::Debug for Storage<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage[{}]", self.len())
    }
}

/// Q8_0 data: int8 values in groups of `group_size` consecutive elements of
/// the flattened tensor, each group with one f32 scale. Groups may straddle
/// matrix rows.
#[derive(Clone, Debug)]
pub struct Q8Data {
    /// Quantized values, one per element.
    pub q: Storage<i8>,
    /// One scale per group: `q.len() / group_size` of them.
    pub scales: Storage<f32>,
    pub group_size: usize,
}

/// The element storage of a weight matrix.
#[derive(Clone, Debug)]
pub enum MatrixData {
    F32(Storage<f32>),
    F16(Storage<f16>),
    BF16(Storage<bf16>),
    Q8(Q8Data),
}

/// A weight matrix `[rows][cols]`, row-major: a matvec reads one row per output.
#[derive(Clone, Debug)]
pub struct HostMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
}

/// The storage types a matrix can have, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8,
}

impl DType {
    /// Bytes per element, counting Q8 scales for the given group size.
    pub fn bytes_per_element(self, group_size: usize) -> f64 {
        match self {
            DType::F32 => 4.0,
            DType::F16 | DType::BF16 => 2.0,
            DType::Q8 => 1.0 + 4.0 / group_size.max(1) as f64,
        }
    }

    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8 => "q8",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(DType::F32),
            "f16" | "fp16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            "q8" | "q8_0" | "int8" => Ok(DType::Q8),
            _ => Err(format!(
                "unknown dtype '{s}': expected f32, f16, bf16 or q8"
            )),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl HostMatrix {
    /// A matrix over owned f32 data.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), rows * cols);
        HostMatrix {
            rows,
            cols,
            data: MatrixData::F32(Storage::owned(data)),
        }
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            MatrixData::F32(_) => DType::F32,
            MatrixData::F16(_) => DType::F16,
            MatrixData::BF16(_) => DType::BF16,
            MatrixData::Q8(_) => DType::Q8,
        }
    }

    /// Checks that this is a `[rows][cols]` matrix whose storage holds
    /// exactly that many elements (and, for Q8, a scale for every group), so
    /// that hand-built weights fail here instead of deep inside a kernel.
    /// `name` says which matrix in the error.
    pub fn check_shape(&self, name: &str, rows: usize, cols: usize) -> crate::Result<()> {
        let fail = |what: String| Err(crate::Error::Invalid(format!("weight {name}: {what}")));
        if (self.rows, self.cols) != (rows, cols) {
            return fail(format!(
                "expected [{rows}][{cols}], found [{}][{}]",
                self.rows, self.cols
            ));
        }
        let stored = match &self.data {
            MatrixData::F32(d) => d.len(),
            MatrixData::F16(d) => d.len(),
            MatrixData::BF16(d) => d.len(),
            MatrixData::Q8(d) => {
                let groups = d.q.len().checked_div(d.group_size);
                if groups.is_none_or(|g| g * d.group_size != d.q.len() || g != d.scales.len()) {
                    return fail(format!(
                        "{} int8 values in groups of {} need one scale per group, found {}",
                        d.q.len(),
                        d.group_size,
                        d.scales.len()
                    ));
                }
                d.q.len()
            }
        };
        if Some(stored) != rows.checked_mul(cols) {
            return fail(format!(
                "[{rows}][{cols}] needs {} elements, the storage holds {stored}",
                rows.saturating_mul(cols)
            ));
        }
        Ok(())
    }

    /// Bytes this matrix occupies (what a matvec streams).
    pub fn byte_size(&self) -> usize {
        match &self.data {
            MatrixData::F32(d) => d.len() * 4,
            MatrixData::F16(d) => d.len() * 2,
            MatrixData::BF16(d) => d.len() * 2,
            MatrixData::Q8(d) => d.q.len() + d.scales.len() * 4,
        }
    }

    /// Row `r` as f32 values (dequantized or widened as needed).
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        let range = r * self.cols..(r + 1) * self.cols;
        match &self.data {
            MatrixData::F32(d) => d[range].to_vec(),
            MatrixData::F16(d) => d[range].iter().map(|v| v.to_f32()).collect(),
            MatrixData::BF16(d) => d[range].iter().map(|v| v.to_f32()).collect(),
            MatrixData::Q8(d) => range
                .map(|i| d.q[i] as f32 * d.scales[i / d.group_size])
                .collect(),
        }
    }

    /// The whole matrix as f32 values.
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            MatrixData::F32(d) => d.to_vec(),
            _ => (0..self.rows)
                .into_par_iter()
                .flat_map_iter(|r| self.row_f32(r))
                .collect(),
        }
    }

    /// This matrix converted to `dtype` (Q8 with `group_size`), for backends
    /// and tools that store weights in another precision than the file.
    /// Values the target cannot hold (NaN or infinity for Q8, whose scales
    /// would silently absorb them; magnitudes beyond f16's range) are an
    /// error rather than a quiet change of the model.
    pub fn convert(&self, dtype: DType, group_size: usize) -> crate::Result<HostMatrix> {
        let same_groups = match &self.data {
            MatrixData::Q8(d) => d.group_size == group_size,
            _ => true,
        };
        if dtype == self.dtype() && same_groups {
            return Ok(self.clone());
        }
        let values = self.to_f32();
        check_representable(&values, self.cols, dtype)?;
        let data = match dtype {
            DType::F32 => MatrixData::F32(Storage::owned(values)),
            DType::F16 => MatrixData::F16(Storage::owned(
                values.iter().map(|&v| f16::from_f32(v)).collect(),
            )),
            DType::BF16 => MatrixData::BF16(Storage::owned(
                values.iter().map(|&v| bf16::from_f32(v)).collect(),
            )),
            DType::Q8 => MatrixData::Q8(crate::quant::quantize(&values, group_size)),
        };
        Ok(HostMatrix {
            rows: self.rows,
            cols: self.cols,
            data,
        })
    }
}

/// Checks that every value of a matrix with rows of `cols` values survives
/// conversion to `dtype`: Q8 needs finite values; f16 needs magnitudes it
/// can hold (a finite value must not become infinite).
pub fn check_representable(values: &[f32], cols: usize, dtype: DType) -> crate::Result<()> {
    let bad = match dtype {
        DType::Q8 => values.par_iter().position_first(|v| !v.is_finite()),
        DType::F16 => values
            .par_iter()
            .position_first(|&v| v.is_finite() && !f16::from_f32(v).is_finite()),
        DType::F32 | DType::BF16 => None,
    };
    let Some(i) = bad else { return Ok(()) };
    let (r, c) = (i / cols.max(1), i % cols.max(1));
    let why = match dtype {
        DType::Q8 => "int8 quantization cannot represent it; the checkpoint is damaged".to_string(),
        _ => format!(
            "it is beyond f16's range of ±{}; use --dtype bf16 or f32",
            f16::MAX
        ),
    };
    Err(crate::Error::NonFinite(format!(
        "cannot convert to {}: row {r}, column {c} holds {}; {why}",
        dtype.name(),
        values[i]
    )))
}
