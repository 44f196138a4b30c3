//! train.py's `get_lr`: linear warmup from 0 over `warmup_iters`, then
//! cosine decay to `min_lr` at `lr_decay_iters`, `min_lr` after that.

/// The schedule's settings (train.py's names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub learning_rate: f64,
    /// `decay_lr`: false keeps `learning_rate` throughout.
    pub decay_lr: bool,
    pub warmup_iters: u64,
    pub lr_decay_iters: u64,
    pub min_lr: f64,
}

impl LrSchedule {
    /// The learning rate at iteration `it`, computed in f64 as Python does.
    pub fn lr(&self, it: u64) -> f64 {
        if !self.decay_lr {
            return self.learning_rate;
        }
        if it < self.warmup_iters {
            return self.learning_rate * it as f64 / self.warmup_iters as f64;
        }
        if it > self.lr_decay_iters || self.lr_decay_iters <= self.warmup_iters {
            // The second case (no decay span) would divide by zero in train.py.
            return if it > self.lr_decay_iters {
                self.min_lr
            } else {
                self.learning_rate
            };
        }
        let ratio =
            (it - self.warmup_iters) as f64 / (self.lr_decay_iters - self.warmup_iters) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
        self.min_lr + coeff * (self.learning_rate - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_floor() {
        let s = LrSchedule {
            learning_rate: 1e-3,
            decay_lr: true,
            warmup_iters: 10,
            lr_decay_iters: 110,
            min_lr: 1e-4,
        };
        assert_eq!(s.lr(0), 0.0);
        assert!((s.lr(5) - 5e-4).abs() < 1e-12);
        assert!((s.lr(10) - 1e-3).abs() < 1e-12);
        assert!((s.lr(60) - 5.5e-4).abs() < 1e-12);
        assert!((s.lr(110) - 1e-4).abs() < 1e-12);
        assert_eq!(s.lr(111), 1e-4);
        let flat = LrSchedule {
            decay_lr: false,
            ..s
        };
        assert_eq!(flat.lr(0), 1e-3);
    }
}
