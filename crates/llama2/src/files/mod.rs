//! Opening input files safely. Every file the engine reads (checkpoints,
//! tokenizers, texts) is opened here, so the same rules hold for all:
//!
//! - only regular files: a directory, a FIFO, a socket or a device
//!   (`/dev/zero`) is refused by name, and opening never blocks (a FIFO
//!   without a writer would otherwise hang `open` forever);
//! - sizes are checked before anything is read or mapped, and reads are
//!   bounded, so an endless or huge input is an error, not an allocation
//!   failure.
//!
//! The platform-specific parts (non-blocking open, physical memory) live in
//! `unix.rs` and `other.rs`; nothing else in the crate has a `cfg` for them.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as platform;

#[cfg(not(unix))]
mod other;
#[cfg(not(unix))]
use other as platform;

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use memmap2::{Mmap, MmapMut};

use crate::error::{Error, Result};

/// Opens `path` for reading, refusing anything but a regular file. `what`
/// names the file's role in messages ("checkpoint", "tokenizer").
pub fn open_regular(path: &Path, what: &str) -> Result<(File, u64)> {
    let io = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    // A directory cannot be opened for reading everywhere; say what it is.
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(not_regular(path, what, "a directory"));
    }
    let file = platform::open_nonblocking(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular(path, what, platform::kind_of(&meta)));
    }
    Ok((file, meta.len()))
}

fn not_regular(path: &Path, what: &str, kind: &str) -> Error {
    Error::File {
        path: path.to_owned(),
        reason: format!(
            "this is {kind}, not a regular file; a {what} must be a file on disk \
             (it is size-checked before it is read)"
        ),
    }
}

/// The whole of the regular file at `path`, refusing files over `limit`
/// bytes before reading any. The read itself is bounded too, in case the
/// file grows while it is read.
pub fn read_bounded(path: &Path, what: &str, limit: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path, what)?;
    let too_big = |len: u64| Error::File {
        path: path.to_owned(),
        reason: format!(
            "it is {len} bytes, more than the {limit} bytes a {what} may have; \
             is this the right file?"
        ),
    };
    if len > limit {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Maps `file` (opened by `open_regular`, `len` bytes) read-only, checking
/// that it still has that size. Weights are used from such maps in place.
pub fn map(file: &File, len: u64, path: &Path) -> Result<Arc<Mmap>> {
    if len > usize::MAX as u64 {
        return Err(Error::File {
            path: path.to_owned(),
            reason: format!("{len} bytes do not fit in this machine's address space"),
        });
    }
    // SAFETY: the map is read-only and nothing hands out references that
    // outlive it (tensors hold an Arc of it). As with every mmap, another
    // process truncating the file while we run would fault; that is the
    // accepted price of not copying gigabytes at start-up.
    let map = unsafe { Mmap::map(file) }.map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    if map.len() as u64 != len {
        return Err(Error::File {
            path: path.to_owned(),
            reason: "the file changed size while it was opened".into(),
        });
    }
    Ok(Arc::new(map))
}

/// A private read-only copy of `bytes` in a map of the same type as a file's
/// (for tests and fuzzing: every reader then runs its file code path).
/// `bytes` must not be empty; `name` is what errors call it.
pub fn map_copy(bytes: &[u8], name: &Path) -> Result<Arc<Mmap>> {
    let map = (|| {
        let mut anon = MmapMut::map_anon(bytes.len())?;
        anon.copy_from_slice(bytes);
        anon.make_read_only()
    })()
    .map_err(|source| Error::Io {
        path: name.to_owned(),
        source,
    })?;
    Ok(Arc::new(map))
}

/// Bytes of physical memory, if the platform says.
pub fn physical_memory() -> Option<u64> {
    platform::physical_memory()
}

/// Refuses an allocation of `bytes` for `what` that exceeds the machine's
/// physical memory: it could only fail (or be killed later by the kernel),
/// and an error naming the size and its cause is better than either.
pub fn check_allocation(bytes: u64, what: &str, advice: &str) -> Result<()> {
    let Some(total) = physical_memory() else {
        return Ok(());
    };
    if bytes > total {
        const GIB: f64 = (1u64 << 30) as f64;
        return Err(Error::Memory(format!(
            "{what} needs {:.1} GiB but this machine has {:.1} GiB of memory; {advice}",
            bytes as f64 / GIB,
            total as f64 / GIB
        )));
    }
    Ok(())
}
