//! Test helpers: deterministic random tensors and central-difference
//! gradients, against which every op's hand-written backward is checked.

/// `n` values uniform in `[-scale, scale)` from a xorshift seeded by `seed`
/// (deterministic, so a failing test fails the same way every run).
pub fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * unit - 1.0) * scale
        })
        .collect()
}

/// `sum_i out[i] * probe[i]` in f64: a scalar loss whose gradient with
/// respect to `out` is `probe`, so an op's backward can be fed `probe`.
pub fn probe_loss(out: &[f32], probe: &[f32]) -> f64 {
    out.iter()
        .zip(probe)
        .map(|(&o, &p)| o as f64 * p as f64)
        .sum()
}

/// The central-difference gradient `[x.len()]` of `loss` at `x`. The step
/// actually taken in f32 (`x + h` and `x - h` rounded) is the divisor, so
/// rounding of the perturbation itself does not bias the estimate.
pub fn numeric_grad(x: &[f32], h: f32, loss: impl Fn(&[f32]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            let (plus, minus) = (x[i] + h, x[i] - h);
            probe[i] = plus;
            let up = loss(&probe);
            probe[i] = minus;
            let down = loss(&probe);
            probe[i] = x[i];
            (up - down) / (plus as f64 - minus as f64)
        })
        .collect()
}

/// Asserts `max |analytic - numeric| / max |numeric| <= tol`.
pub fn assert_grad_close(what: &str, analytic: &[f32], numeric: &[f64], tol: f64) {
    assert_eq!(analytic.len(), numeric.len(), "{what}: lengths");
    let scale = numeric.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let (worst, at) = analytic
        .iter()
        .zip(numeric)
        .enumerate()
        .map(|(i, (&a, &n))| ((a as f64 - n).abs(), i))
        .fold((0f64, 0), |m, d| if d.0 > m.0 { d } else { m });
    assert!(
        worst / scale <= tol,
        "{what}: relative difference {:.3e} at [{at}]: analytic {} numeric {} (scale {scale:.3e})",
        worst / scale,
        analytic[at],
        numeric[at]
    );
}
