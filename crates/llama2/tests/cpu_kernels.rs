//! The CPU kernels against their scalar twins in `cpu::reference`, at every
//! SIMD level this machine supports (scalar included): dot products,
//! activation quantization, products for each weight type (Q8_0 with
//! straddling group sizes too, and repacked for AVX2, VNNI and AMX), the
//! backend's rmsnorm, rope and attention,
//! and batched prefill against one token at a time. Shapes are random,
//! seeded, and include sizes that are not multiples of the vector width or
//! the group size. `scripts/test-aarch64.sh` runs them for NEON under qemu.

use half::f16;
use llama2::arena::Arena;
use llama2::cpu::kernels::{self, Isa, Level, Prepared, Q8Acts, Rows, TokenBlocks};
use llama2::cpu::packed::{self, CpuMatrix};
use llama2::cpu::reference;
use llama2::sampler::Rng;
use llama2::tensor::MatrixData;
use llama2::{
    Backend, Config, CpuBackend, DType, HostMatrix, LanguageModel, ModelWeights, Transformer,
};

fn random_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

fn below(rng: &mut Rng, n: usize) -> usize {
    rng.next_u32() as usize % n
}

/// Asserts `got` matches `want` within a relative error `tol` (of the
/// vector's RMS), printing the first mismatches (index, got, want).
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let rms = (want.iter().map(|w| w * w).sum::<f32>() / want.len().max(1) as f32).sqrt();
    let bound = tol * rms.max(1e-6);
    let bad: Vec<_> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| (*g - *w).abs() > bound || g.is_nan())
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
        .collect();
    assert!(bad.is_empty(), "{what}: bound {bound}: {}", bad.join(", "));
}

/// Asserts bit-identical results, printing the first mismatches.
fn assert_same<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let bad: Vec<_> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| g != w)
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g:?} want {w:?}"))
        .collect();
    assert!(bad.is_empty(), "{what}: {}", bad.join(", "));
}

#[test]
fn levels_include_scalar_and_best() {
    let all = Isa::all();
    assert_eq!(all[0], Isa::scalar());
    assert!(all.contains(&Isa::best()));
}

#[test]
fn dot_and_axpy_match_scalar() {
    let mut rng = Rng::new(1);
    for isa in Isa::all() {
        for len in [0, 1, 7, 8, 15, 16, 17, 33, 64, 100, 288, 1001] {
            let (a, b) = (random_vec(&mut rng, len), random_vec(&mut rng, len));
            let want = kernels::dot_f32_scalar(&a, &b);
            let got = kernels::dot_f32(isa, &a, &b);
            let what = format!("dot {isa:?} len {len}");
            assert_close(&what, &[got], &[want], 1e-5 * (len as f32).sqrt().max(1.0));
            let mut y = a.clone();
            kernels::axpy(isa, &mut y, 0.7, &b);
            let want: Vec<f32> = a.iter().zip(&b).map(|(y, x)| y + 0.7 * x).collect();
            assert_close(&format!("axpy {isa:?} len {len}"), &y, &want, 1e-6);
        }
    }
}

/// An f16 KV cache's rows (keys for the scores, values for the sums) give
/// at every level exactly the bits their f32 widening gives there: the
/// same kernels, loading f16.
#[test]
fn attention_kernels_on_f16_rows_match_their_f32_widening() {
    let mut rng = Rng::new(12);
    for isa in Isa::all() {
        for hs in [1, 7, 16, 24, 32, 48, 64, 72, 96, 100, 128] {
            for tokens in 1..=5 {
                let n = below(&mut rng, 70);
                let stride = hs + below(&mut rng, 3) * 8;
                let len = |count: usize| count.checked_sub(1).map_or(0, |c| c * stride + hs);
                let halves: Vec<f16> = random_vec(&mut rng, len(n))
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                let widened: Vec<f32> = halves.iter().map(|h| h.to_f32()).collect();
                let qs = random_vec(&mut rng, len(tokens));
                let queries = Rows::new(&qs, stride, hs, tokens);
                let (half_rows, wide_rows) = (
                    Rows::new(&halves, stride, hs, n),
                    Rows::new(&widened, stride, hs, n),
                );
                let what = format!("{isa:?} hs {hs} queries {tokens} keys {n} stride {stride}");
                let scale = (hs as f32).sqrt();
                let (mut got, mut want) = (vec![f32::NAN; tokens * n], vec![0f32; tokens * n]);
                kernels::attention_scores(isa, &mut got, queries, half_rows, scale);
                kernels::attention_scores(isa, &mut want, queries, wide_rows, scale);
                assert_same(&format!("f16 scores {what}"), &got, &want);

                let att = random_vec(&mut rng, tokens * n);
                let (mut got, mut want) = (vec![f32::NAN; tokens * hs], vec![0f32; tokens * hs]);
                kernels::weighted_sum(isa, &mut got, &att, half_rows);
                kernels::weighted_sum(isa, &mut want, &att, wide_rows);
                assert_same(&format!("f16 weighted sum {what}"), &got, &want);
            }
        }
    }
}

/// Scoring and summing up to four queries together (a decoded row's query
/// heads that share one KV head, and a prompt's blocks in dot form) gives
/// at every level the bits of one query at a time, for f32 and f16 caches
/// and heads the vector kernels do not take whole: a row's attention is
/// then the same bits however its heads are grouped.
#[test]
fn attention_queries_together_match_one_at_a_time() {
    let mut rng = Rng::new(13);
    for isa in Isa::all() {
        for hs in [7, 8, 16, 24, 48, 64, 128] {
            for n in [1, 3, 16, 17, 40] {
                let stride = hs + below(&mut rng, 2) * 8;
                let len = (n - 1) * stride + hs;
                let (keys, values) = (random_vec(&mut rng, len), random_vec(&mut rng, len));
                let half = |v: &[f32]| v.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>();
                let (keys16, values16) = (half(&keys), half(&values));
                let scale = (hs as f32).sqrt();
                for (t, f16_cache) in (1..=4).flat_map(|t| [(t, false), (t, true)]) {
                    let what = format!("{isa:?} {t} queries of {hs}, {n} rows, f16 {f16_cache}");
                    let (k, v): (kernels::KvRows, kernels::KvRows) = match f16_cache {
                        false => (
                            Rows::new(&keys, stride, hs, n).into(),
                            Rows::new(&values, stride, hs, n).into(),
                        ),
                        true => (
                            Rows::new(&keys16, stride, hs, n).into(),
                            Rows::new(&values16, stride, hs, n).into(),
                        ),
                    };
                    let q = random_vec(&mut rng, t * hs);
                    let mut want = vec![0f32; t * n];
                    for (i, att) in want.chunks_exact_mut(n).enumerate() {
                        let query = Rows::new(&q[i * hs..], hs, hs, 1);
                        kernels::attention_scores(isa, att, query, k, scale);
                    }
                    let mut got = vec![f32::NAN; t * n];
                    kernels::attention_scores(isa, &mut got, Rows::new(&q, hs, hs, t), k, scale);
                    assert_same(&format!("scores {what}"), &got, &want);

                    let att = random_vec(&mut rng, t * n);
                    let mut want = vec![0f32; t * hs];
                    for (i, out) in want.chunks_exact_mut(hs).enumerate() {
                        kernels::weighted_sum(isa, out, &att[i * n..][..n], v);
                    }
                    let mut got = vec![f32::NAN; t * hs];
                    kernels::weighted_sum(isa, &mut got, &att, v);
                    assert_same(&format!("sums {what}"), &got, &want);
                }
            }
        }
    }
}

#[test]
fn attention_kernels_match_scalar() {
    let mut rng = Rng::new(11);
    for isa in Isa::all() {
        for hs in [1, 7, 16, 24, 32, 48, 64, 72, 96, 100, 128] {
            // Blocks of 1 to 4 queries take the vector kernels; 5 takes
            // the per-query loop.
            for tokens in 1..=5 {
                let n = below(&mut rng, 70);
                let stride = hs + below(&mut rng, 3) * 8;
                let rows = |count: usize| {
                    if count == 0 {
                        0
                    } else {
                        (count - 1) * stride + hs
                    }
                };
                let keys = random_vec(&mut rng, rows(n));
                let qs = random_vec(&mut rng, rows(tokens));
                let (keys_r, queries) = (
                    Rows::new(&keys, stride, hs, n),
                    Rows::new(&qs, stride, hs, tokens),
                );
                let what = format!("{isa:?} hs {hs} queries {tokens} keys {n} stride {stride}");
                let scale = (hs as f32).sqrt();
                let mut got = vec![f32::NAN; tokens * n];
                kernels::attention_scores(isa, &mut got, queries, keys_r, scale);
                let pairs = |f: &dyn Fn(&[f32], &[f32]) -> f32| -> Vec<f32> {
                    (0..tokens * n)
                        .map(|i| f(queries.row(i / n), keys_r.row(i % n)) / scale)
                        .collect()
                };
                let want = pairs(&|a, b| kernels::dot_f32_scalar(a, b));
                assert_close(&format!("scores {what}"), &got, &want, 1e-4);
                // Bit-identical to one dot per (query, key) at the same level.
                let per_key = pairs(&|a, b| kernels::dot_f32(isa, a, b));
                assert_same(&format!("scores per key {what}"), &got, &per_key);

                let att = random_vec(&mut rng, tokens * n);
                let mut got = vec![f32::NAN; tokens * hs];
                kernels::weighted_sum(isa, &mut got, &att, keys_r);
                let mut want = vec![0f32; tokens * hs];
                let mut per_key = vec![0f32; tokens * hs];
                for t in 0..tokens {
                    let (want, per_key) = (&mut want[t * hs..][..hs], &mut per_key[t * hs..][..hs]);
                    for (j, &a) in att[t * n..][..n].iter().enumerate() {
                        for (o, &v) in want.iter_mut().zip(keys_r.row(j)) {
                            *o += a * v;
                        }
                        kernels::axpy(isa, per_key, a, keys_r.row(j));
                    }
                }
                assert_close(&format!("weighted sum {what}"), &got, &want, 1e-4);
                assert_same(&format!("weighted sum per key {what}"), &got, &per_key);
            }
        }
    }
}

/// Asserts `got` within `rel` of `want` relative to each value (small
/// probabilities matter to attention as much as large ones).
fn assert_close_each(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let bad: Vec<_> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (g, w))| (*g - *w).abs() > rel * w.abs() + 1e-37 || g.is_nan())
        .take(5)
        .map(|(i, (g, w))| format!("[{i}] got {g} want {w}"))
        .collect();
    assert!(bad.is_empty(), "{what}: {}", bad.join(", "));
}

#[test]
fn block_attention_kernels_match_scalar() {
    use kernels::TOKEN_BLOCK;
    let mut rng = Rng::new(13);
    for isa in Isa::all() {
        for hs in [1, 7, 8, 16, 48, 64, 100, 128] {
            for (count, first) in [(16, 0), (9, 0), (16, 5), (11, 37), (16, 250)] {
                let n = first + count;
                let stride = hs + below(&mut rng, 3) * 8;
                let keys = random_vec(&mut rng, (n - 1) * stride + hs);
                let keys = Rows::new(&keys, stride, hs, n);
                let qs = random_vec(&mut rng, (count - 1) * stride + hs);
                let mut block = vec![0f32; hs * TOKEN_BLOCK];
                kernels::pack_token_block(Isa::scalar(), &qs, (stride, count, hs), &mut block);
                let what = format!("{isa:?} hs {hs} queries {count} from {first}");

                // Every level gives the same bits as the scalar twin, and
                // where the level attends by blocks, those of its dot form:
                // one `dot_f32` per (query, key).
                let blocks = kernels::attends_by_blocks(isa, TOKEN_BLOCK, hs);
                let mut got = vec![f32::NAN; n * TOKEN_BLOCK];
                kernels::scores_by_block(isa, &mut got, &block, keys);
                // The scalar twin, at the level's lane count.
                let lanes = kernels::dot_lanes(isa);
                let want: Vec<f32> = (0..n * TOKEN_BLOCK)
                    .map(|i| {
                        let (j, t) = (i / TOKEN_BLOCK, i % TOKEN_BLOCK);
                        let q: Vec<f32> = (0..hs).map(|c| block[c * TOKEN_BLOCK + t]).collect();
                        kernels::dot_in_lanes(lanes, &q, keys.row(j))
                    })
                    .collect();
                assert_same(&format!("block scores {what}"), &got, &want);
                // Lanes past the block's queries hold zeros, so score 0.
                let dots = |dot: &dyn Fn(&[f32], &[f32]) -> f32| -> Vec<f32> {
                    (0..n * TOKEN_BLOCK)
                        .map(|i| match (i / TOKEN_BLOCK, i % TOKEN_BLOCK) {
                            (j, t) if t < count => dot(&qs[t * stride..][..hs], keys.row(j)),
                            _ => 0.0,
                        })
                        .collect()
                };
                let exact = dots(&|q, k| kernels::dot_f32_scalar(q, k));
                assert_close(&format!("block scores as dots {what}"), &got, &exact, 1e-4);
                if blocks {
                    let dot_form = dots(&|q, k| kernels::dot_f32(isa, q, k));
                    assert_same(&format!("block scores as dot_f32 {what}"), &got, &dot_form);
                }

                for spread in [1.0, 30.0] {
                    let scores: Vec<f32> = want.iter().map(|v| v * spread).collect();
                    let scale = (hs as f32).sqrt();
                    let mut got = scores.clone();
                    kernels::softmax_by_block(isa, &mut got, first, scale);
                    // Down each query's lane: the level's softmax of that
                    // query alone where it attends by blocks, else the
                    // reference's.
                    for t in 0..TOKEN_BLOCK {
                        let seen = (first + t + 1).min(n);
                        let mut lane: Vec<f32> = (0..seen)
                            .map(|j| scores[j * TOKEN_BLOCK + t] / scale)
                            .collect();
                        match kernels::attends_by_blocks(isa, TOKEN_BLOCK, 16) {
                            true => kernels::softmax(isa, &mut lane),
                            false => reference::softmax(&mut lane),
                        }
                        lane.resize(n, 0.0);
                        let column: Vec<f32> = (0..n).map(|j| got[j * TOKEN_BLOCK + t]).collect();
                        let what = format!("block softmax lane {t} {what} x{spread}");
                        assert_same(&what, &column, &lane);
                    }
                }
            }
        }
    }
}

#[test]
fn softmax_log_sum_exp_exp_shifted_sigmoid_and_silu_match_reference() {
    let mut rng = Rng::new(12);
    for isa in Isa::all() {
        for len in [1, 2, 15, 16, 17, 64, 100, 257] {
            for spread in [0.1, 5.0, 40.0, 200.0] {
                let x: Vec<f32> = random_vec(&mut rng, len)
                    .iter()
                    .map(|v| v * spread)
                    .collect();
                let mut want = x.clone();
                reference::softmax(&mut want);
                let mut got = x.clone();
                kernels::softmax(isa, &mut got);
                let what = format!("softmax {isa:?} len {len} spread {spread}");
                assert_close_each(&what, &got, &want, 1e-6);
                let lse = kernels::log_sum_exp(isa, &x);
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let exact = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                assert!(
                    (lse as f64 - exact).abs() <= 1e-6 * exact.abs().max(1.0),
                    "log_sum_exp {what}: got {lse} want {exact}"
                );
                let scale = 0.25;
                let mut got = x.clone();
                kernels::exp_shifted(isa, &mut got, lse, scale);
                let want: Vec<f32> = x.iter().map(|&v| (v - lse).exp() * scale).collect();
                assert_close_each(&format!("exp_shifted {what}"), &got, &want, 1e-6);
            }
        }
        for len in [1, 15, 16, 17, 100] {
            for spread in [1.0, 20.0, 120.0] {
                let gate: Vec<f32> = random_vec(&mut rng, len)
                    .iter()
                    .map(|v| v * spread)
                    .collect();
                let up = random_vec(&mut rng, len);
                let mut got = gate.clone();
                kernels::sigmoid(isa, &mut got);
                let want: Vec<f32> = gate.iter().map(|&g| 1.0 / (1.0 + (-g).exp())).collect();
                assert_close_each(&format!("sigmoid {isa:?} len {len}"), &got, &want, 1e-6);
                let mut got = gate.clone();
                kernels::silu_mul(isa, &mut got, &up);
                for (i, ((&g, &u), &o)) in gate.iter().zip(&up).zip(&got).enumerate() {
                    let want = reference::silu(g) * u;
                    assert!(
                        (o - want).abs() <= 1e-6 * want.abs() + 1e-37,
                        "silu_mul {isa:?} [{i}] of {g} * {u}: got {o} want {want}"
                    );
                }
            }
        }
        let mut nan = vec![0.0, f32::NAN, 1.0];
        kernels::softmax(isa, &mut nan);
        assert!(
            nan.iter().all(|v| v.is_nan()),
            "{isa:?}: NaN input gives {nan:?}"
        );
    }
}

#[test]
fn quantize_in_parts_matches_whole() {
    let mut rng = Rng::new(13);
    let isa = Isa::best();
    for (n, cols, gs) in [(1, 64, 32), (7, 96, 32), (33, 288, 32), (64, 100, 25)] {
        let x = random_vec(&mut rng, n * cols);
        let mut whole = Q8Acts::default();
        whole.quantize(isa, &x, n, cols, gs);
        // Padding rows (up to a whole tile of tokens) repeat the last token.
        let last = &whole.xq[(n - 1) * cols..n * cols];
        for t in n..whole.tokens {
            assert_same(
                &format!("padding row {t}"),
                &whole.xq[t * cols..(t + 1) * cols],
                last,
            );
        }
        for per in [1, 5, 16] {
            let mut parts = Q8Acts::default();
            // Parts in reverse order, as another thread might take them.
            parts.quantize_split(isa, &x, (n, cols, gs), per, |parts, f| {
                parts.iter_mut().rev().for_each(f)
            });
            let (t, g) = (whole.tokens, cols.div_ceil(gs));
            let what = format!("n {n} cols {cols} gs {gs} per {per}");
            assert_eq!(parts.tokens, t, "{what}");
            assert_same(&what, &parts.xq[..t * cols], &whole.xq[..t * cols]);
            assert_same(&what, &parts.xs_t[..t * g], &whole.xs_t[..t * g]);
            assert_same(&what, &parts.xc_t[..t * g], &whole.xc_t[..t * g]);
        }
    }
}

#[test]
fn quantize_is_bit_identical_to_reference() {
    let mut rng = Rng::new(2);
    for isa in Isa::all() {
        for &gs in &[3, 4, 5, 8, 16, 24, 32, 64] {
            for len in [1, 5, 31, 32, 64, 96, 100, 288] {
                let mut x: Vec<f32> = random_vec(&mut rng, len).iter().map(|v| v * 3.0).collect();
                // Exact ties (k + 0.5) * scale and an all-zero group.
                x[0] = 1.0;
                if len > 2 {
                    x[1] = 63.5 / 127.0;
                }
                if len > gs * 2 {
                    x[gs..2 * gs].fill(0.0);
                }
                let (wq, ws) = reference::quantize_activation(&x, gs);
                let groups = len.div_ceil(gs);
                let (mut q, mut s, mut sums) =
                    (vec![0i8; len], vec![0f32; groups], vec![0; groups]);
                kernels::quantize_row_at(isa, &x, gs, &mut q, &mut s, &mut sums);
                let what = format!("quantize {isa:?} gs {gs} len {len}");
                assert_same(&what, &q, &wq);
                assert_same(&what, &s, &ws);
                let want_sums: Vec<i32> = wq
                    .chunks(gs)
                    .map(|g| g.iter().map(|&v| v as i32).sum())
                    .collect();
                assert_same(&what, &sums, &want_sums);
            }
        }
    }
}

/// A random `[rows][cols]` matrix in `dtype` (Q8 with groups of `gs`).
fn matrix(rng: &mut Rng, rows: usize, cols: usize, dtype: DType, gs: usize) -> HostMatrix {
    let m = HostMatrix::from_f32(rows, cols, random_vec(rng, rows * cols));
    m.convert(dtype, gs).unwrap()
}

/// `kernels::product` over all rows of `w`, split in two ranges as a
/// parallel matmul would, into `[n][rows]` (NaN marks a missed output).
fn product(isa: Isa, w: &HostMatrix, x: &[f32], n: usize) -> Vec<f32> {
    let mut acts = Q8Acts::default();
    let q8 = if let llama2::tensor::MatrixData::Q8(d) = &w.data {
        acts.quantize(isa, x, n, w.cols, d.group_size);
        Some(&acts)
    } else {
        None
    };
    let mut out = vec![f32::NAN; w.rows * n];
    let split = w.rows / 3;
    // One range with the batch laid out in token blocks beforehand, as the
    // backend does, the other laid out by the kernel itself.
    let mut blocks = TokenBlocks::default();
    blocks.pack(x, n, w.cols);
    let given = Prepared {
        q8,
        blocks: Some(&blocks),
    };
    let own = Prepared { q8, blocks: None };
    kernels::product(isa, w, x, n, given, 0..split, &mut out, w.rows);
    kernels::product(isa, w, x, n, own, split..w.rows, &mut out[split..], w.rows);
    out
}

#[test]
fn float_products_match_reference() {
    let mut rng = Rng::new(3);
    for isa in Isa::all() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for case in 0..16 {
                // Rows up to 512 values and longer ones, one token (the
                // first cases) and batches: decoding tiles short and long
                // rows differently, batches differently again.
                let (rows, cols, n) = (
                    1 + below(&mut rng, 40),
                    if case % 2 == 0 { 1 } else { 500 } + below(&mut rng, 300),
                    if case < 4 { 1 } else { 1 + below(&mut rng, 80) },
                );
                let w = matrix(&mut rng, rows, cols, dtype, 1);
                let x = random_vec(&mut rng, n * cols);
                let got = product(isa, &w, &x, n);
                let wf = w.to_f32();
                for t in 0..n {
                    let mut want = vec![0f32; rows];
                    reference::matvec_f32(&mut want, &wf, &x[t * cols..(t + 1) * cols]);
                    let what = format!("{dtype} {isa:?} {rows}x{cols} n {n} token {t}");
                    assert_close(&what, &got[t * rows..(t + 1) * rows], &want, 1e-5);
                }
            }
        }
    }
}

/// The triangle product (attention backward's key and value gradients)
/// against the plain loop in f64, at every level: triangles not a multiple
/// of the vector width, widths not a multiple of 8, strided rows.
#[test]
fn triangle_products_match_reference() {
    let mut rng = Rng::new(11);
    for isa in Isa::all() {
        for _ in 0..12 {
            let (t_len, width) = (1 + below(&mut rng, 40), 1 + below(&mut rng, 20));
            let stride = width + below(&mut rng, 4);
            let ld = t_len + below(&mut rng, 3);
            let tri = random_vec(&mut rng, kernels::triangle_row(t_len));
            let a_data = random_vec(&mut rng, t_len * stride);
            let a = Rows::new(&a_data, stride, width, t_len);
            let start = random_vec(&mut rng, width * ld);
            let mut got = start.clone();
            kernels::triangle_product_add(isa, &tri, a, &mut got, ld);
            for d in 0..width {
                for j in 0..t_len {
                    let terms = (j..t_len)
                        .map(|t| a.row(t)[d] as f64 * tri[kernels::triangle_row(t) + j] as f64);
                    let (sum, size) = terms.fold((0f64, 0f64), |(s, m), v| (s + v, m + v.abs()));
                    let want = start[d * ld + j] as f64 + sum;
                    let g = got[d * ld + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-6 * (size + want.abs()) + 1e-30,
                        "{isa:?} T {t_len} width {width}: first mismatch at [{d}][{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }
}

/// One token block packed from strided rows, at every level, against the
/// plain transposition: column tails, fewer than 16 rows, wide strides.
#[test]
fn token_blocks_pack_as_the_plain_loop() {
    let mut rng = Rng::new(10);
    for isa in Isa::all() {
        for _ in 0..20 {
            let (tokens, cols) = (below(&mut rng, 17), 1 + below(&mut rng, 70));
            let stride = cols + below(&mut rng, 5);
            let x = random_vec(&mut rng, tokens.max(1) * stride);
            let mut got = vec![f32::NAN; cols * 16];
            kernels::pack_token_block(isa, &x, (stride, tokens, cols), &mut got);
            for k in 0..cols {
                for t in 0..16 {
                    let want = if t < tokens { x[t * stride + k] } else { 0.0 };
                    assert_eq!(
                        got[k * 16 + t], want,
                        "{isa:?} {tokens} rows of {cols} ({stride} apart): first mismatch at column {k} token {t}"
                    );
                }
            }
        }
    }
}

/// The by-columns float product (a transposed matrix read in place, as
/// training uses it) against the plain loop in f64, on row ranges that
/// start anywhere and end in partial tiles, at every level.
#[test]
fn by_columns_products_match_reference() {
    let mut rng = Rng::new(9);
    for isa in Isa::all() {
        for case in 0..12 {
            let (w_ld, cols, n) = (
                1 + below(&mut rng, 70),
                1 + below(&mut rng, 600),
                1 + below(&mut rng, 80),
            );
            let start = below(&mut rng, w_ld);
            let rows = start..start + 1 + below(&mut rng, w_ld - start);
            let w = random_vec(&mut rng, cols * w_ld);
            let x = random_vec(&mut rng, n * cols);
            let mut blocks = kernels::TokenBlocks::default();
            blocks.pack(&x, n, cols);
            let mut got = vec![f32::NAN; n * rows.len()];
            kernels::float_product_by_columns(
                isa,
                (&w, w_ld),
                &blocks,
                rows.clone(),
                &mut got,
                rows.len(),
            );
            for t in 0..n {
                for (i, j) in rows.clone().enumerate() {
                    let terms = (0..cols).map(|k| w[j + k * w_ld] as f64 * x[t * cols + k] as f64);
                    let (want, size) = terms.fold((0f64, 0f64), |(s, a), v| (s + v, a + v.abs()));
                    let g = got[t * rows.len() + i] as f64;
                    // Rounding grows with the sum of the terms' sizes, not
                    // with the (possibly cancelled) sum itself.
                    assert!(
                        (g - want).abs() <= 1e-6 * size + 1e-30,
                        "case {case} {isa:?} rows {rows:?} of {w_ld}, cols {cols}, n {n}: \
                         first mismatch at token {t} row {j}: {g} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn q8_products_match_reference() {
    let mut rng = Rng::new(4);
    // (gs, cols): aligned fast cases, a half-chunk tail, and groups that
    // straddle rows (cols not a multiple of gs).
    let cases = [
        (32, 288),
        (32, 96),
        (64, 128),
        (64, 768),
        (16, 48),
        (4, 64),
        (4, 172),
        (3, 7),
        (5, 12),
        (32, 40),
    ];
    for isa in Isa::all() {
        for &(gs, cols) in &cases {
            for n in [1, 3, 4, 9] {
                // Up to 8 blocks of 16 rows: decoding's 4-, 2- and 1-block tiles.
                let mut rows = 1 + below(&mut rng, 128);
                while !(rows * cols).is_multiple_of(gs) {
                    rows += 1;
                }
                let w = matrix(&mut rng, rows, cols, DType::Q8, gs);
                let x = random_vec(&mut rng, n * cols);
                let got = product(isa, &w, &x, n);
                let what = format!("q8 gs {gs} {isa:?} {rows}x{cols} n {n}");
                assert_q8_reference(&what, &w, &x, n, &got);
            }
        }
    }
}

/// The packed product of `p` with `x` `[n][cols]` as `[n][rows]`, in two
/// calls split at row `split`, which need not be a block boundary (a
/// task's range may start anywhere).
fn packed_product_split(
    isa: Isa,
    p: &packed::PackedQ8,
    x: &[f32],
    n: usize,
    split: usize,
) -> Vec<f32> {
    let mut acts = Q8Acts::default();
    acts.quantize(isa, x, n, p.cols, p.gs);
    let rows = p.rows;
    let mut out = vec![f32::NAN; rows * n];
    packed::product_packed(isa, p, &acts, 0..split, &mut out, rows);
    packed::product_packed(isa, p, &acts, split..rows, &mut out[split..], rows);
    out
}

/// Asserts `got` `[n][rows]` is bit-identical, token by token, to the
/// reference W8A8 product of the Q8_0 matrix `w` with `x` `[n][cols]`.
fn assert_q8_reference(what: &str, w: &HostMatrix, x: &[f32], n: usize, got: &[f32]) {
    let llama2::tensor::MatrixData::Q8(d) = &w.data else {
        panic!("{what}: not a Q8_0 matrix")
    };
    let (rows, cols) = (w.rows, w.cols);
    for t in 0..n {
        let mut want = vec![0f32; rows];
        reference::matvec_q8(
            &mut want,
            &d.q,
            &d.scales,
            d.group_size,
            &x[t * cols..(t + 1) * cols],
        );
        assert_same(
            &format!("{what} token {t}"),
            &got[t * rows..(t + 1) * rows],
            &want,
        );
    }
}

#[test]
fn packed_q8_products_match_reference() {
    let mut rng = Rng::new(6);
    // (gs, cols): whole groups per row, group sizes a multiple of 4, odd
    // group counts and group sizes not a multiple of 8 included.
    let cases = [(32, 288), (64, 768), (4, 172), (8, 40), (12, 36), (32, 96)];
    for isa in Isa::all() {
        for &(gs, cols) in &cases {
            for n in [1, 3, 4, 9] {
                // Up to 19 blocks of 16 rows: decoding's 8-block tiles too.
                let rows = 1 + below(&mut rng, 300);
                let w = matrix(&mut rng, rows, cols, DType::Q8, gs);
                let packed = CpuMatrix::new(isa, w.clone(), &mut arena());
                let CpuMatrix::PackedQ8(p) = &packed else {
                    continue;
                };
                let what = format!("packed gs {gs} {isa:?} {rows}x{cols} n {n}");
                for r in [0, rows / 2, rows - 1] {
                    assert_same(
                        &format!("{what} row {r}"),
                        &packed.row_f32(r),
                        &w.row_f32(r),
                    );
                }
                let x = random_vec(&mut rng, n * cols);
                let split = below(&mut rng, rows + 1);
                let out = packed_product_split(isa, p, &x, n, split);
                assert_q8_reference(&format!("{what} split {split}"), &w, &x, n, &out);
            }
        }
    }
}

/// An arena as the backend's, with no limit on copies.
fn arena() -> Arena {
    Arena::with_budget(usize::MAX)
}

/// Float matrices are copied into the arena's huge pages while its budget
/// lasts and read in place after; Q8_0 is repacked there. Every copy gives
/// the same products as the source.
#[test]
fn matrices_move_into_huge_pages_within_the_budget() {
    let mut rng = Rng::new(9);
    for isa in Isa::all() {
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8] {
            let w = matrix(&mut rng, 70, 64, dtype, 32);
            let copied = CpuMatrix::new(isa, w.clone(), &mut arena());
            let kept = CpuMatrix::new(isa, w.clone(), &mut Arena::with_budget(0));
            let resident = |m: &CpuMatrix| match m {
                CpuMatrix::PackedQ8(p) => p.q.is_resident() && p.s.is_resident(),
                CpuMatrix::Host(h) => match &h.data {
                    MatrixData::F32(s) => s.is_resident(),
                    MatrixData::F16(s) => s.is_resident(),
                    MatrixData::BF16(s) => s.is_resident(),
                    MatrixData::Q8(d) => d.q.is_resident(),
                },
            };
            let what = format!("{dtype:?} at {isa:?}");
            let packed = matches!(copied, CpuMatrix::PackedQ8(_));
            assert!(resident(&copied), "{what} not copied");
            assert!(packed || !resident(&kept), "{what} copied past the budget");
            let x = random_vec(&mut rng, 3 * 64);
            if let (CpuMatrix::Host(a), CpuMatrix::Host(b)) = (&copied, &kept) {
                assert_same(&what, &product(isa, a, &x, 3), &product(isa, b, &x, 3));
            }
            for r in [0, 69] {
                assert_same(
                    &format!("{what} row {r}"),
                    &copied.row_f32(r),
                    &w.row_f32(r),
                );
            }
        }
    }
}

/// A weight of -128 (which Q8_0 quantizers never write, but a file may
/// hold) has no negation in int8, which AVX2's sign trick needs: such a
/// matrix stays unpacked there, and every level still gives the reference.
#[test]
fn q8_weight_minus_128_matches_reference() {
    let mut rng = Rng::new(8);
    let (rows, cols, gs) = (40, 64, 32);
    let mut w = matrix(&mut rng, rows, cols, DType::Q8, gs);
    let llama2::tensor::MatrixData::Q8(d) = &mut w.data else {
        unreachable!("asked for Q8")
    };
    let mut q = d.q.to_vec();
    q[5] = i8::MIN;
    q[17 * cols + 3] = i8::MIN;
    d.q = llama2::tensor::Storage::Owned(std::sync::Arc::new(q));
    for isa in Isa::all() {
        let m = CpuMatrix::new(isa, w.clone(), &mut arena());
        if isa.level() == Level::Avx2 {
            assert!(matches!(m, CpuMatrix::Host(_)), "AVX2 packed a -128");
        }
        for n in [1, 5] {
            let x = random_vec(&mut rng, n * cols);
            let got = match &m {
                CpuMatrix::PackedQ8(p) => packed_product_split(isa, p, &x, n, rows / 2),
                CpuMatrix::Host(h) => product(isa, h, &x, n),
            };
            assert_q8_reference(&format!("-128 {isa:?} n {n}"), &w, &x, n, &got);
        }
    }
}

/// The AMX tile product (batches of packed Q8_0) against the reference:
/// token counts and rows that are not multiples of the 16-token and
/// 16-row tiles, group sizes of one K step, part of one, and several.
#[test]
fn amx_q8_products_match_reference() {
    let Some(isa) = Isa::new(Level::Amx) else {
        eprintln!("note: AMX is not available here; its product is not tested");
        return;
    };
    let mut rng = Rng::new(7);
    let cases = [
        (64, 768),
        (32, 288),
        (128, 384),
        (12, 36),
        (4, 172),
        (64, 64),
    ];
    for &(gs, cols) in &cases {
        for _ in 0..4 {
            let (rows, n) = (1 + below(&mut rng, 100), 2 + below(&mut rng, 80));
            let w = matrix(&mut rng, rows, cols, DType::Q8, gs);
            let CpuMatrix::PackedQ8(p) = CpuMatrix::new(isa, w.clone(), &mut arena()) else {
                panic!("the AMX level packs Q8_0 with groups of {gs}");
            };
            let x = random_vec(&mut rng, n * cols);
            let split = below(&mut rng, rows + 1);
            let out = packed_product_split(isa, &p, &x, n, split);
            let what = format!("amx gs {gs} {rows}x{cols} n {n} split {split}");
            assert_q8_reference(&what, &w, &x, n, &out);
        }
    }
}

fn small_config() -> Config {
    Config::llama2c(48, 100, 2, 6, 3, 67, 80, true)
}

/// The backend's rmsnorm of `rows` random rows of `d` values: each row
/// equals the one-row reference exactly, however the rows are split.
fn assert_backend_rmsnorm(b: &mut CpuBackend, rng: &mut Rng, rows: usize, d: usize) {
    let x = random_vec(rng, rows * d);
    let w = random_vec(rng, d);
    let mut out = b.buffer(rows * d).unwrap();
    b.rmsnorm(&mut out, &x, &w, rows).unwrap();
    for r in 0..rows {
        let mut want = vec![0f32; d];
        reference::rmsnorm(&mut want, &x[r * d..(r + 1) * d], &w, 1e-5);
        let what = format!("rmsnorm {:?} {rows}x{d} row {r}", b.isa());
        assert_same(&what, &out[r * d..(r + 1) * d], &want);
    }
}

/// A prompt's attention (by query blocks where the level has them: heads
/// of 16 and 48 at AVX-512, also of 8 at AVX2) is the same bits as
/// attending its positions one at a time, as decoding does.
#[test]
fn prompt_attention_is_the_same_bits_as_one_position_at_a_time() {
    let mut rng = Rng::new(21);
    for (dim, heads) in [(96, 6), (96, 2), (48, 6)] {
        let c = Config::llama2c(dim, 100, 1, heads, heads / 2, 67, 80, true);
        let (d, kv) = (c.dim, c.kv_dim());
        for isa in Isa::all() {
            let mut b = CpuBackend::with_isa(2, None, isa).unwrap();
            b.prepare(&c).unwrap();
            // Three positions first, then a prompt of two whole 32-query
            // blocks and a short one.
            let (pos0, rows) = (3, 70);
            let n = pos0 + rows;
            let (q, k, v) = (
                random_vec(&mut rng, n * d),
                random_vec(&mut rng, n * kv),
                random_vec(&mut rng, n * kv),
            );
            let mut batched = b.kv_cache(&c, c.seq_len).unwrap();
            let mut single = b.kv_cache(&c, c.seq_len).unwrap();
            let mut out = b.buffer(n * d).unwrap();
            let mut one = b.buffer(d).unwrap();
            for pos in 0..n {
                let (qr, kr, vr) = (
                    &q[pos * d..][..d],
                    &k[pos * kv..][..kv],
                    &v[pos * kv..][..kv],
                );
                b.attention(
                    &mut one,
                    &qr.to_vec(),
                    &kr.to_vec(),
                    &vr.to_vec(),
                    &mut single,
                    0,
                    1,
                    pos,
                    &c,
                )
                .unwrap();
                if pos < pos0 {
                    b.attention(
                        &mut one,
                        &qr.to_vec(),
                        &kr.to_vec(),
                        &vr.to_vec(),
                        &mut batched,
                        0,
                        1,
                        pos,
                        &c,
                    )
                    .unwrap();
                }
                out[pos * d..][..d].copy_from_slice(&one[..d]);
            }
            let mut prompt = b.buffer(rows * d).unwrap();
            let slice = |x: &[f32], w: usize| x[pos0 * w..n * w].to_vec();
            b.attention(
                &mut prompt,
                &slice(&q, d),
                &slice(&k, kv),
                &slice(&v, kv),
                &mut batched,
                0,
                rows,
                pos0,
                &c,
            )
            .unwrap();
            let what = format!("attention {isa:?} heads of {}", c.head_size());
            assert_same(&what, &prompt[..rows * d], &out[pos0 * d..n * d]);
        }
    }
}

#[test]
fn backend_rmsnorm_rope_attention_match_reference() {
    // The second shape's 16 heads share 2 KV heads: more query heads per
    // KV head than a decoded row scores in one pass.
    for c in [
        small_config(),
        Config::llama2c(128, 100, 2, 16, 2, 67, 80, true),
    ] {
        assert_rmsnorm_rope_attention(&c);
    }
}

fn assert_rmsnorm_rope_attention(c: &Config) {
    let (d, kv) = (c.dim, c.kv_dim());
    let mut rng = Rng::new(5);
    for isa in Isa::all() {
        let mut b = CpuBackend::with_isa(2, None, isa).unwrap();
        b.prepare(c).unwrap();
        let rows = 5;
        assert_backend_rmsnorm(&mut b, &mut rng, rows, d);

        let pos0 = 7;
        let (mut q, mut k) = (
            random_vec(&mut rng, rows * d),
            random_vec(&mut rng, rows * kv),
        );
        let (mut wq, mut wk) = (q.clone(), k.clone());
        b.rope(&mut q, &mut k, rows, pos0, c).unwrap();
        for r in 0..rows {
            reference::rope(
                &mut wq[r * d..(r + 1) * d],
                &mut wk[r * kv..(r + 1) * kv],
                pos0 + r,
                &c.rope_frequencies(),
            );
        }
        assert_close(&format!("rope q {isa:?}"), &q, &wq, 1e-6);
        assert_close(&format!("rope k {isa:?}"), &k, &wk, 1e-6);

        // Fill positions 0..pos0 one token at a time, then a batch of `rows`.
        let mut cache = b.kv_cache(c, c.seq_len).unwrap();
        let (mut keys, mut values) = (vec![0f32; c.seq_len * kv], vec![0f32; c.seq_len * kv]);
        let mut out = b.buffer(c.seq_len * d).unwrap();
        // The fourth batch is long enough to be attended by blocks; the
        // last is one decoded row over all of them.
        let batches = [
            (0, 1),
            (1, pos0 - 1),
            (pos0, rows),
            (pos0 + rows, 21),
            (33, 1),
        ];
        for (pos, n) in batches {
            let (q, k, v) = (
                random_vec(&mut rng, n * d),
                random_vec(&mut rng, n * kv),
                random_vec(&mut rng, n * kv),
            );
            b.attention(&mut out, &q, &k, &v, &mut cache, 1, n, pos, c)
                .unwrap();
            keys[pos * kv..(pos + n) * kv].copy_from_slice(&k);
            values[pos * kv..(pos + n) * kv].copy_from_slice(&v);
            for r in 0..n {
                let mut want = vec![0f32; d];
                reference::attention(
                    &mut want,
                    &q[r * d..(r + 1) * d],
                    &keys,
                    &values,
                    pos + r,
                    c,
                );
                let what = format!("attention {isa:?} pos {}", pos + r);
                assert_close(&what, &out[r * d..(r + 1) * d], &want, 1e-5);
            }
        }
    }
}

#[test]
fn batched_forward_matches_one_token_at_a_time() {
    // The wide model's batches are big enough that copying product results
    // out and quantizing activations are split across the threads too.
    let wide = Config {
        dim: 132, // 6 heads of 22
        hidden_dim: 272,
        head_dim: 22,
        ..small_config()
    };
    for c in [small_config(), wide] {
        batched_matches_single(&c);
    }
}

/// A prompt longer than the backend's batch runs in several steps, only
/// the last of which computes logits: its logits (and every position's,
/// through `forward_all`) equal feeding the tokens one at a time.
#[test]
fn prompts_longer_than_a_batch_match_one_token_at_a_time() {
    let c = Config::llama2c(48, 100, 2, 6, 3, 67, 600, true);
    let weights = llama2::synth::random_weights(&c, DType::F32, 5);
    let backend = CpuBackend::with_dtype(2, None).unwrap();
    let mut batched = Transformer::new(backend, &weights).unwrap();
    let n = batched.max_batch() + 37;
    assert!(n <= c.seq_len);
    let tokens: Vec<u32> = (0..n).map(|i| (i * 17 + 3) as u32 % 67).collect();
    let last = batched.forward(&tokens, 0).unwrap().to_vec();
    let all = batched.forward_all(&tokens, 0).unwrap().to_vec();
    let backend = CpuBackend::with_dtype(1, None).unwrap();
    let mut single = Transformer::new(backend, &weights).unwrap();
    let v = c.vocab_size;
    for (pos, &t) in tokens.iter().enumerate() {
        let want = single.forward(&[t], pos).unwrap();
        assert_close(&format!("pos {pos}"), &all[pos * v..][..v], want, 1e-4);
        if pos == n - 1 {
            assert_close("last logits", &last, want, 1e-4);
        }
    }
}

#[test]
fn model_from_inconsistent_weights_is_an_error() {
    let bad = Config {
        dim: 128, // not divisible by 6 heads
        ..small_config()
    };
    let backend = || CpuBackend::with_dtype(1, None).unwrap();
    let rejected = |result: llama2::Result<Transformer<CpuBackend>>, expected: &str| {
        let err = result.err().expect("accepted");
        assert!(err.to_string().contains(expected), "{err}");
    };
    rejected(
        Transformer::synthetic(backend(), &bad, 1),
        "does not divide",
    );
    let good = llama2::synth::random_weights(&small_config(), DType::Q8, 1);
    assert!(Transformer::new(backend(), &good).is_ok());
    let with_bad_config = ModelWeights {
        config: bad,
        ..good.clone()
    };
    rejected(
        Transformer::new(backend(), &with_bad_config),
        "does not divide",
    );
    let mut fewer = good.clone();
    fewer.layers.pop();
    rejected(Transformer::new(backend(), &fewer), "2 layers but 1");
    let mut swapped = good.clone();
    swapped.layers[1].w2 = swapped.layers[1].w1.clone();
    let expected = "layers[1].w2: expected [48][100], found [100][48]";
    rejected(Transformer::new(backend(), &swapped), expected);
    let mut short = good;
    short.rms_final = llama2::tensor::Storage::owned(vec![1.0; 47]);
    let expected = "rms_final: expected 48 values, found 47";
    rejected(Transformer::new(backend(), &short), expected);
}

/// A 70-token prompt (a full batch and part of another) in batched steps on
/// two threads against the same tokens one at a time on one.
fn batched_matches_single(c: &Config) {
    let tokens: Vec<u32> = (0..70)
        .map(|i| (i * 31 + 5) % c.vocab_size as u32)
        .collect();
    let v = c.vocab_size;
    for dtype in [DType::F32, DType::BF16, DType::Q8] {
        let weights = llama2::synth::random_weights(c, dtype, 11);
        for isa in Isa::all() {
            let backend = CpuBackend::with_isa(2, None, isa).unwrap();
            let mut batched = Transformer::new(backend, &weights).unwrap();
            let all = batched.forward_all(&tokens, 0).unwrap().to_vec();
            let backend = CpuBackend::with_isa(1, None, isa).unwrap();
            let mut single = Transformer::new(backend, &weights).unwrap();
            for (pos, &t) in tokens.iter().enumerate() {
                let got = &all[pos * v..(pos + 1) * v];
                let want = single.forward(&[t], pos).unwrap();
                // Q8 rounds activations; a last-bit difference can flip one value.
                let tol = if dtype == DType::Q8 { 2e-2 } else { 1e-4 };
                let what = format!("dim {} {dtype} {isa:?} pos {pos}", c.dim);
                assert_close(&what, got, want, tol);
            }
        }
    }
}

/// Batches large enough that the backend splits rmsnorm, silu and add
/// across its threads: each row equals the one-row reference exactly.
#[test]
fn backend_elementwise_batches_match_reference() {
    let (rows, d) = (40, 512);
    let mut rng = Rng::new(11);
    for isa in Isa::all() {
        let mut b = CpuBackend::with_isa(2, None, isa).unwrap();
        assert_backend_rmsnorm(&mut b, &mut rng, rows, d);

        let (gate, up) = (
            random_vec(&mut rng, rows * d),
            random_vec(&mut rng, rows * d),
        );
        let mut got = gate.clone();
        b.silu_mul(&mut got, &up, rows * d).unwrap();
        let want: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| reference::silu(g) * u)
            .collect();
        assert_close(&format!("silu_mul {isa:?}"), &got, &want, 1e-6);
        if isa == Isa::scalar() {
            assert_eq!(got, want, "silu_mul {isa:?}");
        }

        let mut sum = gate.clone();
        b.add(&mut sum, &up, rows * d).unwrap();
        let want: Vec<f32> = gate.iter().zip(&up).map(|(&a, &b)| a + b).collect();
        assert_eq!(sum, want, "add {isa:?}");
    }
}
