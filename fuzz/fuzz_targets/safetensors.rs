//! safetensors files: any bytes are refused with an error or give tensors
//! of the float types the engine reads, named once each, whose `len` bytes
//! lie in the data section after the header, as many as the dtype and
//! shape need.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use llama2::checkpoint::hf;
use memmap2::MmapMut;

fuzz_target!(|data: &[u8]| {
    // An empty map cannot be made; an empty file is no safetensors file.
    if data.is_empty() {
        return;
    }
    let mut anon = MmapMut::map_anon(data.len()).expect("an anonymous map");
    anon.copy_from_slice(data);
    let map = Arc::new(anon.make_read_only().expect("a read-only map"));
    let Ok(tensors) = hf::tensors_of(map) else {
        return;
    };
    // The header is the u64 length, then that many bytes of JSON.
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let data_start = 8 + header_len as usize;
    let mut names = HashSet::new();
    for t in &tensors {
        assert!(names.insert(t.name.as_str()), "tensor {} twice", t.name);
        assert_eq!(t.bytes().len(), t.len, "{t:?}");
        assert!(t.offset >= data_start, "{t:?} starts in the header");
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
});
