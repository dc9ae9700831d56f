//! I/O counters and latency histograms of a live mount (lock-free, for `status`).

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const BUCKETS: usize = 40;

/// A log2 histogram of latencies in nanoseconds.
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Histogram {
    /// Count one latency.
    pub fn record(&self, d: Duration) {
        let ns = d.as_nanos().max(1) as u64;
        let b = (63 - ns.leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[b].fetch_add(1, Relaxed);
    }

    /// Upper bound (µs) of the bucket holding quantile `q` (0..1), 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let want = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return (1u64 << (i + 1)) as f64 / 1000.0;
            }
        }
        0.0
    }
}

/// Counters of one device.
#[derive(Default)]
pub struct IoMetrics {
    /// READ requests.
    pub reads: AtomicU64,
    /// WRITE requests.
    pub writes: AtomicU64,
    /// FLUSH requests (and FUA writes).
    pub flushes: AtomicU64,
    /// DISCARD and WRITE_ZEROES requests.
    pub discards: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Requests completed with an error.
    pub errors: AtomicU64,
    /// Reads served on the queue thread from memory.
    pub inline_reads: AtomicU64,
    /// Read latency (handler time).
    pub read_latency: Histogram,
    /// Write latency (handler time).
    pub write_latency: Histogram,
}

/// Serializable view of [`IoMetrics`].
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct IoReport {
    /// READ requests.
    pub reads: u64,
    /// WRITE requests.
    pub writes: u64,
    /// FLUSH requests.
    pub flushes: u64,
    /// DISCARD / WRITE_ZEROES requests.
    pub discards: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Failed requests.
    pub errors: u64,
    /// Reads served from memory on the queue thread.
    pub inline_reads: u64,
    /// Read latency percentiles, µs (bucket upper bounds).
    pub read_p50_us: f64,
    /// 99th percentile.
    pub read_p99_us: f64,
    /// 99.9th percentile.
    pub read_p999_us: f64,
    /// Write latency p50, µs.
    pub write_p50_us: f64,
    /// Write latency p99, µs.
    pub write_p99_us: f64,
}

impl IoMetrics {
    /// Current values.
    pub fn report(&self) -> IoReport {
        IoReport {
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            read_bytes: self.read_bytes.load(Relaxed),
            write_bytes: self.write_bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            inline_reads: self.inline_reads.load(Relaxed),
            read_p50_us: self.read_latency.quantile_us(0.5),
            read_p99_us: self.read_latency.quantile_us(0.99),
            read_p999_us: self.read_latency.quantile_us(0.999),
            write_p50_us: self.write_latency.quantile_us(0.5),
            write_p99_us: self.write_latency.quantile_us(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let h = Histogram::default();
        for _ in 0..99 {
            h.record(Duration::from_micros(10));
        }
        h.record(Duration::from_millis(5));
        assert!(h.quantile_us(0.5) >= 10.0 && h.quantile_us(0.5) < 20.0);
        assert!(h.quantile_us(0.999) >= 5000.0);
    }
}
