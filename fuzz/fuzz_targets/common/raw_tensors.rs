//! What every format's tensor list must satisfy, whatever the bytes: each
//! name once, and each tensor's `len` bytes inside the input, exactly as
//! many as its dtype and shape need. Shared by the GGUF and safetensors
//! targets (both list `RawTensor`s over the input's bytes).

use std::collections::HashSet;

use llama2::checkpoint::raw::RawTensor;

/// Checks `tensors` against the input `data`; returns their names, for
/// targets that list further tensors under the same namespace.
pub fn check<'a>(
    tensors: impl IntoIterator<Item = &'a RawTensor>,
    data: &[u8],
) -> HashSet<&'a str> {
    let mut names = HashSet::new();
    for t in tensors {
        assert!(names.insert(t.name.as_str()), "tensor {} twice", t.name);
        assert_eq!(t.bytes().len(), t.len, "{t:?}");
        assert!(t.offset + t.len <= data.len(), "{t:?}");
        let numel = t
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .expect("the shape's size fits 64 bits");
        assert_eq!(t.numel() as u64, numel, "{t:?}");
        assert_eq!(t.dtype.bytes_for(numel), Some(t.len as u64), "{t:?}");
        assert_eq!(t.bytes(), &data[t.offset..t.offset + t.len]);
    }
    names
}
