//! The recording layer: learns a profile (`mount --record-profile`) from the reads
//! that pass through it, in the profile format the eBPF profiler writes.
//!
//! It sits at the top of the stack, so it sees reads as the guest issued them (fast
//! hits and slow reads alike); everything else passes straight through.

use super::{BlockDevice, Extents};
use crate::error::{Error, Result};
use livemount_store::format::profile::{
    ExtentBuilder, Profile, Source, DEFAULT_BLOCK_SIZE, DEFAULT_COALESCE_NS,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the recorder has seen so far.
struct Recording {
    extents: ExtentBuilder,
    /// Times are `offset_ns` + time since `clock` (device ready).
    clock: Instant,
    /// Duration of the recording a recovered daemon continues (0 for a new one).
    offset_ns: u64,
    /// Reads recorded, to skip periodic writes when nothing changed.
    reads: u64,
}

impl Recording {
    fn now_ns(&self) -> u64 {
        self.offset_ns + self.clock.elapsed().as_nanos() as u64
    }
}

/// A [`BlockDevice`] that records every read of the layer below.
pub struct Recorder {
    below: Arc<dyn BlockDevice>,
    /// Bytes of the disk the profile describes (the image, not the rounded device).
    disk_size: u64,
    state: Mutex<Recording>,
    /// Serializes writes of the learned profile (periodic and final ones share a
    /// temporary file name).
    save_lock: Mutex<()>,
}

impl Recorder {
    /// Record reads of `below`, a disk of `disk_size` bytes.
    pub fn new(below: Arc<dyn BlockDevice>, disk_size: u64) -> Self {
        Recorder {
            below,
            disk_size,
            state: Mutex::new(Recording {
                extents: ExtentBuilder::new(disk_size, DEFAULT_BLOCK_SIZE, DEFAULT_COALESCE_NS),
                clock: Instant::now(),
                offset_ns: 0,
                reads: 0,
            }),
            save_lock: Mutex::new(()),
        }
    }

    fn record(&self, offset: u64, len: usize) {
        if let Ok(mut g) = self.state.lock() {
            let ns = g.now_ns();
            g.extents.add(offset, len as u64, ns);
            g.reads += 1;
        }
    }

    /// Reads recorded so far.
    pub fn recorded_reads(&self) -> u64 {
        self.state.lock().map(|g| g.reads).unwrap_or(0)
    }

    /// Continue the learned profile `previous` (written by a daemon that died): its
    /// reads come first, and this daemon's follow them in time. False (nothing
    /// changed) if it is of another disk or granularity.
    pub fn resume_recording(&self, previous: &Profile) -> bool {
        let Ok(mut g) = self.state.lock() else {
            return false;
        };
        if previous.disk_size != self.disk_size || previous.block_size != g.extents.block_size() {
            return false;
        }
        for e in previous.extents_in_access_order() {
            // Counts say how often a range was read; a bound keeps a hostile or
            // huge count from stalling the recovery.
            for _ in 0..e.count.clamp(1, 64) {
                g.extents.add(e.offset, e.length, e.first_access_ns);
            }
        }
        g.offset_ns = previous.stats.duration_ns;
        g.clock = Instant::now();
        true
    }

    /// Write the learned profile so far to `path` (atomically; callers may race).
    pub fn save_learned_profile(&self, device: &str, path: &Path) -> Result<()> {
        let Some(p) = self.learned_profile(device) else {
            return Ok(());
        };
        let _g = self
            .save_lock
            .lock()
            .map_err(|_| Error::Invalid("learned profile: internal lock poisoned".into()))?;
        p.save(path).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// The learned profile so far, in the profile format.
    pub fn learned_profile(&self, device: &str) -> Option<Profile> {
        let r = self.state.lock().ok()?;
        let text = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let source = Source {
            host: text("/proc/sys/kernel/hostname"),
            device: device.to_string(),
            kernel: text("/proc/sys/kernel/osrelease"),
            tracer: "livemount mount --record-profile".into(),
            started_unix: livemount_store::store::now_secs().max(0) as u64,
            runs: 1,
        };
        let mut p = Profile::new(self.disk_size, r.extents.block_size(), source);
        p.extents = r.extents.finish();
        p.stats.events_seen = p.extents.iter().map(|e| e.count).sum();
        p.stats.duration_ns = r.now_ns();
        Some(p)
    }

    /// Start the clock of the learned profile (at device ready).
    pub fn restart_recording(&self) {
        if let Ok(mut g) = self.state.lock() {
            g.clock = Instant::now();
        }
    }
}

impl BlockDevice for Recorder {
    fn size(&self) -> u64 {
        self.below.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.record(offset, buf.len());
        self.below.read_at(offset, buf)
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        let hit = self.below.read_cached(offset, buf);
        if hit {
            self.record(offset, buf.len());
        }
        hit
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.below.write_at(offset, buf)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.below.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.below.flush()
    }
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.below.known_zero(offset, len)
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.below.extents(offset, len, out)
    }
    fn read_only(&self) -> bool {
        self.below.read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::mem::MemDisk;

    #[test]
    fn records_slow_and_fast_reads_but_not_misses_and_passes_everything_through() {
        let size = 4u64 << 20;
        let below = Arc::new(MemDisk::new(vec![7u8; size as usize], false).writable());
        let rec = Recorder::new(below.clone(), size);
        let mut buf = vec![0u8; 65536];
        assert!(
            !rec.read_cached(0, &mut buf),
            "the layer below has no fast path"
        );
        assert_eq!(rec.recorded_reads(), 0, "a fast-path miss is not a read");
        rec.read_at(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 65536]);
        rec.write_at(0, &[1; 512]).unwrap();
        assert!(!rec.read_only());
        assert_eq!(rec.recorded_reads(), 1);
        let p = rec.learned_profile("dev").unwrap();
        assert_eq!(p.disk_size, size);
        assert_eq!(p.extents.len(), 1);
        assert_eq!(p.extents[0].offset, 1 << 20);
        assert!(p.extents[0].length >= 65536);
        // A profile of another disk is not continued.
        let other = Recorder::new(below, size * 2).learned_profile("x").unwrap();
        assert!(!rec.resume_recording(&other));
        assert!(rec.resume_recording(&p));
    }
}
