//! Kernel compilation: every `kernels/*.cu` file joined into ONE program,
//! compiled by NVRTC for the device's exact architecture (a CUBIN, or PTX
//! when NVRTC does not know the architecture), and cached on disk keyed by a
//! hash of the source, the options, the NVRTC version and the compute
//! capability, so the second start compiles nothing.

use std::ffi::{c_char, CString};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys};
use llama2::{Error, Result};

/// The kernel files, in the order they are joined: `common.cu` first, since
/// the others use its helpers.
const FILES: [(&str, &str); 8] = [
    ("common.cu", include_str!("../kernels/common.cu")),
    ("convert.cu", include_str!("../kernels/convert.cu")),
    ("embed.cu", include_str!("../kernels/embed.cu")),
    ("norm.cu", include_str!("../kernels/norm.cu")),
    ("elementwise.cu", include_str!("../kernels/elementwise.cu")),
    ("rope.cu", include_str!("../kernels/rope.cu")),
    ("matvec.cu", include_str!("../kernels/matvec.cu")),
    ("attention.cu", include_str!("../kernels/attention.cu")),
];

/// The whole program NVRTC compiles: all kernel files, each introduced by a
/// `#line` directive so compiler messages name the right file and line.
pub fn kernel_source() -> String {
    let mut src = String::new();
    for (name, text) in FILES {
        src.push_str(&format!("#line 1 \"{name}\"\n"));
        src.push_str(text);
        src.push('\n');
    }
    src
}

/// A compiled program: a CUBIN or NUL-terminated PTX, and NVRTC's log.
pub struct Compiled {
    pub image: Vec<u8>,
    pub log: String,
}

fn nvrtc_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Backend(format!("NVRTC {what} failed: {e:?}"))
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !crate::libs::nvrtc_present() {
        return Err(Error::Backend(crate::NO_NVRTC.into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the pointers are to locals.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| nvrtc_err("version query", e))?;
    Ok((major, minor))
}

/// Compiles the kernel program for `arch`: "sm_XY" gives a CUBIN,
/// "compute_XY" PTX. `extra` options are appended (e.g. "--warn-on-spills").
/// A compile error returns the log in the message.
pub fn compile(arch: &str, extra: &[&str]) -> Result<Compiled> {
    nvrtc_version()?;
    let src = CString::new(kernel_source()).expect("kernel source has no NUL bytes");
    let name = CString::new("llama2_kernels.cu").expect("static name");
    let mut opts = vec![format!("--gpu-architecture={arch}")];
    opts.extend(extra.iter().map(|s| s.to_string()));
    let prog = nvrtc::create_program(&src, Some(&name)).map_err(|e| nvrtc_err("create", e))?;
    // SAFETY: `prog` was just created and is destroyed once, below.
    let compiled = unsafe { compile_program(prog, &opts, arch.starts_with("sm_")) };
    // SAFETY: as above; nothing uses `prog` after this.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    compiled
}

/// Compiles `prog` and extracts the image and the log.
///
/// # Safety
/// `prog` must be a live program from `create_program`.
unsafe fn compile_program(
    prog: sys::nvrtcProgram,
    opts: &[String],
    cubin: bool,
) -> Result<Compiled> {
    let status = nvrtc::compile_program(prog, opts);
    let log = nvrtc::get_program_log(prog)
        .map(|l| c_chars_to_string(&l))
        .unwrap_or_default();
    if let Err(e) = status {
        return Err(Error::Backend(format!(
            "NVRTC could not compile the kernels ({e:?}) with {opts:?}:\n{log}"
        )));
    }
    let image = if cubin {
        let mut size = 0usize;
        sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| nvrtc_err("CUBIN size", e))?;
        let mut image = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, image.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| nvrtc_err("CUBIN", e))?;
        image
    } else {
        let ptx = nvrtc::get_ptx(prog).map_err(|e| nvrtc_err("PTX", e))?;
        ptx.iter().map(|&c| c as u8).collect()
    };
    Ok(Compiled { image, log })
}

fn c_chars_to_string(chars: &[c_char]) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// Options every product build uses. No fast math: divisions, square roots
/// and exponentials must round like the CPU's for the outputs to agree.
const PRODUCT_OPTIONS: [&str; 1] = ["--std=c++17"];

/// The kernels for a device of compute capability `cc`, from the disk cache
/// when an identical build exists, else compiled (and cached).
pub fn kernels_for(cc: (i32, i32)) -> Result<Vec<u8>> {
    let version = nvrtc_version()?;
    let sm = format!("sm_{}{}", cc.0, cc.1);
    let key = fnv1a(&[
        kernel_source().as_bytes(),
        PRODUCT_OPTIONS.join(" ").as_bytes(),
        format!("{version:?} {cc:?}").as_bytes(),
    ]);
    let path = cache_dir().map(|d| d.join(format!("{sm}-{key:016x}.bin")));
    if let Some(image) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
        return Ok(image);
    }
    let image = match compile(&sm, &PRODUCT_OPTIONS) {
        Ok(c) => c.image,
        // An NVRTC older than the GPU cannot emit its code; PTX for it is
        // then JIT-compiled by the driver.
        Err(_) => compile(&format!("compute_{}{}", cc.0, cc.1), &PRODUCT_OPTIONS)?.image,
    };
    if let Some(p) = path {
        store(&p, &image);
    }
    Ok(image)
}

/// Where compiled kernels are kept: `$XDG_CACHE_HOME/llama2-rs/kernels` or
/// `~/.cache/llama2-rs/kernels`.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("llama2-rs").join("kernels"))
}

/// Writes the cache file through a temporary name, so a concurrent start
/// never reads half a file. Failures only cost a recompile next time.
fn store(path: &std::path::Path, image: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, image).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// 64-bit FNV-1a over several byte strings (each followed by a separator):
/// a hash that, unlike std's, is stable across Rust releases.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in part.iter().chain(&[0xffu8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}
