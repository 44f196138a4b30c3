//! The sampler against a naive transcription of run.c's sampling (full sort
//! of the top-p candidates), over many random distributions and coins.

use llama2::sampler::{argmax, argmax_scalar, softmax, Rng, Sampler};

/// run.c's `sample`, written plainly: temperature, softmax, one coin, then
/// multinomial or top-p with a full (stable) sort of the candidates.
fn naive_sample(logits: &[f32], temperature: f32, topp: f32, rng: &mut Rng) -> u32 {
    if temperature == 0.0 {
        let mut best = 0;
        for i in 1..logits.len() {
            if logits[i] > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut probs: Vec<f32> = logits.iter().map(|l| l / temperature).collect();
    softmax(&mut probs);
    let coin = rng.next_f32();
    let walk = |items: &[(f32, u32)], r: f32| -> u32 {
        let mut cdf = 0f32;
        for &(p, id) in items {
            cdf += p;
            if r < cdf {
                return id;
            }
        }
        items.last().unwrap().1
    };
    let all: Vec<(f32, u32)> = probs
        .iter()
        .enumerate()
        .map(|(i, &p)| (p, i as u32))
        .collect();
    if topp <= 0.0 || topp >= 1.0 {
        return walk(&all, coin);
    }
    let cutoff = (1.0 - topp) / (probs.len() - 1) as f32;
    let mut kept: Vec<(f32, u32)> = all.into_iter().filter(|c| c.0 >= cutoff).collect();
    kept.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let mut cumulative = 0f32;
    let mut last = kept.len() - 1;
    for (i, c) in kept.iter().enumerate() {
        cumulative += c.0;
        if cumulative > topp {
            last = i;
            break;
        }
    }
    walk(&kept[..=last], coin * cumulative)
}

/// Logits of `n` tokens with spread `scale`; `ties` rounds them so that many
/// probabilities are exactly equal.
fn random_logits(rng: &mut Rng, n: usize, scale: f32, ties: bool) -> Vec<f32> {
    (0..n)
        .map(|_| {
            // Sum of uniforms: roughly normal, with a few large values.
            let x: f32 = (0..4).map(|_| rng.next_f32() - 0.5).sum::<f32>() * scale;
            if ties {
                x.round()
            } else {
                x
            }
        })
        .collect()
}

fn compare(n: usize, draws: usize, temperatures: &[f32], topps: &[f32]) {
    let mut gen = Rng::new(0x5eed + n as u64);
    for &scale in &[0.1f32, 1.0, 4.0, 20.0] {
        for ties in [false, true] {
            let logits = random_logits(&mut gen, n, scale, ties);
            for &t in temperatures {
                for &p in topps {
                    let seed = 1 + gen.next_u32() as u64;
                    let mut sampler = Sampler::new(t, p, seed);
                    let mut rng = Rng::new(seed);
                    for draw in 0..draws {
                        let want = naive_sample(&logits, t, p, &mut rng);
                        let got = sampler.sample(&mut logits.clone());
                        assert_eq!(
                            got, want,
                            "n {n} scale {scale} ties {ties} t {t} p {p} draw {draw}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn top_p_matches_full_sort_small_vocab() {
    compare(512, 200, &[0.3, 1.0, 1.7], &[0.05, 0.5, 0.9, 0.95, 0.999]);
    compare(2, 50, &[1.0], &[0.5, 0.9]);
    compare(3, 50, &[1.0], &[0.5, 0.9]);
}

#[test]
fn top_p_matches_full_sort_llama_vocab() {
    compare(32000, 15, &[1.0, 2.0], &[0.5, 0.9, 0.99]);
}

#[test]
fn multinomial_matches_cdf_walk() {
    // top-p outside (0, 1) means plain multinomial sampling.
    compare(512, 200, &[0.5, 1.0], &[0.0, 1.0, 1.5, -0.5]);
}

#[test]
fn multinomial_frequencies_follow_probabilities() {
    let logits = [0f32, (2f32).ln(), (3f32).ln(), (4f32).ln()];
    let mut sampler = Sampler::new(1.0, 1.0, 42);
    let mut counts = [0usize; 4];
    let n = 100_000;
    for _ in 0..n {
        counts[sampler.sample(&mut logits.clone()) as usize] += 1;
    }
    for (i, &c) in counts.iter().enumerate() {
        let want = (i + 1) as f64 / 10.0;
        let got = c as f64 / n as f64;
        assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
    }
}

#[test]
fn temperature_zero_is_argmax_first_max_wins() {
    let mut s = Sampler::new(0.0, 0.9, 7);
    assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(s.sample(&mut [5.0, 5.0, 5.0]), 0);
    assert_eq!(s.sample(&mut [-3.0, -1.0, -2.0, -1.0]), 1);
    assert_eq!(
        s.sample(&mut [f32::NEG_INFINITY, -1e30, f32::NEG_INFINITY]),
        1
    );
    assert_eq!(s.sample(&mut [0.0, 0.0, 0.0, 1e-30]), 3);
    assert_eq!(argmax(&[2.0]), 0);
    // Greedy sampling never depends on the seed or top-p.
    let mut gen = Rng::new(99);
    for _ in 0..50 {
        let logits = random_logits(&mut gen, 300, 3.0, true);
        let want = argmax(&logits);
        for (seed, p) in [(1, 0.9), (2, 0.0), (3, 1.0)] {
            assert_eq!(Sampler::new(0.0, p, seed).sample(&mut logits.clone()), want);
        }
    }
}

#[test]
fn argmax_matches_its_scalar_reference() {
    let mut rng = Rng::new(5);
    let specials = [f32::NAN, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1.0];
    for case in 0..400 {
        let n = 1 + rng.next_u32() as usize % 100;
        // Few distinct values, so ties are common; some specials mixed in.
        let mut v: Vec<f32> = (0..n).map(|_| (rng.next_u32() % 5) as f32 - 2.0).collect();
        if case % 2 == 0 {
            for _ in 0..1 + n / 10 {
                let i = rng.next_u32() as usize % n;
                v[i] = specials[rng.next_u32() as usize % specials.len()];
            }
        }
        assert_eq!(argmax(&v), argmax_scalar(&v), "{v:?}");
    }
    let mut big: Vec<f32> = (0..32000).map(|i| ((i * 7919) % 32000) as f32).collect();
    assert_eq!(argmax(&big), argmax_scalar(&big));
    big[31999] = 1e9;
    assert_eq!(argmax(&big), 31999);
    assert_eq!(argmax(&[]), 0);
}

#[test]
fn skip_consumes_one_coin_like_sample() {
    let logits = [0.5f32, 0.1, 0.9, 0.3, 0.2];
    let mut a = Sampler::new(1.0, 0.9, 133742);
    let mut b = Sampler::new(1.0, 0.9, 133742);
    let mut seq_a = Vec::new();
    let mut seq_b = Vec::new();
    for i in 0..100 {
        if i % 3 == 0 {
            a.skip();
            b.sample(&mut logits.clone());
        } else {
            seq_a.push(a.sample(&mut logits.clone()));
            seq_b.push(b.sample(&mut logits.clone()));
        }
    }
    assert_eq!(seq_a, seq_b);
}

#[test]
fn rng_coins_are_24_bit_fractions_in_unit_interval() {
    let mut rng = Rng::new(133742);
    for _ in 0..10_000 {
        let c = rng.next_f32();
        assert!((0.0..1.0).contains(&c));
        assert_eq!((c * 16_777_216.0).fract(), 0.0);
    }
    // Same seed, same stream; different seeds, different streams.
    let a: Vec<u32> = (0..8)
        .scan(Rng::new(5), |r, _| Some(r.next_u32()))
        .collect();
    let b: Vec<u32> = (0..8)
        .scan(Rng::new(5), |r, _| Some(r.next_u32()))
        .collect();
    let c: Vec<u32> = (0..8)
        .scan(Rng::new(6), |r, _| Some(r.next_u32()))
        .collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn degenerate_distributions_do_not_panic() {
    // A flat distribution with a tiny top-p: every probability (1/512) is
    // below the candidate cutoff (1 - p) / (V - 1), so no token passes the
    // filter (llama2.c then reads before its array). Sample them all instead.
    let mut s = Sampler::new(1.0, 0.001, 1);
    let mut rng = Rng::new(1);
    for _ in 0..20 {
        let got = s.sample(&mut [0.0; 512]);
        let coin = rng.next_f32();
        assert_eq!(got, (coin * 512.0) as u32);
    }
    // NaN or infinite logits (a broken model): some token, no panic.
    for logits in [
        vec![f32::NAN; 16],
        vec![f32::INFINITY; 16],
        vec![f32::NEG_INFINITY; 16],
        vec![0.0, f32::NAN, 1.0, f32::INFINITY],
    ] {
        for (t, p) in [(0.0, 0.9), (1.0, 0.9), (1.0, 0.0), (0.5, 0.5)] {
            let token = Sampler::new(t, p, 3).sample(&mut logits.clone());
            assert!((token as usize) < logits.len());
        }
    }
}
