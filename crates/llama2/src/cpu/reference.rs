//! Scalar reference ops: the plainest correct version of every CPU op, one
//! token at a time, written to mirror llama2.c's `run.c` and `runq.c`
//! arithmetic. The fast ops in this folder are tested against these on
//! random inputs; these are never used on the hot path.

use crate::config::Config;

/// `out = x / sqrt(mean(x^2) + eps) * weight`, as run.c computes it (run.c's
/// eps is 1e-5).
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    let mut ss = 0f32;
    for v in x {
        ss += v * v;
    }
    ss /= x.len() as f32;
    ss += eps;
    let inv = 1.0 / ss.sqrt();
    for ((o, &w), &v) in out.iter_mut().zip(weight).zip(x) {
        *o = w * (inv * v);
    }
}

/// `out[i] = w[i] · x` for an f32 matrix `w` `[out.len()][x.len()]`.
pub fn matvec_f32(out: &mut [f32], w: &[f32], x: &[f32]) {
    let n = x.len();
    for (i, o) in out.iter_mut().enumerate() {
        let mut val = 0f32;
        for j in 0..n {
            val += w[i * n + j] * x[j];
        }
        *o = val;
    }
}

/// Quantizes an activation vector the way runq does at run time: groups of
/// `gs`, scale = max|x| / 127, values rounded half away from zero. A final
/// partial group gets its own scale.
pub fn quantize_activation(x: &[f32], gs: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; x.len()];
    let mut s = vec![0f32; x.len().div_ceil(gs)];
    for (g, group) in x.chunks(gs).enumerate() {
        let max = group.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        s[g] = scale;
        for (k, &v) in group.iter().enumerate() {
            q[g * gs + k] = if scale == 0.0 {
                0
            } else {
                (v / scale).round() as i8
            };
        }
    }
    (q, s)
}

/// runq's W8A8 product for a Q8_0 matrix `[out.len()][x.len()]` whose groups
/// of `gs` run over the flattened matrix. Each output sums, in f32, one term
/// per stretch of elements that shares a weight group and an activation
/// group: `(int32 dot) * w_scale * x_scale`. When rows are whole groups this
/// is exactly runq's loop; when groups straddle rows it is still correct.
pub fn matvec_q8(out: &mut [f32], wq: &[i8], ws: &[f32], gs: usize, x: &[f32]) {
    let n = x.len();
    let (xq, xs) = quantize_activation(x, gs);
    for (i, o) in out.iter_mut().enumerate() {
        let mut val = 0f32;
        let mut j = 0;
        while j < n {
            let e = i * n + j;
            let end = (j + gs - e % gs).min(j + gs - j % gs).min(n);
            let mut ival = 0i32;
            for k in j..end {
                ival += xq[k] as i32 * wq[i * n + k] as i32;
            }
            val += ival as f32 * ws[e / gs] * xs[j / gs];
            j = end;
        }
        *o = val;
    }
}

/// Rotary embedding of one token's `q` `[D]` and `k` `[KV]` at `pos`, as
/// run.c, with `freqs` `[head_size / 2]` the frequency of each pair of a head
/// (`Config::rope_frequencies`; run.c's are `1 / 10000^(2j / head_size)`).
pub fn rope(q: &mut [f32], k: &mut [f32], pos: usize, freqs: &[f32]) {
    let head_size = 2 * freqs.len();
    for i in (0..q.len()).step_by(2) {
        let freq = freqs[(i % head_size) / 2];
        let val = pos as f32 * freq;
        let (fci, fcr) = val.sin_cos();
        let rotate = |v: &mut [f32]| {
            let (v0, v1) = (v[i], v[i + 1]);
            v[i] = v0 * fcr - v1 * fci;
            v[i + 1] = v0 * fci + v1 * fcr;
        };
        rotate(q);
        if i < k.len() {
            rotate(k);
        }
    }
}

/// In-place softmax, as run.c.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(x[0], f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Attention of one token's queries `q` `[D]` at `pos` over the cached keys
/// and values `[S][KV]` of one layer (positions `0..=pos` filled).
pub fn attention(out: &mut [f32], q: &[f32], keys: &[f32], values: &[f32], pos: usize, c: &Config) {
    let (hs, kv_dim) = (c.head_size(), c.kv_dim());
    let mut att = vec![0f32; pos + 1];
    for h in 0..c.n_heads {
        let qh = &q[h * hs..(h + 1) * hs];
        let kv_off = (h / c.kv_group()) * hs;
        for (t, a) in att.iter_mut().enumerate() {
            let kt = &keys[t * kv_dim + kv_off..][..hs];
            let mut score = 0f32;
            for i in 0..hs {
                score += qh[i] * kt[i];
            }
            *a = score / (hs as f32).sqrt();
        }
        softmax(&mut att);
        let oh = &mut out[h * hs..(h + 1) * hs];
        oh.fill(0.0);
        for (t, &a) in att.iter().enumerate() {
            let vt = &values[t * kv_dim + kv_off..][..hs];
            for i in 0..hs {
                oh[i] += a * vt[i];
            }
        }
    }
}

/// `silu(x) = x * sigmoid(x)`, as run.c.
pub fn silu(x: f32) -> f32 {
    x * (1.0 / (1.0 + (-x).exp()))
}
