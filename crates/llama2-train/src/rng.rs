//! The training run's random numbers: run.c's xorshift64* generator (as
//! `llama2::sampler::Rng`) with its state readable, so a checkpoint can
//! store it and a resumed run draws the same batches; plus normal draws by
//! Box-Muller for the weight init. Not bit-compatible with PyTorch's RNG.

/// xorshift64*; the state must not be zero (a zero seed is replaced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator from `seed`; xorshift is stuck at 0, so 0 becomes a fixed
    /// odd constant.
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: if seed == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                seed
            },
        }
    }

    /// The state, for checkpoints.
    pub fn state(&self) -> u64 {
        self.state
    }

    /// A generator resumed from a stored state.
    pub fn from_state(state: u64) -> Rng {
        Rng::new(state)
    }

    pub fn next_u32(&mut self) -> u32 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        (self.state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    /// 64 random bits from two draws.
    pub fn next_u64(&mut self) -> u64 {
        ((self.next_u32() as u64) << 32) | self.next_u32() as u64
    }

    /// Uniform in `0..n` (`n > 0`); the modulo bias is below 2^-40 for any
    /// count of windows a shard can hold.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in (0, 1], never 0, so `ln` is finite.
    fn open_unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// A standard normal draw (Box-Muller, one of the pair used).
    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.open_unit(), self.open_unit());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_normals_look_normal() {
        let mut a = Rng::new(42);
        a.next_u32();
        let mut b = Rng::from_state(a.state());
        assert_eq!(a.next_u64(), b.next_u64());
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|_| a.normal() as f64).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
        assert!((0..1000).all(|_| a.below(7) < 7));
    }
}
