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

    /// When a request of `bytes` issued at `now` completes (the model), moving the
    /// link's free time on.
    fn completion(&self, now: Instant, bytes: usize) -> Instant {
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
        transfer_done + self.latency
    }

    fn delay(&self, bytes: usize) {
        let done = self.completion(Instant::now(), bytes);
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
        // The model on a fixed clock (no sleeping, no timing assertion): four
        // requests of 100 kB issued at once over a 10 MB/s link with 20 ms latency.
        let t = ThrottledSource::new(Arc::new(Mem), Duration::from_millis(20), Some(10_000_000));
        let t0 = Instant::now();
        *t.link_free_at.lock().unwrap() = t0;
        let done: Vec<Duration> = (0..4).map(|_| t.completion(t0, 100_000) - t0).collect();
        // Transfers serialize (10 ms each), latencies overlap (one 20 ms each).
        let ms = |n| Duration::from_millis(n);
        assert_eq!(done, [ms(30), ms(40), ms(50), ms(60)]);
        // A request after the link went idle pays only its own time.
        assert_eq!(t.completion(t0 + ms(100), 100_000) - t0, ms(130));
        // Without a bandwidth limit: latency alone.
        let l = ThrottledSource::new(Arc::new(Mem), ms(5), None);
        assert_eq!(l.completion(t0, 1 << 30) - t0, ms(5));
    }

    #[test]
    fn reads_wait_at_least_the_modelled_time() {
        let t = ThrottledSource::new(Arc::new(Mem), Duration::from_millis(20), None);
        let start = Instant::now();
        t.read_range(&ChunkId([0; 32]), 0, 10).unwrap();
        // A lower bound only: sleeping can take longer, never shorter.
        assert!(start.elapsed() >= Duration::from_millis(20));
    }
}
