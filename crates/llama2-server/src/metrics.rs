//! The server's counters, gauges and histograms, and their Prometheus text
//! form for `GET /metrics`. The engine thread and the HTTP handlers update
//! them concurrently: atomics for single numbers, a mutex per histogram
//! (touched once per step or request).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A cumulative histogram with fixed bucket bounds.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>, // [bounds.len()], not cumulative
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub cancelled: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// Generated tokens per second of the last step, as f64 bits.
    decode_rate: AtomicU64,
    batch_rows: Mutex<Histogram>,
    first_token: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            queue_depth: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_blocks_used: AtomicUsize::new(0),
            kv_blocks_total: AtomicUsize::new(0),
            decode_rate: AtomicU64::new(0),
            batch_rows: Mutex::new(Histogram::new(ROWS)),
            first_token: Mutex::new(Histogram::new(SECONDS)),
        }
    }
}

/// A lock that a panicking holder cannot make unusable: metrics are
/// counts, and a half-updated histogram is still worth reporting.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, endpoint: &'static str, status: u16) {
        *lock(&self.requests).entry((endpoint, status)).or_default() += 1;
    }

    /// Records one engine step of `rows` rows that generated `tokens` tokens.
    pub fn observe_step(&self, rows: usize, tokens: usize, took: Duration) {
        lock(&self.batch_rows).observe(rows as f64);
        self.generated_tokens
            .fetch_add(tokens as u64, Ordering::Relaxed);
        let rate = tokens as f64 / took.as_secs_f64().max(1e-9);
        self.decode_rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Nothing runs: no tokens per second.
    pub fn idle(&self) {
        self.decode_rate.store(0f64.to_bits(), Ordering::Relaxed);
    }

    pub fn observe_first_token(&self, after: Duration) {
        lock(&self.first_token).observe(after.as_secs_f64());
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP llama2_requests_total HTTP requests answered, by endpoint and status.\n\
             # TYPE llama2_requests_total counter"
        );
        for ((endpoint, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "llama2_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let size = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let counters = [
            (
                "llama2_prompt_tokens_total",
                "Prompt tokens admitted.",
                load(&self.prompt_tokens),
            ),
            (
                "llama2_generated_tokens_total",
                "Tokens generated.",
                load(&self.generated_tokens),
            ),
            (
                "llama2_cancelled_total",
                "Requests cancelled by their client.",
                load(&self.cancelled),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let rate = f64::from_bits(load(&self.decode_rate));
        let gauges = [
            (
                "llama2_queue_depth",
                "Requests waiting for a sequence slot.",
                size(&self.queue_depth) as f64,
            ),
            (
                "llama2_running_sequences",
                "Sequences being generated.",
                size(&self.running) as f64,
            ),
            (
                "llama2_kv_blocks_used",
                "KV cache blocks holding positions.",
                size(&self.kv_blocks_used) as f64,
            ),
            (
                "llama2_kv_blocks_total",
                "KV cache blocks the server may use.",
                size(&self.kv_blocks_total) as f64,
            ),
            (
                "llama2_decode_tokens_per_second",
                "Tokens generated per second in the last step.",
                rate,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        lock(&self.batch_rows).render(
            &mut out,
            "llama2_batch_rows",
            "Rows (tokens) per engine step.",
        );
        lock(&self.first_token).render(
            &mut out,
            "llama2_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
        );
        out
    }
}
