//! GGUF, llama.cpp's model file (versions 2 and 3, little-endian): typed
//! metadata (hyper-parameters and the tokenizer), tensor descriptions, and
//! the aligned tensor data, which becomes `RawTensor`s.
//!
//! ```text
//! "GGUF"  u32 version  u64 n_tensors  u64 n_kv
//! n_kv      × { string key, u32 value_type, value }
//! n_tensors × { string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset }
//! padding to `general.alignment` (default 32), then the tensor data: each
//! tensor at data_start + offset, a multiple of the alignment
//!
//! string = u64 length, bytes;  array = u32 element type, u64 count, elements
//! ```
//!
//! `ne` lists dimensions innermost first (`ne[0]` is the row length); the
//! `RawTensor`s made here have them outermost first, like every other reader.
//!
//! Every count, length and offset is checked against the file before it is
//! used, with 64-bit checked arithmetic, so any input either opens or is
//! refused with an error, and no input makes the reader allocate more than a
//! small multiple of the file's size.
//!
//! Tensors of the types the engine computes with (F32, F16, BF16, Q8_0) are
//! `RawTensor`s. Those of any other ggml type (Q4_K, Q6_K, ...) are listed
//! apart and do not stop the file from opening, so its metadata and
//! tokenizer stay readable; asking for one as a weight is the error, and it
//! names the tensor and its type.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::raw::{RawDType, RawTensor};
use crate::error::{Error, Result};
use crate::files;

/// The first four bytes of every GGUF file.
const MAGIC: [u8; 4] = *b"GGUF";
/// Magic, version and the two counts.
const HEADER_BYTES: u64 = 24;
/// The metadata key that sets the data alignment.
const ALIGNMENT_KEY: &str = "general.alignment";
/// Where tensor data is aligned when the file does not say.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are read to this depth: deeper than any real file
/// needs, shallow enough that a crafted one cannot exhaust the stack.
const MAX_ARRAY_DEPTH: u32 = 8;
/// Smallest metadata entry: an empty key, a type and a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest tensor description: an empty name, no dimensions, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 4 + 8;

/// Metadata entries allocated before any is read.
const PREALLOCATED_ENTRIES: u64 = 256;

/// Token type llama.cpp assumes when a file has no `tokenizer.ggml.token_type`.
pub const TOKEN_TYPE_NORMAL: i32 = 1;

/// ggml's tensor types: id, name, values per block, bytes per block (as
/// ggml and gguf-py define them). Ids missing here were removed from ggml
/// or are newer than this table; such tensors can be listed but not sized.
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

/// A ggml tensor type id, as a GGUF tensor description stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    pub const F32: GgmlType = GgmlType(0);
    pub const F16: GgmlType = GgmlType(1);
    pub const Q8_0: GgmlType = GgmlType(8);
    pub const BF16: GgmlType = GgmlType(30);

    /// ggml's name for the type ("Q4_K"), if it is one this reader knows.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|&(_, name, _, _)| name)
    }

    /// The element type of a `RawTensor` of this type, for the types the
    /// engine computes with; `None` for all others.
    pub fn raw_dtype(self) -> Option<RawDType> {
        match self {
            GgmlType::F32 => Some(RawDType::F32),
            GgmlType::F16 => Some(RawDType::F16),
            GgmlType::Q8_0 => Some(RawDType::Q8_0Blocks),
            GgmlType::BF16 => Some(RawDType::BF16),
            _ => None,
        }
    }

    /// Values per block and bytes per block.
    fn layout(self) -> Option<(u64, u64)> {
        self.entry().map(|&(_, _, values, bytes)| (values, bytes))
    }

    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        GGML_TYPES.iter().find(|(id, ..)| *id == self.0)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "ggml type {}", self.0),
        }
    }
}

/// The types of GGUF metadata values, by their ids in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_id(id: u32) -> Option<Self> {
        use ValueType::*;
        const BY_ID: [ValueType; 13] = [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ];
        BY_ID.get(usize::try_from(id).ok()?).copied()
    }

    /// The fewest bytes one value of this type takes in the file (a string
    /// its length, an array its element type and count), which bounds how
    /// many of them the rest of a file can hold.
    fn min_bytes(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }

    fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// A metadata value. GGUF strings are meant to be UTF-8 but are kept as
/// bytes: a vocabulary may hold pieces that are not, and one odd token
/// should not make the whole file unreadable.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(Vec<u8>),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array. Elements share one type, so they are stored as a
/// vector of that type: memory stays proportional to the file, and typed
/// slices (`as_f32s`, `as_strings`) need no conversion.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<Vec<u8>>),
    /// Arrays of arrays; each inner array has its own element type.
    Array(Vec<MetaArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetaValue {
    /// The value of any integer type, if it is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|v| u64::try_from(v).ok())
    }

    /// The value of any integer type, if it fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|v| i64::try_from(v).ok())
    }

    /// The value of any number type (large 64-bit integers are rounded).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(f64::from(v)),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value, if it is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        self.as_bytes().and_then(|b| std::str::from_utf8(b).ok())
    }

    /// A string value's bytes.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            MetaValue::String(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value's type as messages name it: "u32", "string", "array of f32".
    pub fn type_name(&self) -> String {
        match self {
            MetaValue::Array(a) => format!("array of {}", a.element_type_name()),
            other => other.scalar_type().name().to_string(),
        }
    }

    fn scalar_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }

    /// Every integer type fits an i128, so one conversion serves them all.
    fn as_i128(&self) -> Option<i128> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v.into()),
            _ => None,
        }
    }
}

/// Long strings are cut to this many characters when shown in messages.
const SHOWN_CHARS: usize = 60;

impl fmt::Display for MetaValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v:e}"),
            MetaValue::F64(v) => write!(f, "{v:e}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(b) => {
                let text = String::from_utf8_lossy(b);
                let shown: String = text.chars().take(SHOWN_CHARS).collect();
                write!(f, "{shown:?}")?;
                if shown.len() < text.len() {
                    write!(f, "... ({} bytes)", b.len())?;
                }
                Ok(())
            }
            MetaValue::Array(a) => write!(f, "[{} × {}]", a.len(), a.element_type_name()),
        }
    }
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::Array(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements' type: "u8", "string", "array", ...
    pub fn element_type_name(&self) -> &'static str {
        match self {
            MetaArray::U8(_) => "u8",
            MetaArray::I8(_) => "i8",
            MetaArray::U16(_) => "u16",
            MetaArray::I16(_) => "i16",
            MetaArray::U32(_) => "u32",
            MetaArray::I32(_) => "i32",
            MetaArray::F32(_) => "f32",
            MetaArray::Bool(_) => "bool",
            MetaArray::String(_) => "string",
            MetaArray::Array(_) => "array",
            MetaArray::U64(_) => "u64",
            MetaArray::I64(_) => "i64",
            MetaArray::F64(_) => "f64",
        }
    }

    pub fn as_strings(&self) -> Option<&[Vec<u8>]> {
        match self {
            MetaArray::String(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            MetaArray::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i32s(&self) -> Option<&[i32]> {
        match self {
            MetaArray::I32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_arrays(&self) -> Option<&[MetaArray]> {
        match self {
            MetaArray::Array(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of an array of any integer type, if all fit an i64.
    pub fn to_i64s(&self) -> Option<Vec<i64>> {
        fn all<T: Copy>(v: &[T]) -> Option<Vec<i64>>
        where
            i64: TryFrom<T>,
        {
            v.iter().map(|&x| i64::try_from(x).ok()).collect()
        }
        match self {
            MetaArray::U8(v) => all(v),
            MetaArray::I8(v) => all(v),
            MetaArray::U16(v) => all(v),
            MetaArray::I16(v) => all(v),
            MetaArray::U32(v) => all(v),
            MetaArray::I32(v) => all(v),
            MetaArray::U64(v) => all(v),
            MetaArray::I64(v) => all(v),
            _ => None,
        }
    }

    /// The elements of an array of any number type (large 64-bit integers
    /// are rounded).
    pub fn to_f64s(&self) -> Option<Vec<f64>> {
        fn all<T: Copy>(v: &[T], f: fn(T) -> f64) -> Option<Vec<f64>> {
            Some(v.iter().map(|&x| f(x)).collect())
        }
        match self {
            MetaArray::U8(v) => all(v, f64::from),
            MetaArray::I8(v) => all(v, f64::from),
            MetaArray::U16(v) => all(v, f64::from),
            MetaArray::I16(v) => all(v, f64::from),
            MetaArray::U32(v) => all(v, f64::from),
            MetaArray::I32(v) => all(v, f64::from),
            MetaArray::F32(v) => all(v, f64::from),
            MetaArray::U64(v) => all(v, |x| x as f64),
            MetaArray::I64(v) => all(v, |x| x as f64),
            MetaArray::F64(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// A tensor whose ggml type the engine does not compute with. Its extent
/// in the file has been checked when its type is one ggml still defines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsupportedTensor {
    pub name: String,
    pub ggml_type: GgmlType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Where its data starts, in bytes from the start of the file.
    pub offset: u64,
}

/// The tokenizer a GGUF file carries in its `tokenizer.ggml.*` metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocabulary {
    /// Token strings by id, as stored: SentencePiece vocabularies spell a
    /// space as "▁" (U+2581), byte-level BPE ones use GPT-2's byte mapping.
    pub pieces: Vec<Vec<u8>>,
    /// Merge scores by id; all 0 when the file has none (BPE vocabularies).
    pub scores: Vec<f32>,
    /// llama.cpp token types by id (1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte); all normal when the file has none.
    pub token_types: Vec<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// `tokenizer.ggml.model`: "llama" (SentencePiece), "gpt2" (byte-level
    /// BPE), ...
    pub model: String,
}

/// A parsed GGUF file: its metadata, and its tensors in a memory map.
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    /// Tensors of the types the engine computes with, in file order.
    tensors: Vec<RawTensor>,
    /// The others, in file order.
    unsupported: Vec<UnsupportedTensor>,
    by_name: HashMap<String, Slot>,
}

/// Where a tensor name's description lives.
#[derive(Clone, Copy)]
enum Slot {
    Raw(usize),
    Unsupported(usize),
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("unsupported", &self.unsupported.len())
            .finish()
    }
}

/// Opens, validates and maps the GGUF file at `path`.
pub fn open(path: &Path) -> Result<GgufFile> {
    let (file, len) = files::open_regular(path, "GGUF file")?;
    check_file_size(len).map_err(|reason| Error::checkpoint(path, reason))?;
    let map = files::map(&file, len, path)?;
    let layout = read_layout(&map).map_err(|reason| Error::checkpoint(path, reason))?;
    assemble(path, map, layout)
}

/// Validates and maps a GGUF file held in memory (tests and fuzzing): the
/// same checks as `open`, on a private copy of `bytes`.
pub fn from_bytes(bytes: &[u8]) -> Result<GgufFile> {
    let path = Path::new("<memory>");
    let layout = read_layout(bytes).map_err(|reason| Error::checkpoint(path, reason))?;
    // read_layout refused anything shorter than the header, so the map is
    // never empty.
    assemble(path, files::map_copy(bytes, path)?, layout)
}

impl GgufFile {
    /// The format version: 2 or 3 (they differ only in that 3 allows
    /// big-endian files, which this reader refuses).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of tensor data, in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, in file order; keys are unique.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// An integer value: `None` when the key is absent, an error when it
    /// holds something else (or a negative number).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", MetaValue::as_u64)
            .map_err(|reason| Error::checkpoint(&self.path, reason))
    }

    /// A number value: `None` when the key is absent, an error when it
    /// holds something else.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", MetaValue::as_f64)
            .map_err(|reason| Error::checkpoint(&self.path, reason))
    }

    /// A string value: `None` when the key is absent, an error when it
    /// holds something else (or bytes that are not UTF-8).
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a UTF-8 string", MetaValue::as_str)
            .map_err(|reason| Error::checkpoint(&self.path, reason))
    }

    /// An integer value that must be present.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        self.get_u64(key)?.ok_or_else(|| {
            Error::checkpoint(
                &self.path,
                format!("metadata key {key} is missing; expected an integer"),
            )
        })
    }

    /// The tensors of the types the engine computes with (F32, F16, BF16,
    /// Q8_0), in file order. Tensors of other types are in
    /// `unsupported_tensors`.
    pub fn tensors(&self) -> &[RawTensor] {
        &self.tensors
    }

    /// The tensors of types the engine does not compute with, in file order.
    pub fn unsupported_tensors(&self) -> &[UnsupportedTensor] {
        &self.unsupported
    }

    /// The tensor called `name`, to be used as a weight: `Ok(None)` when the
    /// file has none of that name (some are optional, like `output.weight`
    /// in models that share it with the embedding), an error when it has
    /// one of a type the engine does not compute with.
    pub fn tensor(&self, name: &str) -> Result<Option<&RawTensor>> {
        match self.by_name.get(name) {
            None => Ok(None),
            Some(&Slot::Raw(i)) => Ok(Some(&self.tensors[i])),
            Some(&Slot::Unsupported(i)) => Err(self.unsupported_error(&self.unsupported[i])),
        }
    }

    /// The tokenizer in the metadata. Scores and token types are optional
    /// (byte-level BPE vocabularies have no scores), and default as
    /// llama.cpp defaults them: score 0, type normal. BOS and EOS are
    /// `None` when the file does not give them; the caller knows the
    /// model's defaults.
    pub fn vocabulary(&self) -> Result<Vocabulary> {
        self.read_vocabulary()
            .map_err(|reason| Error::tokenizer(&self.path, reason))
    }

    fn read_vocabulary(&self) -> Result<Vocabulary, String> {
        let model = self
            .typed("tokenizer.ggml.model", "a UTF-8 string", MetaValue::as_str)?
            .ok_or("the file has no tokenizer (no tokenizer.ggml.model key)")?
            .to_string();
        let pieces = self
            .typed("tokenizer.ggml.tokens", "an array of strings", |v| {
                v.as_array()?.as_strings()
            })?
            .ok_or("the file has no tokenizer.ggml.tokens")?
            .to_vec();
        let n = pieces.len();
        if u32::try_from(n).is_err() {
            return Err(format!(
                "tokenizer.ggml.tokens has {n} tokens, more than 32-bit ids can number"
            ));
        }
        let scores = self
            .per_token("tokenizer.ggml.scores", n, "an array of numbers", |a| {
                Some(match a.as_f32s() {
                    Some(s) => s.to_vec(),
                    None => a.to_f64s()?.into_iter().map(|s| s as f32).collect(),
                })
            })?
            .unwrap_or_else(|| vec![0.0; n]);
        let token_types = self
            .per_token(
                "tokenizer.ggml.token_type",
                n,
                "an array of 32-bit integers",
                |a| match a.as_i32s() {
                    Some(t) => Some(t.to_vec()),
                    None => a
                        .to_i64s()?
                        .into_iter()
                        .map(|t| i32::try_from(t).ok())
                        .collect(),
                },
            )?
            .unwrap_or_else(|| vec![TOKEN_TYPE_NORMAL; n]);
        Ok(Vocabulary {
            bos: self.token_id("tokenizer.ggml.bos_token_id", n)?,
            eos: self.token_id("tokenizer.ggml.eos_token_id", n)?,
            pieces,
            scores,
            token_types,
            model,
        })
    }

    /// An array with one value per token, converted by `convert`.
    fn per_token<T>(
        &self,
        key: &str,
        n: usize,
        expected: &str,
        convert: impl Fn(&MetaArray) -> Option<Vec<T>>,
    ) -> Result<Option<Vec<T>>, String> {
        let Some(values) = self.typed(key, expected, |v| convert(v.as_array()?))? else {
            return Ok(None);
        };
        if values.len() != n {
            return Err(format!(
                "{key} has {} values but tokenizer.ggml.tokens has {n} tokens",
                values.len()
            ));
        }
        Ok(Some(values))
    }

    /// A token id, checked to name one of the `n` tokens.
    fn token_id(&self, key: &str, n: usize) -> Result<Option<u32>, String> {
        let Some(id) = self.typed(key, "a non-negative integer", MetaValue::as_u64)? else {
            return Ok(None);
        };
        match u32::try_from(id) {
            Ok(id) if (id as usize) < n => Ok(Some(id)),
            _ => Err(format!(
                "{key} is {id}, but the vocabulary has only {n} tokens"
            )),
        }
    }

    /// The value of `key` converted by `convert`: `None` when the key is
    /// absent, an error saying what was `expected` when it does not convert.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a MetaValue) -> Option<T>,
    ) -> Result<Option<T>, String> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        convert(value).map(Some).ok_or_else(|| {
            format!(
                "metadata key {key} is {value} (a {}); expected {expected}",
                value.type_name()
            )
        })
    }

    fn unsupported_error(&self, t: &UnsupportedTensor) -> Error {
        Error::checkpoint(
            &self.path,
            format!(
                "tensor {} is stored as {}, which this engine cannot compute with; the \
                 supported tensor types are F32, F16, BF16 and Q8_0 (convert the model again, \
                 e.g. with llama.cpp's convert_hf_to_gguf.py --outtype q8_0, f16, bf16 or f32)",
                t.name, t.ggml_type
            ),
        )
    }
}

/// What the header and tensor descriptions say, all checked against the
/// file's length.
struct Layout {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<CheckedTensor>,
}

/// A tensor description whose data has been checked to lie in the file.
struct CheckedTensor {
    name: String,
    ggml_type: GgmlType,
    /// Outermost first.
    shape: Vec<usize>,
    /// From the start of the file.
    start: u64,
}

/// A tensor description as the file gives it.
struct TensorInfo {
    name: String,
    /// Innermost first, as ggml's `ne`.
    dims: Vec<u64>,
    ggml_type: GgmlType,
    /// From the start of the data section.
    offset: u64,
}

/// Files shorter than the header, or too long to map, are refused before
/// anything is read.
fn check_file_size(len: u64) -> Result<(), String> {
    if len < HEADER_BYTES {
        return Err(format!(
            "the file is {len} bytes, shorter than the {HEADER_BYTES}-byte GGUF header"
        ));
    }
    if usize::try_from(len).is_err() {
        return Err(format!(
            "{len} bytes do not fit in this machine's address space"
        ));
    }
    Ok(())
}

/// Parses and checks everything but the tensor data itself.
fn read_layout(bytes: &[u8]) -> Result<Layout, String> {
    let file_len = bytes.len() as u64;
    check_file_size(file_len)?;
    let mut r = Reader { bytes, pos: 0 };
    let version = read_preamble(&mut r)?;
    let n_tensors = r.count("the tensor count", MIN_TENSOR_INFO_BYTES)?;
    let n_kv = r.count("the metadata count", MIN_KV_BYTES)?;
    let metadata = read_metadata(&mut r, n_kv)?;
    let alignment = alignment(&metadata)?;
    let infos = (0..n_tensors)
        .map(|_| read_tensor_info(&mut r))
        .collect::<Result<Vec<_>, _>>()?;
    let data_start = (r.pos as u64)
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| format!("the data section's start overflows at alignment {alignment}"))?;
    let tensors = check_tensors(infos, alignment, data_start, file_len)?;
    Ok(Layout {
        version,
        alignment,
        metadata,
        tensors,
    })
}

/// Magic and version.
fn read_preamble(r: &mut Reader) -> Result<u32, String> {
    let magic: [u8; 4] = r.fixed("the magic")?;
    if magic != MAGIC {
        return Err(format!(
            "it starts with \"{}\", not the GGUF magic \"GGUF\"",
            magic.escape_ascii()
        ));
    }
    match r.u32("the version")? {
        version @ (2 | 3) => Ok(version),
        1 => Err(
            "it is GGUF version 1 (2023, 32-bit counts), which is not supported; \
                  convert the model again with a current llama.cpp"
                .to_string(),
        ),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            Err("it is a big-endian GGUF file; only little-endian files are supported".into())
        }
        v => Err(format!(
            "it is GGUF version {v}; this reader supports versions 2 and 3"
        )),
    }
}

/// `n` key-value pairs, refusing duplicate keys (a lookup could not say
/// which one the writer meant).
fn read_metadata(r: &mut Reader, n: u64) -> Result<Vec<(String, MetaValue)>, String> {
    // Room for a typical file's entries only: a lying count is refused
    // when its entries run out, not paid for in memory up front.
    let mut metadata = Vec::with_capacity(n.min(PREALLOCATED_ENTRIES) as usize);
    let mut seen = HashSet::new();
    for _ in 0..n {
        let at = r.pos;
        let key = r.utf8("a metadata key")?;
        let value = r
            .value_type("the value type")
            .and_then(|ty| read_value(r, ty))
            .map_err(|e| format!("metadata key {key}: {e}"))?;
        if !seen.insert(key.clone()) {
            return Err(format!("at byte {at}: metadata key {key} appears twice"));
        }
        metadata.push((key, value));
    }
    Ok(metadata)
}

/// The alignment `general.alignment` sets, or the default.
fn alignment(metadata: &[(String, MetaValue)]) -> Result<u64, String> {
    let Some((_, value)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    match value.as_u64() {
        Some(a) if a.is_power_of_two() => Ok(a),
        _ => Err(format!(
            "{ALIGNMENT_KEY} is {value} (a {}); expected a power of two",
            value.type_name()
        )),
    }
}

fn read_value(r: &mut Reader, ty: ValueType) -> Result<MetaValue, String> {
    Ok(match ty {
        ValueType::U8 => MetaValue::U8(u8::from_le_bytes(r.fixed("a u8")?)),
        ValueType::I8 => MetaValue::I8(i8::from_le_bytes(r.fixed("an i8")?)),
        ValueType::U16 => MetaValue::U16(u16::from_le_bytes(r.fixed("a u16")?)),
        ValueType::I16 => MetaValue::I16(i16::from_le_bytes(r.fixed("an i16")?)),
        ValueType::U32 => MetaValue::U32(u32::from_le_bytes(r.fixed("a u32")?)),
        ValueType::I32 => MetaValue::I32(i32::from_le_bytes(r.fixed("an i32")?)),
        ValueType::F32 => MetaValue::F32(f32::from_le_bytes(r.fixed("an f32")?)),
        ValueType::Bool => MetaValue::Bool(r.bool()?),
        ValueType::String => MetaValue::String(r.string("a string")?.to_vec()),
        ValueType::Array => MetaValue::Array(read_array(r, 0)?),
        ValueType::U64 => MetaValue::U64(u64::from_le_bytes(r.fixed("a u64")?)),
        ValueType::I64 => MetaValue::I64(i64::from_le_bytes(r.fixed("an i64")?)),
        ValueType::F64 => MetaValue::F64(f64::from_le_bytes(r.fixed("an f64")?)),
    })
}

/// An array `depth` arrays deep. Its count is checked against the bytes
/// left before any element is read, so the work and memory it costs are
/// bounded by the file's size.
fn read_array(r: &mut Reader, depth: u32) -> Result<MetaArray, String> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(format!(
            "at byte {}: arrays are nested more than {MAX_ARRAY_DEPTH} deep",
            r.pos
        ));
    }
    let ty = r.value_type("the array's element type")?;
    let n = r.count("the array's length", ty.min_bytes())?;
    Ok(match ty {
        ValueType::U8 => MetaArray::U8(r.numbers(n, u8::from_le_bytes)?),
        ValueType::I8 => MetaArray::I8(r.numbers(n, i8::from_le_bytes)?),
        ValueType::U16 => MetaArray::U16(r.numbers(n, u16::from_le_bytes)?),
        ValueType::I16 => MetaArray::I16(r.numbers(n, i16::from_le_bytes)?),
        ValueType::U32 => MetaArray::U32(r.numbers(n, u32::from_le_bytes)?),
        ValueType::I32 => MetaArray::I32(r.numbers(n, i32::from_le_bytes)?),
        ValueType::F32 => MetaArray::F32(r.numbers(n, f32::from_le_bytes)?),
        ValueType::U64 => MetaArray::U64(r.numbers(n, u64::from_le_bytes)?),
        ValueType::I64 => MetaArray::I64(r.numbers(n, i64::from_le_bytes)?),
        ValueType::F64 => MetaArray::F64(r.numbers(n, f64::from_le_bytes)?),
        ValueType::Bool => MetaArray::Bool((0..n).map(|_| r.bool()).collect::<Result<_, _>>()?),
        ValueType::String => MetaArray::String(
            (0..n)
                .map(|_| r.string("a string in an array").map(<[u8]>::to_vec))
                .collect::<Result<_, _>>()?,
        ),
        ValueType::Array => MetaArray::Array(
            (0..n)
                .map(|_| read_array(r, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
    })
}

fn read_tensor_info(r: &mut Reader) -> Result<TensorInfo, String> {
    let name = r.utf8("a tensor name")?;
    let rest = |r: &mut Reader| -> Result<(Vec<u64>, GgmlType, u64), String> {
        let at = r.pos;
        let n_dims = r.u32("the dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(format!(
                "at byte {at}: it has {n_dims} dimensions; GGUF tensors have at most {MAX_DIMS}"
            ));
        }
        let dims = (0..n_dims)
            .map(|_| r.u64("a dimension"))
            .collect::<Result<_, _>>()?;
        let ggml_type = GgmlType(r.u32("the tensor type")?);
        let offset = r.u64("the data offset")?;
        Ok((dims, ggml_type, offset))
    };
    let (dims, ggml_type, offset) = rest(r).map_err(|e| format!("tensor {name}: {e}"))?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Checks every tensor's data to lie inside the file at an aligned offset,
/// and names to be unique.
fn check_tensors(
    infos: Vec<TensorInfo>,
    alignment: u64,
    data_start: u64,
    file_len: u64,
) -> Result<Vec<CheckedTensor>, String> {
    let mut seen = HashSet::new();
    infos
        .into_iter()
        .map(|info| {
            if !seen.insert(info.name.clone()) {
                return Err(format!("tensor {} appears twice", info.name));
            }
            check_tensor(info, alignment, data_start, file_len)
        })
        .collect()
}

fn check_tensor(
    info: TensorInfo,
    alignment: u64,
    data_start: u64,
    file_len: u64,
) -> Result<CheckedTensor, String> {
    let bad = |why: String| {
        format!(
            "tensor {} ({}, ne {:?}): {why}",
            info.name, info.ggml_type, info.dims
        )
    };
    if !info.offset.is_multiple_of(alignment) {
        return Err(bad(format!(
            "its offset {} is not a multiple of the file's alignment {alignment}",
            info.offset
        )));
    }
    let start = data_start
        .checked_add(info.offset)
        .ok_or_else(|| bad(format!("its offset {} overflows", info.offset)))?;
    // Without a known block layout only the start can be checked; such a
    // tensor is never read, only named in the error that refuses it.
    let bytes = match info.ggml_type.layout() {
        Some(layout) => data_bytes(&info.dims, layout).map_err(bad)?,
        None => 0,
    };
    if start.checked_add(bytes).is_none_or(|end| end > file_len) {
        return Err(bad(format!(
            "its {bytes} bytes at byte {start} run past the end of the file ({file_len} bytes)"
        )));
    }
    let shape = info
        .dims
        .iter()
        .rev()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("a dimension does not fit in this machine's address space".into()))?;
    Ok(CheckedTensor {
        name: info.name,
        ggml_type: info.ggml_type,
        shape,
        start,
    })
}

/// Bytes of a tensor with ggml dimensions `ne` in blocks of `block` values
/// taking `block_bytes` each. Blocks never span rows, so the row length
/// `ne[0]` must be a whole number of blocks.
fn data_bytes(ne: &[u64], (block, block_bytes): (u64, u64)) -> Result<u64, String> {
    let row = ne.first().copied().unwrap_or(1);
    if !row.is_multiple_of(block) {
        return Err(format!(
            "its rows are {row} values long, not a multiple of its type's {block}-value blocks"
        ));
    }
    ne.iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .and_then(|numel| (numel / block).checked_mul(block_bytes))
        .ok_or_else(|| "its size overflows 64 bits".to_string())
}

/// Makes the checked tensors into `RawTensor`s over `map`, or lists them
/// as unsupported.
fn assemble(path: &Path, map: Arc<Mmap>, layout: Layout) -> Result<GgufFile> {
    let mut tensors = Vec::new();
    let mut unsupported = Vec::new();
    let mut by_name = HashMap::with_capacity(layout.tensors.len());
    for t in layout.tensors {
        let slot = match t.ggml_type.raw_dtype() {
            Some(dtype) => {
                let name = t.name.clone();
                let raw = RawTensor::new(t.name, dtype, t.shape, Arc::clone(&map), t.start)
                    .map_err(|e| Error::checkpoint(path, e.to_string()))?;
                tensors.push(raw);
                (name, Slot::Raw(tensors.len() - 1))
            }
            None => {
                unsupported.push(UnsupportedTensor {
                    name: t.name.clone(),
                    ggml_type: t.ggml_type,
                    shape: t.shape,
                    offset: t.start,
                });
                (t.name, Slot::Unsupported(unsupported.len() - 1))
            }
        };
        by_name.insert(slot.0, slot.1);
    }
    Ok(GgufFile {
        path: path.to_owned(),
        version: layout.version,
        alignment: layout.alignment,
        metadata: layout.metadata,
        tensors,
        unsupported,
        by_name,
    })
}

/// Reads little-endian values from the front of a byte slice. Every read is
/// checked against what is left, and errors say where they happened.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "at byte {}: {what} needs {n} bytes but the file has only {} left (is it truncated?)",
                self.pos,
                self.remaining()
            ));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let bytes = self.take(N as u64, what)?;
        Ok(bytes.try_into().expect("take returns exactly N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.fixed(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.fixed(what).map(u64::from_le_bytes)
    }

    fn bool(&mut self) -> Result<bool, String> {
        let at = self.pos;
        match self.fixed::<1>("a bool")? {
            [0] => Ok(false),
            [1] => Ok(true),
            [b] => Err(format!("at byte {at}: a bool is {b}; expected 0 or 1")),
        }
    }

    fn value_type(&mut self, what: &str) -> Result<ValueType, String> {
        let at = self.pos;
        let id = self.u32(what)?;
        ValueType::from_id(id)
            .ok_or_else(|| format!("at byte {at}: {what} is {id}, not a GGUF value type (0 to 12)"))
    }

    /// A count of items that each take at least `min_bytes` of the file,
    /// refused when that many cannot fit in what is left: loops and
    /// allocations sized by it are bounded by the file's size.
    fn count(&mut self, what: &str, min_bytes: u64) -> Result<u64, String> {
        let at = self.pos;
        let n = self.u64(what)?;
        if n.checked_mul(min_bytes)
            .is_none_or(|b| b > self.remaining())
        {
            return Err(format!(
                "at byte {at}: {what} is {n}, but {n} items of at least {min_bytes} bytes cannot \
                 fit in the {} bytes left",
                self.remaining()
            ));
        }
        Ok(n)
    }

    /// `n` numbers of `N` bytes each.
    fn numbers<T, const N: usize>(
        &mut self,
        n: u64,
        from: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, String> {
        let bytes = self.take(n.saturating_mul(N as u64), "the array's elements")?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| from(c.try_into().expect("chunks of N bytes")))
            .collect())
    }

    /// A string's bytes.
    fn string(&mut self, what: &str) -> Result<&'a [u8], String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() {
            return Err(format!(
                "at byte {at}: {what} is {len} bytes long, more than the {} bytes left in the file",
                self.remaining()
            ));
        }
        self.take(len, what)
    }

    /// A string that must be UTF-8 (keys and tensor names).
    fn utf8(&mut self, what: &str) -> Result<String, String> {
        let at = self.pos;
        let bytes = self.string(what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            format!(
                "at byte {at}: {what} is not UTF-8: \"{}\"",
                bytes[..bytes.len().min(SHOWN_CHARS)].escape_ascii()
            )
        })
    }
}

// ----------------------------------------------------------------------------
// The Llama model in a GGUF file

/// Whether the file at `path` starts with GGUF's magic.
pub fn is_gguf(path: &Path) -> bool {
    matches!(super::sniff(path), Ok(super::Kind::Gguf))
}

/// Loads the Llama model of the GGUF file at `path`.
pub fn load_model(path: &Path) -> Result<super::ModelWeights> {
    let file = open(path)?;
    file.model()
}

impl GgufFile {
    /// The model's hyper-parameters from the `llama.*` metadata and the
    /// vocabulary (BOS/EOS ids).
    pub fn config(&self) -> Result<crate::config::Config> {
        use crate::config::{Config, TokenSet, LLAMA2C_NORM_EPS, LLAMA2C_ROPE_THETA};
        let arch = self.get_str("general.architecture")?.unwrap_or("");
        if arch != "llama" {
            return Err(Error::checkpoint(
                &self.path,
                format!("general.architecture is {arch:?}; this program runs \"llama\" models"),
            ));
        }
        if self.get("llama.rope.scaling.type").is_some() || self.tensor_named("rope_freqs.weight") {
            return Err(Error::checkpoint(
                &self.path,
                "the model scales its RoPE frequencies, which is not supported for GGUF files \
                 yet; convert the Hugging Face model instead",
            ));
        }
        let key = |k: &str| self.require_u64(&format!("llama.{k}")).map(|v| v as usize);
        let n_heads = key("attention.head_count")?;
        let embd_rows = self.tensor_named_rows("token_embd.weight");
        let vocab = match self.get_u64("llama.vocab_size")? {
            Some(v) => v as usize,
            None => embd_rows.unwrap_or(0),
        };
        let mut c = Config::llama2c(
            key("embedding_length")?,
            key("feed_forward_length")?,
            key("block_count")?,
            n_heads,
            match self.get_u64("llama.attention.head_count_kv")? {
                Some(kv) => kv as usize,
                None => n_heads,
            },
            vocab,
            key("context_length")?,
            !self.tensor_named("output.weight"),
        );
        if let Some(hd) = self.get_u64("llama.attention.key_length")? {
            c.head_dim = hd as usize;
        }
        c.norm_eps = self
            .get_f64("llama.attention.layer_norm_rms_epsilon")?
            .map_or(LLAMA2C_NORM_EPS, |e| e as f32);
        c.rope_theta = self
            .get_f64("llama.rope.freq_base")?
            .map_or(LLAMA2C_ROPE_THETA, |t| t as f32);
        let vocabulary = self.vocabulary()?;
        if let Some(bos) = vocabulary.bos {
            c.bos = bos;
        }
        if let Some(eos) = vocabulary.eos {
            c.eos = TokenSet::one(eos);
        }
        c.eos_ends_generation = true;
        c.validate()
            .map_err(|e| Error::checkpoint(&self.path, e.to_string()))?;
        Ok(c)
    }

    /// Whether a tensor of this name exists, of any type.
    fn tensor_named(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
            || self.unsupported.iter().any(|t| t.name == name)
    }

    /// The row count of a supported tensor.
    fn tensor_named_rows(&self, name: &str) -> Option<usize> {
        let t = self.tensors.iter().find(|t| t.name == name)?;
        t.shape.first().copied()
    }

    /// The model's weights, borrowed from the file where they can be.
    pub fn model(&self) -> Result<super::ModelWeights> {
        let config = self.config()?;
        // A tensor the model needs in a type we cannot compute with is an
        // error naming it and its type.
        for t in &self.unsupported {
            self.tensor(&t.name)?;
        }
        let tensors = self
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.clone()))
            .collect();
        super::assemble::TensorSet {
            tensors,
            naming: super::assemble::Naming::Gguf,
            rotate_half: false,
            source: super::Source::Gguf,
        }
        .assemble(config)
        .map_err(|e| match e {
            Error::Invalid(reason) | Error::Config(reason) => Error::checkpoint(&self.path, reason),
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models")
    }

    fn fixture(name: &str) -> GgufFile {
        open(&models().join("gguf").join(name)).unwrap()
    }

    const F32_FILE: &str = "stories260K-f32.gguf";
    const Q8_FILE: &str = "stories260K-q8_0.gguf";

    /// stories260K's sizes.
    const DIM: usize = 64;
    const HIDDEN: usize = 172;
    const LAYERS: usize = 5;
    const KV_DIM: usize = 32;
    const VOCAB: usize = 512;

    /// The tensors of llama2.c's version 0 `stories260K.bin`, by the names
    /// GGUF gives them, sliced from the file as f32 in its layout order.
    fn llama2c_tensors() -> HashMap<String, Vec<f32>> {
        let bytes = std::fs::read(models().join("stories260K.bin")).unwrap();
        let floats: Vec<f32> = bytes[28..]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut at = 0;
        let mut take = |n: usize| {
            at += n;
            floats[at - n..at].to_vec()
        };
        let mut out = HashMap::new();
        out.insert("token_embd.weight".to_string(), take(VOCAB * DIM));
        let per_layer = [
            ("attn_norm", DIM),
            ("attn_q", DIM * DIM),
            ("attn_k", KV_DIM * DIM),
            ("attn_v", KV_DIM * DIM),
            ("attn_output", DIM * DIM),
            ("ffn_norm", DIM),
            ("ffn_gate", HIDDEN * DIM),
            ("ffn_down", DIM * HIDDEN),
            ("ffn_up", HIDDEN * DIM),
        ];
        for (name, n) in per_layer {
            for l in 0..LAYERS {
                out.insert(format!("blk.{l}.{name}.weight"), take(n));
            }
        }
        out.insert("output_norm.weight".to_string(), take(DIM));
        out
    }

    fn f32s(t: &RawTensor) -> Vec<f32> {
        assert_eq!(t.dtype, RawDType::F32);
        t.bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Dequantizes Q8_0 blocks: an f16 scale, then 32 int8.
    fn dequantize_q8_0(t: &RawTensor) -> (Vec<f32>, Vec<f32>) {
        assert_eq!(t.dtype, RawDType::Q8_0Blocks);
        let mut values = Vec::new();
        let mut scales = Vec::new();
        for block in t.bytes().chunks_exact(34) {
            let scale = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            scales.push(scale);
            values.extend(block[2..].iter().map(|&q| q as i8 as f32 * scale));
        }
        (values, scales)
    }

    fn expected_shape(name: &str) -> Vec<usize> {
        let kind = name.split('.').rev().nth(1).unwrap();
        match kind {
            "token_embd" => vec![VOCAB, DIM],
            "attn_norm" | "ffn_norm" | "output_norm" => vec![DIM],
            "attn_q" | "attn_output" => vec![DIM, DIM],
            "attn_k" | "attn_v" => vec![KV_DIM, DIM],
            "ffn_gate" | "ffn_up" => vec![HIDDEN, DIM],
            "ffn_down" => vec![DIM, HIDDEN],
            other => panic!("unexpected tensor kind {other}"),
        }
    }

    #[test]
    fn fixture_metadata() {
        for (file, file_type) in [(F32_FILE, 0), (Q8_FILE, 7)] {
            let g = fixture(file);
            println!(
                "{file}: version {}, {} keys",
                g.version(),
                g.metadata().len()
            );
            for (key, value) in g.metadata() {
                println!("  {key}: {} = {value}", value.type_name());
            }
            assert_eq!(g.version(), 3);
            assert_eq!(g.alignment(), 32);
            assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
            assert_eq!(g.get_str("general.name").unwrap(), Some("stories260K"));
            let ints = [
                ("llama.embedding_length", 64),
                ("llama.block_count", 5),
                ("llama.feed_forward_length", 172),
                ("llama.attention.head_count", 8),
                ("llama.attention.head_count_kv", 4),
                ("llama.context_length", 512),
                ("llama.vocab_size", 512),
                ("llama.rope.dimension_count", 8),
                ("general.file_type", file_type),
            ];
            for (key, want) in ints {
                assert_eq!(g.require_u64(key).unwrap(), want, "{file}: {key}");
            }
            assert_eq!(g.get_f64("llama.rope.freq_base").unwrap(), Some(10000.0));
            let eps = g.get_f64("llama.attention.layer_norm_rms_epsilon").unwrap();
            assert_eq!(eps, Some(f64::from(1e-5f32)));
            assert_eq!(
                g.get("tokenizer.ggml.add_bos_token")
                    .and_then(MetaValue::as_bool),
                Some(true)
            );
            assert!(g.get("tokenizer.chat_template").unwrap().as_str().is_some());
            assert!(g.get("no.such.key").is_none());
            assert_eq!(g.get_u64("no.such.key").unwrap(), None);
            let err = g.get_u64("general.name").unwrap_err().to_string();
            assert!(
                err.contains("general.name") && err.contains("string"),
                "{err}"
            );
        }
    }

    #[test]
    fn fixture_tensor_names_types_and_shapes() {
        let mut names = vec!["token_embd.weight".to_string()];
        for l in 0..LAYERS {
            for kind in [
                "attn_norm",
                "ffn_down",
                "ffn_gate",
                "ffn_up",
                "ffn_norm",
                "attn_k",
                "attn_output",
                "attn_q",
                "attn_v",
            ] {
                names.push(format!("blk.{l}.{kind}.weight"));
            }
        }
        names.push("output_norm.weight".to_string());
        for file in [F32_FILE, Q8_FILE] {
            let g = fixture(file);
            let found: Vec<&str> = g.tensors().iter().map(|t| t.name.as_str()).collect();
            assert_eq!(found, names, "{file}");
            assert!(g.unsupported_tensors().is_empty());
            // The classifier is shared with the embedding, so it is absent.
            assert!(g.tensor("output.weight").unwrap().is_none());
            for t in g.tensors() {
                assert_eq!(t.shape, expected_shape(&t.name), "{file}: {}", t.name);
                let want = match (file, t.shape.len(), t.shape.last()) {
                    (F32_FILE, ..) | (_, 1, _) => RawDType::F32,
                    // Rows of 172 values do not split into 32-value blocks.
                    (_, _, Some(&HIDDEN)) => RawDType::F16,
                    _ => RawDType::Q8_0Blocks,
                };
                assert_eq!(t.dtype, want, "{file}: {}", t.name);
                assert_eq!(t.offset % 32, 0, "{file}: {}", t.name);
                assert!(std::ptr::eq(g.tensor(&t.name).unwrap().unwrap(), t));
            }
        }
    }

    #[test]
    fn f32_tensors_equal_the_llama2c_checkpoint() {
        // This also shows that convert_hf_to_gguf.py undoes the rotate-half
        // permutation of Hugging Face's q and k rows: GGUF stores them in
        // Meta's (and llama2.c's) interleaved order.
        let want = llama2c_tensors();
        let g = fixture(F32_FILE);
        assert_eq!(want.len(), g.tensors().len());
        for t in g.tensors() {
            assert!(f32s(t) == want[&t.name], "{} differs", t.name);
        }
    }

    #[test]
    fn q8_0_tensors_are_the_llama2c_checkpoint_quantized() {
        let want = llama2c_tensors();
        let g = fixture(Q8_FILE);
        for t in g.tensors() {
            let exact = &want[&t.name];
            match t.dtype {
                RawDType::F32 => assert!(f32s(t) == *exact, "{}", t.name),
                RawDType::F16 => {
                    let got: Vec<u16> = t
                        .bytes()
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect();
                    let rounded: Vec<u16> = exact
                        .iter()
                        .map(|&x| half::f16::from_f32(x).to_bits())
                        .collect();
                    assert!(got == rounded, "{}", t.name);
                }
                RawDType::Q8_0Blocks => {
                    let (values, scales) = dequantize_q8_0(t);
                    assert_eq!(values.len(), exact.len());
                    for (i, (&v, &x)) in values.iter().zip(exact).enumerate() {
                        // Half a step, plus the scale's rounding to f16
                        // (relative 2^-11) over up to 127 steps.
                        let step = scales[i / 32];
                        let tolerance = step * (0.5 + 127.0 / 2048.0) + 1e-7;
                        assert!(
                            (v - x).abs() <= tolerance,
                            "{}[{i}]: {v} vs {x} (scale {step})",
                            t.name
                        );
                    }
                }
                RawDType::BF16 => panic!("no bf16 tensors expected"),
            }
        }
    }

    /// tok512.bin's entries: score and piece.
    fn tok512() -> Vec<(f32, Vec<u8>)> {
        let bytes = std::fs::read(models().join("tok512.bin")).unwrap();
        let mut at = 4;
        let mut entries = Vec::new();
        while at < bytes.len() {
            let score = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
            let len = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            entries.push((score, bytes[at + 8..at + 8 + len].to_vec()));
            at += 8 + len;
        }
        entries
    }

    #[test]
    fn vocabulary_matches_tok512() {
        let want = tok512();
        assert_eq!(want.len(), VOCAB);
        for file in [F32_FILE, Q8_FILE] {
            let v = fixture(file).vocabulary().unwrap();
            assert_eq!(v.model, "llama");
            assert_eq!((v.bos, v.eos), (Some(1), Some(2)));
            assert_eq!(v.pieces.len(), VOCAB);
            assert_eq!(v.scores.len(), VOCAB);
            assert_eq!(&v.token_types[..5], [2, 3, 3, 6, 6]);
            assert_eq!(v.pieces[1], b"<s>");
            assert_eq!(v.pieces[2], b"</s>");
            assert_eq!(want[1].1, b"\n<s>\n");
            assert_eq!(want[2].1, b"\n</s>\n");
            for (id, (piece, (score, bin))) in v.pieces.iter().zip(&want).enumerate() {
                assert_eq!(v.scores[id], *score, "score of {id}");
                if id == 1 || id == 2 {
                    continue;
                }
                let spaced = String::from_utf8(piece.clone())
                    .unwrap()
                    .replace('\u{2581}', " ");
                assert_eq!(spaced.as_bytes(), bin.as_slice(), "piece {id}");
            }
        }
    }

    // ---- Hand-made files, for the malformed cases. ----

    /// A GGUF writer for tests: metadata entries and tensor descriptions
    /// as raw bytes, so any of them can be made wrong.
    struct Builder {
        version: u32,
        alignment: usize,
        kvs: Vec<u8>,
        n_kv: u64,
        infos: Vec<u8>,
        n_tensors: u64,
        data: Vec<u8>,
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                version: 3,
                alignment: 32,
                kvs: Vec::new(),
                n_kv: 0,
                infos: Vec::new(),
                n_tensors: 0,
                data: Vec::new(),
            }
        }

        /// A metadata entry of value type `ty` with `value` already encoded.
        fn kv(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
            self.kvs.extend(string(key.as_bytes()));
            self.kvs.extend(ty.to_le_bytes());
            self.kvs.extend_from_slice(value);
            self.n_kv += 1;
            self
        }

        fn tensor(mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> Self {
            self.infos.extend(string(name.as_bytes()));
            self.infos.extend((ne.len() as u32).to_le_bytes());
            for d in ne {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ty.to_le_bytes());
            self.infos.extend(offset.to_le_bytes());
            self.n_tensors += 1;
            self
        }

        fn data(mut self, bytes: &[u8]) -> Self {
            self.data.extend_from_slice(bytes);
            self
        }

        fn build(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend_from_slice(&self.kvs);
            out.extend_from_slice(&self.infos);
            out.resize(out.len().next_multiple_of(self.alignment), 0);
            out.extend_from_slice(&self.data);
            out
        }
    }

    /// An array value: element type, count, encoded elements.
    fn array(ty: u32, n: u64, elements: &[u8]) -> Vec<u8> {
        let mut out = ty.to_le_bytes().to_vec();
        out.extend(n.to_le_bytes());
        out.extend_from_slice(elements);
        out
    }

    fn error(bytes: &[u8]) -> String {
        match from_bytes(bytes) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_metadata_type_reads() {
        let strings = [string(b"a"), string(b"\xff\xfe")].concat();
        let inner = [
            array(4, 2, &[1u32.to_le_bytes(), 2u32.to_le_bytes()].concat()),
            array(8, 0, &[]),
        ]
        .concat();
        let bytes = Builder::new()
            .kv("u8", 0, &[200])
            .kv("i8", 1, &[0xff])
            .kv("u16", 2, &60000u16.to_le_bytes())
            .kv("i16", 3, &(-2i16).to_le_bytes())
            .kv("u32", 4, &4_000_000_000u32.to_le_bytes())
            .kv("i32", 5, &(-5i32).to_le_bytes())
            .kv("f32", 6, &1.5f32.to_le_bytes())
            .kv("bool", 7, &[1])
            .kv("string", 8, &string("héllo".as_bytes()))
            .kv("u64", 10, &u64::MAX.to_le_bytes())
            .kv("i64", 11, &i64::MIN.to_le_bytes())
            .kv("f64", 12, &0.25f64.to_le_bytes())
            .kv("bools", 9, &array(7, 3, &[0, 1, 0]))
            .kv("strings", 9, &array(8, 2, &strings))
            .kv("nested", 9, &array(9, 2, &inner))
            .kv("f32s", 9, &array(6, 1, &2.5f32.to_le_bytes()))
            .kv(
                "i16s",
                9,
                &array(3, 2, &[(-1i16).to_le_bytes(), 7i16.to_le_bytes()].concat()),
            )
            .build();
        let g = from_bytes(&bytes).unwrap();
        assert_eq!(g.metadata().len(), 17);
        assert!(g.tensors().is_empty());
        let v = |k: &str| g.get(k).unwrap();
        assert_eq!(v("u8").as_u64(), Some(200));
        assert_eq!(v("i8").as_i64(), Some(-1));
        assert_eq!(v("i8").as_u64(), None);
        assert_eq!(v("u16").as_u64(), Some(60000));
        assert_eq!(v("i16").as_i64(), Some(-2));
        assert_eq!(v("u32").as_u64(), Some(4_000_000_000));
        assert_eq!(v("i32").as_f64(), Some(-5.0));
        assert_eq!(v("f32").as_f64(), Some(1.5));
        assert_eq!(v("f32").as_u64(), None);
        assert_eq!(v("bool").as_bool(), Some(true));
        assert_eq!(v("string").as_str(), Some("héllo"));
        assert_eq!(v("u64").as_u64(), Some(u64::MAX));
        assert_eq!(v("u64").as_i64(), None);
        assert_eq!(v("i64").as_i64(), Some(i64::MIN));
        assert_eq!(v("f64").as_f64(), Some(0.25));
        let a = |k: &str| v(k).as_array().unwrap();
        assert_eq!(*a("bools"), MetaArray::Bool(vec![false, true, false]));
        let s = a("strings").as_strings().unwrap();
        assert_eq!(s, [b"a".to_vec(), b"\xff\xfe".to_vec()]);
        let nested = a("nested").as_arrays().unwrap();
        assert_eq!(nested[0], MetaArray::U32(vec![1, 2]));
        assert_eq!(nested[0].to_i64s(), Some(vec![1, 2]));
        assert!(nested[1].is_empty() && nested[1].as_strings().is_some());
        assert_eq!(a("f32s").as_f32s(), Some(&[2.5f32][..]));
        assert_eq!(a("i16s").to_f64s(), Some(vec![-1.0, 7.0]));
        assert_eq!(v("nested").type_name(), "array of array");
        assert_eq!(v("strings").to_string(), "[2 × string]");
        // Bytes that are not UTF-8 are kept, but are not a str.
        let bad = Builder::new().kv("s", 8, &string(b"\xff")).build();
        let g = from_bytes(&bad).unwrap();
        assert_eq!(g.get("s").unwrap().as_bytes(), Some(&b"\xff"[..]));
        assert!(g.get_str("s").is_err());
    }

    #[test]
    fn tensors_of_every_supported_type_read() {
        let bytes = Builder::new()
            .kv("general.alignment", 4, &64u32.to_le_bytes())
            .tensor("a", &[3, 2], 0, 0)
            .tensor("b", &[4], 1, 64)
            .tensor("c", &[2], 30, 128)
            .tensor("d", &[32, 2], 8, 192)
            .tensor("e", &[0, 7], 0, 256)
            .data(&[0; 192 + 68]);
        let mut builder = bytes;
        builder.alignment = 64;
        let g = from_bytes(&builder.build()).unwrap();
        assert_eq!(g.alignment(), 64);
        let kinds: Vec<_> = g
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.shape.clone(), t.len))
            .collect();
        assert_eq!(
            kinds,
            [
                ("a", RawDType::F32, vec![2, 3], 24),
                ("b", RawDType::F16, vec![4], 8),
                ("c", RawDType::BF16, vec![2], 4),
                ("d", RawDType::Q8_0Blocks, vec![2, 32], 68),
                ("e", RawDType::F32, vec![7, 0], 0),
            ]
        );
        assert_eq!(g.tensors()[1].offset - g.tensors()[0].offset, 64);
    }

    #[test]
    fn unsupported_tensor_types_fail_only_when_asked_for() {
        let bytes = Builder::new()
            .kv("general.architecture", 8, &string(b"llama"))
            .tensor("ok", &[4], 0, 0)
            .tensor("blk.0.ffn_down.weight", &[256, 2], 12, 32)
            .tensor("future", &[8], 99, 320)
            .data(&[0; 320])
            .build();
        let g = from_bytes(&bytes).unwrap();
        assert_eq!(g.tensors().len(), 1);
        assert!(g.tensor("ok").unwrap().is_some());
        let u = g.unsupported_tensors();
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].ggml_type.name(), Some("Q4_K"));
        assert_eq!(u[0].shape, [2, 256]);
        let err = g.tensor("blk.0.ffn_down.weight").unwrap_err().to_string();
        for part in ["blk.0.ffn_down.weight", "Q4_K", "F32, F16, BF16 and Q8_0"] {
            assert!(err.contains(part), "{err}");
        }
        let err = g.tensor("future").unwrap_err().to_string();
        assert!(err.contains("ggml type 99"), "{err}");
        // A known unsupported type is still checked against the file.
        let short = Builder::new()
            .tensor("q", &[256, 2], 12, 0)
            .data(&[0; 287])
            .build();
        assert!(error(&short).contains("past the end"));
    }

    #[test]
    fn truncated_fixtures_are_errors() {
        for file in [F32_FILE, Q8_FILE] {
            let bytes = std::fs::read(models().join("gguf").join(file)).unwrap();
            assert!(from_bytes(&bytes).is_ok());
            // Every cut in the header and descriptions, then strides
            // through the data: the last tensor ends at the file's end, so
            // any cut leaves it short.
            let header_end = 15_400;
            let cuts = (0..header_end).chain((header_end..bytes.len()).step_by(4093));
            for n in cuts {
                assert!(from_bytes(&bytes[..n]).is_err(), "{file} cut at {n}");
            }
        }
    }

    #[test]
    fn malformed_headers_are_errors() {
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "bad magic",
                [b"GGUG".as_slice(), &[0; 20]].concat(),
                "magic",
            ),
            (
                "version 1",
                Builder {
                    version: 1,
                    ..Builder::new()
                }
                .build(),
                "version 1",
            ),
            (
                "version 4",
                Builder {
                    version: 4,
                    ..Builder::new()
                }
                .build(),
                "version 4",
            ),
            (
                "big-endian",
                Builder {
                    version: 3u32.swap_bytes(),
                    ..Builder::new()
                }
                .build(),
                "big-endian",
            ),
            (
                "huge key length",
                Builder::new()
                    .kv("k", 8, &[])
                    .build()
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| if (24..32).contains(&i) { 0xff } else { b })
                    .collect(),
                "more than",
            ),
            (
                "huge string length",
                Builder::new().kv("k", 8, &u64::MAX.to_le_bytes()).build(),
                "bytes long",
            ),
            (
                "huge array count",
                Builder::new()
                    .kv("k", 9, &array(0, u64::MAX / 2, &[]))
                    .build(),
                "cannot fit",
            ),
            (
                "huge array of arrays",
                Builder::new()
                    .kv("k", 9, &array(9, 1 << 40, &[0; 64]))
                    .build(),
                "cannot fit",
            ),
            (
                "unknown metadata type",
                Builder::new().kv("k", 13, &[0; 8]).build(),
                "13, not a GGUF value type",
            ),
            (
                "unknown array element type",
                Builder::new().kv("k", 9, &array(77, 1, &[0; 8])).build(),
                "77, not a GGUF value type",
            ),
            (
                "bad bool",
                Builder::new().kv("k", 7, &[2]).build(),
                "expected 0 or 1",
            ),
            (
                "duplicate key",
                Builder::new().kv("k", 0, &[1]).kv("k", 0, &[2]).build(),
                "appears twice",
            ),
            (
                "key not UTF-8",
                Builder::new()
                    .kv("k\u{80}", 0, &[1])
                    .build()
                    .into_iter()
                    .enumerate()
                    .map(|(i, b)| if i == 33 { 0xc0 } else { b })
                    .collect(),
                "not UTF-8",
            ),
            (
                "alignment not a power of two",
                Builder::new()
                    .kv("general.alignment", 4, &24u32.to_le_bytes())
                    .build(),
                "power of two",
            ),
            (
                "alignment zero",
                Builder::new()
                    .kv("general.alignment", 4, &0u32.to_le_bytes())
                    .build(),
                "power of two",
            ),
            (
                "alignment a string",
                Builder::new()
                    .kv("general.alignment", 8, &string(b"32"))
                    .build(),
                "power of two",
            ),
            (
                "huge metadata count",
                {
                    let mut b = Builder::new().build();
                    b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
                    b
                },
                "cannot fit",
            ),
            (
                "huge tensor count",
                {
                    let mut b = Builder::new().build();
                    b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
                    b
                },
                "cannot fit",
            ),
        ];
        for (what, bytes, expect) in cases {
            let err = error(&bytes);
            assert!(err.contains(expect), "{what}: {err}");
        }
    }

    #[test]
    fn deeply_nested_arrays_are_errors() {
        // Each level is one array holding the next: element type 9, count 1.
        let mut value = Vec::new();
        for _ in 0..10_000 {
            value.extend(array(9, 1, &[]));
        }
        value.extend(array(0, 0, &[]));
        let err = error(&Builder::new().kv("k", 9, &value).build());
        assert!(err.contains("nested more than"), "{err}");
        let mut ok = Vec::new();
        for _ in 0..MAX_ARRAY_DEPTH - 1 {
            ok.extend(array(9, 1, &[]));
        }
        ok.extend(array(0, 1, &[5]));
        assert!(from_bytes(&Builder::new().kv("k", 9, &ok).build()).is_ok());
    }

    #[test]
    fn malformed_tensor_descriptions_are_errors() {
        let data = [0u8; 256];
        let one = |name: &str, ne: &[u64], ty: u32, offset: u64| {
            Builder::new()
                .tensor(name, ne, ty, offset)
                .data(&data)
                .build()
        };
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "offset beyond the file",
                one("t", &[4], 0, 1 << 20),
                "past the end",
            ),
            (
                "offset overflows",
                one("t", &[4], 0, u64::MAX - 31),
                "overflows",
            ),
            (
                "data runs past the end",
                one("t", &[65], 0, 0),
                "past the end",
            ),
            (
                "misaligned offset",
                one("t", &[4], 0, 4),
                "not a multiple of the file's alignment",
            ),
            (
                "huge dims",
                one("t", &[u64::MAX, u64::MAX], 0, 0),
                "overflows",
            ),
            (
                "Q8_0 rows not whole blocks",
                one("t", &[48], 8, 0),
                "not a multiple",
            ),
            (
                "huge n_dims",
                {
                    let mut b = one("t", &[4], 0, 0);
                    // The u32 after the name "t": 24 + 8 + 1.
                    b[33..37].copy_from_slice(&u32::MAX.to_le_bytes());
                    b
                },
                "dimensions",
            ),
            (
                "duplicate tensor",
                Builder::new()
                    .tensor("t", &[4], 0, 0)
                    .tensor("t", &[4], 0, 32)
                    .data(&data)
                    .build(),
                "appears twice",
            ),
            (
                "description truncated",
                {
                    let b = one("t", &[4, 4], 0, 0);
                    b[..24 + 8 + 1 + 4 + 12].to_vec()
                },
                "truncated",
            ),
        ];
        for (what, bytes, expect) in cases {
            let err = error(&bytes);
            assert!(err.contains(expect), "{what}: {err}");
        }
    }

    #[test]
    fn vocabulary_errors_are_clear() {
        let tokens = array(8, 2, &[string(b"a"), string(b"b")].concat());
        let base = || {
            Builder::new()
                .kv("tokenizer.ggml.model", 8, &string(b"llama"))
                .kv("tokenizer.ggml.tokens", 9, &tokens)
        };
        let v = from_bytes(&base().build()).unwrap().vocabulary().unwrap();
        assert_eq!(v.scores, [0.0, 0.0]);
        assert_eq!(v.token_types, [TOKEN_TYPE_NORMAL; 2]);
        assert_eq!((v.bos, v.eos), (None, None));
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("no tokenizer", Builder::new().build(), "no tokenizer"),
            (
                "short scores",
                base()
                    .kv("tokenizer.ggml.scores", 9, &array(6, 1, &[0; 4]))
                    .build(),
                "has 1 values",
            ),
            (
                "scores of strings",
                base().kv("tokenizer.ggml.scores", 9, &tokens).build(),
                "expected an array of numbers",
            ),
            (
                "token types too large",
                base()
                    .kv("tokenizer.ggml.token_type", 9, &array(10, 2, &[0xff; 16]))
                    .build(),
                "32-bit integers",
            ),
            (
                "bos out of range",
                base()
                    .kv("tokenizer.ggml.bos_token_id", 4, &2u32.to_le_bytes())
                    .build(),
                "only 2 tokens",
            ),
            (
                "tokens not strings",
                Builder::new()
                    .kv("tokenizer.ggml.model", 8, &string(b"llama"))
                    .kv("tokenizer.ggml.tokens", 9, &array(0, 1, &[0]))
                    .build(),
                "an array of strings",
            ),
        ];
        for (what, bytes, expect) in cases {
            let err = from_bytes(&bytes)
                .unwrap()
                .vocabulary()
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{what}: {err}");
        }
    }

    #[test]
    fn mutated_fixture_headers_never_panic() {
        let bytes = std::fs::read(models().join("gguf").join(Q8_FILE)).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..600 {
            let mut m = bytes.clone();
            for _ in 0..1 + next() % 4 {
                // Mostly the header and descriptions, where the structure is.
                let at = (next() % 15_400) as usize;
                m[at] = next() as u8;
            }
            if let Ok(g) = from_bytes(&m) {
                let _ = g.vocabulary();
                for t in g.tensors() {
                    assert_eq!(t.bytes().len(), t.len);
                }
            }
        }
    }

    #[test]
    fn open_refuses_what_is_not_a_gguf_file() {
        let err = open(&models()).unwrap_err().to_string();
        assert!(err.contains("directory"), "{err}");
        let err = open(&models().join("tok512.bin")).unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");
    }
}
