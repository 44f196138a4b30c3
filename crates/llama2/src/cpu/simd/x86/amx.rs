//! AMX kernels: batched products of packed Q8_0 matrices on the int8 tile
//! unit (Sapphire Rapids and later). Rust's AMX intrinsics are nightly-only,
//! so the tile instructions are written as inline assembly. The packed
//! layout (`cpu::packed`) already is the B operand's: a block's four-column
//! strip `[16 rows][4 bytes]` is one 64-byte tile row. Each group's int32
//! dot is exact in a tile, then scaled and added in f32 in group order, so
//! results are bit-identical to `kernels::dot_q8`.

use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

use super::Q8Tokens;

/// Tokens per A tile (its rows) and rows per block (the C tile's columns).
pub const TILE_TOKENS: usize = 16;
/// Groups whose int32 dots are stored before their f32 terms are added:
/// each token's running sums are then loaded and stored once per chunk
/// rather than once per group (64 of them do not fit in registers).
pub const GROUP_CHUNK: usize = 4;

/// Scratch for `tile_q8`'s int32 dots, `[group in chunk][block][token
/// tile][token][row]`: 16 KiB, owned by the caller so that it is not
/// zeroed on every call (tiles overwrite what they use before it is read).
pub type TileInts = [[[[i32; 16 * TILE_TOKENS]; 2]; 2]; GROUP_CHUNK];

/// Whether the CPU has AMX-TILE and AMX-INT8 and Linux lets this process
/// use the tile state (asked once; the grant covers every thread).
pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let leaf7 = __cpuid_count(7, 0);
        let (tile, int8) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 25) != 0);
        tile && int8 && cfg!(target_os = "linux") && request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: Linux keeps the
/// tile data state off until a process asks for it.
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: usize = 158;
    const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
    const XFEATURE_XTILEDATA: usize = 18;
    let ret: isize;
    // SAFETY: a plain Linux system call that only changes this process's
    // permissions; `syscall` clobbers rcx and r11, declared here.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret == 0
}

/// The tile configuration (palette 1): tmm0..3 accumulators `[16 tokens]
/// [16 rows]` int32, tmm4/5 activations `[16 tokens][kk bytes]`, tmm6/7
/// weights `[kk / 4][64 bytes]`.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn new(kk: usize) -> TileConfig {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..4 {
            (c.colsb[t], c.rows[t]) = (64, 16);
        }
        for t in 4..6 {
            (c.colsb[t], c.rows[t]) = (kk as u16, TILE_TOKENS as u8);
        }
        for t in 6..8 {
            (c.colsb[t], c.rows[t]) = (64, (kk / 4) as u8);
        }
        c
    }
}

/// The K step (bytes per tile product) for groups of `gs`, or `None` when
/// no step fits: a group must be one step of at most 64 or whole steps of 64.
pub fn k_step(gs: usize) -> Option<usize> {
    if gs.is_multiple_of(4) && gs > 0 && gs <= 64 {
        Some(gs)
    } else if gs.is_multiple_of(64) {
        Some(64)
    } else {
        None
    }
}

/// Loads the configuration for K steps of `kk` bytes.
///
/// # Safety
/// AMX is `available`; `kk` comes from `k_step`. The tiles stay configured
/// until `release`.
pub unsafe fn configure(kk: usize) {
    let cfg = TileConfig::new(kk);
    // SAFETY (caller): the OS granted the tile state; `cfg` is a valid
    // palette-1 configuration.
    asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly));
}

/// Returns the tile state to its initial (unused) state.
///
/// # Safety
/// AMX is `available`.
pub unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
}

#[inline(always)]
unsafe fn zero<const C: u8>() {
    asm!("tilezero tmm{c}", c = const C, options(nostack, nomem));
}

#[inline(always)]
unsafe fn load<const T: u8>(p: *const u8, stride: usize) {
    asm!(
        "tileloadd tmm{t}, [{p} + {s}*1]",
        t = const T,
        p = in(reg) p,
        s = in(reg) stride,
        options(nostack, readonly),
    );
}

#[inline(always)]
unsafe fn store<const C: u8>(p: *mut i32) {
    asm!(
        "tilestored [{p} + {s}*1], tmm{c}",
        c = const C,
        p = in(reg) p,
        s = in(reg) 64usize,
        options(nostack),
    );
}

/// `tmm C += tmm A (signed activations) . tmm B (unsigned weights)`.
#[inline(always)]
unsafe fn dot<const C: u8, const A: u8, const B: u8>() {
    asm!(
        "tdpbsud tmm{c}, tmm{a}, tmm{b}",
        c = const C,
        a = const A,
        b = const B,
        options(nostack, nomem),
    );
}

/// `B` consecutive blocks of 16 rows (at most 2) against `T` tiles of 16
/// tokens from `t0` (at most 2). Result `[b][t]` holds block `b`'s 16 rows
/// for token `t0 + t`, bit-identical to `kernels::dot_q8`.
///
/// # Safety
/// AMX is `available` and `configure(kk)` ran on this thread with `kk =
/// k_step(gs)`; AVX-512F is available; `q` and `s` point at a block of a
/// packed matrix with `cols` columns in groups of `gs` dividing `cols`, and
/// `B` blocks from there exist; `x` holds tokens `t0..t0 + 16 * T`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn tile_q8<const B: usize, const T: usize>(
    q: *const u8,
    s: *const f32,
    (cols, gs, kk): (usize, usize, usize),
    x: &Q8Tokens,
    t0: usize,
    ints: &mut TileInts,
) -> [[__m512; 32]; 2] {
    let groups = cols / gs;
    let xq = x.xq.as_ptr() as *const u8;
    let mut f = [[_mm512_setzero_ps(); 32]; 2];
    for g0 in (0..groups).step_by(GROUP_CHUNK) {
        let chunk = GROUP_CHUNK.min(groups - g0);
        for (c, ints) in ints.iter_mut().enumerate().take(chunk) {
            let g = g0 + c;
            zero::<0>();
            if T == 2 {
                zero::<1>();
            }
            if B == 2 {
                zero::<2>();
                if T == 2 {
                    zero::<3>();
                }
            }
            for k in (g * gs..(g + 1) * gs).step_by(kk) {
                load::<4>(xq.add(t0 * cols + k), cols);
                if T == 2 {
                    load::<5>(xq.add((t0 + TILE_TOKENS) * cols + k), cols);
                }
                load::<6>(q.add(k * 16), 64);
                dot::<0, 4, 6>();
                if T == 2 {
                    dot::<1, 5, 6>();
                }
                if B == 2 {
                    load::<7>(q.add(cols * 16 + k * 16), 64);
                    dot::<2, 4, 7>();
                    if T == 2 {
                        dot::<3, 5, 7>();
                    }
                }
            }
            store::<0>(ints[0][0].as_mut_ptr());
            if T == 2 {
                store::<1>(ints[0][1].as_mut_ptr());
            }
            if B == 2 {
                store::<2>(ints[1][0].as_mut_ptr());
                if T == 2 {
                    store::<3>(ints[1][1].as_mut_ptr());
                }
            }
        }
        for b in 0..B {
            let ws: [__m512; GROUP_CHUNK] = std::array::from_fn(|c| {
                _mm512_loadu_ps(s.add((b * groups + g0 + c.min(chunk - 1)) * 16))
            });
            for t in 0..T * TILE_TOKENS {
                let mut acc = f[b][t];
                for c in 0..chunk {
                    let at = (g0 + c) * x.tokens + t0 + t;
                    let xs = _mm512_set1_ps(*x.xs_t.get_unchecked(at));
                    let xc = _mm512_set1_epi32(*x.xc_t.get_unchecked(at));
                    let row = ints[c][b][t / TILE_TOKENS]
                        .as_ptr()
                        .add((t % TILE_TOKENS) * 16);
                    let v = _mm512_sub_epi32(_mm512_loadu_si512(row as *const _), xc);
                    let term = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), ws[c]), xs);
                    acc = _mm512_add_ps(acc, term);
                }
                f[b][t] = acc;
            }
        }
    }
    f
}
