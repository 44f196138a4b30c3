//! PyTorch checkpoints (`torch.save` files: Meta's `consolidated.NN.pth`,
//! llama2.c's `train.py` `ckpt.pt`) read as data.
//!
//! Such a file is a zip archive of uncompressed entries: `<prefix>/data.pkl`,
//! a pickle describing the saved object, and one `<prefix>/data/<key>` per
//! tensor storage, holding its elements as raw little-endian bytes.
//!
//! A pickle is a program for Python's pickle machine, and unpickling may
//! import and call anything. This module is deliberately NOT an unpickler:
//! it never imports, calls or executes anything from a file. It parses the
//! small subset of pickle that state dicts are made of: a fixed list of
//! opcodes and a fixed list of globals (`collections.OrderedDict`, torch's
//! tensor-rebuilding functions, storage types and dtypes), where "calling" a
//! listed global builds a plain data value. Any other opcode or global is
//! refused by name. Every length, index and count read from the file is
//! checked before it is used, so a hostile file gives an error, never a
//! panic, an out-of-bounds read or an allocation the file's size does not
//! justify.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use super::raw::{RawDType, RawTensor};
use crate::error::{Error, Result};
use crate::files;

/// The prefix `torch.compile` puts before every parameter name of the model
/// it wraps; train.py saves the compiled model's state dict.
const COMPILED_PREFIX: &str = "_orig_mod.";

/// A value from a checkpoint's pickle: the Python objects a checkpoint holds,
/// as plain data.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict or `OrderedDict`, its pairs in file order.
    Dict(Vec<(Value, Value)>),
    Tensor(TorchTensor),
    /// A listed global stored as a value rather than called (a dtype such
    /// as `torch.float32`), by its dotted name.
    Global(String),
}

impl Value {
    /// The value stored under the string `key`, when this is a dict that has
    /// one (the last, as Python keeps the last of repeated keys).
    pub fn get<'a>(&'a self, key: &str) -> Option<&'a Value> {
        match self {
            Value::Dict(pairs) => pairs
                .iter()
                .rev()
                .find(|(k, _)| matches!(k, Value::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// The integer, when this is one.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The number, when this is a float or an integer (Python code often
    /// writes `1` where it means `1.0`).
    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    /// The string, when this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// What kind of value this is, for messages ("a dict", "an int").
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Tensor(_) => "a tensor",
            Value::Global(_) => "a Python global",
        }
    }
}

/// Element types of torch storages. Only the floating-point ones can be
/// model weights; the others are parsed so that files holding them (an
/// optimizer's step counters, token ids) still open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    Complex64,
    Complex128,
}

impl TorchDType {
    /// Bytes one element takes.
    pub fn element_bytes(self) -> usize {
        match self {
            TorchDType::I8 | TorchDType::U8 | TorchDType::Bool => 1,
            TorchDType::F16 | TorchDType::BF16 | TorchDType::I16 => 2,
            TorchDType::F32 | TorchDType::I32 => 4,
            TorchDType::F64 | TorchDType::I64 | TorchDType::Complex64 => 8,
            TorchDType::Complex128 => 16,
        }
    }

    /// Torch's name for it.
    pub fn name(self) -> &'static str {
        match self {
            TorchDType::F32 => "float32",
            TorchDType::F16 => "float16",
            TorchDType::BF16 => "bfloat16",
            TorchDType::F64 => "float64",
            TorchDType::I64 => "int64",
            TorchDType::I32 => "int32",
            TorchDType::I16 => "int16",
            TorchDType::I8 => "int8",
            TorchDType::U8 => "uint8",
            TorchDType::Bool => "bool",
            TorchDType::Complex64 => "complex64",
            TorchDType::Complex128 => "complex128",
        }
    }

    /// The stored-tensor type, for the types weights can have.
    pub fn raw(self) -> Option<RawDType> {
        match self {
            TorchDType::F32 => Some(RawDType::F32),
            TorchDType::F16 => Some(RawDType::F16),
            TorchDType::BF16 => Some(RawDType::BF16),
            _ => None,
        }
    }
}

/// A tensor as the pickle describes it: a view (shape, strides, offset) of
/// a storage, which is a zip entry of the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchTensor {
    pub dtype: TorchDType,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements to step over per index of each dimension.
    pub stride: Vec<usize>,
    /// Index, in elements, of the tensor's first element in its storage.
    pub storage_offset: usize,
    /// The storage's key: its data is the archive entry `data/<key>`.
    pub storage: String,
    /// Elements the storage says it holds.
    pub storage_len: usize,
    /// Where the tensor lived when it was saved ("cpu", "cuda:0").
    pub device: String,
}

impl TorchTensor {
    /// Number of elements, if it fits in a `usize`.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// The strides a row-major tensor of this shape has.
    pub fn contiguous_stride(&self) -> Vec<usize> {
        let mut stride = vec![1usize; self.shape.len()];
        for i in (0..self.shape.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1].saturating_mul(self.shape[i + 1]);
        }
        stride
    }

    /// Whether the elements lie row-major and back to back in the storage.
    /// A dimension of size 1 is never stepped over, so its stride does not
    /// matter (torch gives such dimensions arbitrary strides after views).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == Some(0) {
            return true;
        }
        self.shape
            .iter()
            .zip(self.stride.iter().zip(self.contiguous_stride()))
            .all(|(&d, (&s, c))| d == 1 || s == c)
    }
}

/// An opened `torch.save` archive: its pickle parsed into a value tree, its
/// storages located in the memory map.
pub struct TorchFile {
    path: PathBuf,
    map: Arc<Mmap>,
    root: Value,
    /// Storage key → its archive entry.
    storages: HashMap<String, zip::Entry>,
}

impl std::fmt::Debug for TorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TorchFile({}, {} storages)",
            self.path.display(),
            self.storages.len()
        )
    }
}

impl TorchFile {
    /// Opens and parses the `torch.save` archive at `path`. Nothing of the
    /// file is run; tensors are only located, not read.
    pub fn open(path: &Path) -> Result<TorchFile> {
        let (file, len) = files::open_regular(path, "PyTorch checkpoint")?;
        // An empty file cannot be mapped; say what it is not instead.
        if len < zip::EOCD_LEN as u64 {
            return Err(Error::checkpoint(path, zip::too_short(len)));
        }
        Self::parse(path, files::map(&file, len, path)?)
    }

    /// Parses an archive held in memory (tests and fuzzing), on a private
    /// copy of `bytes`.
    pub fn from_bytes(bytes: &[u8]) -> Result<TorchFile> {
        let name = Path::new("<memory>");
        // Checked first so that an empty input never reaches `map_anon(0)`.
        if bytes.len() < zip::EOCD_LEN {
            return Err(Error::checkpoint(name, zip::too_short(bytes.len() as u64)));
        }
        Self::parse(name, files::map_copy(bytes, name)?)
    }

    fn parse(path: &Path, map: Arc<Mmap>) -> Result<TorchFile> {
        let (root, storages) =
            read_archive(&map).map_err(|reason| Error::checkpoint(path, reason))?;
        Ok(TorchFile {
            path: path.to_owned(),
            map,
            root,
            storages,
        })
    }

    /// The file it was read from (`<memory>` for `from_bytes`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved object.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// The bytes of tensor `t` (called `name` in messages), checked to be a
    /// contiguous row-major view of a float storage that the archive holds
    /// in full.
    pub fn raw_tensor(&self, name: &str, t: &TorchTensor) -> Result<RawTensor> {
        let bad = |why: String| Error::checkpoint(&self.path, format!("tensor {name}: {why}"));
        let dtype = t.dtype.raw().ok_or_else(|| {
            bad(format!(
                "its elements are {}; model weights must be float32, float16 or bfloat16",
                t.dtype.name()
            ))
        })?;
        if t.shape.len() != t.stride.len() {
            return Err(bad(format!(
                "its shape {:?} and strides {:?} have different lengths",
                t.shape, t.stride
            )));
        }
        if !t.is_contiguous() {
            return Err(bad(format!(
                "it is a non-contiguous view (shape {:?}, strides {:?}; a contiguous tensor of \
                 this shape has strides {:?}); save `tensor.contiguous()` instead",
                t.shape,
                t.stride,
                t.contiguous_stride()
            )));
        }
        let end = t
            .numel()
            .and_then(|n| n.checked_add(t.storage_offset))
            .ok_or_else(|| bad(format!("its shape {:?} overflows", t.shape)))?;
        if end > t.storage_len {
            return Err(bad(format!(
                "its elements {}..{end} lie outside its storage of {} elements",
                t.storage_offset, t.storage_len
            )));
        }
        let entry = self.storages.get(&t.storage).ok_or_else(|| {
            bad(format!(
                "its storage data/{} is missing from the archive",
                t.storage
            ))
        })?;
        let (data, bytes) = entry.stored().map_err(bad)?;
        let element = t.dtype.element_bytes() as u64;
        let needed = (end as u64).saturating_mul(element);
        if needed > bytes {
            return Err(bad(format!(
                "its storage entry data/{} holds {bytes} bytes, fewer than the {needed} its \
                 elements up to {end} need: the file is truncated or damaged",
                t.storage
            )));
        }
        RawTensor::new(
            name.to_owned(),
            dtype,
            t.shape.clone(),
            Arc::clone(&self.map),
            data + t.storage_offset as u64 * element,
        )
    }

    /// The model's tensors by name: the root dict itself when it is a state
    /// dict (Meta's `consolidated.NN.pth`), or the state dict under its
    /// `"model"` key (llama2.c's `train.py` checkpoint). A leading
    /// `_orig_mod.` (torch.compile's wrapper) is taken off every name.
    pub fn state_dict(&self) -> Result<Vec<(String, TorchTensor)>> {
        let bad = |why: String| Error::checkpoint(&self.path, why);
        let dict = self.model_dict().map_err(bad)?;
        let mut seen = std::collections::HashSet::new();
        let mut tensors = Vec::with_capacity(dict.len());
        for (key, value) in dict {
            let Value::Str(name) = key else {
                return Err(bad(format!(
                    "the state dict has a key that is {}, not a tensor name",
                    key.kind()
                )));
            };
            let Value::Tensor(t) = value else {
                return Err(bad(format!(
                    "state dict entry {name} is {}, not a tensor",
                    value.kind()
                )));
            };
            let name = name.strip_prefix(COMPILED_PREFIX).unwrap_or(name);
            if !seen.insert(name) {
                return Err(bad(format!("the state dict names tensor {name} twice")));
            }
            tensors.push((name.to_owned(), t.clone()));
        }
        Ok(tensors)
    }

    /// The dict that holds the model's tensors.
    fn model_dict(&self) -> std::result::Result<&[(Value, Value)], String> {
        let Value::Dict(root) = &self.root else {
            return Err(format!(
                "it holds {}, not a state dict (a dict of tensors)",
                self.root.kind()
            ));
        };
        let has_tensors =
            |pairs: &[(Value, Value)]| pairs.iter().any(|(_, v)| matches!(v, Value::Tensor(_)));
        if has_tensors(root) {
            return Ok(root);
        }
        match self.root.get("model") {
            Some(Value::Dict(model)) if has_tensors(model) => Ok(model),
            _ => Err(format!(
                "it is neither a state dict (a dict of tensors, as Meta's consolidated.NN.pth) \
                 nor a training checkpoint with one under \"model\" (as llama2.c's train.py \
                 writes); its top-level keys are {}",
                describe_keys(root)
            )),
        }
    }
}

/// The first few keys of a dict, for messages.
fn describe_keys(pairs: &[(Value, Value)]) -> String {
    const SHOWN: usize = 12;
    let mut keys: Vec<String> = pairs
        .iter()
        .take(SHOWN)
        .map(|(k, _)| match k {
            Value::Str(s) => format!("{:?}", truncate(s)),
            other => other.kind().to_owned(),
        })
        .collect();
    if pairs.len() > SHOWN {
        keys.push(format!("and {} more", pairs.len() - SHOWN));
    }
    if keys.is_empty() {
        "none".to_owned()
    } else {
        keys.join(", ")
    }
}

/// A name from the file, cut short for messages.
fn truncate(s: &str) -> &str {
    const LONGEST: usize = 120;
    match s.char_indices().nth(LONGEST) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

/// The archive's pickle, parsed, and its storage entries by key.
fn read_archive(bytes: &[u8]) -> std::result::Result<(Value, HashMap<String, zip::Entry>), String> {
    let entries = zip::read_entries(bytes)?;
    let prefix = archive_prefix(&entries)?;
    check_not_torchscript(&entries, prefix)?;
    check_byte_order(bytes, &entries, prefix)?;
    let pickle_name = format!("{prefix}/data.pkl");
    let pickle = entries
        .iter()
        .find(|e| e.name == pickle_name)
        .ok_or_else(|| format!("the archive has no {pickle_name}"))?
        .stored_bytes(bytes)?;
    let root = unpickle::parse(pickle)?;
    let data_dir = format!("{prefix}/data/");
    let mut storages = HashMap::new();
    for entry in &entries {
        if let Some(key) = entry.name.strip_prefix(&data_dir) {
            if storages.insert(key.to_owned(), entry.clone()).is_some() {
                return Err(format!(
                    "the archive holds two entries named {:?}",
                    truncate(&entry.name)
                ));
            }
        }
    }
    Ok((root, storages))
}

/// The archive's top folder: `X` of its one `X/data.pkl`.
fn archive_prefix(entries: &[zip::Entry]) -> std::result::Result<&str, String> {
    let mut pickles = entries.iter().filter_map(|e| {
        e.name
            .strip_suffix("/data.pkl")
            .filter(|prefix| !prefix.is_empty() && !prefix.contains('/'))
    });
    match (pickles.next(), pickles.next()) {
        (Some(prefix), None) => Ok(prefix),
        (None, _) => Err(format!(
            "it is a zip archive but not a torch.save one: no entry is named <folder>/data.pkl \
             ({} entries)",
            entries.len()
        )),
        (Some(a), Some(b)) => Err(format!(
            "the archive holds more than one pickle ({:?}/data.pkl, {:?}/data.pkl, ...); \
             torch.save writes one",
            truncate(a),
            truncate(b)
        )),
    }
}

/// TorchScript archives (`torch.jit.save`) also hold a `data.pkl`, but what
/// they store is a program; say so rather than fail on its first class.
fn check_not_torchscript(entries: &[zip::Entry], prefix: &str) -> std::result::Result<(), String> {
    let code = format!("{prefix}/code/");
    if entries.iter().any(|e| e.name.starts_with(&code)) {
        return Err(
            "it is a TorchScript archive (torch.jit.save), which holds a program, not a \
             checkpoint; save the model's state_dict() with torch.save instead"
                .to_owned(),
        );
    }
    Ok(())
}

/// Storages hold the saving machine's byte order; torch writes it down
/// (files from before it did are little-endian).
fn check_byte_order(
    bytes: &[u8],
    entries: &[zip::Entry],
    prefix: &str,
) -> std::result::Result<(), String> {
    let name = format!("{prefix}/byteorder");
    let Some(entry) = entries.iter().find(|e| e.name == name) else {
        return Ok(());
    };
    match entry.stored_bytes(bytes)? {
        b"little" => Ok(()),
        other => Err(format!(
            "its storages are in byte order {:?}; only little-endian checkpoints are supported",
            String::from_utf8_lossy(&other[..other.len().min(16)])
        )),
    }
}

/// The zip container: end-of-central-directory record (and its ZIP64
/// extension, which torch writes for large files), central directory, local
/// headers. Only the layout is read; entries must be stored uncompressed, as
/// torch.save writes them, so their data is a window of the file. CRCs are
/// not checked: that would read every byte of a multi-gigabyte file at open,
/// and a damaged weight shows up where weights are checked (norms at load,
/// logits every step).
mod zip {
    /// Size of the end-of-central-directory record, without its comment.
    pub(super) const EOCD_LEN: usize = 22;
    const EOCD_SIG: u32 = 0x0605_4b50;
    const MAX_COMMENT: usize = 0xFFFF;
    const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
    const ZIP64_LOCATOR_LEN: u64 = 20;
    const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
    const CENTRAL_SIG: u32 = 0x0201_4b50;
    const CENTRAL_LEN: u64 = 46;
    const LOCAL_SIG: u32 = 0x0403_4b50;
    const LOCAL_LEN: u64 = 30;
    const ZIP64_EXTRA: u16 = 0x0001;
    /// A 32-bit field with this value is stored in the ZIP64 extra field.
    const SATURATED32: u32 = u32::MAX;
    const SATURATED16: u16 = u16::MAX;
    const METHOD_STORED: u16 = 0;
    const FLAG_ENCRYPTED: u16 = 1;

    type Res<T> = std::result::Result<T, String>;

    /// The message for a file too short to hold any zip archive.
    pub(super) fn too_short(len: u64) -> String {
        format!(
            "the file is {len} bytes, shorter than the smallest zip archive ({EOCD_LEN} bytes); \
             a PyTorch checkpoint is a zip archive"
        )
    }

    /// One archive entry, located.
    #[derive(Clone, Debug)]
    pub(super) struct Entry {
        pub name: String,
        method: u16,
        flags: u16,
        compressed: u64,
        size: u64,
        /// Offset of the entry's data in the file.
        data: u64,
    }

    impl Entry {
        /// Offset and length of the entry's data, if it is stored as is.
        pub fn stored(&self) -> Res<(u64, u64)> {
            let name = super::truncate(&self.name);
            if self.flags & FLAG_ENCRYPTED != 0 {
                return Err(format!("archive entry {name} is encrypted"));
            }
            if self.method != METHOD_STORED {
                let method = match self.method {
                    8 => " (deflate)",
                    12 => " (bzip2)",
                    14 => " (lzma)",
                    93 => " (zstd)",
                    _ => "",
                };
                return Err(format!(
                    "archive entry {name} is compressed with method {}{method}; torch.save \
                     stores entries uncompressed, so the archive was re-packed: load and save \
                     it with torch again, or re-zip it without compression (zip -0)",
                    self.method
                ));
            }
            if self.compressed != self.size {
                return Err(format!(
                    "archive entry {name} is stored uncompressed but its sizes disagree \
                     ({} and {} bytes): the archive is damaged",
                    self.compressed, self.size
                ));
            }
            Ok((self.data, self.size))
        }

        /// The entry's data, if it is stored as is.
        pub fn stored_bytes<'a>(&self, file: &'a [u8]) -> Res<&'a [u8]> {
            let (at, len) = self.stored()?;
            Record::new(file, 0, "archive entry data").bytes(at, len)
        }
    }

    /// Little-endian fields of a record that starts at `at` of `file`;
    /// reading past the end of the file is an error naming the record.
    #[derive(Clone, Copy)]
    struct Record<'a> {
        file: &'a [u8],
        at: u64,
        what: &'static str,
    }

    impl<'a> Record<'a> {
        fn new(file: &'a [u8], at: u64, what: &'static str) -> Self {
            Record { file, at, what }
        }

        fn bytes(&self, offset: u64, len: u64) -> Res<&'a [u8]> {
            let start = self.at.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= self.file.len() as u64 => {
                    Ok(&self.file[s as usize..e as usize])
                }
                _ => Err(format!(
                    "{} at byte {} runs past the end of the file ({} bytes): the archive is \
                     truncated or damaged",
                    self.what,
                    self.at,
                    self.file.len()
                )),
            }
        }

        fn array<const N: usize>(&self, offset: u64) -> Res<[u8; N]> {
            let bytes = self.bytes(offset, N as u64)?;
            bytes
                .try_into()
                .map_err(|_| format!("{} at byte {}: a field is malformed", self.what, self.at))
        }

        fn u16(&self, offset: u64) -> Res<u16> {
            self.array(offset).map(u16::from_le_bytes)
        }

        fn u32(&self, offset: u64) -> Res<u32> {
            self.array(offset).map(u32::from_le_bytes)
        }

        fn u64(&self, offset: u64) -> Res<u64> {
            self.array(offset).map(u64::from_le_bytes)
        }

        fn has_signature(&self, sig: u32) -> bool {
            self.u32(0) == Ok(sig)
        }
    }

    /// Where the central directory is.
    struct Directory {
        entries: u64,
        offset: u64,
        size: u64,
        /// The directory must end by here (where the end records begin).
        limit: u64,
    }

    /// Every entry of the archive in `file`, located and bounds-checked.
    pub(super) fn read_entries(file: &[u8]) -> Res<Vec<Entry>> {
        let eocd = find_end_record(file)?;
        let dir = read_directory_location(file, eocd)?;
        let end = dir
            .offset
            .checked_add(dir.size)
            .filter(|&e| e <= dir.limit)
            .ok_or_else(|| {
                format!(
                    "the central directory ({} bytes at byte {}) does not lie before the end \
                     record at byte {}: the archive is truncated or damaged",
                    dir.size, dir.offset, dir.limit
                )
            })?;
        // Each entry takes at least CENTRAL_LEN bytes, so the directory's
        // size, not the count it claims, bounds the allocation.
        let mut entries = Vec::with_capacity(dir.entries.min(dir.size / CENTRAL_LEN) as usize);
        let mut at = dir.offset;
        for _ in 0..dir.entries {
            let (entry, next) = read_central_entry(file, at, end)?;
            entries.push(entry);
            at = next;
        }
        Ok(entries)
    }

    /// Offset of the end-of-central-directory record: the last signature
    /// near the end of the file whose comment fits in the file.
    fn find_end_record(file: &[u8]) -> Res<u64> {
        if file.len() < EOCD_LEN {
            return Err(too_short(file.len() as u64));
        }
        let last = file.len() - EOCD_LEN;
        let first = last.saturating_sub(MAX_COMMENT);
        let found = (first..=last).rev().find(|&at| {
            let r = Record::new(file, at as u64, "");
            r.has_signature(EOCD_SIG)
                && r.u16(20)
                    .is_ok_and(|comment| at + EOCD_LEN + comment as usize <= file.len())
        });
        match found {
            Some(at) => Ok(at as u64),
            // torch.save before PyTorch 1.6 wrote a bare sequence of pickles.
            None if file.first() == Some(&0x80) => Err(
                "it is a legacy torch.save file (PyTorch before 1.6), not a zip archive; only \
                 the zip format is supported: load it with torch and save it again"
                    .to_owned(),
            ),
            None => Err(
                "it is not a zip archive (no end-of-central-directory record), so not a \
                 torch.save checkpoint"
                    .to_owned(),
            ),
        }
    }

    /// Reads the end record at `eocd`, and the ZIP64 end record it points to
    /// when there is one.
    fn read_directory_location(file: &[u8], eocd: u64) -> Res<Directory> {
        let r = Record::new(file, eocd, "the end-of-central-directory record");
        let disks = (r.u16(4)?, r.u16(6)?);
        let mut dir = Directory {
            entries: r.u16(10)?.into(),
            size: r.u32(12)?.into(),
            offset: r.u32(16)?.into(),
            limit: eocd,
        };
        let locator = eocd
            .checked_sub(ZIP64_LOCATOR_LEN)
            .map(|at| Record::new(file, at, "the ZIP64 end-of-central-directory locator"))
            .filter(|l| l.has_signature(ZIP64_LOCATOR_SIG));
        if let Some(locator) = locator {
            let at = locator.u64(8)?;
            let z = Record::new(file, at, "the ZIP64 end-of-central-directory record");
            if !z.has_signature(ZIP64_EOCD_SIG) || at >= locator.at {
                return Err(format!(
                    "the ZIP64 locator points at byte {at}, where there is no ZIP64 end record: \
                     the archive is damaged"
                ));
            }
            if (z.u32(16)?, z.u32(20)?) != (0, 0) {
                return Err(multi_disk());
            }
            dir = Directory {
                entries: z.u64(32)?,
                size: z.u64(40)?,
                offset: z.u64(48)?,
                limit: at,
            };
        } else if disks != (0, 0) && disks != (SATURATED16, SATURATED16) {
            return Err(multi_disk());
        }
        Ok(dir)
    }

    fn multi_disk() -> String {
        "the archive spans several disks (split zip), which torch.save never writes".to_owned()
    }

    /// The central directory entry at `at` (which must end by `end`), and
    /// where the next one starts.
    fn read_central_entry(file: &[u8], at: u64, end: u64) -> Res<(Entry, u64)> {
        let r = Record::new(file, at, "a central directory entry");
        if at.saturating_add(CENTRAL_LEN) > end || !r.has_signature(CENTRAL_SIG) {
            return Err(format!(
                "the central directory has no valid entry at byte {at}: the archive is \
                 truncated or damaged"
            ));
        }
        let name_len = u64::from(r.u16(28)?);
        let extra_len = u64::from(r.u16(30)?);
        let comment_len = u64::from(r.u16(32)?);
        let next = at + CENTRAL_LEN + name_len + extra_len + comment_len;
        if next > end {
            return Err(format!(
                "the central directory entry at byte {at} runs past the directory's end: the \
                 archive is damaged"
            ));
        }
        let name = String::from_utf8_lossy(r.bytes(CENTRAL_LEN, name_len)?).into_owned();
        let extra = r.bytes(CENTRAL_LEN + name_len, extra_len)?;
        let mut sizes = Zip64Fields {
            size: r.u32(24)?,
            compressed: r.u32(20)?,
            local: r.u32(42)?,
        }
        .resolve(extra)
        .map_err(|why| format!("archive entry {}: {why}", super::truncate(&name)))?;
        sizes.local = locate_data(file, sizes.local, sizes.compressed, &name)?;
        let entry = Entry {
            name,
            method: r.u16(10)?,
            flags: r.u16(8)?,
            compressed: sizes.compressed,
            size: sizes.size,
            data: sizes.local,
        };
        Ok((entry, next))
    }

    /// An entry's sizes and local header offset, 32-bit in the central
    /// directory unless saturated, when the ZIP64 extra field holds them.
    struct Zip64Fields {
        size: u32,
        compressed: u32,
        local: u32,
    }

    struct Resolved {
        size: u64,
        compressed: u64,
        local: u64,
    }

    impl Zip64Fields {
        fn resolve(self, extra: &[u8]) -> Res<Resolved> {
            let saturated = [self.size, self.compressed, self.local].contains(&SATURATED32);
            let mut wide = if saturated {
                zip64_extra(extra)?.chunks_exact(8)
            } else {
                [].chunks_exact(8)
            };
            // The extra field holds the saturated fields only, in this order.
            let mut widen = |v: u32| -> Res<u64> {
                if v != SATURATED32 {
                    return Ok(v.into());
                }
                wide.next()
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_le_bytes)
                    .ok_or_else(|| "its ZIP64 extra field is missing a size or offset".to_owned())
            };
            Ok(Resolved {
                size: widen(self.size)?,
                compressed: widen(self.compressed)?,
                local: widen(self.local)?,
            })
        }
    }

    /// The data of the ZIP64 extra field among an entry's extra fields.
    fn zip64_extra(mut extra: &[u8]) -> Res<&[u8]> {
        while extra.len() >= 4 {
            let id = u16::from_le_bytes([extra[0], extra[1]]);
            let len = usize::from(u16::from_le_bytes([extra[2], extra[3]]));
            let body = extra
                .get(4..4 + len)
                .ok_or_else(|| "its extra fields are malformed".to_owned())?;
            if id == ZIP64_EXTRA {
                return Ok(body);
            }
            extra = &extra[4 + len..];
        }
        Err(
            "a size or offset is marked as stored in a ZIP64 extra field, which is missing"
                .to_owned(),
        )
    }

    /// Offset of the data after the local header at `local`, checked to hold
    /// `len` bytes. The local header's own name and extra lengths count:
    /// torch pads its extra field so that storages start aligned.
    fn locate_data(file: &[u8], local: u64, len: u64, name: &str) -> Res<u64> {
        let r = Record::new(file, local, "a local file header");
        if !r.has_signature(LOCAL_SIG) {
            return Err(format!(
                "archive entry {}: no local file header at byte {local}: the archive is \
                 truncated or damaged",
                super::truncate(name)
            ));
        }
        let skip = LOCAL_LEN + u64::from(r.u16(26)?) + u64::from(r.u16(28)?);
        r.bytes(skip, len)?;
        Ok(local + skip)
    }
}

/// The pickle machine, restricted to data: a stack, a memo, and objects in
/// an arena, so that a memoized list or dict is shared, as in Python, and
/// filled in place by later opcodes. The result becomes a `Value` tree at
/// STOP.
mod unpickle {
    use std::collections::HashMap;

    use super::{truncate, TorchDType, TorchTensor, Value};

    type Res<T> = std::result::Result<T, String>;

    /// Index of an object in the arena.
    type Id = usize;

    /// Most items on the stack at once; torch's pickler batches at 1000.
    pub(super) const STACK_LIMIT: usize = 1 << 20;
    /// Most open MARKs at once.
    pub(super) const MARK_LIMIT: usize = 1 << 16;
    /// Deepest nesting of containers in the result.
    const DEPTH_LIMIT: usize = 256;
    /// Highest pickle protocol there is.
    const HIGHEST_PROTOCOL: u8 = 5;
    /// Bytes of result allowed, beyond a proportional share of the pickle:
    /// an object referred to many times is copied each time into the tree,
    /// so a tiny pickle could otherwise ask for exponential memory.
    const RESULT_BASE_BYTES: u64 = 64 << 20;
    const RESULT_BYTES_PER_PICKLE_BYTE: u64 = 256;

    /// The opcodes this reader knows, by their byte.
    mod op {
        pub const MARK: u8 = b'(';
        pub const STOP: u8 = b'.';
        pub const BINFLOAT: u8 = b'G';
        pub const BININT: u8 = b'J';
        pub const BININT1: u8 = b'K';
        pub const BININT2: u8 = b'M';
        pub const NONE: u8 = b'N';
        pub const BINPERSID: u8 = b'Q';
        pub const REDUCE: u8 = b'R';
        pub const BINUNICODE: u8 = b'X';
        pub const EMPTY_LIST: u8 = b']';
        pub const APPEND: u8 = b'a';
        pub const BUILD: u8 = b'b';
        pub const GLOBAL: u8 = b'c';
        pub const APPENDS: u8 = b'e';
        pub const BINGET: u8 = b'h';
        pub const LONG_BINGET: u8 = b'j';
        pub const BINPUT: u8 = b'q';
        pub const LONG_BINPUT: u8 = b'r';
        pub const SETITEM: u8 = b's';
        pub const TUPLE: u8 = b't';
        pub const SETITEMS: u8 = b'u';
        pub const EMPTY_DICT: u8 = b'}';
        pub const EMPTY_TUPLE: u8 = b')';
        pub const BINBYTES: u8 = b'B';
        pub const SHORT_BINBYTES: u8 = b'C';
        pub const PROTO: u8 = 0x80;
        pub const NEWOBJ: u8 = 0x81;
        pub const TUPLE1: u8 = 0x85;
        pub const TUPLE2: u8 = 0x86;
        pub const TUPLE3: u8 = 0x87;
        pub const NEWTRUE: u8 = 0x88;
        pub const NEWFALSE: u8 = 0x89;
        pub const LONG1: u8 = 0x8a;
        pub const SHORT_BINUNICODE: u8 = 0x8c;
        pub const BINUNICODE8: u8 = 0x8d;
        pub const BINBYTES8: u8 = 0x8e;
        pub const STACK_GLOBAL: u8 = 0x93;
        pub const MEMOIZE: u8 = 0x94;
        pub const FRAME: u8 = 0x95;
    }

    /// Pickle opcodes this reader refuses, by byte: the name, and whether
    /// the opcode creates or calls an arbitrary object (runs code).
    const REFUSED: &[(u8, &str, bool)] = &[
        (b'i', "INST", true),
        (b'o', "OBJ", true),
        (0x92, "NEWOBJ_EX", true),
        (0x82, "EXT1", true),
        (0x83, "EXT2", true),
        (0x84, "EXT4", true),
        (b'P', "PERSID", false),
        (b'I', "INT", false),
        (b'L', "LONG", false),
        (0x8b, "LONG4", false),
        (b'F', "FLOAT", false),
        (b'S', "STRING", false),
        (b'T', "BINSTRING", false),
        (b'U', "SHORT_BINSTRING", false),
        (b'V', "UNICODE", false),
        (b'd', "DICT", false),
        (b'l', "LIST", false),
        (b'p', "PUT", false),
        (b'g', "GET", false),
        (b'0', "POP", false),
        (b'1', "POP_MARK", false),
        (b'2', "DUP", false),
        (0x8f, "EMPTY_SET", false),
        (0x90, "ADDITEMS", false),
        (0x91, "FROZENSET", false),
        (0x96, "BYTEARRAY8", false),
        (0x97, "NEXT_BUFFER", false),
        (0x98, "READONLY_BUFFER", false),
    ];

    /// The globals a checkpoint may name. None of them is ever called:
    /// "calling" one below builds the data value it stands for.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Kind {
        OrderedDict,
        RebuildTensorV2,
        RebuildParameter,
        Storage(TorchDType),
        Dtype,
    }

    /// A listed global: module, name, what it stands for.
    type Global = (&'static str, &'static str, Kind);

    const GLOBALS: &[Global] = &[
        ("collections", "OrderedDict", Kind::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2", Kind::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter", Kind::RebuildParameter),
        ("torch", "FloatStorage", Kind::Storage(TorchDType::F32)),
        ("torch", "HalfStorage", Kind::Storage(TorchDType::F16)),
        ("torch", "BFloat16Storage", Kind::Storage(TorchDType::BF16)),
        ("torch", "DoubleStorage", Kind::Storage(TorchDType::F64)),
        ("torch", "LongStorage", Kind::Storage(TorchDType::I64)),
        ("torch", "IntStorage", Kind::Storage(TorchDType::I32)),
        ("torch", "ShortStorage", Kind::Storage(TorchDType::I16)),
        ("torch", "CharStorage", Kind::Storage(TorchDType::I8)),
        ("torch", "ByteStorage", Kind::Storage(TorchDType::U8)),
        ("torch", "BoolStorage", Kind::Storage(TorchDType::Bool)),
        (
            "torch",
            "ComplexFloatStorage",
            Kind::Storage(TorchDType::Complex64),
        ),
        (
            "torch",
            "ComplexDoubleStorage",
            Kind::Storage(TorchDType::Complex128),
        ),
        ("torch", "float32", Kind::Dtype),
        ("torch", "float16", Kind::Dtype),
        ("torch", "bfloat16", Kind::Dtype),
    ];

    /// The dotted name of a global, for values and messages.
    fn dotted(g: &Global) -> String {
        format!("{}.{}", g.0, g.1)
    }

    /// Objects of the pickle machine.
    enum Obj {
        None,
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(String),
        Bytes(Vec<u8>),
        List(Vec<Id>),
        Tuple(Vec<Id>),
        Dict(Vec<(Id, Id)>),
        Global(&'static Global),
        /// A storage a persistent id names, before a tensor views it.
        Storage {
            dtype: TorchDType,
            key: String,
            device: String,
            len: usize,
        },
        Tensor(TorchTensor),
    }

    impl Obj {
        fn kind(&self) -> &'static str {
            match self {
                Obj::None => "None",
                Obj::Bool(_) => "a bool",
                Obj::Int(_) => "an int",
                Obj::Float(_) => "a float",
                Obj::Str(_) => "a string",
                Obj::Bytes(_) => "bytes",
                Obj::List(_) => "a list",
                Obj::Tuple(_) => "a tuple",
                Obj::Dict(_) => "a dict",
                Obj::Global(_) => "a Python global",
                Obj::Storage { .. } => "a tensor storage",
                Obj::Tensor(_) => "a tensor",
            }
        }
    }

    /// Parses a checkpoint's `data.pkl` into the value it holds.
    pub(super) fn parse(pickle: &[u8]) -> Res<Value> {
        Machine::new(pickle).run()
    }

    struct Machine<'a> {
        code: &'a [u8],
        pos: usize,
        /// Offset of the opcode being run, for messages.
        op_at: usize,
        objects: Vec<Obj>,
        stack: Vec<Id>,
        /// Stack lengths at each open MARK.
        marks: Vec<usize>,
        memo: HashMap<u32, Id>,
    }

    impl<'a> Machine<'a> {
        fn new(code: &'a [u8]) -> Self {
            Machine {
                code,
                pos: 0,
                op_at: 0,
                objects: Vec::new(),
                stack: Vec::new(),
                marks: Vec::new(),
                memo: HashMap::new(),
            }
        }

        /// Runs opcodes up to STOP. Bytes after STOP are ignored, as Python
        /// ignores them.
        fn run(mut self) -> Res<Value> {
            loop {
                self.op_at = self.pos;
                let Some(&op) = self.code.get(self.pos) else {
                    return Err(format!(
                        "data.pkl ends after {} bytes without its STOP opcode: it is truncated",
                        self.code.len()
                    ));
                };
                self.pos += 1;
                if op == op::STOP {
                    return self.finish();
                }
                self.step(op)
                    .map_err(|why| format!("data.pkl, byte {}: {why}", self.op_at))?;
            }
        }

        /// The saved object: the one item left on the stack.
        fn finish(self) -> Res<Value> {
            if !self.marks.is_empty() || self.stack.len() != 1 {
                return Err(format!(
                    "data.pkl stops with {} items on its stack and {} open marks; a pickle \
                     leaves exactly one object: the file is damaged",
                    self.stack.len(),
                    self.marks.len()
                ));
            }
            let budget = RESULT_BASE_BYTES.saturating_add(
                RESULT_BYTES_PER_PICKLE_BYTE.saturating_mul(self.code.len() as u64),
            );
            let mut tree = Tree {
                objects: &self.objects,
                open: vec![false; self.objects.len()],
                budget,
            };
            tree.value(self.stack[0], 0)
        }

        fn step(&mut self, op: u8) -> Res<()> {
            match op {
                op::PROTO => self.protocol(),
                op::FRAME => self.frame(),
                op::MARK => self.mark(),
                op::EMPTY_DICT => self.push_new(Obj::Dict(Vec::new())),
                op::EMPTY_LIST => self.push_new(Obj::List(Vec::new())),
                op::EMPTY_TUPLE => self.push_new(Obj::Tuple(Vec::new())),
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push_new(Obj::Tuple(items))
                }
                op::TUPLE1 => self.small_tuple(1),
                op::TUPLE2 => self.small_tuple(2),
                op::TUPLE3 => self.small_tuple(3),
                op::APPEND => {
                    let item = self.pop()?;
                    self.extend_list(vec![item])
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    self.extend_list(items)
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    self.extend_dict(vec![key, value])
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    self.extend_dict(items)
                }
                op::BINPUT => {
                    let [i] = self.array()?;
                    self.memo_put(i.into())
                }
                op::LONG_BINPUT => {
                    let i = u32::from_le_bytes(self.array()?);
                    self.memo_put(i)
                }
                op::MEMOIZE => {
                    let i = u32::try_from(self.memo.len())
                        .map_err(|_| "the memo is full".to_owned())?;
                    self.memo_put(i)
                }
                op::BINGET => {
                    let [i] = self.array()?;
                    self.memo_get(i.into())
                }
                op::LONG_BINGET => {
                    let i = u32::from_le_bytes(self.array()?);
                    self.memo_get(i)
                }
                op::BININT => {
                    let i = i32::from_le_bytes(self.array()?);
                    self.push_new(Obj::Int(i.into()))
                }
                op::BININT1 => {
                    let [i] = self.array()?;
                    self.push_new(Obj::Int(i.into()))
                }
                op::BININT2 => {
                    let i = u16::from_le_bytes(self.array()?);
                    self.push_new(Obj::Int(i.into()))
                }
                op::LONG1 => self.long1(),
                op::BINFLOAT => {
                    let f = f64::from_be_bytes(self.array()?);
                    self.push_new(Obj::Float(f))
                }
                op::NONE => self.push_new(Obj::None),
                op::NEWTRUE => self.push_new(Obj::Bool(true)),
                op::NEWFALSE => self.push_new(Obj::Bool(false)),
                op::SHORT_BINUNICODE => {
                    let [n] = self.array()?;
                    self.unicode(n.into())
                }
                op::BINUNICODE => {
                    let n = u32::from_le_bytes(self.array()?);
                    self.unicode(n.into())
                }
                op::BINUNICODE8 => {
                    let n = u64::from_le_bytes(self.array()?);
                    self.unicode(n)
                }
                op::SHORT_BINBYTES => {
                    let [n] = self.array()?;
                    self.bytes(n.into())
                }
                op::BINBYTES => {
                    let n = u32::from_le_bytes(self.array()?);
                    self.bytes(n.into())
                }
                op::BINBYTES8 => {
                    let n = u64::from_le_bytes(self.array()?);
                    self.bytes(n)
                }
                op::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push_global(module, name)
                }
                op::STACK_GLOBAL => self.stack_global(),
                op::REDUCE => self.reduce(),
                op::NEWOBJ => self.new_object(),
                op::BUILD => self.build(),
                op::BINPERSID => self.persistent_load(),
                other => Err(refuse_opcode(other)),
            }
        }

        /// The next `n` bytes, if the pickle holds that many.
        fn take(&mut self, n: u64) -> Res<&'a [u8]> {
            let left = self.code.len() - self.pos;
            if n > left as u64 {
                return Err(format!(
                    "the opcode needs {n} more bytes but the pickle ends after {left}: data.pkl \
                     is truncated or damaged"
                ));
            }
            let bytes = &self.code[self.pos..self.pos + n as usize];
            self.pos += n as usize;
            Ok(bytes)
        }

        fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
            let bytes = self.take(N as u64)?;
            bytes
                .try_into()
                .map_err(|_| "an opcode argument is malformed".to_owned())
        }

        /// A newline-terminated text argument (GLOBAL's module and name).
        fn line(&mut self) -> Res<&'a str> {
            let rest = &self.code[self.pos..];
            let len = rest
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| "GLOBAL's name has no end: data.pkl is truncated".to_owned())?;
            let line = self.take(len as u64 + 1)?;
            std::str::from_utf8(&line[..len])
                .map_err(|_| "GLOBAL's name is not valid UTF-8".to_owned())
        }

        fn unicode(&mut self, n: u64) -> Res<()> {
            let bytes = self.take(n)?;
            let s =
                std::str::from_utf8(bytes).map_err(|_| "a string is not valid UTF-8".to_owned())?;
            self.push_new(Obj::Str(s.to_owned()))
        }

        fn bytes(&mut self, n: u64) -> Res<()> {
            let bytes = self.take(n)?.to_vec();
            self.push_new(Obj::Bytes(bytes))
        }

        /// LONG1: a little-endian two's-complement integer of up to 255 bytes;
        /// only those that fit in 64 bits are accepted.
        fn long1(&mut self) -> Res<()> {
            let [n] = self.array()?;
            let bytes = self.take(n.into())?;
            if bytes.len() > 8 {
                return Err(format!(
                    "an integer of {} bytes is wider than 64 bits",
                    bytes.len()
                ));
            }
            let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
            let mut wide = [if negative { 0xff } else { 0 }; 8];
            wide[..bytes.len()].copy_from_slice(bytes);
            self.push_new(Obj::Int(i64::from_le_bytes(wide)))
        }

        fn protocol(&mut self) -> Res<()> {
            let [version] = self.array()?;
            if version > HIGHEST_PROTOCOL {
                return Err(format!(
                    "pickle protocol {version} does not exist (the highest is {HIGHEST_PROTOCOL})"
                ));
            }
            Ok(())
        }

        /// FRAME only groups opcodes for buffered reading; its length is
        /// checked and otherwise ignored.
        fn frame(&mut self) -> Res<()> {
            let len = u64::from_le_bytes(self.array()?);
            let left = (self.code.len() - self.pos) as u64;
            if len > left {
                return Err(format!(
                    "a frame of {len} bytes is longer than the {left} left: data.pkl is truncated"
                ));
            }
            Ok(())
        }

        fn push_new(&mut self, obj: Obj) -> Res<()> {
            self.objects.push(obj);
            self.push(self.objects.len() - 1)
        }

        fn push(&mut self, id: Id) -> Res<()> {
            if self.stack.len() >= STACK_LIMIT {
                return Err(format!(
                    "the stack holds more than {STACK_LIMIT} items, far more than a checkpoint \
                     needs"
                ));
            }
            self.stack.push(id);
            Ok(())
        }

        /// The stack index below which the current MARK hides items.
        fn fence(&self) -> usize {
            self.marks.last().copied().unwrap_or(0)
        }

        fn pop(&mut self) -> Res<Id> {
            if self.stack.len() <= self.fence() {
                return Err("an opcode takes an item from an empty stack".to_owned());
            }
            self.stack
                .pop()
                .ok_or_else(|| "an opcode takes an item from an empty stack".to_owned())
        }

        fn top(&self) -> Res<Id> {
            match self.stack.len().checked_sub(1) {
                Some(i) if i >= self.fence() => Ok(self.stack[i]),
                _ => Err("an opcode needs an item but the stack is empty".to_owned()),
            }
        }

        fn mark(&mut self) -> Res<()> {
            if self.marks.len() >= MARK_LIMIT {
                return Err(format!(
                    "more than {MARK_LIMIT} MARKs are open, far more than a checkpoint needs"
                ));
            }
            self.marks.push(self.stack.len());
            Ok(())
        }

        /// The items pushed since the last MARK, which is closed.
        fn pop_mark(&mut self) -> Res<Vec<Id>> {
            let start = self
                .marks
                .pop()
                .ok_or_else(|| "an opcode needs a MARK but none is open".to_owned())?;
            if start > self.stack.len() {
                return Err("the stack shrank below an open MARK".to_owned());
            }
            Ok(self.stack.split_off(start))
        }

        fn small_tuple(&mut self, n: usize) -> Res<()> {
            let mut items = vec![0; n];
            for slot in items.iter_mut().rev() {
                *slot = self.pop()?;
            }
            self.push_new(Obj::Tuple(items))
        }

        fn memo_put(&mut self, index: u32) -> Res<()> {
            let id = self.top()?;
            self.memo.insert(index, id);
            Ok(())
        }

        fn memo_get(&mut self, index: u32) -> Res<()> {
            let id = *self.memo.get(&index).ok_or_else(|| {
                format!("it refers to memo entry {index}, which was never stored")
            })?;
            self.push(id)
        }

        fn extend_list(&mut self, items: Vec<Id>) -> Res<()> {
            let target = self.top()?;
            match &mut self.objects[target] {
                Obj::List(list) => {
                    list.extend(items);
                    Ok(())
                }
                other => Err(format!(
                    "APPEND adds to {}; only lists are appended to here",
                    other.kind()
                )),
            }
        }

        /// Adds key, value, key, value... to the dict on top of the stack.
        fn extend_dict(&mut self, items: Vec<Id>) -> Res<()> {
            if !items.len().is_multiple_of(2) {
                return Err(format!(
                    "SETITEMS has {} items, not key-value pairs",
                    items.len()
                ));
            }
            let target = self.top()?;
            match &mut self.objects[target] {
                Obj::Dict(dict) => {
                    dict.extend(items.chunks_exact(2).map(|kv| (kv[0], kv[1])));
                    Ok(())
                }
                other => Err(format!(
                    "SETITEM sets an item of {}; only dicts have items set here",
                    other.kind()
                )),
            }
        }

        fn stack_global(&mut self) -> Res<()> {
            let name = self.pop()?;
            let module = self.pop()?;
            match (&self.objects[module], &self.objects[name]) {
                (Obj::Str(m), Obj::Str(n)) => {
                    let (m, n) = (m.clone(), n.clone());
                    self.push_global(&m, &n)
                }
                (m, n) => Err(format!(
                    "STACK_GLOBAL names a global by {} and {}, not two strings",
                    m.kind(),
                    n.kind()
                )),
            }
        }

        /// Pushes a listed global; any other is refused here, before
        /// anything could use it.
        fn push_global(&mut self, module: &str, name: &str) -> Res<()> {
            let global = GLOBALS
                .iter()
                .find(|g| g.0 == module && g.1 == name)
                .ok_or_else(|| refuse_global(module, name))?;
            self.push_new(Obj::Global(global))
        }

        /// The items of the tuple `id` (the arguments of a call).
        fn tuple_items(&self, id: Id, what: &str) -> Res<Vec<Id>> {
            match &self.objects[id] {
                Obj::Tuple(items) => Ok(items.clone()),
                other => Err(format!("{what} are {}, not a tuple", other.kind())),
            }
        }

        /// The listed global at `id`, about to be "called" by `opcode`.
        fn callee(&self, id: Id, opcode: &str) -> Res<&'static Global> {
            match &self.objects[id] {
                Obj::Global(g) => Ok(*g),
                other => Err(format!(
                    "{opcode} calls {}, which is not a function; this reader never runs code \
                     from a file",
                    other.kind()
                )),
            }
        }

        fn reduce(&mut self) -> Res<()> {
            let args = self.pop()?;
            let func = self.pop()?;
            let global = self.callee(func, "REDUCE")?;
            let args = self.tuple_items(args, "REDUCE's arguments")?;
            match global.2 {
                Kind::OrderedDict => {
                    self.expect_no_args(global, &args)?;
                    self.push_new(Obj::Dict(Vec::new()))
                }
                Kind::RebuildTensorV2 => {
                    let tensor = self.rebuild_tensor(&args)?;
                    self.push_new(Obj::Tensor(tensor))
                }
                Kind::RebuildParameter => self.rebuild_parameter(&args),
                Kind::Storage(_) | Kind::Dtype => Err(refuse_call(global)),
            }
        }

        /// NEWOBJ: `cls.__new__(cls, *args)`; only an empty OrderedDict.
        fn new_object(&mut self) -> Res<()> {
            let args = self.pop()?;
            let class = self.pop()?;
            let global = self.callee(class, "NEWOBJ")?;
            let args = self.tuple_items(args, "NEWOBJ's arguments")?;
            if global.2 != Kind::OrderedDict {
                return Err(refuse_call(global));
            }
            self.expect_no_args(global, &args)?;
            self.push_new(Obj::Dict(Vec::new()))
        }

        fn expect_no_args(&self, global: &Global, args: &[Id]) -> Res<()> {
            if args.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "{} is called with {} arguments; a checkpoint creates it empty and fills it",
                    dotted(global),
                    args.len()
                ))
            }
        }

        /// BUILD sets an object's state. torch saves a state dict's
        /// attributes (its `_metadata`) so, which are not tensors and are
        /// dropped; on anything else it would run a class's code.
        fn build(&mut self) -> Res<()> {
            let state = self.pop()?;
            let target = self.top()?;
            match (&self.objects[target], &self.objects[state]) {
                (Obj::Dict(_), Obj::Dict(_) | Obj::None | Obj::Tuple(_)) => Ok(()),
                (Obj::Dict(_), state) => Err(format!(
                    "BUILD gives a dict a state that is {}, not attributes",
                    state.kind()
                )),
                (other, _) => Err(format!(
                    "the file asks for code to be run: BUILD sets the state of {}, which would \
                     run its class's __setstate__; this reader never runs code from a file",
                    other.kind()
                )),
            }
        }

        /// BINPERSID: torch's reference to a storage, the tuple
        /// `("storage", storage type, key, location, number of elements)`.
        fn persistent_load(&mut self) -> Res<()> {
            let pid = self.pop()?;
            let items = self.tuple_items(pid, "a persistent id's parts")?;
            let bad = || {
                "a persistent id is not (\"storage\", type, key, location, size) as torch.save \
                 writes it"
                    .to_owned()
            };
            let [tag, kind, key, device, len] = items[..] else {
                return Err(bad());
            };
            if !matches!(&self.objects[tag], Obj::Str(s) if s == "storage") {
                return Err(bad());
            }
            let dtype = match &self.objects[kind] {
                Obj::Global((_, _, Kind::Storage(dtype))) => *dtype,
                _ => return Err(bad()),
            };
            let (Obj::Str(key), Obj::Str(device)) = (&self.objects[key], &self.objects[device])
            else {
                return Err(bad());
            };
            let storage = Obj::Storage {
                dtype,
                key: key.clone(),
                device: device.clone(),
                len: self.usize_at(len, "a storage's size")?,
            };
            self.push_new(storage)
        }

        /// `_rebuild_tensor_v2(storage, storage_offset, size, stride,
        /// requires_grad, backward_hooks[, metadata])`: a view of a storage.
        fn rebuild_tensor(&self, args: &[Id]) -> Res<TorchTensor> {
            if !(6..=7).contains(&args.len()) {
                return Err(format!(
                    "torch._utils._rebuild_tensor_v2 takes 6 or 7 arguments, not {}",
                    args.len()
                ));
            }
            let Obj::Storage {
                dtype,
                key,
                device,
                len,
            } = &self.objects[args[0]]
            else {
                return Err(format!(
                    "a tensor is built on {}, not a storage",
                    self.objects[args[0]].kind()
                ));
            };
            let shape = self.usizes_at(args[2], "a tensor's shape")?;
            let stride = self.usizes_at(args[3], "a tensor's strides")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "a tensor has shape {shape:?} but strides {stride:?}, of another length"
                ));
            }
            Ok(TorchTensor {
                dtype: *dtype,
                shape,
                stride,
                storage_offset: self.usize_at(args[1], "a tensor's storage offset")?,
                storage: key.clone(),
                storage_len: *len,
                device: device.clone(),
            })
        }

        /// `_rebuild_parameter(data, requires_grad, backward_hooks)`: a
        /// parameter is its tensor here.
        fn rebuild_parameter(&mut self, args: &[Id]) -> Res<()> {
            match args.first() {
                Some(&data) if args.len() == 3 && matches!(self.objects[data], Obj::Tensor(_)) => {
                    self.push(data)
                }
                _ => Err(
                    "torch._utils._rebuild_parameter is not given (tensor, requires_grad, hooks)"
                        .to_owned(),
                ),
            }
        }

        fn usize_at(&self, id: Id, what: &str) -> Res<usize> {
            match &self.objects[id] {
                Obj::Int(i) => usize::try_from(*i)
                    .map_err(|_| format!("{what} is {i}; expected a count of elements")),
                other => Err(format!("{what} is {}, not an integer", other.kind())),
            }
        }

        fn usizes_at(&self, id: Id, what: &str) -> Res<Vec<usize>> {
            self.tuple_items(id, what)?
                .into_iter()
                .map(|i| self.usize_at(i, what))
                .collect()
        }
    }

    /// Turns the arena's object graph into a tree, refusing cycles, deep
    /// nesting and a tree too large for the pickle that describes it.
    struct Tree<'m> {
        objects: &'m [Obj],
        /// Objects being converted, on the path from the root.
        open: Vec<bool>,
        budget: u64,
    }

    impl Tree<'_> {
        fn value(&mut self, id: Id, depth: usize) -> Res<Value> {
            if depth > DEPTH_LIMIT {
                return Err(format!(
                    "data.pkl nests containers more than {DEPTH_LIMIT} deep, far more than a \
                     checkpoint does"
                ));
            }
            if std::mem::replace(&mut self.open[id], true) {
                return Err(
                    "data.pkl holds a container that contains itself, which a checkpoint never \
                     does"
                        .to_owned(),
                );
            }
            let value = self.convert(id, depth);
            self.open[id] = false;
            value
        }

        fn convert(&mut self, id: Id, depth: usize) -> Res<Value> {
            let objects = self.objects;
            let obj = &objects[id];
            self.spend(obj)?;
            let mut many = |ids: &[Id]| -> Res<Vec<Value>> {
                ids.iter().map(|&i| self.value(i, depth + 1)).collect()
            };
            Ok(match obj {
                Obj::None => Value::None,
                Obj::Bool(b) => Value::Bool(*b),
                Obj::Int(i) => Value::Int(*i),
                Obj::Float(f) => Value::Float(*f),
                Obj::Str(s) => Value::Str(s.clone()),
                Obj::Bytes(b) => Value::Bytes(b.clone()),
                Obj::List(items) => Value::List(many(items)?),
                Obj::Tuple(items) => Value::Tuple(many(items)?),
                Obj::Dict(pairs) => {
                    let mut dict = Vec::with_capacity(pairs.len());
                    for &(k, v) in pairs {
                        dict.push((self.value(k, depth + 1)?, self.value(v, depth + 1)?));
                    }
                    Value::Dict(dict)
                }
                Obj::Global(g) => Value::Global(dotted(g)),
                Obj::Tensor(t) => Value::Tensor(t.clone()),
                Obj::Storage { key, .. } => {
                    return Err(format!(
                        "data.pkl holds the storage {:?} on its own, outside any tensor",
                        truncate(key)
                    ))
                }
            })
        }

        /// Charges the bytes the copy of `obj` will take against the budget.
        fn spend(&mut self, obj: &Obj) -> Res<()> {
            let payload = match obj {
                Obj::Str(s) => s.len(),
                Obj::Bytes(b) => b.len(),
                Obj::Tensor(t) => t.storage.len() + t.device.len() + 16 * t.shape.len(),
                _ => 0,
            };
            let cost = (std::mem::size_of::<Value>() + payload) as u64;
            self.budget = self.budget.checked_sub(cost).ok_or_else(|| {
                "data.pkl refers to its objects so many times that copying them out would take \
                 far more memory than the file justifies; a checkpoint is nothing like this"
                    .to_owned()
            })?;
            Ok(())
        }
    }

    fn refuse_global(module: &str, name: &str) -> String {
        format!(
            "the file asks for code to be run: it imports the Python global `{}.{}`, which is \
             not one of the data types a PyTorch checkpoint is made of; this reader never runs \
             code from a file, so it refuses it (if you trust the file, load it with torch and \
             save its state_dict again)",
            truncate(module).escape_debug(),
            truncate(name).escape_debug()
        )
    }

    fn refuse_call(global: &Global) -> String {
        format!(
            "the file asks for code to be run: it calls `{}`, which a checkpoint never calls; \
             this reader never runs code from a file",
            dotted(global)
        )
    }

    fn refuse_opcode(byte: u8) -> String {
        match REFUSED.iter().find(|r| r.0 == byte) {
            Some((_, name, true)) => format!(
                "the file asks for code to be run: opcode {name} (0x{byte:02x}) creates an \
                 object of an arbitrary class; this reader never runs code from a file"
            ),
            Some((_, name, false)) => format!(
                "opcode {name} (0x{byte:02x}) is not one torch.save writes; this reader accepts \
                 only the data a PyTorch checkpoint is made of and never runs code from a file"
            ),
            None => format!(
                "byte 0x{byte:02x} is not a pickle opcode this reader accepts (it reads only the \
                 data a PyTorch checkpoint is made of and never runs code from a file): the \
                 file is damaged or not a checkpoint"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/models")
    }

    fn open(name: &str) -> TorchFile {
        TorchFile::open(&models().join(name)).expect("fixture opens")
    }

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// stories260K.bin (version 0): the token embedding and the final norm.
    fn reference_weights() -> (Vec<f32>, Vec<f32>) {
        let bin = std::fs::read(models().join("stories260K.bin")).expect("fixture reads");
        let all = floats(&bin[28..]);
        let (d, h, l, v, kv) = (64, 172, 5, 512, 32);
        let before_final =
            v * d + l * d + l * d * d + 2 * l * kv * d + l * d * d + l * d + 3 * l * h * d;
        (
            all[..v * d].to_vec(),
            all[before_final..before_final + d].to_vec(),
        )
    }

    fn tensor_floats(file: &TorchFile, name: &str) -> Vec<f32> {
        let sd = file.state_dict().expect("a state dict");
        let (_, t) = sd
            .iter()
            .find(|(n, _)| n == name)
            .expect("the tensor is there");
        floats(file.raw_tensor(name, t).expect("readable").bytes())
    }

    fn err_text<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("must be refused").to_string()
    }

    fn assert_refused<T: std::fmt::Debug>(r: Result<T>, expected: &[&str]) {
        let msg = err_text(r);
        for part in expected {
            assert!(msg.contains(part), "{msg:?} should mention {part:?}");
        }
    }

    /// A hand-written pickle, protocol 2.
    struct Pickle(Vec<u8>);

    impl Pickle {
        fn new() -> Self {
            Pickle(vec![0x80, 2])
        }

        fn op(&mut self, op: u8) -> &mut Self {
            self.0.push(op);
            self
        }

        fn raw(&mut self, bytes: &[u8]) -> &mut Self {
            self.0.extend_from_slice(bytes);
            self
        }

        fn str(&mut self, s: &str) -> &mut Self {
            self.op(b'X')
                .raw(&(s.len() as u32).to_le_bytes())
                .raw(s.as_bytes())
        }

        fn int(&mut self, i: i32) -> &mut Self {
            self.op(b'J').raw(&i.to_le_bytes())
        }

        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b'c')
                .raw(module.as_bytes())
                .op(b'\n')
                .raw(name.as_bytes())
                .op(b'\n')
        }

        fn ints(&mut self, values: &[i32]) -> &mut Self {
            self.op(b'(');
            for &v in values {
                self.int(v);
            }
            self.op(b't')
        }

        /// `_rebuild_tensor_v2` of storage `key` as torch.save writes it.
        fn tensor(
            &mut self,
            storage_type: &str,
            key: &str,
            storage_len: i32,
            offset: i32,
            shape: &[i32],
            stride: &[i32],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b'(')
                .op(b'(')
                .str("storage")
                .global("torch", storage_type)
                .str(key)
                .str("cpu")
                .int(storage_len)
                .op(b't')
                .op(b'Q')
                .int(offset)
                .ints(shape)
                .ints(stride)
                .op(0x89)
                .global("collections", "OrderedDict")
                .op(b')')
                .op(b'R')
                .op(b't')
                .op(b'R')
        }

        fn stop(&mut self) -> Vec<u8> {
            self.op(b'.');
            self.0.clone()
        }
    }

    /// A state dict `{name: tensor}` holding one tensor.
    fn one_tensor(
        storage_type: &str,
        storage_len: i32,
        offset: i32,
        shape: &[i32],
        stride: &[i32],
    ) -> Vec<u8> {
        Pickle::new()
            .op(b'}')
            .str("w")
            .tensor(storage_type, "0", storage_len, offset, shape, stride)
            .op(b's')
            .stop()
    }

    struct ZipOptions {
        zip64: bool,
        method: u16,
    }

    const PLAIN: ZipOptions = ZipOptions {
        zip64: false,
        method: 0,
    };

    /// A zip archive of `files`, laid out as torch writes it (local extra
    /// fields padding the data to 64 bytes), optionally with ZIP64 records.
    fn zip(files: &[(&str, &[u8])], options: &ZipOptions) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in files {
            let local = out.len() as u64;
            let unpadded = out.len() + 30 + name.len() + 4;
            let pad = (64 - unpadded % 64) % 64;
            let size = data.len() as u32;
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&[20, 0, 0, 0]);
            out.extend_from_slice(&options.method.to_le_bytes());
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&(4 + pad as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b"FB");
            out.extend_from_slice(&(pad as u16).to_le_bytes());
            out.extend(std::iter::repeat_n(b'Z', pad));
            out.extend_from_slice(data);

            let (size32, local32, extra) = if options.zip64 {
                let mut extra = vec![1, 0, 24, 0];
                extra.extend_from_slice(&(data.len() as u64).to_le_bytes());
                extra.extend_from_slice(&(data.len() as u64).to_le_bytes());
                extra.extend_from_slice(&local.to_le_bytes());
                (u32::MAX, u32::MAX, extra)
            } else {
                (size, local as u32, Vec::new())
            };
            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&[20, 0, 20, 0, 0, 0]);
            central.extend_from_slice(&options.method.to_le_bytes());
            central.extend_from_slice(&[0; 8]);
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&size32.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 10]);
            central.extend_from_slice(&local32.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            central.extend_from_slice(&extra);
        }
        let dir_at = out.len() as u64;
        out.extend_from_slice(&central);
        let count = files.len() as u64;
        if options.zip64 {
            let record_at = out.len() as u64;
            out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            for v in [count, count, central.len() as u64, dir_at] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&record_at.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let (count16, size32, at32) = if options.zip64 {
            (u16::MAX, u32::MAX, u32::MAX)
        } else {
            (count as u16, central.len() as u32, dir_at as u32)
        };
        out.extend_from_slice(&count16.to_le_bytes());
        out.extend_from_slice(&count16.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&at32.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    /// A torch.save archive of `pickle` and storages `(key, bytes)`.
    fn archive(pickle: &[u8], storages: &[(&str, &[u8])], options: &ZipOptions) -> Vec<u8> {
        let names: Vec<String> = storages
            .iter()
            .map(|(key, _)| format!("archive/data/{key}"))
            .collect();
        let mut files: Vec<(&str, &[u8])> = vec![
            ("archive/data.pkl", pickle),
            ("archive/byteorder", b"little"),
        ];
        files.extend(
            names
                .iter()
                .map(String::as_str)
                .zip(storages.iter().map(|s| s.1)),
        );
        files.push(("archive/version", b"3\n"));
        zip(&files, options)
    }

    fn parse(pickle: &[u8]) -> Result<TorchFile> {
        TorchFile::from_bytes(&archive(pickle, &[], &PLAIN))
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The stored data of entry `suffix` of the archive in `file`.
    fn entry_data<'a>(file: &'a [u8], suffix: &str) -> &'a [u8] {
        let entries = zip::read_entries(file).expect("a zip archive");
        let entry = entries
            .iter()
            .find(|e| e.name.ends_with(suffix))
            .expect("the entry is there");
        entry.stored_bytes(file).expect("stored")
    }

    #[test]
    fn train_checkpoint_state_dict_has_the_models_tensors() {
        let file = open("stories260K-ckpt.pt");
        let sd = file.state_dict().unwrap();
        assert_eq!(sd.len(), 3 + 5 * 9);
        let shape = |name: &str| {
            let (_, t) = sd.iter().find(|(n, _)| n == name).unwrap();
            assert_eq!(t.dtype, TorchDType::F32, "{name}");
            assert!(t.is_contiguous(), "{name}");
            t.shape.clone()
        };
        assert_eq!(shape("tok_embeddings.weight"), [512, 64]);
        assert_eq!(shape("output.weight"), [512, 64]);
        assert_eq!(shape("norm.weight"), [64]);
        assert_eq!(shape("layers.0.attention.wq.weight"), [64, 64]);
        assert_eq!(shape("layers.4.attention.wk.weight"), [32, 64]);
        assert_eq!(shape("layers.2.feed_forward.w1.weight"), [172, 64]);
        assert_eq!(shape("layers.2.feed_forward.w2.weight"), [64, 172]);
        assert_eq!(shape("layers.3.ffn_norm.weight"), [64]);
        assert!(sd.iter().all(|(n, _)| !n.starts_with(COMPILED_PREFIX)));
        for (name, t) in &sd {
            let raw = file.raw_tensor(name, t).unwrap();
            assert_eq!(raw.numel(), t.numel().unwrap());
            assert_eq!(raw.dtype, RawDType::F32);
        }
    }

    #[test]
    fn train_checkpoint_values_match_the_v0_export() {
        let file = open("stories260K-ckpt.pt");
        let (embedding, rms_final) = reference_weights();
        assert_eq!(tensor_floats(&file, "tok_embeddings.weight"), embedding);
        assert_eq!(tensor_floats(&file, "norm.weight"), rms_final);
        // The classifier is tied: the same storage.
        assert_eq!(tensor_floats(&file, "output.weight"), embedding);
    }

    #[test]
    fn train_checkpoint_model_args_and_training_state_read() {
        let file = open("stories260K-ckpt.pt");
        let root = file.root();
        let args = root.get("model_args").unwrap();
        let int = |k: &str| args.get(k).and_then(Value::as_int);
        assert_eq!(int("dim"), Some(64));
        assert_eq!(int("n_layers"), Some(5));
        assert_eq!(int("n_heads"), Some(8));
        assert_eq!(int("n_kv_heads"), Some(4));
        assert_eq!(int("vocab_size"), Some(512));
        assert_eq!(int("multiple_of"), Some(4));
        assert_eq!(int("max_seq_len"), Some(512));
        assert_eq!(args.get("dropout").and_then(Value::as_float), Some(0.0));
        assert_eq!(root.get("iter_num").and_then(Value::as_int), Some(1));
        assert_eq!(
            root.get("best_val_loss").and_then(Value::as_float),
            Some(1e9)
        );
        let config = root.get("config").unwrap();
        assert_eq!(config.get("dtype").and_then(Value::as_str), Some("float32"));
        assert_eq!(config.get("batch_size").and_then(Value::as_int), Some(2));
        let optimizer = root.get("optimizer").unwrap();
        let Some(Value::List(groups)) = optimizer.get("param_groups") else {
            panic!("param_groups is a list");
        };
        assert_eq!(groups.len(), 2);
        let Some(Value::Tensor(step)) = optimizer
            .get("state")
            .and_then(|s| match s {
                Value::Dict(pairs) => pairs.first().map(|(_, v)| v),
                _ => None,
            })
            .and_then(|state| state.get("step"))
        else {
            panic!("the optimizer state holds a step tensor");
        };
        assert!(step.shape.is_empty());
        assert_eq!(step.numel(), Some(1));
        assert_eq!(root.get("missing"), None);
        assert_eq!(Value::Int(3).get("dim"), None);
    }

    #[test]
    fn meta_shards_split_the_model_and_concatenate_to_it() {
        let shards = [
            open("meta/stories260K/consolidated.00.pth"),
            open("meta/stories260K/consolidated.01.pth"),
        ];
        let (embedding, rms_final) = reference_weights();
        for shard in &shards {
            let sd = shard.state_dict().unwrap();
            assert_eq!(sd.len(), 3 + 5 * 9);
            let shape = |name: &str| sd.iter().find(|(n, _)| n == name).unwrap().1.shape.clone();
            assert_eq!(shape("tok_embeddings.weight"), [512, 32]);
            assert_eq!(shape("output.weight"), [256, 64]);
            assert_eq!(shape("layers.0.attention.wq.weight"), [32, 64]);
            assert_eq!(shape("layers.0.attention.wk.weight"), [16, 64]);
            assert_eq!(shape("layers.0.attention.wo.weight"), [64, 32]);
            assert_eq!(shape("layers.0.feed_forward.w1.weight"), [86, 64]);
            assert_eq!(shape("layers.0.feed_forward.w2.weight"), [64, 86]);
            assert_eq!(shape("norm.weight"), [64]);
            assert_eq!(tensor_floats(shard, "norm.weight"), rms_final);
        }
        let halves = shards.map(|s| tensor_floats(&s, "tok_embeddings.weight"));
        let joined: Vec<f32> = (0..512)
            .flat_map(|row| {
                let cols = row * 32..row * 32 + 32;
                halves[0][cols.clone()]
                    .iter()
                    .chain(&halves[1][cols])
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(joined, embedding);
    }

    #[test]
    fn from_bytes_reads_what_open_reads() {
        let path = models().join("meta/stories260K/consolidated.00.pth");
        let bytes = std::fs::read(&path).unwrap();
        let mapped = TorchFile::open(&path).unwrap();
        let copied = TorchFile::from_bytes(&bytes).unwrap();
        assert_eq!(mapped.root(), copied.root());
        assert_eq!(copied.path(), Path::new("<memory>"));
        assert_eq!(
            tensor_floats(&mapped, "layers.3.attention.wv.weight"),
            tensor_floats(&copied, "layers.3.attention.wv.weight")
        );
    }

    #[test]
    fn globals_outside_the_list_are_refused_by_name() {
        let cases = [
            ("os", "system"),
            ("builtins", "eval"),
            ("__builtin__", "getattr"),
            ("posix", "system"),
            ("torch", "load"),
            ("collections", "Counter"),
        ];
        for (module, name) in cases {
            let call = Pickle::new()
                .global(module, name)
                .str("echo pwned")
                .op(0x85)
                .op(b'R')
                .stop();
            assert_refused(
                parse(&call),
                &[
                    &format!("`{module}.{name}`"),
                    "code to be run",
                    "never runs code",
                ],
            );
            let stacked = Pickle::new()
                .op(0x8c)
                .raw(&[module.len() as u8])
                .raw(module.as_bytes())
                .op(0x8c)
                .raw(&[name.len() as u8])
                .raw(name.as_bytes())
                .op(0x93)
                .op(b')')
                .op(b'R')
                .stop();
            assert_refused(
                parse(&stacked),
                &[&format!("`{module}.{name}`"), "code to be run"],
            );
        }
    }

    #[test]
    fn calls_of_listed_non_functions_and_non_globals_are_refused() {
        let storage = Pickle::new()
            .global("torch", "FloatStorage")
            .op(b')')
            .op(b'R')
            .stop();
        assert_refused(parse(&storage), &["torch.FloatStorage", "code to be run"]);
        let string = Pickle::new().str("os.system").op(b')').op(b'R').stop();
        assert_refused(
            parse(&string),
            &["REDUCE calls a string", "never runs code"],
        );
        let with_args = Pickle::new()
            .global("collections", "OrderedDict")
            .int(1)
            .op(0x85)
            .op(b'R')
            .stop();
        assert_refused(
            parse(&with_args),
            &["collections.OrderedDict is called with 1"],
        );
        let newobj = Pickle::new()
            .global("torch", "float32")
            .op(b')')
            .op(0x81)
            .stop();
        assert_refused(parse(&newobj), &["torch.float32", "code to be run"]);
        let build_list = Pickle::new().op(b']').op(b'}').op(b'b').stop();
        assert_refused(
            parse(&build_list),
            &["BUILD sets the state of a list", "code to be run"],
        );
        let bad_pid = Pickle::new().str("module").op(b'Q').stop();
        assert_refused(parse(&bad_pid), &["persistent id"]);
    }

    #[test]
    fn the_data_only_forms_torch_writes_are_accepted() {
        // An OrderedDict made by NEWOBJ, given its attributes by BUILD (as
        // torch saves a state dict's _metadata), holding a parameter.
        let mut p = Pickle::new();
        p.global("collections", "OrderedDict")
            .op(b')')
            .op(0x81)
            .op(0x94)
            .str("w")
            .global("torch._utils", "_rebuild_parameter")
            .tensor("HalfStorage", "0", 2, 0, &[2], &[1])
            .op(0x88)
            .global("collections", "OrderedDict")
            .op(b')')
            .op(b'R')
            .op(0x87)
            .op(b'R')
            .op(b's')
            .op(b'}')
            .str("_metadata")
            .op(b'}')
            .op(b's')
            .op(b'b');
        let pickle = p.stop();
        let file = TorchFile::from_bytes(&archive(&pickle, &[("0", &[0, 0x3c, 0, 0xc0])], &PLAIN))
            .unwrap();
        let sd = file.state_dict().unwrap();
        assert_eq!(sd.len(), 1);
        let raw = file.raw_tensor("w", &sd[0].1).unwrap();
        assert_eq!(raw.dtype, RawDType::F16);
        assert_eq!(raw.bytes(), [0, 0x3c, 0, 0xc0]);

        let scalars = Pickle::new()
            .op(b'(')
            .op(b'N')
            .op(0x88)
            .op(0x89)
            .op(b'K')
            .raw(&[200])
            .op(b'M')
            .raw(&[1, 1])
            .int(-5)
            .op(0x8a)
            .raw(&[2, 0x00, 0x80])
            .op(0x8a)
            .raw(&[0])
            .op(b'G')
            .raw(&1.5f64.to_be_bytes())
            .op(b'C')
            .raw(&[2, 7, 8])
            .op(b'B')
            .raw(&[1, 0, 0, 0, 9])
            .op(0x8d)
            .raw(&3u64.to_le_bytes())
            .raw("hé".as_bytes())
            .global("torch", "bfloat16")
            .op(b't')
            .stop();
        let file = parse(&scalars).unwrap();
        assert_eq!(
            file.root(),
            &Value::Tuple(vec![
                Value::None,
                Value::Bool(true),
                Value::Bool(false),
                Value::Int(200),
                Value::Int(257),
                Value::Int(-5),
                Value::Int(-32768),
                Value::Int(0),
                Value::Float(1.5),
                Value::Bytes(vec![7, 8]),
                Value::Bytes(vec![9]),
                Value::Str("hé".to_owned()),
                Value::Global("torch.bfloat16".to_owned()),
            ])
        );
    }

    #[test]
    fn opcodes_outside_the_list_are_refused_by_name() {
        let inst = Pickle::new().op(b'i').raw(b"os\nsystem\n").stop();
        assert_refused(parse(&inst), &["INST", "code to be run"]);
        let ext = Pickle::new().op(0x82).raw(&[1]).stop();
        assert_refused(parse(&ext), &["EXT1", "code to be run"]);
        let string = Pickle::new().op(b'T').raw(&[1, 0, 0, 0, b'a']).stop();
        assert_refused(parse(&string), &["BINSTRING", "never runs code"]);
        let unknown = Pickle::new().op(0xff).stop();
        assert_refused(parse(&unknown), &["0xff", "never runs code"]);
        let protocol = Pickle::new().op(0x80).raw(&[9]).op(b'N').stop();
        assert_refused(parse(&protocol), &["protocol 9"]);
    }

    #[test]
    fn lying_lengths_and_indices_are_errors() {
        let missing_memo = Pickle::new()
            .op(b'N')
            .op(b'q')
            .raw(&[0])
            .op(b'h')
            .raw(&[7])
            .stop();
        assert_refused(parse(&missing_memo), &["memo entry 7"]);
        let long_missing = Pickle::new().op(b'j').raw(&u32::MAX.to_le_bytes()).stop();
        assert_refused(parse(&long_missing), &["memo entry 4294967295"]);
        let huge = Pickle::new()
            .op(b'X')
            .raw(&u32::MAX.to_le_bytes())
            .raw(b"abc")
            .stop();
        assert_refused(parse(&huge), &["4294967295 more bytes", "truncated"]);
        for op in [0x8d, 0x8e] {
            let huge8 = Pickle::new().op(op).raw(&u64::MAX.to_le_bytes()).stop();
            assert_refused(parse(&huge8), &["18446744073709551615 more bytes"]);
        }
        let frame = Pickle::new().op(0x95).raw(&u64::MAX.to_le_bytes()).stop();
        assert_refused(parse(&frame), &["frame"]);
        let wide = Pickle::new().op(0x8a).raw(&[9]).raw(&[1; 9]).stop();
        assert_refused(parse(&wide), &["wider than 64 bits"]);
        let bad_utf8 = Pickle::new().op(0x8c).raw(&[1, 0xff]).stop();
        assert_refused(parse(&bad_utf8), &["UTF-8"]);
        let underflow = Pickle::new().op(b'N').op(b'(').op(b's').stop();
        assert_refused(parse(&underflow), &["empty stack"]);
        let no_mark = Pickle::new().op(b'N').op(b't').stop();
        assert_refused(parse(&no_mark), &["MARK"]);
        let two_left = Pickle::new().op(b'N').op(b'N').stop();
        assert_refused(parse(&two_left), &["2 items"]);
        let odd_items = Pickle::new().op(b'}').op(b'(').op(b'N').op(b'u').stop();
        assert_refused(parse(&odd_items), &["key-value pairs"]);
        let append_to_dict = Pickle::new().op(b'}').op(b'N').op(b'a').stop();
        assert_refused(parse(&append_to_dict), &["APPEND adds to a dict"]);
        let negative_shape = one_tensor("FloatStorage", 4, 0, &[-1], &[1]);
        assert_refused(parse(&negative_shape), &["shape is -1"]);
        let bare_storage = Pickle::new()
            .op(b'(')
            .str("storage")
            .global("torch", "FloatStorage")
            .str("0")
            .str("cpu")
            .int(1)
            .op(b't')
            .op(b'Q')
            .stop();
        assert_refused(parse(&bare_storage), &["outside any tensor"]);
    }

    #[test]
    fn hostile_structures_are_bounded() {
        let mut deep = Pickle::new();
        deep.op(b'N');
        for _ in 0..100_000 {
            deep.op(0x85);
        }
        assert_refused(parse(&deep.stop()), &["nests containers more than 256"]);

        let cycle = Pickle::new()
            .op(b']')
            .op(b'q')
            .raw(&[0])
            .op(b'h')
            .raw(&[0])
            .op(b'a')
            .stop();
        assert_refused(parse(&cycle), &["contains itself"]);

        // Each step pairs the previous value with itself: 2^64 leaves.
        let mut laughs = Pickle::new();
        laughs.op(b'N');
        for i in 0..64u8 {
            laughs.op(b'q').raw(&[i]).op(b'h').raw(&[i]).op(0x86);
        }
        assert_refused(
            parse(&laughs.stop()),
            &["far more memory than the file justifies"],
        );

        let mut tall = Pickle::new();
        tall.raw(&vec![b'N'; unpickle::STACK_LIMIT + 1]);
        assert_refused(parse(&tall.stop()), &["stack holds more than"]);

        let mut marks = Pickle::new();
        marks.raw(&vec![b'('; unpickle::MARK_LIMIT + 1]);
        assert_refused(parse(&marks.stop()), &["MARKs are open"]);
    }

    #[test]
    fn every_truncation_of_a_real_pickle_is_an_error() {
        for name in [
            "meta/stories260K/consolidated.00.pth",
            "stories260K-ckpt.pt",
        ] {
            let file = std::fs::read(models().join(name)).unwrap();
            let pickle = entry_data(&file, "/data.pkl");
            assert!(unpickle::parse(pickle).is_ok());
            for len in 0..pickle.len() {
                let err = unpickle::parse(&pickle[..len]).expect_err("a cut pickle is refused");
                assert!(err.contains("truncated"), "{name}, cut at {len}: {err}");
            }
        }
    }

    #[test]
    fn damaged_bytes_of_a_real_archive_give_errors_not_panics() {
        let file = std::fs::read(models().join("meta/stories260K/consolidated.00.pth")).unwrap();
        let pickle = entry_data(&file, "/data.pkl").to_vec();
        for at in 0..pickle.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut damaged = pickle.clone();
                damaged[at] ^= flip;
                let _ = unpickle::parse(&damaged);
            }
        }
        // The headers: the first local header and the central directory.
        let eocd = file.len() - 22;
        let dir_start = u32::from_le_bytes(file[eocd + 16..eocd + 20].try_into().unwrap()) as usize;
        for at in (0..128).chain(dir_start..file.len()) {
            let mut damaged = file.clone();
            damaged[at] ^= 0xff;
            if let Ok(parsed) = TorchFile::from_bytes(&damaged) {
                if let Ok(sd) = parsed.state_dict() {
                    for (name, t) in &sd {
                        let _ = parsed.raw_tensor(name, t);
                    }
                }
            }
        }
    }

    #[test]
    fn truncated_archives_are_errors() {
        let file = std::fs::read(models().join("stories260K-ckpt.pt")).unwrap();
        for cut in [
            0,
            1,
            4,
            21,
            22,
            30,
            100,
            17_000,
            file.len() / 2,
            file.len() - 100,
            file.len() - 22,
            file.len() - 1,
        ] {
            let msg = err_text(TorchFile::from_bytes(&file[..cut]));
            assert!(
                msg.contains("<memory>: not a valid checkpoint"),
                "cut at {cut}: {msg}"
            );
        }
        let small = archive(
            &one_tensor("FloatStorage", 2, 0, &[2], &[1]),
            &[("0", &f32_bytes(&[1.0, 2.0]))],
            &PLAIN,
        );
        for cut in 0..small.len() {
            assert!(
                TorchFile::from_bytes(&small[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn zip64_archives_are_read() {
        let pickle = one_tensor("FloatStorage", 3, 1, &[2], &[1]);
        let data = f32_bytes(&[1.0, 2.0, 3.0]);
        let options = ZipOptions {
            zip64: true,
            method: 0,
        };
        let bytes = archive(&pickle, &[("0", &data)], &options);
        let file = TorchFile::from_bytes(&bytes).unwrap();
        let sd = file.state_dict().unwrap();
        assert_eq!(sd[0].1.storage_offset, 1);
        let raw = file.raw_tensor("w", &sd[0].1).unwrap();
        assert_eq!(floats(raw.bytes()), [2.0, 3.0]);
        assert_eq!(raw.offset % 4, 0);
        for cut in 0..bytes.len() {
            assert!(
                TorchFile::from_bytes(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn archives_that_are_not_torch_save_ones_are_refused() {
        let pickle = one_tensor("FloatStorage", 1, 0, &[1], &[1]);
        let deflated = archive(
            &pickle,
            &[],
            &ZipOptions {
                zip64: false,
                method: 8,
            },
        );
        assert_refused(
            TorchFile::from_bytes(&deflated),
            &["compressed with method 8 (deflate)"],
        );
        let mut legacy = Pickle::new().op(b'N').stop();
        legacy.resize(64, 0);
        assert_refused(TorchFile::from_bytes(&legacy), &["legacy torch.save file"]);
        assert_refused(TorchFile::from_bytes(&[b'x'; 100]), &["not a zip archive"]);
        assert_refused(TorchFile::from_bytes(&[]), &["0 bytes"]);
        let script = zip(
            &[
                ("m/data.pkl", &pickle),
                ("m/code/__torch__/m.py", b"def f(): pass"),
            ],
            &PLAIN,
        );
        assert_refused(TorchFile::from_bytes(&script), &["TorchScript"]);
        let big_endian = zip(&[("m/data.pkl", &pickle), ("m/byteorder", b"big")], &PLAIN);
        assert_refused(TorchFile::from_bytes(&big_endian), &["byte order \"big\""]);
        let two = zip(&[("a/data.pkl", &pickle), ("b/data.pkl", &pickle)], &PLAIN);
        assert_refused(TorchFile::from_bytes(&two), &["more than one pickle"]);
        let none = zip(&[("a/other.pkl", &pickle)], &PLAIN);
        assert_refused(
            TorchFile::from_bytes(&none),
            &["no entry is named <folder>/data.pkl"],
        );
        let dir = std::env::temp_dir();
        assert_refused(TorchFile::open(&dir), &["directory"]);
    }

    #[test]
    fn tensors_that_are_not_plain_weights_are_refused_by_name() {
        let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let read = |pickle: Vec<u8>, data: &[u8]| {
            let file = TorchFile::from_bytes(&archive(&pickle, &[("0", data)], &PLAIN)).unwrap();
            let sd = file.state_dict().unwrap();
            file.raw_tensor(&sd[0].0, &sd[0].1)
                .map(|raw| floats(raw.bytes()))
        };
        let transposed = one_tensor("FloatStorage", 6, 0, &[2, 3], &[1, 2]);
        assert_refused(
            read(transposed, &data),
            &["tensor w", "non-contiguous view"],
        );
        let unit_dim = one_tensor("FloatStorage", 6, 0, &[1, 3, 1], &[99, 1, 7]);
        assert_eq!(read(unit_dim, &data).unwrap(), [1.0, 2.0, 3.0]);
        let matrix = one_tensor("FloatStorage", 6, 0, &[3, 2], &[2, 1]);
        assert_eq!(read(matrix, &data).unwrap(), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let long = one_tensor("LongStorage", 3, 0, &[3], &[1]);
        assert_refused(read(long, &data), &["tensor w", "int64"]);
        let past_storage = one_tensor("FloatStorage", 6, 4, &[3], &[1]);
        assert_refused(read(past_storage, &data), &["outside its storage of 6"]);
        let short_entry = one_tensor("FloatStorage", 6, 0, &[6], &[1]);
        assert_refused(
            read(short_entry, &data[..20]),
            &["holds 20 bytes", "truncated"],
        );
        let lying_len = one_tensor("FloatStorage", i32::MAX, 0, &[1 << 30], &[1]);
        assert_refused(read(lying_len, &data), &["holds 24 bytes"]);
        let elsewhere = Pickle::new()
            .op(b'}')
            .str("w")
            .tensor("FloatStorage", "7", 6, 0, &[6], &[1])
            .op(b's')
            .stop();
        assert_refused(read(elsewhere, &data), &["data/7 is missing"]);
    }

    #[test]
    fn roots_without_a_state_dict_are_refused() {
        let list = Pickle::new().op(b']').stop();
        assert_refused(parse(&list).unwrap().state_dict(), &["holds a list"]);
        let no_tensors = Pickle::new()
            .op(b'}')
            .str("iter_num")
            .int(3)
            .op(b's')
            .stop();
        assert_refused(
            parse(&no_tensors).unwrap().state_dict(),
            &["neither a state dict", "\"iter_num\""],
        );
        let mut p = Pickle::new();
        p.op(b'}')
            .op(b'(')
            .str("_orig_mod.w")
            .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
            .str("w")
            .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
            .op(b'u');
        assert_refused(
            parse(&p.stop()).unwrap().state_dict(),
            &["names tensor w twice"],
        );
        let mut mixed = Pickle::new();
        mixed
            .op(b'}')
            .op(b'(')
            .str("w")
            .tensor("FloatStorage", "0", 1, 0, &[1], &[1])
            .str("step")
            .int(3)
            .op(b'u');
        assert_refused(
            parse(&mixed.stop()).unwrap().state_dict(),
            &["entry step is an int"],
        );
    }
}
