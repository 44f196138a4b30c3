//! The CPU KV cache takes memory as positions are written, not for the
//! context it reserves: a server's short sequences must cost their lengths.
//! Its own test binary, so no other test's allocations move the resident
//! size it reads (Linux's `/proc/self/statm`).
#![cfg(target_os = "linux")]

use llama2::{Backend, Config, CpuBackend, KvDtype};

/// Resident bytes of this process.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Eight caches of a context of 4096 positions (64 MiB each in f32, half
/// in f16: 512 MiB reserved) holding 16 positions each stay within a few
/// MiB of resident memory, for both storage types.
#[test]
fn caches_take_memory_for_written_positions_only() {
    // 8 heads of 64, 4 layers: 2 x 4 x 4096 x 512 values per cache.
    let c = Config::llama2c(512, 1024, 4, 8, 8, 32, 4096, true);
    for dtype in [KvDtype::F32, KvDtype::F16] {
        let mut b = CpuBackend::new(1).unwrap().with_kv_dtype(dtype);
        b.prepare(&c).unwrap();
        let (d, kv, rows) = (c.dim, c.kv_dim(), 16);
        let (q, k, v) = (
            vec![0.5; rows * d],
            vec![0.25; rows * kv],
            vec![1.0; rows * kv],
        );
        let mut out = b.buffer(rows * d).unwrap();
        let before = resident_bytes();
        let mut caches: Vec<_> = (0..8).map(|_| b.kv_cache(&c, c.seq_len).unwrap()).collect();
        for cache in &mut caches {
            for layer in 0..c.n_layers {
                b.attention(&mut out, &q, &k, &v, cache, layer, rows, 0, &c)
                    .unwrap();
            }
        }
        let grown = resident_bytes().saturating_sub(before);
        // Written: 8 caches x 2 x 4 layers x 8 heads x one 4 KiB page.
        assert!(
            grown < 16 << 20,
            "{dtype:?}: 8 caches of 16 positions grew the resident size by {grown} bytes"
        );
    }
}
