//! An in-memory [`BlockDevice`]: the fake layer under each layer's unit tests, and
//! a base for benchmarks. Counts its slow and fast reads so tests can see which
//! path a layer above took.

use super::BlockDevice;
use livemount_store::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;

/// A RAM disk. `cached` decides whether [`BlockDevice::read_cached`] succeeds.
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    cached: bool,
    writable: bool,
    delay: std::time::Duration,
    /// Calls of `read_at`.
    pub slow_reads: AtomicU64,
    /// Successful calls of `read_cached`.
    pub fast_reads: AtomicU64,
}

impl MemDisk {
    /// A read-only disk holding `data`; `cached`: whether its fast path hits.
    pub fn new(data: Vec<u8>, cached: bool) -> Self {
        MemDisk {
            data: RwLock::new(data),
            cached,
            writable: false,
            delay: std::time::Duration::ZERO,
            slow_reads: AtomicU64::new(0),
            fast_reads: AtomicU64::new(0),
        }
    }

    /// The same, accepting writes.
    pub fn writable(mut self) -> Self {
        self.writable = true;
        self
    }

    /// The same, each slow read returning `delay` after it took its bytes (a
    /// store's latency, so that tests can race writes against reads in flight).
    pub fn slow(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>> {
        let size = self.size();
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(Error::Invalid(format!(
                "MemDisk: {len} bytes at {offset} past {size}"
            ))),
        }
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.slow_reads.fetch_add(1, Relaxed);
        let r = self.range(offset, buf.len())?;
        {
            let d = self
                .data
                .read()
                .map_err(|_| Error::Invalid("MemDisk poisoned".into()))?;
            buf.copy_from_slice(&d[r]);
        }
        // The bytes were taken before the delay: what a reader gets may be older
        // than a write that completes meanwhile, as with a real store read.
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(())
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        if !self.cached {
            return false;
        }
        let (Ok(r), Ok(d)) = (self.range(offset, buf.len()), self.data.read()) else {
            return false;
        };
        buf.copy_from_slice(&d[r]);
        self.fast_reads.fetch_add(1, Relaxed);
        true
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(super::read_only());
        }
        let r = self.range(offset, buf.len())?;
        let mut d = self
            .data
            .write()
            .map_err(|_| Error::Invalid("MemDisk poisoned".into()))?;
        d[r].copy_from_slice(buf);
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if !self.writable {
            return Err(super::read_only());
        }
        let r = self.range(offset, len as usize)?;
        let mut d = self
            .data
            .write()
            .map_err(|_| Error::Invalid("MemDisk poisoned".into()))?;
        d[r].fill(0);
        Ok(())
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
}
