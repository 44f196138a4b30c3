//! Finding CUDA's shared libraries. cudarc loads them by name only (through
//! the dynamic loader's search path) and panics when none is found, so every
//! entry point here first checks presence, and otherwise looks in the usual
//! install folders and loads the library by full path: once a library is
//! loaded, loading it again by its soname finds the same copy.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Folders searched when the loader's default path lacks a library:
/// `$LLAMA2_NVRTC_DIR` (pip wheels in CI), the CUDA toolkit's lib64 folders.
fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("LLAMA2_NVRTC_DIR") {
        dirs.push(PathBuf::from(d));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(d) = std::env::var_os(var) {
            dirs.push(PathBuf::from(d).join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs
}

/// File names tried in each folder, most specific first. `libnvrtc-builtins`
/// comes with NVRTC and is loaded by it by soname, so it is preloaded too.
fn file_names(lib: &str) -> &'static [&'static str] {
    match lib {
        "nvrtc" => &["libnvrtc-builtins.so.13.0", "libnvrtc.so.13", "libnvrtc.so"],
        "cublas" => &[
            "libcublasLt.so.13",
            "libcublas.so.13",
            "libcublasLt.so",
            "libcublas.so",
        ],
        "cuda" => &["libcuda.so.1", "libcuda.so"],
        _ => &[],
    }
}

/// Loads `lib`'s files from the search folders, keeping them loaded for the
/// life of the process.
fn preload(lib: &str) {
    for dir in search_dirs() {
        for name in file_names(lib) {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            // SAFETY: loading a CUDA library runs only its own initializers;
            // the handle is leaked on purpose so the library stays loaded.
            if let Ok(l) = unsafe { libloading::Library::new(&path) } {
                std::mem::forget(l);
            }
        }
    }
}

/// Whether cudarc will find `lib` ("cuda", "nvrtc" or "cublas"), after
/// preloading it from the search folders if the default path lacks it.
fn present(lib: &str, check: fn() -> bool) -> bool {
    if check() {
        return true;
    }
    preload(lib);
    check()
}

/// The driver library (libcuda) can be loaded.
pub fn driver_present() -> bool {
    static P: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen candidate names.
    *P.get_or_init(|| {
        present("cuda", || unsafe {
            cudarc::driver::sys::is_culib_present()
        })
    })
}

/// NVRTC can be loaded.
pub fn nvrtc_present() -> bool {
    static P: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen candidate names.
    *P.get_or_init(|| {
        present("nvrtc", || unsafe {
            cudarc::nvrtc::sys::is_culib_present()
        })
    })
}

/// cuBLAS can be loaded.
pub fn cublas_present() -> bool {
    static P: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries to dlopen candidate names.
    *P.get_or_init(|| {
        present("cublas", || unsafe {
            cudarc::cublas::sys::is_culib_present()
        })
    })
}
