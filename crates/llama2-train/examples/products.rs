//! Times training's three products per linear layer (the forward `y = x
//! W^T`, `dx = dy W` and `dw = dy^T x`) at a model's shapes and prints each
//! as GFLOP/s, so the product tiles' rate can be read apart from the rest
//! of a step (compare with the machine's FMA peak).
//!
//! `cargo run --release -p llama2-train --example products -- [DIM HIDDEN VOCAB TOKENS [THREADS]]`
//! (defaults: stories15M, 288 768 32000, at batch 8 x 256 on 2 threads).

use std::time::Instant;

use llama2::cpu::kernels::Isa;
use llama2_train::ops::gemm::{gemm_nt, View};

/// The median seconds of `f` over at least 5 calls and 2 seconds.
fn median_seconds(mut f: impl FnMut()) -> f64 {
    let (start, mut times) = (Instant::now(), Vec::new());
    while times.len() < 5 || start.elapsed().as_secs_f64() < 2.0 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// `len` values in `[-1, 1)` from a fixed linear congruential sequence.
fn filled(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("arguments are whole numbers"))
        .collect();
    let [dim, hidden, vocab, n, threads] = match args[..] {
        [] => [288, 768, 32000, 2048, 2],
        [d, h, v, n] => [d, h, v, n, 2],
        [d, h, v, n, t] => [d, h, v, n, t],
        _ => panic!("usage: products [DIM HIDDEN VOCAB TOKENS [THREADS]]"),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("the global pool is built once");
    let isa = Isa::best();
    println!(
        "{n} tokens, {threads} threads, {:?}: GFLOP/s (median)",
        isa.level()
    );
    println!(
        "{:32} {:>8} {:>8} {:>8}",
        "layer [in -> out]", "forward", "dx", "dw"
    );
    for (name, k, m) in [
        ("wq wk wv wo", dim, dim),
        ("w1 w3", dim, hidden),
        ("w2", hidden, dim),
        ("classifier", dim, vocab),
    ] {
        let (x, w, dy) = (filled(n * k, 1), filled(m * k, 2), filled(n * m, 3));
        let (mut y, mut dx, mut dw) = (vec![0f32; n * m], vec![0f32; n * k], vec![0f32; m * k]);
        let gflop = 2.0 * (n * k * m) as f64 / 1e9;
        let forward = median_seconds(|| {
            gemm_nt(
                isa,
                View::rows(&w, k),
                View::rows(&x, k),
                (m, n, k),
                &mut y,
                false,
            )
        });
        let dx_time = median_seconds(|| {
            let (a, b) = (View::transposed(&w, k), View::rows(&dy, m));
            gemm_nt(isa, a, b, (k, n, m), &mut dx, true)
        });
        let dw_time = median_seconds(|| {
            let (a, b) = (View::transposed(&x, k), View::transposed(&dy, m));
            gemm_nt(isa, a, b, (k, m, n), &mut dw, true)
        });
        let label = format!("{name} [{k} -> {m}]");
        println!(
            "{label:32} {:8.1} {:8.1} {:8.1}",
            gflop / forward,
            gflop / dx_time,
            gflop / dw_time
        );
    }
}
