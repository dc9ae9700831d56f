//! A chunk source that behaves like remote secondary storage, for tests and benchmarks.
//!
//! Model: every request costs a fixed latency (requests in flight overlap, as with an
//! object store), and all requests share one link of a given bandwidth (transfers are
//! serialized on it). A request of `n` bytes issued at `t` completes at
//! `max(t, link free) + n / bandwidth + latency`.

use super::ChunkSource;
use crate::error::Result;
use crate::format::chunk::ChunkId;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// [`ChunkSource`] wrapper adding latency and a shared bandwidth limit.
pub struct ThrottledSource {
    inner: Arc<dyn ChunkSource>,
    latency: Duration,
    bytes_per_sec: Option<u64>,
    link_free_at: Mutex<Instant>,
}

impl ThrottledSource {
    /// Wrap `inner` with `latency` per request and an optional bandwidth in bytes/s.
    pub fn new(inner: Arc<dyn ChunkSource>, latency: Duration, bytes_per_sec: Option<u64>) -> Self {
        ThrottledSource {
            inner,
            latency,
            bytes_per_sec,
            link_free_at: Mutex::new(Instant::now()),
        }
    }

    fn delay(&self, bytes: usize) {
        let now = Instant::now();
        let transfer_done = match self.bytes_per_sec {
            Some(bw) if bw > 0 => {
                let transfer = Duration::from_secs_f64(bytes as f64 / bw as f64);
                match self.link_free_at.lock() {
                    Ok(mut free) => {
                        let start = (*free).max(now);
                        *free = start + transfer;
                        *free
                    }
                    Err(_) => now + transfer,
                }
            }
            _ => now,
        };
        let done = transfer_done + self.latency;
        let wait = done.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }
}

impl ChunkSource for ThrottledSource {
    fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
        let r = self.inner.read_range(id, offset, len)?;
        self.delay(r.len());
        Ok(r)
    }

    fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>> {
        let r = self.inner.read_all(id, limit)?;
        self.delay(r.len());
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem;
    impl ChunkSource for Mem {
        fn read_range(&self, _: &ChunkId, _: u64, len: usize) -> Result<Vec<u8>> {
            Ok(vec![0; len])
        }
        fn read_all(&self, _: &ChunkId, _: u64) -> Result<Vec<u8>> {
            Ok(vec![0; 10])
        }
    }

    #[test]
    fn latency_overlaps_and_bandwidth_is_shared() {
        let t = Arc::new(ThrottledSource::new(
            Arc::new(Mem),
            Duration::from_millis(20),
            Some(10_000_000),
        ));
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                let t = t.clone();
                // 4 × 100 kB = 40 ms of link time at 10 MB/s, plus one 20 ms latency.
                s.spawn(move || t.read_range(&ChunkId([0; 32]), 0, 100_000).unwrap());
            }
        });
        let e = start.elapsed();
        assert!(e >= Duration::from_millis(60), "{e:?}");
        assert!(
            e < Duration::from_millis(60 + 60),
            "latencies must overlap: {e:?}"
        );
    }
}
