//! Platforms without Unix file types: FIFOs that block `open` do not exist
//! there, so a plain open is safe; physical memory is not queried.

use std::fs::{File, Metadata};
use std::io;
use std::path::Path;

pub fn open_nonblocking(path: &Path) -> io::Result<File> {
    File::open(path)
}

pub fn kind_of(meta: &Metadata) -> &'static str {
    if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

pub fn physical_memory() -> Option<u64> {
    None
}
