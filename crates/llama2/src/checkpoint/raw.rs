//! Tensors as a source file stores them, before they become model weights:
//! a name, an element type, a shape (outermost dimension first, as torch
//! and safetensors write it) and a window of a memory-mapped file. Every
//! reader of a foreign format (safetensors, torch pickle, GGUF) produces
//! these, checked to lie inside their file; turning them into `ModelWeights`
//! is one shared step that knows nothing of where they came from.

use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Element types of stored tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawDType {
    F32,
    F16,
    BF16,
    /// GGUF's Q8_0: blocks of 32 values, each an f16 scale then 32 int8
    /// (34 bytes); the innermost dimension is a multiple of 32.
    Q8_0Blocks,
}

impl RawDType {
    /// Bytes `n` elements take (for Q8_0, `n` must be a multiple of 32).
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        match self {
            RawDType::F32 => n.checked_mul(4),
            RawDType::F16 | RawDType::BF16 => n.checked_mul(2),
            RawDType::Q8_0Blocks => n.is_multiple_of(32).then(|| n / 32 * 34),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RawDType::F32 => "F32",
            RawDType::F16 => "F16",
            RawDType::BF16 => "BF16",
            RawDType::Q8_0Blocks => "Q8_0",
        }
    }
}

/// One stored tensor: `len` bytes at `offset` of `map`.
#[derive(Clone)]
pub struct RawTensor {
    pub name: String,
    pub dtype: RawDType,
    /// Dimensions, outermost first: a `[rows][cols]` matrix is `[rows, cols]`.
    pub shape: Vec<usize>,
    pub map: Arc<Mmap>,
    pub offset: usize,
    pub len: usize,
}

impl std::fmt::Debug for RawTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {:?} at {}+{}",
            self.name,
            self.dtype.name(),
            self.shape,
            self.offset,
            self.len
        )
    }
}

impl RawTensor {
    /// A tensor of `shape` and `dtype` whose data starts at `offset` of
    /// `map`, checked to fit inside the map (with 64-bit arithmetic, so a
    /// lying header cannot overflow).
    pub fn new(
        name: String,
        dtype: RawDType,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        offset: u64,
    ) -> Result<Self> {
        let bad = |why: String| Error::Invalid(format!("tensor {name}: {why}"));
        let numel = shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        let len = dtype.bytes_for(numel).ok_or_else(|| {
            bad(format!(
                "{numel} values cannot be stored as {}",
                dtype.name()
            ))
        })?;
        offset
            .checked_add(len)
            .filter(|&e| e <= map.len() as u64)
            .ok_or_else(|| {
                bad(format!(
                    "its {len} bytes at offset {offset} run past the end of the file ({} bytes)",
                    map.len()
                ))
            })?;
        Ok(RawTensor {
            name,
            dtype,
            shape,
            map,
            offset: offset as usize,
            len: len as usize,
        })
    }

    /// The tensor's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.offset..self.offset + self.len]
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}
