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

    /// True if the layer refuses writes.
    fn read_only(&self) -> bool {
        true
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
