//! The inner loops of the CPU matmuls: one weight row against one activation
//! row. These are the functions SIMD versions replace; each has its scalar
//! twin in `reference.rs` and a test comparing the two.

/// `a · b`, accumulated in f32 in index order.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

/// Quantizes one activation row for the W8A8 product: groups of `gs`,
/// rounding half away from zero as runq does; a final partial group gets its
/// own scale. `q` has `x.len()` entries, `s` `x.len().div_ceil(gs)`.
pub fn quantize_row(x: &[f32], gs: usize, q: &mut [i8], s: &mut [f32]) {
    for ((group, qg), scale) in x.chunks(gs).zip(q.chunks_mut(gs)).zip(s.iter_mut()) {
        let max = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        *scale = max / 127.0;
        for (o, &v) in qg.iter_mut().zip(group) {
            // runq divides; multiplying by an inverse would change roundings.
            *o = if max == 0.0 {
                0
            } else {
                (v / *scale).round() as i8
            };
        }
    }
}

/// One output of the W8A8 product: row `row` of a Q8_0 matrix with `cols`
/// columns (values `wq`, group scales `ws`, groups of `gs` over the flattened
/// matrix) against a quantized activation row (`xq`, `xs`).
pub fn dot_q8(wq: &[i8], ws: &[f32], gs: usize, row: usize, xq: &[i8], xs: &[f32]) -> f32 {
    let cols = xq.len();
    let start = row * cols;
    if cols % gs == 0 {
        dot_q8_aligned(&wq[start..start + cols], &ws[start / gs..], gs, xq, xs)
    } else {
        dot_q8_straddling(wq, ws, gs, start, xq, xs)
    }
}

/// The common case: the row starts on a group boundary, so weight groups and
/// activation groups coincide.
fn dot_q8_aligned(wq: &[i8], ws: &[f32], gs: usize, xq: &[i8], xs: &[f32]) -> f32 {
    let mut val = 0f32;
    for (g, (wg, xg)) in wq.chunks_exact(gs).zip(xq.chunks_exact(gs)).enumerate() {
        let mut ival = 0i32;
        for (&a, &b) in wg.iter().zip(xg) {
            ival += a as i32 * b as i32;
        }
        val += ival as f32 * ws[g] * xs[g];
    }
    val
}

/// Rows that start mid-group: one term per stretch sharing both groups.
fn dot_q8_straddling(wq: &[i8], ws: &[f32], gs: usize, start: usize, xq: &[i8], xs: &[f32]) -> f32 {
    let cols = xq.len();
    let mut val = 0f32;
    let mut j = 0;
    while j < cols {
        let e = start + j;
        let end = (j + gs - e % gs).min(j + gs - j % gs).min(cols);
        let mut ival = 0i32;
        for k in j..end {
            ival += xq[k] as i32 * wq[start + k] as i32;
        }
        val += ival as f32 * ws[e / gs] * xs[j / gs];
        j = end;
    }
    val
}
