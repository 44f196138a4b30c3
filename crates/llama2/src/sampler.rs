//! Sampling the next token from logits, bit for bit as llama2.c's `run.c`:
//! the xorshift64* generator, one f32 coin per sampled token, argmax at
//! temperature 0, multinomial sampling, and top-p (nucleus) sampling with
//! the same candidate filter and order.

/// run.c's xorshift64* generator.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u32(&mut self) -> u32 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    /// A float in [0, 1) with 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / 16_777_216.0
    }
}

/// Sampling settings plus the generator state.
#[derive(Clone, Debug)]
pub struct Sampler {
    temperature: f32,
    topp: f32,
    rng: Rng,
    /// Candidates for top-p: (probability, id).
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// `temperature` 0 is greedy; `topp` outside (0, 1) disables nucleus
    /// sampling. Values are used as given (clamping is the CLI's job).
    pub fn new(temperature: f32, topp: f32, seed: u64) -> Self {
        Sampler {
            temperature,
            topp,
            rng: Rng::new(seed),
            candidates: Vec::new(),
        }
    }

    /// Picks the next token from `logits`, which it may overwrite. A
    /// temperature so small that dividing by it overflows (1e-38, or a
    /// subnormal) is treated as 0, the limit it approaches: run.c samples
    /// from NaN probabilities there.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.temperature == 0.0 || overflows(logits, self.temperature) {
            return argmax(logits);
        }
        for l in logits.iter_mut() {
            *l /= self.temperature;
        }
        softmax(logits);
        let coin = self.rng.next_f32();
        if self.topp <= 0.0 || self.topp >= 1.0 {
            sample_mult(logits, coin)
        } else {
            self.sample_topp(logits, coin)
        }
    }

    /// Advances the generator as `sample` would, without logits: for steps
    /// whose sampled token is discarded anyway.
    pub fn skip(&mut self) {
        if self.temperature != 0.0 {
            self.rng.next_f32();
        }
    }

    /// Top-p: keep tokens with probability >= (1 - p) / (V - 1), sort them by
    /// probability (descending; ties by id, as a stable sort gives), cut
    /// after the running sum first exceeds p, sample within the cut.
    fn sample_topp(&mut self, probs: &[f32], coin: f32) -> u32 {
        let cutoff = (1.0 - self.topp) / (probs.len() - 1) as f32;
        self.candidates.clear();
        self.candidates.extend(
            probs
                .iter()
                .enumerate()
                .filter(|(_, &p)| p >= cutoff)
                .map(|(i, &p)| (p, i as u32)),
        );
        if self.candidates.is_empty() {
            // Nothing passes the filter: a flat distribution with a tiny
            // top-p, or NaN probabilities. llama2.c reads before its array
            // here; sample from all tokens instead.
            return sample_mult(probs, coin);
        }
        let kept = sort_until_mass(&mut self.candidates, self.topp);
        let mut cumulative = 0f32;
        let mut last = kept.len() - 1;
        for (i, &(p, _)) in kept.iter().enumerate() {
            cumulative += p;
            if cumulative > self.topp {
                last = i;
                break;
            }
        }
        let r = coin * cumulative;
        let mut cdf = 0f32;
        for &(p, id) in &kept[..=last] {
            cdf += p;
            if r < cdf {
                return id;
            }
        }
        kept[last].1
    }
}

/// Whether some `logit / temperature` is infinite though the logit is not.
pub(crate) fn overflows(logits: &[f32], temperature: f32) -> bool {
    let max_abs = logits.iter().fold(0f32, |m, l| m.max(l.abs()));
    !(max_abs / temperature).is_finite()
}

/// Orders candidates by descending probability (ascending id on ties) far
/// enough to cover probability mass `topp`, and returns that sorted prefix
/// (or all candidates). On flat distributions only a small part of the
/// candidates is ever needed, so this avoids llama2.c's full sort while
/// returning the same ordered prefix.
pub(crate) fn sort_until_mass(c: &mut [(f32, u32)], topp: f32) -> &[(f32, u32)] {
    let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let mut sorted = 0;
    let mut mass = 0f32;
    let mut chunk = 64;
    while sorted < c.len() {
        let end = (sorted + chunk).min(c.len());
        if end < c.len() {
            c[sorted..].select_nth_unstable_by(end - sorted - 1, order);
        }
        c[sorted..end].sort_unstable_by(order);
        mass += c[sorted..end].iter().map(|p| p.0).sum::<f32>();
        sorted = end;
        // Stop once the sorted prefix surely holds the cut; the running sum
        // over it is recomputed exactly by the caller.
        if mass > topp * 1.001 + 1e-6 {
            break;
        }
        chunk *= 2;
    }
    &c[..sorted]
}

/// Index of the largest value; the first one on ties; NaNs are never
/// chosen unless the first value is one. The same answer as
/// `argmax_scalar`, in two vectorizable passes: the maximum, kept in 16
/// independent lanes, then the first chunk holding it. Greedy decoding runs
/// this once per token over the whole vocabulary, on one thread, while the
/// other threads wait.
pub fn argmax(v: &[f32]) -> u32 {
    const LANES: usize = 16;
    let Some(&first) = v.first() else {
        return 0;
    };
    if first.is_nan() {
        return 0;
    }
    let mut lanes = [first; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            if x > *m {
                *m = x;
            }
        }
    }
    let max = lanes
        .into_iter()
        .chain(tail.iter().copied())
        .fold(first, |m, x| if x > m { x } else { m });
    let start = v
        .chunks(LANES)
        .position(|c| c.iter().fold(false, |hit, &x| hit | (x == max)))
        .expect("the maximum is one of the values")
        * LANES;
    let offset = v[start..]
        .iter()
        .position(|&x| x == max)
        .expect("found above");
    (start + offset) as u32
}

/// `argmax`'s reference: run.c's loop, replacing the best index only when a
/// value is strictly greater.
pub fn argmax_scalar(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// In-place softmax as run.c computes it.
pub fn softmax(x: &mut [f32]) {
    crate::cpu::reference::softmax(x)
}

/// Multinomial sample: the first index whose cumulative probability exceeds
/// `coin`, or the last index.
fn sample_mult(probs: &[f32], coin: f32) -> u32 {
    let mut cdf = 0f32;
    for (i, &p) in probs.iter().enumerate() {
        cdf += p;
        if coin < cdf {
            return i as u32;
        }
    }
    (probs.len() - 1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full sort llama2.c does, for comparison.
    fn full_sort(c: &[(f32, u32)]) -> Vec<(f32, u32)> {
        let mut v = c.to_vec();
        v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        v
    }

    #[test]
    fn partial_sort_prefix_matches_full_sort() {
        let mut rng = Rng::new(7);
        for n in [1usize, 5, 63, 64, 65, 1000, 5000] {
            let raw: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
            let sum: f32 = raw.iter().sum();
            let c: Vec<(f32, u32)> = raw
                .iter()
                .enumerate()
                .map(|(i, &p)| (p / sum, i as u32))
                .collect();
            for topp in [0.1f32, 0.5, 0.9, 0.99] {
                let mut work = c.clone();
                let prefix = sort_until_mass(&mut work, topp).to_vec();
                let full = full_sort(&c);
                assert_eq!(prefix[..], full[..prefix.len()], "n {n} topp {topp}");
                let mass: f32 = prefix.iter().map(|p| p.0).sum();
                assert!(prefix.len() == n || mass > topp);
            }
        }
    }

    #[test]
    fn rng_matches_reference_sequence() {
        // xorshift64* from seed 42, computed by hand from the definition.
        let mut s: u64 = 42;
        let mut rng = Rng::new(42);
        for _ in 0..100 {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let want = (s.wrapping_mul(0x2545F4914F6CDD1D) >> 32) as u32;
            assert_eq!(rng.next_u32(), want);
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut s = Sampler::new(0.0, 0.9, 1);
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0, 2.0]), 1);
    }
}
