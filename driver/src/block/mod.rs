//! The block stack: one trait, [`BlockDevice`], implemented by every layer of a
//! live mount and stacked as wrappers, top to bottom:
//!
//! ```text
//! frontend (ublk, …) → Recorder (learned profile, optional)
//!                    → Migrating (live migration to local storage, idle until asked)
//!                    → Overlay (copy-on-write, optional: read-only mounts skip it)
//!                    → SnapshotImage (index → read cache → store back end)
//! ```
//!
//! Each layer owns its fast path ([`BlockDevice::read_cached`]) and knows only the
//! layer below it through this trait, so each is unit-tested over a fake layer
//! ([`mem::MemDisk`]). [`prestage`] and [`sequential`] are the image's helpers that
//! fill the read cache ahead of the reader.

pub mod image;
pub mod mem;
pub mod migrate;
pub mod overlay;
pub mod prestage;
pub mod recording;
pub mod sequential;

use livemount_store::error::{Error, Result};

/// A block device layer. Offsets and lengths are in bytes; the frontends pass whole
/// 512-byte sectors within [`size`](Self::size).
pub trait BlockDevice: Send + Sync {
    /// Bytes in the device.
    fn size(&self) -> u64;

    /// Fill `buf` from `offset` (may block: store reads, decoding). Bytes of the
    /// last sector past the image's end read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Fill `buf` only if that needs no I/O and no decoding (memory-tier hits);
    /// false means "do it the slow way", off the I/O queue. Frontends call it first
    /// for every read, in arrival order, so read-ahead watches reads here.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> bool {
        false
    }

    /// Write `buf` at `offset`; not durable before [`flush`](Self::flush).
    fn write_at(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(read_only())
    }

    /// Make `offset..offset+len` read as zeros (DISCARD, WRITE_ZEROES).
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }

    /// Make every completed write durable.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// True if `offset..offset+len` is known to read as zeros without reading it
    /// (a snapshot's zero chunks); false when not known.
    fn known_zero(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    /// Append the allocation of `offset..offset+len` (whole sectors within the
    /// device) to `out`, in order from `offset`: runs known to read as zeros and
    /// runs that may hold data. They cover the range, or a prefix of it once `out`
    /// is full ([`Extents::stopped`]). The default is one run, zero if
    /// [`known_zero`](Self::known_zero) says so; layers that know better (the
    /// snapshot's zero chunks, the overlay's holes) answer run by run. Used for
    /// NBD's BLOCK_STATUS, so that `qemu-img convert` and `nbdcopy` skip zeros.
    fn extents(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        out.push(len, self.known_zero(offset, len));
        Ok(())
    }

    /// True if the layer refuses writes.
    fn read_only(&self) -> bool {
        true
    }
}

/// A run of a device's bytes: `len` bytes known to read as zeros, or maybe data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes in the run.
    pub len: u64,
    /// The run reads as zeros (a zero chunk, a hole); false: not known.
    pub zero: bool,
}

/// Consecutive [`Extent`]s, at most `max` of them (a reply's size is bounded
/// whatever the device looks like); adjacent runs of one kind are merged.
#[derive(Debug)]
pub struct Extents {
    list: Vec<Extent>,
    max: usize,
    stopped: bool,
}

impl Extents {
    /// An empty list that holds at most `max` (≥ 1) extents.
    pub fn new(max: usize) -> Extents {
        Extents {
            list: Vec::new(),
            max: max.max(1),
            stopped: false,
        }
    }

    /// Add the next `len` bytes. Refused (and [`stopped`](Self::stopped) from then
    /// on) when it would take an extent beyond `max`: the list then ends here.
    pub fn push(&mut self, len: u64, zero: bool) {
        if len == 0 || self.stopped {
            return;
        }
        let n = self.list.len();
        match self.list.last_mut() {
            Some(last) if last.zero == zero => last.len += len,
            _ if n >= self.max => self.stopped = true,
            _ => self.list.push(Extent { len, zero }),
        }
    }

    /// True once a run was refused: what follows is not covered (callers stop).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Add `start..end` of `file` (a hole reads as zeros, the rest may be data), as
    /// SEEK_DATA/SEEK_HOLE see it.
    pub fn push_file(&mut self, file: &std::fs::File, start: u64, end: u64) {
        let mut at = start;
        for (a, b) in livemount_store::fsutil::data_extents(file, start, end) {
            self.push(a - at, true);
            self.push(b - a, false);
            at = b;
        }
        self.push(end - at, true);
    }

    /// The extents.
    pub fn into_vec(self) -> Vec<Extent> {
        self.list
    }
}

/// The error of a write to a read-only layer (EROFS on the device).
pub fn read_only() -> Error {
    Error::io("device", std::io::Error::from_raw_os_error(libc::EROFS))
}

/// `size` rounded up to whole 512-byte sectors: the size a device shows.
pub fn device_size(size: u64) -> u64 {
    size.div_ceil(512) * 512
}
