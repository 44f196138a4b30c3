//! safetensors files: any bytes are refused with an error or give tensors
//! of the float types the engine reads, named once each, whose `len` bytes
//! lie in the data section after the header, as many as the dtype and
//! shape need.
#![no_main]

mod common {
    pub mod raw_tensors;
}

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use llama2::checkpoint::hf;

fuzz_target!(|data: &[u8]| {
    // An empty map cannot be made; an empty file is no safetensors file.
    if data.is_empty() {
        return;
    }
    let map = llama2::files::map_copy(data, Path::new("fuzz input")).expect("an anonymous map");
    let Ok(tensors) = hf::tensors_of(map) else {
        return;
    };
    // The header is the u64 length, then that many bytes of JSON.
    let header_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let data_start = 8 + header_len as usize;
    common::raw_tensors::check(&tensors, data);
    for t in &tensors {
        assert!(t.offset >= data_start, "{t:?} starts in the header");
    }
});
