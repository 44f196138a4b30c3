//! The inner loops of the CPU ops and the choice of instruction set. An
//! `Isa` is a SIMD level confirmed on this CPU at run time; every entry point
//! takes one, runs the architecture's vector kernel (`simd/`) when it has
//! one for that level and falls back to the scalar loop here otherwise.
//! Tests pick each level in `Isa::all()` to compare it with `reference.rs`.

use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::{grow_to, simd};
use crate::tensor::{HostMatrix, MatrixData};

// ----------------------------------------------------------------------------
// Instruction set selection

/// SIMD levels, from none to the widest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// `Avx2` plus AVX-VNNI (`vpdpbusd` on 256-bit registers: Alder Lake
    /// and later, Zen 5): int8 products on VNNI, everything else as `Avx2`.
    AvxVnni,
    /// x86-64 AVX-512 F/BW/VL with VNNI.
    Avx512,
    /// `Avx512` plus AMX-TILE/INT8 granted by the OS: batched Q8_0
    /// products run on the tile unit, everything else as at `Avx512`.
    Amx,
    /// aarch64 Advanced SIMD.
    Neon,
}

impl Level {
    /// Every level, narrowest first.
    pub const ALL: [Level; 6] = [
        Level::Scalar,
        Level::Avx2,
        Level::AvxVnni,
        Level::Avx512,
        Level::Amx,
        Level::Neon,
    ];

    /// The level `name` names (as `name()` spells it).
    pub fn from_name(name: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == name)
    }

    /// What `from_name` accepts, for errors: "one of scalar, avx2, ...".
    pub fn choices() -> String {
        let names: Vec<_> = Level::ALL.iter().map(|l| l.name()).collect();
        format!("one of {}", names.join(", "))
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Scalar => "scalar",
            Level::Avx2 => "avx2",
            Level::AvxVnni => "avxvnni",
            Level::Avx512 => "avx512",
            Level::Amx => "amx",
            Level::Neon => "neon",
        }
    }
}

/// The environment variable that forces a SIMD level (`Isa::configured`).
pub const ISA_VAR: &str = "LLAMA2_ISA";

/// A SIMD level this CPU supports: holding one is what makes calling its
/// `unsafe` kernels sound, so it can only be made by checking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Isa {
    level: Level,
}

impl Isa {
    /// `level` if this CPU runs it.
    pub fn new(level: Level) -> Option<Isa> {
        simd::supported(level).then_some(Isa { level })
    }

    /// The scalar loops, available everywhere.
    pub fn scalar() -> Isa {
        Isa {
            level: Level::Scalar,
        }
    }

    /// The widest supported level (detected once).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| *Isa::all().last().expect("scalar is always supported"))
    }

    /// Every supported level, narrowest first.
    pub fn all() -> Vec<Isa> {
        Level::ALL.into_iter().filter_map(Isa::new).collect()
    }

    /// `level`, or an error saying which levels this CPU does run.
    pub fn require(level: Level) -> Result<Isa, String> {
        Isa::new(level).ok_or_else(|| {
            let have: Vec<_> = Isa::all().iter().map(|i| i.level().name()).collect();
            format!(
                "this CPU cannot run the {} kernels; it runs: {}",
                level.name(),
                have.join(", ")
            )
        })
    }

    /// The level the environment variable `ISA_VAR` forces, else the
    /// widest: so a narrower level can be timed and tested on a wider CPU
    /// by any command, test or benchmark without a flag of its own.
    pub fn configured() -> Result<Isa, String> {
        match std::env::var(ISA_VAR) {
            Err(std::env::VarError::NotPresent) => Ok(Isa::best()),
            Ok(name) if name.is_empty() => Ok(Isa::best()),
            Ok(name) => {
                let level = Level::from_name(&name)
                    .ok_or_else(|| format!("{ISA_VAR}={name}: expected {}", Level::choices()))?;
                Isa::require(level).map_err(|e| format!("{ISA_VAR}={name}: {e}"))
            }
            Err(e) => Err(format!("{ISA_VAR}: {e}")),
        }
    }

    pub fn level(self) -> Level {
        self.level
    }
}

// ----------------------------------------------------------------------------
// Vector helpers

/// `a · b`: in index order at the scalar level, in SIMD lanes otherwise.
pub fn dot_f32(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    simd::dot_f32(isa, a, b).unwrap_or_else(|| dot_f32_scalar(a, b))
}

/// `a · b`, accumulated in f32 in index order.
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (x, y) in a.iter().zip(b) {
        sum += x * y;
    }
    sum
}

/// `y += a * x`.
pub fn axpy(isa: Isa, y: &mut [f32], a: f32, x: &[f32]) {
    if !simd::axpy(isa, y, a, x) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o += a * v;
        }
    }
}

/// In-place softmax: the reference's (run.c's) at the scalar level; with
/// vector exponentials (within 2 ulp of `f32::exp`) and lane-wise sums
/// otherwise, so results differ from the reference by float rounding only.
pub fn softmax(isa: Isa, x: &mut [f32]) {
    if !simd::softmax(isa, x) {
        super::reference::softmax(x)
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`: the reference's formula at the scalar
/// level, with vector exponentials (within 2 ulp of `f32::exp`) otherwise.
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up differ in length");
    if !simd::silu_mul(isa, gate, up) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = super::reference::silu(*g) * u;
        }
    }
}

/// `ln(sum of e^x)` over `x`, as `max + ln(sum of e^(x - max))` with
/// `max` its largest value (so no exponential overflows): softmax's first
/// two passes, without its stores, for a cross-entropy loss (this minus
/// the target's logit). The plain loops at the scalar level, vector
/// exponentials and lane-wise sums otherwise. Empty: negative infinity.
pub fn log_sum_exp(isa: Isa, x: &[f32]) -> f32 {
    if let Some(v) = simd::log_sum_exp(isa, x) {
        return v;
    }
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = x.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

/// `x[i] = e^(x[i] - shift) * scale` in place: with `shift` a row's
/// `log_sum_exp` and `scale` `1 / count`, the cross-entropy gradient's
/// softmax in one pass and without a division (training keeps the
/// forward's log-sum-exp, so its backward does not find the row's maximum
/// and sum again). The plain loop at the scalar level, vector exponentials
/// (within 2 ulp of `f32::exp`) otherwise.
pub fn exp_shifted(isa: Isa, x: &mut [f32], shift: f32, scale: f32) {
    if !simd::exp_shifted(isa, x, shift, scale) {
        for v in x.iter_mut() {
            *v = (*v - shift).exp() * scale;
        }
    }
}

/// `x[i] = 1 / (1 + e^-x[i])` in place: the reference's formula (as
/// `reference::silu` uses it) at the scalar level, with vector
/// exponentials (within 2 ulp of `f32::exp`) otherwise. Training's SwiGLU
/// backward needs the sigmoid itself.
pub fn sigmoid(isa: Isa, x: &mut [f32]) {
    if !simd::sigmoid(isa, x) {
        for v in x.iter_mut() {
            *v = 1.0 / (1.0 + (-*v).exp());
        }
    }
}

/// `count` rows of `width` values, row `i` at `data[i * stride..][..width]`:
/// one head's queries for a block of tokens, or its keys or values in the
/// KV cache (f32, or f16 in a half-size cache). The constructor checks that
/// every row lies in `data`, which the vector kernels rely on.
#[derive(Debug)]
pub struct Rows<'a, T = f32> {
    data: &'a [T],
    stride: usize,
    width: usize,
    count: usize,
}

// Not derived: a derive would ask `T: Copy` although only a reference is copied.
impl<T> Clone for Rows<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Rows<'_, T> {}

impl<'a, T> Rows<'a, T> {
    /// Panics when row `count - 1` would end past `data` or rows overlap.
    pub fn new(data: &'a [T], stride: usize, width: usize, count: usize) -> Self {
        assert!(
            count == 0 || (width <= stride && (count - 1) * stride + width <= data.len()),
            "{count} rows of {width} values {stride} apart do not fit in {} values",
            data.len()
        );
        Rows {
            data,
            stride,
            width,
            count,
        }
    }

    pub fn row(&self, i: usize) -> &'a [T] {
        &self.data[i * self.stride..][..self.width]
    }

    /// The values the rows lie in: row `i` starts `i * stride` in.
    pub fn data(&self) -> &'a [T] {
        self.data
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Values per row.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// Values `start..start + width` of every row (one head of whole cache
    /// rows).
    pub fn columns(&self, start: usize, width: usize) -> Self {
        let data = self.data.get(start..).unwrap_or_default();
        Rows::new(data, self.stride, width, self.count)
    }
}

/// Keys or values of one head as a KV cache stores them.
#[derive(Clone, Copy, Debug)]
pub enum KvRows<'a> {
    F32(Rows<'a, f32>),
    /// Half the bytes per position; every value widens to f32 exactly, so
    /// the kernels give the bits they give on the widened rows.
    F16(Rows<'a, f16>),
}

impl KvRows<'_> {
    pub fn width(&self) -> usize {
        match self {
            KvRows::F32(r) => r.width(),
            KvRows::F16(r) => r.width(),
        }
    }

    pub fn count(&self) -> usize {
        match self {
            KvRows::F32(r) => r.count(),
            KvRows::F16(r) => r.count(),
        }
    }

    /// Values `start..start + width` of every row.
    pub fn columns(&self, start: usize, width: usize) -> Self {
        match self {
            KvRows::F32(r) => KvRows::F32(r.columns(start, width)),
            KvRows::F16(r) => KvRows::F16(r.columns(start, width)),
        }
    }

    /// Runs `f` on these rows as f32: in place, or (f16) widened into
    /// `scratch` as `[count][width]`.
    pub fn as_f32<R>(self, scratch: &mut Vec<f32>, f: impl FnOnce(Rows<'_, f32>) -> R) -> R {
        match self {
            KvRows::F32(r) => f(r),
            KvRows::F16(r) => {
                let (w, n) = (r.width(), r.count());
                let wide = grow_to(scratch, w * n);
                for (j, out) in wide.chunks_exact_mut(w.max(1)).take(n).enumerate() {
                    r.row(j).convert_to_f32_slice(out);
                }
                f(Rows::new(wide, w, w, n))
            }
        }
    }
}

impl<'a> From<Rows<'a, f32>> for KvRows<'a> {
    fn from(r: Rows<'a, f32>) -> Self {
        KvRows::F32(r)
    }
}

impl<'a> From<Rows<'a, f16>> for KvRows<'a> {
    fn from(r: Rows<'a, f16>) -> Self {
        KvRows::F16(r)
    }
}

thread_local! {
    /// Keys or values widened to f32 where a level has no f16 kernel.
    static WIDENED: std::cell::RefCell<Vec<f32>> = Default::default();
}

/// Attention scores of one head for a block of queries:
/// `att[t * n + j] = (queries.row(t) · keys.row(j)) / scale` for the `n =
/// keys.count()` keys. A block shares each loaded key among its queries.
/// f16 keys give the bits their f32 widening gives, at every level.
pub fn attention_scores<'k>(
    isa: Isa,
    att: &mut [f32],
    queries: Rows,
    keys: impl Into<KvRows<'k>>,
    scale: f32,
) {
    let keys = keys.into();
    let n = keys.count();
    assert_eq!(att.len(), queries.count() * n, "scores are [queries][keys]");
    assert_eq!(
        queries.width(),
        keys.width(),
        "queries and keys differ in size"
    );
    if simd::attention_scores(isa, att, queries, keys, scale) {
        return;
    }
    WIDENED.with_borrow_mut(|scratch| {
        keys.as_f32(scratch, |keys| {
            for (t, att) in att.chunks_exact_mut(n.max(1)).enumerate() {
                for (j, a) in att.iter_mut().enumerate() {
                    *a = dot_f32(isa, queries.row(t), keys.row(j)) / scale;
                }
            }
        })
    })
}

/// For each query `t` of a block: `out[t * hs..][..hs] = sum over j of
/// att[t * n + j] * values.row(j)`, accumulated in key order (`hs =
/// values.width()`, `n = values.count()`). A block shares each loaded value
/// row among its queries. f16 values give the bits their f32 widening
/// gives, at every level.
pub fn weighted_sum<'v>(isa: Isa, out: &mut [f32], att: &[f32], values: impl Into<KvRows<'v>>) {
    let values = values.into();
    let (hs, n) = (values.width(), values.count());
    assert_eq!(
        out.len() * n,
        att.len() * hs,
        "outputs and scores differ in queries"
    );
    if simd::weighted_sum(isa, out, att, values) {
        return;
    }
    WIDENED.with_borrow_mut(|scratch| {
        values.as_f32(scratch, |values| {
            out.fill(0.0);
            for (out, att) in out.chunks_exact_mut(hs.max(1)).zip(att.chunks(n.max(1))) {
                for (j, &a) in att.iter().enumerate().take(n) {
                    axpy(isa, out, a, values.row(j));
                }
            }
        })
    })
}

/// Whether `isa` attends a block of `queries` consecutive queries of one
/// head of `hs` values as whole-block products (`scores_by_block`,
/// `softmax_by_block`, then the values by `float_product_by_columns`)
/// rather than by blocks of up to four in dot form (`attention_scores`,
/// `softmax`, `weighted_sum`). The block form runs the batch tiles and
/// needs no horizontal sums, yet rounds every value exactly as the dot
/// form does, so a prompt's attention is the same bits either way (and as
/// decoding its tokens one at a time); the dot form serves decode and the
/// levels without it.
pub fn attends_by_blocks(isa: Isa, queries: usize, hs: usize) -> bool {
    simd::attends_by_blocks(isa, queries, hs)
}

/// Attention scores of one head for a block of up to `TOKEN_BLOCK`
/// queries, laid out as a block of `TokenBlocks` whose columns are the
/// keys: `att[j * TOKEN_BLOCK + t] = q(t) · keys.row(j)` for each of the
/// `n` keys, where `q(t)` is lane `t` of `queries` `[hs][TOKEN_BLOCK]` (a
/// block as `pack_token_block` lays one out). So the probabilities made
/// from them multiply the values as a batch does a matrix stored by
/// columns. Each score rounds as the level's `dot_f32` computes it
/// (`dot_in_lanes` with the level's `dot_lanes`: AVX-512's 16, else
/// AVX2's 8), the dot form's scores at that level.
pub fn scores_by_block(isa: Isa, att: &mut [f32], queries: &[f32], keys: Rows) {
    let (n, hs) = (keys.count(), keys.width());
    assert!(
        att.len() >= n * TOKEN_BLOCK,
        "scores are [keys][TOKEN_BLOCK]"
    );
    assert!(
        queries.len() >= hs * TOKEN_BLOCK,
        "queries are [hs][TOKEN_BLOCK]"
    );
    if simd::scores_by_block(isa, att, queries, keys) {
        return;
    }
    let lanes = dot_lanes(isa);
    let mut q = vec![0f32; hs];
    for t in 0..TOKEN_BLOCK {
        for (c, v) in q.iter_mut().enumerate() {
            *v = queries[c * TOKEN_BLOCK + t];
        }
        for j in 0..n {
            att[j * TOKEN_BLOCK + t] = dot_in_lanes(lanes, &q, keys.row(j));
        }
    }
}

/// Lane sums `isa`'s `dot_f32` keeps before adding them (16 at AVX-512,
/// else 8), which `scores_by_block` rounds with.
pub fn dot_lanes(isa: Isa) -> usize {
    simd::dot_lanes(isa)
}

/// Queries one block of block attention takes at most at `isa`'s level:
/// the width of its batch tile (32 at AVX-512, else `TOKEN_BLOCK`).
pub fn attention_block_queries(isa: Isa) -> usize {
    simd::attention_block_queries(isa)
}

/// `a · b` as a vector `dot_f32` of `lanes` lanes (8 or 16) rounds it:
/// `lanes` lane sums, lane `l` a chain of fused multiply-adds over `l, l +
/// lanes, ...` of the whole groups of `lanes`, added by halves (lane `l`
/// with `l + lanes / 2`, then quarters, down to the last pair) as the
/// horizontal sum adds them, then the values past the last whole group,
/// each product rounded before it is added.
pub fn dot_in_lanes(lanes: usize, a: &[f32], b: &[f32]) -> f32 {
    assert!(
        lanes == 8 || lanes == 16,
        "dot_in_lanes takes 8 or 16 lanes"
    );
    let whole = a.len().min(b.len()) / lanes * lanes;
    let mut v = [0f32; 16];
    for (a, b) in a[..whole]
        .chunks_exact(lanes)
        .zip(b[..whole].chunks_exact(lanes))
    {
        for l in 0..lanes {
            v[l] = a[l].mul_add(b[l], v[l]);
        }
    }
    let mut width = lanes;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            v[l] += v[l + width];
        }
    }
    let mut sum = v[0];
    for (a, b) in a[whole..].iter().zip(&b[whole..]) {
        sum += a * b;
    }
    sum
}

/// Causal softmax of a block of scores `att` `[n][TOKEN_BLOCK]`
/// (`scores_by_block`): lane `t`, the query at position `first + t`,
/// takes its scores for keys `0..=first + t` divided by `scale`, and 0
/// for the later keys. Each lane's values are those of `softmax` at the
/// same level on that query's scores (the scalar loop: `reference::softmax`),
/// to the bit.
pub fn softmax_by_block(isa: Isa, att: &mut [f32], first: usize, scale: f32) {
    assert_eq!(att.len() % TOKEN_BLOCK, 0, "scores are [keys][TOKEN_BLOCK]");
    if simd::softmax_by_block(isa, att, first, scale) {
        return;
    }
    let n = att.len() / TOKEN_BLOCK;
    if n == 0 {
        return;
    }
    let mut lane = Vec::with_capacity(n);
    for t in 0..TOKEN_BLOCK {
        let seen = (first + t + 1).min(n);
        lane.clear();
        lane.extend((0..seen).map(|j| att[j * TOKEN_BLOCK + t] / scale));
        super::reference::softmax(&mut lane);
        for j in 0..n {
            att[j * TOKEN_BLOCK + t] = lane.get(j).copied().unwrap_or(0.0);
        }
    }
}

/// Where row `t` of a causal triangle starts: rows `0..t` hold `1..=t`
/// values each (row `i` is positions `0..=i`).
pub fn triangle_row(t: usize) -> usize {
    t * (t + 1) / 2
}

/// `out[d * ld + j] += sum over t in j..T of a.row(t)[d] * tri(t, j)` for
/// every `d < a.width()` and `j < T = a.count()`, where `tri(t, j)` is
/// entry `j` of row `t` of the causal triangle `tri` (rows stored one after
/// the other, `triangle_row`): the transposed product of a triangle with a
/// block of rows, as attention's backward forms the key and value
/// gradients (`[hs][T]`) from the probabilities or their gradient. The
/// vector levels sweep the triangle's columns 16 or 8 at a time with the
/// sums in registers; the plain loop is the reference.
pub fn triangle_product_add(isa: Isa, tri: &[f32], a: Rows, out: &mut [f32], ld: usize) {
    let (t_len, width) = (a.count(), a.width());
    assert!(
        tri.len() >= triangle_row(t_len),
        "the triangle has fewer than {t_len} rows"
    );
    assert!(ld >= t_len && (width == 0 || out.len() >= (width - 1) * ld + t_len));
    if simd::triangle_product_add(isa, tri, a, out, ld) {
        return;
    }
    for t in 0..t_len {
        let (row, coeffs) = (&tri[triangle_row(t)..][..t + 1], a.row(t));
        for (d, &c) in coeffs.iter().enumerate() {
            for (o, &v) in out[d * ld..][..t + 1].iter_mut().zip(row) {
                *o += c * v;
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Activation quantization

/// Quantizes one activation row for the W8A8 product: groups of `gs`,
/// rounding half away from zero as runq does; a final partial group gets its
/// own scale. `q` has `x.len()` entries, `s` `x.len().div_ceil(gs)`.
pub fn quantize_row(x: &[f32], gs: usize, q: &mut [i8], s: &mut [f32]) {
    for ((group, qg), scale) in x.chunks(gs).zip(q.chunks_mut(gs)).zip(s.iter_mut()) {
        *scale = quantize_group_scalar(group, qg);
    }
}

/// One group of `quantize_row`; returns its scale.
fn quantize_group_scalar(group: &[f32], q: &mut [i8]) -> f32 {
    let max = group.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    for (o, &v) in q.iter_mut().zip(group) {
        // runq divides; multiplying by an inverse would change roundings.
        *o = if max == 0.0 {
            0
        } else {
            (v / scale).round() as i8
        };
    }
    scale
}

/// `quantize_row` at `isa`'s level (bit-identical results), also returning
/// each group's sum of quantized values in `sums`.
pub fn quantize_row_at(
    isa: Isa,
    x: &[f32],
    gs: usize,
    q: &mut [i8],
    s: &mut [f32],
    sums: &mut [i32],
) {
    let groups = x.chunks(gs).zip(q.chunks_mut(gs));
    for (((group, qg), scale), sum) in groups.zip(s.iter_mut()).zip(sums.iter_mut()) {
        (*scale, *sum) = simd::quantize_group(isa, group, qg).unwrap_or_else(|| {
            let scale = quantize_group_scalar(group, qg);
            (scale, qg.iter().map(|&v| v as i32).sum())
        });
    }
}

/// A batch of activation rows quantized for Q8_0 products, in the layouts
/// both the scalar and the vector loops read. Buffers are reused.
#[derive(Default)]
pub struct Q8Acts {
    /// Tokens quantized.
    pub n: usize,
    /// `n` rounded up to 4 for one token, to 16 for batches; the extra rows
    /// repeat the last token, so vector tiles of 4 tokens and AMX tiles of
    /// 16 never need a partial load.
    pub tokens: usize,
    pub cols: usize,
    pub gs: usize,
    // Buffers are reused and may be longer than the shapes given here.
    /// Values `[tokens][cols]`.
    pub xq: Vec<i8>,
    /// Scales `[tokens][groups]`.
    pub xs: Vec<f32>,
    /// Scales `[groups][tokens]`.
    pub xs_t: Vec<f32>,
    /// `128 * sum of each group's values`, `[groups][tokens]`.
    pub xc_t: Vec<i32>,
    sums: Vec<i32>,
}

/// The tokens `t0..` of a `Q8Acts` one worker quantizes: their rows of the
/// values, scales and sums.
pub struct QuantPart<'a> {
    t0: usize,
    xq: &'a mut [i8],
    xs: &'a mut [f32],
    sums: &'a mut [i32],
}

impl Q8Acts {
    /// Quantizes `n` rows of `cols` from `x` in groups of `gs`.
    pub fn quantize(&mut self, isa: Isa, x: &[f32], n: usize, cols: usize, gs: usize) {
        self.quantize_split(isa, x, (n, cols, gs), usize::MAX, |_, _| {
            unreachable!("a single part is quantized in place")
        })
    }

    /// As `quantize`, with the tokens in parts of `per` that `run` hands to
    /// `f` one by one, in any order and on any thread (the parts are
    /// disjoint). With `per` covering all `n` tokens, `run` is not called.
    pub fn quantize_split(
        &mut self,
        isa: Isa,
        x: &[f32],
        (n, cols, gs): (usize, usize, usize),
        per: usize,
        run: impl FnOnce(&mut [QuantPart], &(dyn Fn(&mut QuantPart) + Sync)),
    ) {
        let groups = cols.div_ceil(gs);
        let tokens = if n == 1 { 4 } else { n.div_ceil(16) * 16 };
        (self.n, self.tokens, self.cols, self.gs) = (n, tokens, cols, gs);
        let per = per.clamp(1, n);
        // Grown, never shrunk: reads use the lengths above, and regrowing
        // would zero-fill on every product whose width differs. Parts cover
        // the `n` real tokens; the padding rows are copied below.
        let mut parts = super::grow_to(&mut self.xq, tokens * cols)[..n * cols]
            .chunks_mut(per * cols)
            .zip(
                super::grow_to(&mut self.xs, tokens * groups)[..n * groups]
                    .chunks_mut(per * groups),
            )
            .zip(
                super::grow_to(&mut self.sums, tokens * groups)[..n * groups]
                    .chunks_mut(per * groups),
            )
            .enumerate()
            .map(|(k, ((xq, xs), sums))| QuantPart {
                t0: k * per,
                xq,
                xs,
                sums,
            });
        let work = |p: &mut QuantPart| {
            let rows = p.xq.chunks_mut(cols).zip(p.xs.chunks_mut(groups));
            for (i, ((xq, xs), sums)) in rows.zip(p.sums.chunks_mut(groups)).enumerate() {
                let t = p.t0 + i;
                quantize_row_at(isa, &x[t * cols..(t + 1) * cols], gs, xq, xs, sums);
            }
        };
        if per == n {
            // One part: no list to build (decoding quantizes ~30 times a token).
            work(&mut parts.next().expect("at least one token"));
        } else {
            run(&mut parts.collect::<Vec<_>>(), &work);
        }
        // Rows past `n` repeat the last token (see `tokens`): copied, not
        // quantized again (decoding quantizes one token into four rows).
        for t in n..tokens {
            self.xq.copy_within((n - 1) * cols..n * cols, t * cols);
            self.xs
                .copy_within((n - 1) * groups..n * groups, t * groups);
            self.sums
                .copy_within((n - 1) * groups..n * groups, t * groups);
        }
        super::grow_to(&mut self.xs_t, tokens * groups);
        super::grow_to(&mut self.xc_t, tokens * groups);
        for t in 0..tokens {
            for g in 0..groups {
                self.xs_t[g * tokens + t] = self.xs[t * groups + g];
                self.xc_t[g * tokens + t] = 128 * self.sums[t * groups + g];
            }
        }
    }

    fn groups(&self) -> usize {
        self.cols.div_ceil(self.gs)
    }
}

// ----------------------------------------------------------------------------
// Activations in blocks of tokens

/// Tokens side by side in a block of `TokenBlocks`.
pub const TOKEN_BLOCK: usize = 16;

/// A batch of activation rows laid out for outer-product float tiles:
/// blocks of `TOKEN_BLOCK` tokens, each `[cols][TOKEN_BLOCK]` (one column
/// of a block is contiguous), tokens past `n` zero. Made once per product,
/// so that its tasks share it. Buffers are reused.
#[derive(Default)]
pub struct TokenBlocks {
    pub n: usize,
    pub cols: usize,
    /// `[n.div_ceil(TOKEN_BLOCK)][cols][TOKEN_BLOCK]`.
    pub data: Vec<f32>,
}

impl TokenBlocks {
    /// Lays out `n` rows of `x` `[n][cols]`, the blocks in parts that `run`
    /// hands to `f` (block index, its values) in any order and on any
    /// thread, with `isa`'s `pack_token_block`.
    pub fn pack_split(
        &mut self,
        isa: Isa,
        x: &[f32],
        (n, cols): (usize, usize),
        run: impl FnOnce(&mut [f32], usize, &(dyn Fn(usize, &mut [f32]) + Sync)),
    ) {
        (self.n, self.cols) = (n, cols);
        let len = n.div_ceil(TOKEN_BLOCK) * cols * TOKEN_BLOCK;
        self.data.resize(len, 0.0);
        let fill = |b: usize, block: &mut [f32]| {
            let t0 = b * TOKEN_BLOCK;
            let tokens = (n - t0).min(TOKEN_BLOCK);
            pack_token_block(isa, &x[t0 * cols..], (cols, tokens, cols), block);
        };
        run(&mut self.data[..len], cols * TOKEN_BLOCK, &fill);
    }

    /// `pack_split` on this thread, by the plain loop.
    pub fn pack(&mut self, x: &[f32], n: usize, cols: usize) {
        self.pack_split(Isa::scalar(), x, (n, cols), |data, per, f| {
            for (b, block) in data.chunks_exact_mut(per).enumerate() {
                f(b, block)
            }
        })
    }

    /// Block `b`.
    pub fn block(&self, b: usize) -> &[f32] {
        &self.data[b * self.cols * TOKEN_BLOCK..][..self.cols * TOKEN_BLOCK]
    }
}

/// One block of `TokenBlocks` from up to 16 activation rows `stride`
/// apart in `x`: `block[k * 16 + t] = x[t * stride + k]` for `t < tokens`
/// and `k < cols`, zero for the rows past `tokens`. A register transpose at
/// the AVX-512 level, the plain loop (the reference) elsewhere.
pub fn pack_token_block(
    isa: Isa,
    x: &[f32],
    (stride, tokens, cols): (usize, usize, usize),
    block: &mut [f32],
) {
    if simd::pack_token_block(isa, x, (stride, tokens, cols), block) {
        return;
    }
    for (k, column) in block[..cols * TOKEN_BLOCK]
        .chunks_exact_mut(TOKEN_BLOCK)
        .enumerate()
    {
        for (t, v) in column.iter_mut().enumerate() {
            *v = if t < tokens { x[t * stride + k] } else { 0.0 };
        }
    }
}

/// Whether `isa` multiplies `n`-token float batches from `TokenBlocks`.
pub fn takes_token_blocks(isa: Isa, n: usize) -> bool {
    simd::takes_token_blocks(isa, n)
}

/// The weight rows of one tile of an `n`-token float batch at `isa`'s
/// level, where batches run in outer-product tiles.
pub fn batch_tile_rows(isa: Isa, n: usize) -> Option<usize> {
    simd::batch_tile_rows(isa, n)
}

/// The forms of a product's activations prepared once for all its tasks.
#[derive(Clone, Copy, Default)]
pub struct Prepared<'a> {
    /// Quantized with the matrix's group size (Q8 matrices need it).
    pub q8: Option<&'a Q8Acts>,
    /// In token blocks, for levels that take them (`takes_token_blocks`);
    /// without them such a level lays the batch out itself, per call.
    pub blocks: Option<&'a TokenBlocks>,
}

// ----------------------------------------------------------------------------
// Products

/// The element storage of a float weight matrix, for the vector kernels.
#[derive(Clone, Copy)]
pub enum WeightRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl WeightRows<'_> {
    pub fn len(&self) -> usize {
        match self {
            WeightRows::F32(d) => d.len(),
            WeightRows::F16(d) => d.len(),
            WeightRows::BF16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn row_into(&self, j: usize, cols: usize, out: &mut Vec<f32>) {
        let range = j * cols..(j + 1) * cols;
        out.clear();
        match self {
            WeightRows::F32(d) => out.extend_from_slice(&d[range]),
            WeightRows::F16(d) => out.extend(d[range].iter().map(|v| v.to_f32())),
            WeightRows::BF16(d) => out.extend(d[range].iter().map(|v| v.to_f32())),
        }
    }
}

/// `out[t * ld + j - rows.start] = w[j] · x[t]` for weight rows `rows` and
/// `n` activation rows `x` `[n][w.cols]`: one task's share of a product, in
/// the `[tokens][rows]` layout of the op's output (`ld` apart per token), so
/// a block of rows for one token is one contiguous store. `prepared`
/// holds `x` quantized with `w`'s group size when `w` is Q8_0, and may
/// hold it in token blocks.
#[allow(clippy::too_many_arguments)]
pub fn product(
    isa: Isa,
    w: &HostMatrix,
    x: &[f32],
    n: usize,
    prepared: Prepared,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let cols = w.cols;
    let floats = match &w.data {
        MatrixData::F32(d) => WeightRows::F32(d),
        MatrixData::F16(d) => WeightRows::F16(d),
        MatrixData::BF16(d) => WeightRows::BF16(d),
        MatrixData::Q8(d) => {
            assert!(rows.is_empty() || out.len() >= (n - 1) * ld + rows.len());
            let acts = prepared.q8.expect("Q8 products need quantized activations");
            assert!(acts.gs == d.group_size && acts.cols == cols && acts.n == n);
            if !simd::q8_rows(isa, &d.q, &d.scales, acts, rows.clone(), out, ld) {
                q8_rows_scalar(&d.q, &d.scales, acts, rows, out, ld);
            }
            return;
        }
    };
    float_product(isa, floats, cols, (x, prepared.blocks), n, rows, out, ld)
}

/// `product` for float weights given as bare rows of `cols` values (the
/// training crate's matrices, which change every step and are not
/// `HostMatrix`es): `out[t * ld + j - rows.start] = w[j] · x[t]`. With
/// `blocks` given and a level that takes them (`takes_token_blocks`), `x`
/// is not read and may be empty.
#[allow(clippy::too_many_arguments)]
pub fn float_product(
    isa: Isa,
    floats: WeightRows,
    cols: usize,
    (x, blocks): (&[f32], Option<&TokenBlocks>),
    n: usize,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    assert!(rows.is_empty() || out.len() >= (n - 1) * ld + rows.len());
    assert!(blocks.is_none_or(|b| b.n == n && b.cols == cols));
    if !simd::f32_rows(isa, floats, (x, blocks), (cols, n), rows.clone(), out, ld) {
        let mut row = Vec::with_capacity(cols);
        for (i, j) in rows.enumerate() {
            floats.row_into(j, cols, &mut row);
            for t in 0..n {
                out[t * ld + i] = dot_f32(isa, &row, &x[t * cols..(t + 1) * cols]);
            }
        }
    }
}

/// `float_product` for a float matrix stored by columns and read in place
/// (the transpose of a row-major `[cols][w_ld]` matrix, as training's
/// gradient products see their operands): row `j`'s value `k` is
/// `w[j + k * w_ld]`, multiplied with a batch laid out in token blocks:
/// `out[t * ld + j - rows.start] = sum over k of w[j + k * w_ld] * x(t, k)`.
/// Levels with a by-columns tile read `w` as it lies; the others run the
/// plain loop, which is also the reference.
pub fn float_product_by_columns(
    isa: Isa,
    (w, w_ld): (&[f32], usize),
    x: &TokenBlocks,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let (n, cols) = (x.n, x.cols);
    assert!(rows.is_empty() || out.len() >= (n - 1) * ld + rows.len());
    if simd::f32_columns(isa, (w, w_ld), x, (cols, n), rows.clone(), out, ld) {
        return;
    }
    for (i, j) in rows.enumerate() {
        for t in 0..n {
            let block = x.block(t / TOKEN_BLOCK);
            let mut sum = 0f32;
            for k in 0..cols {
                sum += w[j + k * w_ld] * block[k * TOKEN_BLOCK + t % TOKEN_BLOCK];
            }
            out[t * ld + i] = sum;
        }
    }
}

fn q8_rows_scalar(
    wq: &[i8],
    ws: &[f32],
    a: &Q8Acts,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let (cols, groups) = (a.cols, a.groups());
    for (i, j) in rows.enumerate() {
        for t in 0..a.n {
            let xq = &a.xq[t * cols..(t + 1) * cols];
            let xs = &a.xs[t * groups..(t + 1) * groups];
            out[t * ld + i] = dot_q8(wq, ws, a.gs, j, xq, xs);
        }
    }
}

/// Runs `tile` over weight rows `rows` x tokens `0..n` in tiles of `R` rows
/// and `T` tokens (tokens starting at multiples of `T`), storing results in
/// `out[t * ld + j - rows.start]`. Partial tiles repeat their last row or
/// token, whose results are dropped, so tiles always see full arrays.
pub fn sweep<const R: usize, const T: usize>(
    rows: Range<usize>,
    n: usize,
    out: &mut [f32],
    ld: usize,
    mut tile: impl FnMut([usize; R], [usize; T]) -> [[f32; T]; R],
) {
    let start = rows.start;
    for j0 in rows.clone().step_by(R) {
        let js: [usize; R] = std::array::from_fn(|r| (j0 + r).min(rows.end - 1));
        for t0 in (0..n).step_by(T) {
            let ts: [usize; T] = std::array::from_fn(|t| (t0 + t).min(n - 1));
            let v = tile(js, ts);
            for (r, vr) in v.iter().enumerate().take(rows.end - j0) {
                for (t, &x) in vr.iter().enumerate().take(n - t0) {
                    out[(t0 + t) * ld + j0 + r - start] = x;
                }
            }
        }
    }
}

/// One output of the W8A8 product: row `row` of a Q8_0 matrix with `cols`
/// columns (values `wq`, group scales `ws`, groups of `gs` over the flattened
/// matrix) against a quantized activation row (`xq`, `xs`).
pub fn dot_q8(wq: &[i8], ws: &[f32], gs: usize, row: usize, xq: &[i8], xs: &[f32]) -> f32 {
    let cols = xq.len();
    let start = row * cols;
    if cols.is_multiple_of(gs) {
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
