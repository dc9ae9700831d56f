//! The copy-on-write overlay: every write to a live mount lands here, never in the store.
//!
//! # File format (version 1, little-endian; see docs/format.md)
//! ```text
//!  0     header (4096 bytes)
//!          0 magic        [u8; 8]  b"LMOVERL\x01"
//!          8 version      u32      1
//!         12 sector_size  u32      512: the map's granularity
//!         16 device_size  u64      bytes
//!         24 map_offset   u64      4096
//!         32 map_len      u64      bytes of the map, a multiple of 4096
//!         40 data_offset  u64      where device offset 0 lives (1 MiB aligned)
//!         48 index_sum    [u8; 32] the BLAKE3 checksum of the base snapshot's index
//!         80 name_len     u32      then the snapshot name (series@time), UTF-8
//!         84 name         [u8; name_len ≤ 256]
//!       4092 header_crc   u32      crc32c of bytes 0..4092
//!  4096  map: one bit per sector, 1 = the sector's current content is in the overlay
//!  data_offset + o: the content of device byte o (sparse: only written sectors use space)
//! ```
//!
//! # Durability protocol
//! Map bits only ever go from 0 to 1 (discards keep the bit and punch a hole, which
//! reads as zeros). A write goes to the data area (page cache) and sets its bits in
//! memory. FLUSH (and FUA writes) then: (0) copy the dirty map pages; (1) fdatasync
//! the file, making the data of every write those pages mark durable; (2) write the
//! copied map pages; (3) fdatasync again. A crash anywhere leaves
//! a map whose set bits all have durable data: torn map pages can only lose bits of
//! writes that were never flushed. Writing a sector twice is harmless, so writes
//! re-issued after a daemon crash (UBLK_F_USER_RECOVERY_REISSUE) are safe.
//!
//! # Failures
//! After a failed fdatasync the kernel may have dropped the dirty pages it could not
//! write, and a later, successful sync would make map bits durable over data that
//! never reached the disk. So the first failed sync puts the overlay in an errored
//! state: that flush and every later write, discard, flush and read of a sector the
//! overlay holds fail with EIO (reads of untouched sectors still come from the
//! snapshot); only a new mount, after the operator has fixed the disk, clears it.
//! Without its map mirror ([`mirror`]; e.g. /run is full) every write is flushed
//! before it completes, so a killed daemon still loses no acknowledged write.

pub mod map;
pub mod mirror;

use super::{BlockDevice, Extents};
use crate::error::{Error, IoContext, Result};
use map::SparseMap;
use mirror::{Mirror, MirrorKey};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Magic bytes of an overlay file.
pub const OVERLAY_MAGIC: [u8; 8] = *b"LMOVERL\x01";
/// Overlay format version.
pub const OVERLAY_VERSION: u32 = 1;
/// Map granularity.
pub const SECTOR: u64 = 512;
const HEADER_LEN: u64 = 4096;
const PAGE: u64 = map::PAGE;
const MAX_NAME: usize = 256;
/// Discards are looked at in pieces of this size (see `discard`).
const DISCARD_PIECE: u64 = 1 << 20;

/// Which snapshot an overlay belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayIdentity {
    /// `series@time`.
    pub snapshot: String,
    /// The BLAKE3 checksum stored at the end of the snapshot's index file.
    pub index_sum: [u8; 32],
    /// Device bytes.
    pub device_size: u64,
}

/// What an overlay can do now (for `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlayState {
    /// Writes are acknowledged once in the page cache and the map mirror.
    Ok,
    /// No map mirror (/run full or unusable): every write is flushed first.
    Synchronous,
    /// A flush failed: the overlay refuses I/O until it is mounted again.
    Failed,
}

impl std::fmt::Display for OverlayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverlayState::Ok => "ok",
            OverlayState::Synchronous => {
                "synchronous writes (no map mirror on /run: every write is flushed first)"
            }
            OverlayState::Failed => {
                "FAILED: a flush of the overlay failed; it refuses I/O until it is mounted again (check the disk under it)"
            }
        })
    }
}

struct MapState {
    bits: SparseMap,
    /// Dirty map pages (index of 4096-byte page of the map).
    dirty: std::collections::BTreeSet<u64>,
    /// The map's copy on tmpfs; None once it failed (then writes are synchronous).
    mirror: Option<Mirror>,
    /// Without a mirror, its file may still be on /run (holding acknowledged bits
    /// until a flush makes them durable): the first flush that starts after the
    /// mirror went removes it, so that a full /run gets its space back.
    stale_mirror: bool,
}

/// An open overlay over a base image.
pub struct Overlay {
    file: File,
    path: PathBuf,
    base: Arc<dyn BlockDevice>,
    map: Mutex<MapState>,
    map_offset: u64,
    data_offset: u64,
    device_size: u64,
    /// Sectors currently mapped.
    pub mapped_sectors: AtomicU64,
    /// Serializes flushes so the map pages written are a consistent snapshot.
    flush_lock: Mutex<()>,
    /// Where the mirror lives (removed at a clean close).
    mirror_path: PathBuf,
    /// No mirror: every write is flushed before it completes.
    sync_writes: AtomicBool,
    /// A sync failed: the overlay refuses I/O (see the module docs).
    failed: AtomicBool,
    /// Writes hold it shared while they run; [`Overlay::close`] takes it exclusively
    /// and sets it: no write is acknowledged after the final flush.
    closed: std::sync::RwLock<bool>,
    /// How the file's data is made durable (fdatasync; tests inject failures).
    sync: fn(&File) -> std::io::Result<()>,
}

fn map_len(device_size: u64) -> u64 {
    device_size
        .div_ceil(SECTOR)
        .div_ceil(8)
        .div_ceil(PAGE)
        .max(1)
        * PAGE
}

fn encode_header(id: &OverlayIdentity) -> Vec<u8> {
    let ml = map_len(id.device_size);
    let data_offset = (HEADER_LEN + ml).div_ceil(1 << 20) * (1 << 20);
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(&OVERLAY_MAGIC);
    h[8..12].copy_from_slice(&OVERLAY_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(SECTOR as u32).to_le_bytes());
    h[16..24].copy_from_slice(&id.device_size.to_le_bytes());
    h[24..32].copy_from_slice(&HEADER_LEN.to_le_bytes());
    h[32..40].copy_from_slice(&ml.to_le_bytes());
    h[40..48].copy_from_slice(&data_offset.to_le_bytes());
    h[48..80].copy_from_slice(&id.index_sum);
    let name = id.snapshot.as_bytes();
    let n = name.len().min(MAX_NAME);
    h[80..84].copy_from_slice(&(n as u32).to_le_bytes());
    h[84..84 + n].copy_from_slice(&name[..n]);
    let crc = crc32c::crc32c(&h[..4092]);
    h[4092..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Parse an overlay header, naming `path` in errors.
pub fn read_identity(path: &Path) -> Result<OverlayIdentity> {
    let f = File::open(path).at(path)?;
    let mut h = vec![0u8; HEADER_LEN as usize];
    f.read_exact_at(&mut h, 0)
        .map_err(|_| Error::Invalid(format!("overlay {}: truncated header", path.display())))?;
    parse_header(path, &h).map(|(id, _, _)| id)
}

/// Parse an overlay header from its bytes (at least 4096 of them).
pub fn parse_identity(h: &[u8]) -> Result<OverlayIdentity> {
    let h = h
        .get(..HEADER_LEN as usize)
        .ok_or_else(|| Error::Invalid("overlay: truncated header".into()))?;
    parse_header(Path::new("overlay"), h).map(|(id, _, _)| id)
}

fn parse_header(path: &Path, h: &[u8]) -> Result<(OverlayIdentity, u64, u64)> {
    let bad = |r: &str| Error::Invalid(format!("overlay {}: {r}", path.display()));
    if h[..8] != OVERLAY_MAGIC {
        return Err(bad("not a livemount overlay (bad magic)"));
    }
    let u32_at = |a: usize| u32::from_le_bytes([h[a], h[a + 1], h[a + 2], h[a + 3]]);
    let u64_at = |a: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[a..a + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != OVERLAY_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            what: "overlay",
            found: version,
            supported: OVERLAY_VERSION,
        });
    }
    if crc32c::crc32c(&h[..4092]) != u32_at(4092) {
        return Err(bad("header checksum mismatch"));
    }
    let device_size = u64_at(16);
    let (map_offset, ml, data_offset) = (u64_at(24), u64_at(32), u64_at(40));
    if u32_at(12) as u64 != SECTOR
        || map_offset != HEADER_LEN
        || ml != map_len(device_size)
        || data_offset != (HEADER_LEN + ml).div_ceil(1 << 20) * (1 << 20)
    {
        // data_offset is what every writer computes from the map length: anything
        // else (e.g. a huge value that would overflow `data_offset + offset`) is damage.
        return Err(bad("inconsistent header"));
    }
    let n = (u32_at(80) as usize).min(MAX_NAME);
    let snapshot = String::from_utf8_lossy(&h[84..84 + n]).into_owned();
    let mut index_sum = [0u8; 32];
    index_sum.copy_from_slice(&h[48..80]);
    Ok((
        OverlayIdentity {
            snapshot,
            index_sum,
            device_size,
        },
        map_offset,
        data_offset,
    ))
}

impl Overlay {
    /// Open the overlay at `path` over `base`, creating it (mode 0600, sparse) if it
    /// does not exist, with its map mirror in the run directory. An existing overlay
    /// of another snapshot is refused.
    pub fn open(path: &Path, base: Arc<dyn BlockDevice>, id: &OverlayIdentity) -> Result<Overlay> {
        let dir = crate::paths::run_dir().ok().map(Path::to_path_buf);
        Self::open_with_mirror_in(path, base, id, dir.as_deref())
    }

    /// [`open`](Self::open) with the mirror in `mirror_dir` (None or unusable: no
    /// mirror, synchronous writes).
    pub fn open_with_mirror_in(
        path: &Path,
        base: Arc<dyn BlockDevice>,
        id: &OverlayIdentity,
        mirror_dir: Option<&Path>,
    ) -> Result<Overlay> {
        let file = crate::paths::open_private_rw(path).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Error::Invalid(format!(
                "overlay {} is a symlink; name the file itself",
                path.display()
            )),
            _ => Error::io(path, e),
        })?;
        if !file.metadata().at(path)?.file_type().is_file() {
            return Err(Error::Invalid(format!(
                "overlay {} is not a regular file",
                path.display()
            )));
        }
        // One user at a time: two daemons (or a mount and a commit) writing one
        // overlay would corrupt its map.
        livemount_store::fsutil::flock(&file, true, false).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::Busy(format!(
                    "overlay {} is in use by another livemount process",
                    path.display()
                ))
            } else {
                Error::io(path, e)
            }
        })?;
        let ml = map_len(id.device_size);
        let key = MirrorKey::of(&file, id, ml)?;
        let mirror_path = key.path_in(mirror_dir.unwrap_or(Path::new(crate::paths::RUN_DIR)));
        if file.metadata().at(path)?.len() == 0 {
            // A mirror left by a dead daemon of an earlier file with this inode.
            let _ = std::fs::remove_file(&mirror_path);
            init_file(&file, path, id)?;
        }
        let mut h = vec![0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| Error::Invalid(format!("overlay {}: truncated header", path.display())))?;
        let (found, map_offset, data_offset) = parse_header(path, &h)?;
        if found.index_sum != id.index_sum || found.device_size != id.device_size {
            return Err(Error::Invalid(format!(
                "overlay {} belongs to snapshot {}, not {}; use another overlay file",
                path.display(),
                found.snapshot,
                id.snapshot
            )));
        }
        if file.metadata().at(path)?.len() < data_offset {
            return Err(Error::Invalid(format!(
                "overlay {}: truncated map",
                path.display()
            )));
        }
        let mut bits = SparseMap::load(&file, map_offset, ml).at(path)?;
        let (dirty, merged) = merge_mirror(&mut bits, &mirror_path, &key, path);
        let mirror = start_mirror(&bits, mirror_dir.map(|_| mirror_path.as_path()), &key, path);
        let mapped = bits.count_ones();
        let sync_writes = AtomicBool::new(mirror.is_none());
        Ok(Overlay {
            file,
            path: path.to_path_buf(),
            base,
            map: Mutex::new(MapState {
                bits,
                dirty,
                // A mirror file that could not be merged is never removed here.
                stale_mirror: mirror.is_none() && merged,
                mirror,
            }),
            map_offset,
            data_offset,
            device_size: id.device_size,
            mapped_sectors: AtomicU64::new(mapped),
            flush_lock: Mutex::new(()),
            mirror_path,
            sync_writes,
            failed: AtomicBool::new(false),
            closed: std::sync::RwLock::new(false),
            sync: File::sync_data,
        })
    }

    /// Make every write durable and remove the map mirror: a clean stop leaves no
    /// run file behind (a later overlay on the same inode must not inherit it).
    pub fn close(&self) -> Result<()> {
        // Wait for writes in progress, refuse later ones, then make everything durable.
        *self.closed.write().map_err(|_| poisoned(&self.path))? = true;
        self.flush()?;
        let m = self.map.lock().map_err(|_| poisoned(&self.path))?;
        if m.dirty.is_empty() {
            let _ = std::fs::remove_file(&self.mirror_path);
        }
        Ok(())
    }

    /// True while every write is flushed before it completes (no mirror).
    pub fn synchronous_writes(&self) -> bool {
        self.sync_writes.load(Relaxed)
    }

    /// What the overlay can do now.
    pub fn state(&self) -> OverlayState {
        if self.failed.load(Relaxed) {
            OverlayState::Failed
        } else if self.synchronous_writes() {
            OverlayState::Synchronous
        } else {
            OverlayState::Ok
        }
    }

    /// Where the map mirror is (or would be) kept.
    pub fn mirror_path(&self) -> &Path {
        &self.mirror_path
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Relaxed) {
            return Err(Error::io(
                &self.path,
                std::io::Error::other(
                    "an earlier flush failed (the disk lost data it had accepted); the overlay refuses I/O until it is mounted again",
                ),
            ));
        }
        Ok(())
    }

    /// Refuse a write after [`close`](Self::close); returns the guard to hold while
    /// the write runs.
    fn open_for_write(&self) -> Result<std::sync::RwLockReadGuard<'_, bool>> {
        let g = self.closed.read().map_err(|_| poisoned(&self.path))?;
        if *g {
            return Err(Error::io(
                &self.path,
                std::io::Error::other("the overlay is closed (the server is stopping)"),
            ));
        }
        Ok(g)
    }

    /// Enter the errored state after a failed sync of the file. The mirror goes too:
    /// its bits may belong to writes whose pages the kernel dropped, and a later open
    /// in this boot must not make them durable.
    fn fail(&self, e: std::io::Error) -> Error {
        if let Ok(mut m) = self.map.lock() {
            m.mirror = None;
        }
        let _ = std::fs::remove_file(&self.mirror_path);
        if !self.failed.swap(true, Relaxed) {
            eprintln!(
                "livemount: error: fdatasync of overlay {} failed ({e}); refusing further I/O to it (see docs/architecture.md, Overlay failures)",
                self.path.display()
            );
        }
        Error::io(&self.path, e)
    }

    /// The overlay file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        if !offset.is_multiple_of(SECTOR)
            || !len.is_multiple_of(SECTOR)
            || offset.checked_add(len).is_none_or(|e| e > self.device_size)
        {
            return Err(Error::Invalid(format!(
                "I/O out of range: {len} bytes at {offset}"
            )));
        }
        Ok(())
    }

    /// Per sector of `offset..offset+len`: is it in the overlay? As runs (start, len, mapped).
    fn runs(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64, bool)>> {
        let m = self.map.lock().map_err(|_| poisoned(&self.path))?;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let first = offset / SECTOR;
        for s in first..first + len / SECTOR {
            let bit = m.bits.get(s);
            match out.last_mut() {
                Some(last) if last.2 == bit => last.1 += SECTOR,
                _ => out.push((s * SECTOR, SECTOR, bit)),
            }
        }
        Ok(out)
    }

    /// True if no sector of the range is in the overlay (the read goes to the base).
    pub fn untouched(&self, offset: u64, len: u64) -> bool {
        // Hot path of every read: whole 64-bit words of the map at a time, no
        // allocation (a VM that has written little hits this for nearly every read).
        if self.mapped_sectors.load(Relaxed) == 0 {
            return true;
        }
        let (mut s, end) = (offset / SECTOR, (offset + len).div_ceil(SECTOR));
        if end > self.device_size.div_ceil(SECTOR) {
            return false;
        }
        let Ok(m) = self.map.lock() else { return false };
        while s < end {
            let (w, b) = ((s / 64) as usize, s % 64);
            let n = (64 - b).min(end - s);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            if m.bits.word(w) & mask != 0 {
                return false;
            }
            s += n;
        }
        true
    }

    /// Mark `offset..offset+len` as the overlay's, in memory and in the mirror
    /// (before the write is acknowledged). A mirror that fails is dropped, loudly,
    /// and writes become synchronous (the caller flushes this one).
    fn set_bits(&self, offset: u64, len: u64) -> Result<()> {
        let mut m = self.map.lock().map_err(|_| poisoned(&self.path))?;
        let first = offset / SECTOR;
        let mut newly = 0;
        let mut changed: Option<(usize, usize)> = None;
        for s in first..first + len / SECTOR {
            if m.bits.set(s) {
                let w = (s / 64) as usize;
                newly += 1;
                m.dirty.insert(s / (PAGE * 8));
                changed = Some(changed.map_or((w, w), |(a, _)| (a, w)));
            }
        }
        // Under the lock, so that concurrent writers cannot store older words over
        // newer ones.
        if let (Some(mirror), Some((a, z))) = (&m.mirror, changed) {
            let bytes: Vec<u8> = (a..=z).flat_map(|w| m.bits.word(w).to_le_bytes()).collect();
            if let Err(e) = mirror.write(a as u64 * 8, &bytes) {
                // The file stays: its bits are all acknowledged writes, and the next
                // flush (this write's, now synchronous) makes them durable anyway.
                warn_no_mirror(&self.path, &e.to_string());
                m.mirror = None;
                m.stale_mirror = true;
                self.sync_writes.store(true, Relaxed);
            }
        }
        self.mapped_sectors.fetch_add(newly, Relaxed);
        Ok(())
    }

    fn redirty(&self, pages: &[(u64, Vec<u8>)]) {
        if let Ok(mut m) = self.map.lock() {
            m.dirty.extend(pages.iter().map(|(p, _)| *p));
        }
    }

    /// Bytes of memory the sector map holds (pages exist where sectors were written).
    pub fn map_bytes(&self) -> u64 {
        self.map.lock().map_or(0, |m| m.bits.heap_bytes())
    }

    /// Bytes the map's mirror takes on /run (allocated, not its sparse length; 0
    /// when there is none: synchronous writes).
    pub fn mirror_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.mirror_path())
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    /// Device bytes.
    pub fn device_size(&self) -> u64 {
        self.device_size
    }

    /// Punch `offset..offset+len` out of the data area and map it (reads zeros).
    fn discard_piece(&self, offset: u64, len: u64) -> Result<()> {
        livemount_store::fsutil::zero_range(&self.file, self.data_offset + offset, len, true)
            .at(&self.path)?;
        self.set_bits(offset, len)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        // Everything durable in the on-disk map: the mirror is no longer needed.
        if !self.failed.load(Relaxed) && self.map.lock().is_ok_and(|m| m.dirty.is_empty()) {
            let _ = std::fs::remove_file(&self.mirror_path);
        }
    }
}

fn poisoned(path: &Path) -> Error {
    Error::io(
        path,
        std::io::Error::other("overlay map lock poisoned by a panic; refusing I/O"),
    )
}

fn warn_no_mirror(path: &Path, why: &str) {
    eprintln!(
        "livemount: WARNING: no map mirror for overlay {} ({why}): every write is now flushed before it completes (slower), so that a killed daemon loses no acknowledged write",
        path.display()
    );
}

/// Merge the bits of this overlay's mirror (a dead daemon's acknowledged writes)
/// into `bits`; the map pages that gained bits are dirty (to be made durable at the
/// next flush). A mirror of another file or boot is ignored, with a warning.
/// Returns the map pages it changed, and whether whatever mirror file is there may
/// be removed once they are durable (false when it was there but not merged: it
/// stays for a later look).
fn merge_mirror(
    bits: &mut SparseMap,
    mirror_path: &Path,
    key: &MirrorKey,
    path: &Path,
) -> (std::collections::BTreeSet<u64>, bool) {
    let mut dirty = std::collections::BTreeSet::new();
    let merged = match mirror::load(mirror_path, key) {
        Ok(Some(old)) => {
            for p in old.allocated_pages() {
                if bits.merge_page(p, &old.page_bytes(p)) {
                    dirty.insert(p);
                }
            }
            true
        }
        Ok(None) => true,
        Err(why) => {
            eprintln!(
                "livemount: warning: ignoring the map mirror {} of overlay {}: {why}",
                mirror_path.display(),
                path.display()
            );
            false
        }
    };
    (dirty, merged)
}

/// A fresh mirror holding `bits` at `at` (None: no run directory), or None with a
/// loud warning: writes are then synchronous.
fn start_mirror(
    bits: &SparseMap,
    at: Option<&Path>,
    key: &MirrorKey,
    path: &Path,
) -> Option<Mirror> {
    let Some(at) = at else {
        warn_no_mirror(path, "no run directory");
        return None;
    };
    match Mirror::create(at, key, bits) {
        Ok(m) => Some(m),
        Err(e) => {
            warn_no_mirror(path, &e.to_string());
            None
        }
    }
}

/// Write the header of a new overlay and size it (sparse), durably.
fn init_file(file: &File, path: &Path, id: &OverlayIdentity) -> Result<()> {
    let h = encode_header(id);
    file.write_all_at(&h, 0).at(path)?;
    file.set_len(u64::from_le_bytes(h[40..48].try_into().unwrap_or([0; 8])) + id.device_size)
        .at(path)?;
    file.sync_all().at(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        livemount_store::fsutil::fsync_dir(dir)?;
    }
    Ok(())
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.device_size
    }

    /// Read `buf.len()` bytes at `offset`: overlay where written, base elsewhere.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        for (start, len, mapped) in self.runs(offset, buf.len() as u64)? {
            let part = &mut buf[(start - offset) as usize..(start - offset + len) as usize];
            if mapped {
                // After a failed sync the page cache may hold neither the new data
                // nor the old: EIO, never possibly wrong bytes.
                self.check_failed()?;
                self.file
                    .read_exact_at(part, self.data_offset + start)
                    .at(&self.path)?;
            } else {
                self.base.read_at(start, part)?;
            }
        }
        Ok(())
    }

    /// Write `buf` at `offset` (not durable until [`flush`](BlockDevice::flush)).
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        let _open = self.open_for_write()?;
        self.check_failed()?;
        self.file
            .write_all_at(buf, self.data_offset + offset)
            .at(&self.path)?;
        self.set_bits(offset, buf.len() as u64)?;
        if self.sync_writes.load(Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Make `offset..offset+len` read as zeros and release its space (DISCARD and
    /// WRITE_ZEROES): punch a hole and map the sectors.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        let _open = self.open_for_write()?;
        self.check_failed()?;
        // A guest's fstrim discards its free space, most of a thin disk: where the
        // overlay holds nothing and the snapshot is known to be zeros, the range
        // already reads as zeros, so it takes no map bits (memory follows data).
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let n = (DISCARD_PIECE - at % DISCARD_PIECE).min(end - at);
            if !(self.untouched(at, n) && self.base.known_zero(at, n)) {
                self.discard_piece(at, n)?;
            }
            at += n;
        }
        if self.sync_writes.load(Relaxed) {
            self.flush()?;
        }
        Ok(())
    }

    /// Whether `offset..offset+len` is known to read as zeros.
    fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.untouched(offset, len) && self.base.known_zero(offset, len)
    }

    /// The base's extents where the overlay holds nothing; where it does, the
    /// overlay file's holes (discarded and zeroed ranges) are zeros, the rest data.
    fn extents(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        self.check(offset, len)?;
        if self.mapped_sectors.load(Relaxed) == 0 {
            return self.base.extents(offset, len, out);
        }
        self.check_failed()?;
        for (start, n, mapped) in self.runs(offset, len)? {
            if mapped {
                let from = self.data_offset + start;
                out.push_file(&self.file, from, from + n);
            } else {
                self.base.extents(start, n, out)?;
            }
            if out.stopped() {
                break;
            }
        }
        Ok(())
    }

    /// Make every completed write durable, data and map (see the module docs). A
    /// failed sync is final (see Failures in the module docs).
    fn flush(&self) -> Result<()> {
        let _g = self.flush_lock.lock().map_err(|_| poisoned(&self.path))?;
        self.check_failed()?;
        // Snapshot the dirty map pages *before* syncing the data: every bit in the
        // snapshot belongs to a write whose data reached the page cache before it was
        // set, so the sync below makes that data durable before the bit. (Taking the
        // pages after the sync would let a write landing in between get a durable bit
        // over non-durable data.)
        let stale;
        let pages: Vec<(u64, Vec<u8>)> = {
            let mut m = self.map.lock().map_err(|_| poisoned(&self.path))?;
            stale = m.mirror.is_none() && m.stale_mirror;
            let dirty = std::mem::take(&mut m.dirty);
            dirty
                .into_iter()
                .map(|p| (p, m.bits.page_bytes(p)))
                .collect()
        };
        // The pages stay dirty in memory if anything below fails: the mirror keeps
        // them, and the errored state keeps them from ever being written.
        (self.sync)(&self.file).map_err(|e| {
            self.redirty(&pages);
            self.fail(e)
        })?;
        if !pages.is_empty() {
            for (p, bytes) in &pages {
                if let Err(e) = self.file.write_all_at(bytes, self.map_offset + p * PAGE) {
                    // The data is durable; the map write (page cache) failed: retrying
                    // is safe, nothing was lost yet.
                    self.redirty(&pages);
                    return Err(Error::io(&self.path, e));
                }
            }
            (self.sync)(&self.file).map_err(|e| {
                self.redirty(&pages);
                self.fail(e)
            })?;
        }
        if stale {
            // Every bit the old mirror holds was set before this flush began, so it
            // is durable now.
            let _ = std::fs::remove_file(&self.mirror_path);
            if let Ok(mut m) = self.map.lock() {
                m.stale_mirror = false;
            }
        }
        Ok(())
    }

    /// Only a range the overlay never wrote can be a fast hit: it is then the base's
    /// to serve (and to watch, for sequential read-ahead).
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.untouched(offset, buf.len() as u64) && self.base.read_cached(offset, buf)
    }

    fn read_only(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Pattern(u64);
    impl BlockDevice for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) / 512) as u8 | 1;
            }
            Ok(())
        }
    }

    fn open(
        p: &Path,
        base: Arc<dyn BlockDevice>,
        id: &OverlayIdentity,
        mirrors: &tempfile::TempDir,
    ) -> Overlay {
        Overlay::open_with_mirror_in(p, base, id, Some(mirrors.path())).unwrap()
    }

    fn ident(size: u64, sum: u8) -> OverlayIdentity {
        OverlayIdentity {
            snapshot: "vm@t".into(),
            index_sum: [sum; 32],
            device_size: size,
        }
    }

    #[test]
    fn writes_reads_discards_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ov");
        let size = 4 << 20;
        let base: Arc<dyn BlockDevice> = Arc::new(Pattern(size));
        let mirrors = tempfile::tempdir().unwrap();
        let ov = open(&p, base.clone(), &ident(size, 7), &mirrors);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        ov.write_at(1024, &[0xaa; 1024]).unwrap();
        ov.discard(8192, 4096).unwrap();
        let mut buf = vec![0u8; 16384];
        ov.read_at(0, &mut buf).unwrap();
        assert_eq!(buf[0], 1);
        assert!(buf[1024..2048].iter().all(|&b| b == 0xaa));
        assert_eq!(buf[2048], 5);
        assert!(buf[8192..12288].iter().all(|&b| b == 0));
        assert_eq!(buf[12288], 24 | 1);
        // Flushed writes survive a reopen; so does an unflushed one, through the
        // mirror (the daemon was "killed": dropped without a close).
        ov.flush().unwrap();
        ov.write_at(65536, &[0xbb; 512]).unwrap();
        drop(ov);
        assert!(
            mirrors.path().read_dir().unwrap().count() == 1,
            "the mirror stays"
        );
        let ov = open(&p, base.clone(), &ident(size, 7), &mirrors);
        let mut buf2 = vec![0u8; 16384];
        ov.read_at(0, &mut buf2).unwrap();
        assert_eq!(buf, buf2);
        let mut unflushed = [0u8; 512];
        ov.read_at(65536, &mut unflushed).unwrap();
        assert_eq!(unflushed, [0xbb; 512]);
        assert_eq!(ov.mapped_sectors.load(Relaxed), 11);
        // Re-applying a write is harmless.
        ov.write_at(1024, &[0xaa; 1024]).unwrap();
        ov.read_at(0, &mut buf2).unwrap();
        assert_eq!(buf, buf2);
        // Out-of-range I/O is an error, not a wrap-around.
        assert!(ov.write_at(size, &[0; 512]).is_err());
        // Another snapshot's overlay is refused, naming both (once it is not in use).
        drop(ov);
        let e = Overlay::open_with_mirror_in(&p, base, &ident(size, 8), Some(mirrors.path()))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("belongs to snapshot vm@t"), "{e}");
    }

    #[test]
    fn untouched_matches_the_map() {
        let d = tempfile::tempdir().unwrap();
        let size = 1 << 20;
        let ov = Overlay::open_with_mirror_in(
            &d.path().join("ov"),
            Arc::new(Pattern(size)),
            &ident(size, 1),
            Some(d.path()),
        )
        .unwrap();
        assert!(ov.untouched(0, size));
        ov.write_at(512 * 100, &[1; 512]).unwrap();
        for (off, len, want) in [
            (0u64, 512 * 100, true),
            (0, 512 * 101, false),
            (512 * 100, 512, false),
            (512 * 101, 512 * 200, true),
            (512 * 64, 512 * 64, false),
            (512 * 36, 512 * 64, true),
            (512 * 37, 512 * 64, false),
            (512 * 128, size - 512 * 128, true),
        ] {
            assert_eq!(ov.untouched(off, len), want, "{off}+{len}");
            assert_eq!(
                ov.untouched(off, len),
                ov.runs(off, len).unwrap().iter().all(|r| !r.2),
                "{off}+{len}"
            );
        }
    }

    #[test]
    fn fast_path_serves_the_base_only_where_the_overlay_never_wrote() {
        use crate::block::mem::MemDisk;
        let d = tempfile::tempdir().unwrap();
        let size = 1u64 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 | 1).collect();
        let base = Arc::new(MemDisk::new(data.clone(), true));
        let ov = Overlay::open_with_mirror_in(
            &d.path().join("ov"),
            base.clone(),
            &ident(size, 1),
            Some(d.path()),
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        // Untouched: the base's fast path answers.
        assert!(ov.read_cached(8192, &mut buf));
        assert_eq!(buf, data[8192..8192 + 4096]);
        assert_eq!(base.fast_reads.load(Relaxed), 1);
        // One written sector in the range: never the base's bytes, never fast.
        ov.write_at(8192 + 1024, &[0xee; 512]).unwrap();
        assert!(!ov.read_cached(8192, &mut buf));
        assert_eq!(base.fast_reads.load(Relaxed), 1, "base not asked");
        ov.read_at(8192, &mut buf).unwrap();
        assert_eq!(buf[..1024], data[8192..8192 + 1024]);
        assert!(buf[1024..1536].iter().all(|&b| b == 0xee));
        assert_eq!(buf[1536..], data[8192 + 1536..8192 + 4096]);
        // A base with no fast path makes the overlay's miss too.
        let slow = Arc::new(MemDisk::new(data, false));
        let ov2 = Overlay::open_with_mirror_in(
            &d.path().join("ov2"),
            slow,
            &ident(size, 1),
            Some(d.path()),
        )
        .unwrap();
        assert!(!ov2.read_cached(0, &mut buf));
    }

    fn failing_sync(_: &File) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EIO))
    }

    #[test]
    fn a_failed_sync_is_final_and_never_makes_unsynced_writes_durable() {
        let d = tempfile::tempdir().unwrap();
        let mirrors = tempfile::tempdir().unwrap();
        let p = d.path().join("ov");
        let size = 1u64 << 20;
        let base: Arc<dyn BlockDevice> = Arc::new(Pattern(size));
        let mut ov = open(&p, base.clone(), &ident(size, 1), &mirrors);
        ov.write_at(0, &[0xaa; 512]).unwrap();
        ov.flush().unwrap();
        ov.write_at(4096, &[0xbb; 512]).unwrap();
        ov.sync = failing_sync;
        let e = ov.flush().unwrap_err();
        assert_eq!(e.errno(), libc::EIO, "{e}");
        // The disk works again, but the kernel may have dropped the pages the sync
        // could not write: the overlay stays errored (a retried flush would make
        // the map bit of 4096 durable over data that may never have reached disk).
        ov.sync = File::sync_data;
        assert!(ov.flush().is_err(), "a failed sync must not be retried");
        assert!(ov.write_at(8192, &[1; 512]).is_err());
        assert!(ov.discard(8192, 512).is_err());
        let mut buf = [0u8; 512];
        assert!(ov.read_at(4096, &mut buf).is_err(), "mapped sectors: EIO");
        ov.read_at(65536, &mut buf).unwrap();
        assert_eq!(
            buf[0],
            128 | 1,
            "untouched sectors still read from the base"
        );
        // After a reboot (no mirror), only the flushed write is there.
        drop(ov);
        let fresh = tempfile::tempdir().unwrap();
        let ov = open(&p, base, &ident(size, 1), &fresh);
        ov.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0xaa; 512]);
        ov.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf[0], 8 | 1, "the write whose flush failed is not mapped");
    }

    #[test]
    fn without_a_mirror_writes_are_durable_before_they_complete() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ov");
        let size = 1u64 << 20;
        let base: Arc<dyn BlockDevice> = Arc::new(Pattern(size));
        // The mirror directory is a file: the mirror cannot be made (like ENOSPC in /run).
        let not_a_dir = d.path().join("run");
        std::fs::write(&not_a_dir, b"").unwrap();
        let ov = Overlay::open_with_mirror_in(&p, base.clone(), &ident(size, 1), Some(&not_a_dir))
            .unwrap();
        assert!(ov.synchronous_writes());
        assert_eq!(ov.state(), OverlayState::Synchronous);
        ov.write_at(512, &[0xcc; 512]).unwrap();
        drop(ov); // killed: no flush, no close
        let mirrors = tempfile::tempdir().unwrap();
        let ov = open(&p, base, &ident(size, 1), &mirrors);
        assert!(!ov.synchronous_writes());
        let mut buf = [0u8; 512];
        ov.read_at(512, &mut buf).unwrap();
        assert_eq!(
            buf, [0xcc; 512],
            "the acknowledged write survived without a mirror"
        );
    }

    #[test]
    fn a_mirror_of_another_boot_or_file_is_ignored_and_a_clean_close_removes_it() {
        let d = tempfile::tempdir().unwrap();
        let mirrors = tempfile::tempdir().unwrap();
        let p = d.path().join("ov");
        let size = 1u64 << 20;
        let base: Arc<dyn BlockDevice> = Arc::new(Pattern(size));
        let ov = open(&p, base.clone(), &ident(size, 1), &mirrors);
        ov.write_at(1024, &[0xdd; 512]).unwrap();
        let mp = ov.mirror_path().to_path_buf();
        drop(ov);
        // Another boot's mirror (its boot id differs): its bits are not trusted.
        let mut m = std::fs::read(&mp).unwrap();
        m[8] ^= 0xff;
        std::fs::write(&mp, &m).unwrap();
        let ov = open(&p, base.clone(), &ident(size, 1), &mirrors);
        let mut buf = [0u8; 512];
        ov.read_at(1024, &mut buf).unwrap();
        assert_eq!(buf[0], 2 | 1, "a foreign mirror's bits were merged");
        assert_eq!(ov.mapped_sectors.load(Relaxed), 0);
        // A clean close leaves no run file.
        ov.write_at(0, &[1; 512]).unwrap();
        ov.close().unwrap();
        assert!(!mp.exists(), "close left the mirror behind");
    }

    #[test]
    fn after_close_writes_fail_and_after_a_failed_sync_the_mirror_is_gone() {
        let d = tempfile::tempdir().unwrap();
        let mirrors = tempfile::tempdir().unwrap();
        let size = 1u64 << 20;
        let base: Arc<dyn BlockDevice> = Arc::new(Pattern(size));
        let ov = open(&d.path().join("a"), base.clone(), &ident(size, 1), &mirrors);
        ov.write_at(0, &[1; 512]).unwrap();
        ov.close().unwrap();
        assert!(
            ov.write_at(512, &[2; 512]).is_err(),
            "a write after the final flush"
        );
        assert!(ov.discard(512, 512).is_err());
        let mut ov = open(&d.path().join("b"), base, &ident(size, 1), &mirrors);
        ov.write_at(0, &[1; 512]).unwrap();
        let mp = ov.mirror_path().to_path_buf();
        assert!(mp.exists());
        ov.sync = failing_sync;
        assert!(ov.flush().is_err());
        assert!(
            !mp.exists(),
            "a failed sync left a mirror a later open would merge"
        );
    }

    /// Memory, mirror and the file's allocated map follow the writes, not the size
    /// of the device: a 4 TiB overlay written at both ends and in the middle.
    #[test]
    fn a_4_tib_overlay_costs_what_is_written_and_survives_kill_and_reopen() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let mirrors = tempfile::tempdir().unwrap();
        let p = d.path().join("ov");
        let size = 4u64 << 40;
        let base: Arc<dyn BlockDevice> = Arc::new(Pattern(size));
        let ov = open(&p, base.clone(), &ident(size, 1), &mirrors);
        assert!(
            ov.map_bytes() <= 2 << 20,
            "before writes: {}",
            ov.map_bytes()
        );
        assert!(ov.mirror_bytes() <= 64 << 10, "{}", ov.mirror_bytes());
        let spots = [0, size / 2 + 4096, size - 8192];
        for (i, &at) in spots.iter().enumerate() {
            ov.write_at(at, &[0x10 + i as u8; 8192]).unwrap();
        }
        ov.flush().unwrap();
        ov.write_at(size / 4, &[0x77; 512]).unwrap(); // acknowledged, not flushed
        assert!(ov.map_bytes() <= (2 << 20) + 4 * PAGE, "{}", ov.map_bytes());
        assert!(ov.mirror_bytes() <= 64 << 10, "{}", ov.mirror_bytes());
        let m = std::fs::metadata(&p).unwrap();
        assert!(
            m.blocks() * 512 < 1 << 20,
            "overlay file uses {}",
            m.blocks() * 512
        );
        drop(ov); // killed: the unflushed write lives in the mirror
        let ov = open(&p, base.clone(), &ident(size, 1), &mirrors);
        let mut buf = vec![0u8; 8192];
        for (i, &at) in spots.iter().enumerate() {
            ov.read_at(at, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0x10 + i as u8), "at {at}");
        }
        ov.read_at(size / 4, &mut buf[..1024]).unwrap();
        assert_eq!(buf[..512], [0x77; 512]);
        assert_eq!(
            buf[512],
            ((size / 4 + 512) / 512) as u8 | 1,
            "base after it"
        );
        assert_eq!(ov.mapped_sectors.load(Relaxed), 3 * 16 + 1);
        ov.close().unwrap();
        drop(ov);
        // After a reboot (no mirror) the on-disk map alone has everything closed.
        let fresh = tempfile::tempdir().unwrap();
        let ov = open(&p, base, &ident(size, 1), &fresh);
        ov.read_at(size / 4, &mut buf[..512]).unwrap();
        assert_eq!(buf[..512], [0x77; 512]);
        assert_eq!(ov.mapped_sectors.load(Relaxed), 3 * 16 + 1);
    }

    /// A base of zeros that says so (a thin snapshot's zero chunks).
    struct Zeros(u64);
    impl BlockDevice for Zeros {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, _offset: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn known_zero(&self, _offset: u64, _len: u64) -> bool {
            true
        }
    }

    /// BLOCK_STATUS over an overlay: written sectors are data, a discarded (punched)
    /// piece is zeros although mapped, untouched ranges are what the base says.
    #[test]
    fn extents_show_writes_as_data_and_discarded_pieces_as_zeros() {
        use crate::block::Extent;
        let d = tempfile::tempdir().unwrap();
        let mirrors = tempfile::tempdir().unwrap();
        let size = 8u64 << 20;
        let base: Arc<dyn BlockDevice> = Arc::new(Zeros(size));
        let ov = open(&d.path().join("ov"), base, &ident(size, 1), &mirrors);
        let all = |ov: &Overlay| {
            let mut e = Extents::new(64);
            ov.extents(0, size, &mut e).unwrap();
            e.into_vec()
        };
        assert_eq!(
            all(&ov),
            vec![Extent {
                len: size,
                zero: true
            }]
        );
        ov.write_at(64 << 10, &[7; 4096]).unwrap();
        ov.write_at(2 << 20, &[8; 8192]).unwrap();
        ov.discard(2 << 20, 8192).unwrap();
        assert!(
            !ov.untouched(2 << 20, 8192),
            "the discarded piece is mapped"
        );
        let z = |len| Extent { len, zero: true };
        let d4k = Extent {
            len: 4096,
            zero: false,
        };
        assert_eq!(
            all(&ov),
            vec![z(64 << 10), d4k, z(size - (64 << 10) - 4096)]
        );
        // Unaligned or beyond the device: refused.
        let mut e = Extents::new(4);
        assert!(ov.extents(100, 512, &mut e).is_err());
        assert!(ov.extents(size - 512, 1024, &mut e).is_err());
    }

    /// A guest's fstrim of a thin 4 TiB disk: ranges that already read as zeros take
    /// no map bits (they mapped the whole device: 1 GiB of map for one fstrim).
    #[test]
    fn discarding_what_already_reads_as_zeros_maps_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mirrors = tempfile::tempdir().unwrap();
        let size = 4u64 << 40;
        let base: Arc<dyn BlockDevice> = Arc::new(Zeros(size));
        let ov = open(&d.path().join("ov"), base, &ident(size, 1), &mirrors);
        ov.write_at((1 << 30) + 4096, &[7; 4096]).unwrap();
        ov.discard(0, size).unwrap();
        // Only the 1 MiB piece holding the write is mapped (and punched).
        assert_eq!(ov.mapped_sectors.load(Relaxed), (1 << 20) / 512);
        assert!(ov.map_bytes() <= (2 << 20) + 2 * PAGE, "{}", ov.map_bytes());
        let mut buf = vec![1u8; 8192];
        ov.read_at(1 << 30, &mut buf).unwrap();
        assert!(
            buf.iter().all(|&b| b == 0),
            "the discarded write still reads"
        );
        ov.read_at(size - 8192, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        // Over a base that is not known to be zero, a discard still maps its range.
        let d2 = tempfile::tempdir().unwrap();
        let p: Arc<dyn BlockDevice> = Arc::new(Pattern(1 << 20));
        let ov = open(&d2.path().join("ov"), p, &ident(1 << 20, 1), &mirrors);
        ov.discard(65536, 65536).unwrap();
        assert_eq!(ov.mapped_sectors.load(Relaxed), 128);
    }

    #[test]
    fn a_header_with_another_data_offset_is_refused() {
        let id = ident(1 << 20, 3);
        let mut h = encode_header(&id);
        assert!(parse_identity(&h).is_ok());
        h[40..48].copy_from_slice(&(u64::MAX - 4096).to_le_bytes());
        let crc = crc32c::crc32c(&h[..4092]);
        h[4092..].copy_from_slice(&crc.to_le_bytes());
        let e = parse_identity(&h).unwrap_err().to_string();
        assert!(e.contains("inconsistent header"), "{e}");
    }
}
