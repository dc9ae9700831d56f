//! The overlay map's mirror on tmpfs (`/run/livemount/overlay-DEV-INO.map`).
//!
//! Acknowledged writes that were not yet flushed have their data in the overlay's
//! page cache, which survives the daemon (SIGKILL, panic); only their map bits would
//! be lost with its memory, and the device, which never went away for its users,
//! would silently revert them. So every bit set in memory is also written here
//! before the write completes, and the next open (`mount --recover`) merges it.
//!
//! A mirror is trusted only for the overlay file and the boot it was made for: its
//! header names the overlay (device, inode, birth time), the snapshot it overlays
//! (index checksum, device size), the boot id and the map length, under a crc. A
//! mirror that does not match is ignored (after a reboot the on-disk map, which only
//! holds flushed writes, is what counts; a reused inode number is another file).
//!
//! ```text
//!  0  magic        [u8; 8]  b"LMMIRR\x01\0"
//!  8  boot_id      [u8; 16] /proc/sys/kernel/random/boot_id
//! 24  dev, ino     u64, u64 of the overlay file
//! 40  btime_ns     u64      birth time of the overlay file (0: unknown)
//! 48  index_sum    [u8; 32] of the snapshot
//! 80  device_size  u64
//! 88  map_len      u64
//! 4092 crc32c of bytes 0..4092
//! 4096 the map, as in the overlay file (sparse: only pages with set bits exist)
//! ```

use super::map::SparseMap;
use super::OverlayIdentity;
use crate::error::{Error, IoContext, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 8] = *b"LMMIRR\x01\0";
/// Bytes before the map.
pub const HEADER_LEN: u64 = 4096;

/// What a mirror must say to be merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorKey {
    boot_id: [u8; 16],
    dev: u64,
    ino: u64,
    btime_ns: u64,
    index_sum: [u8; 32],
    device_size: u64,
    map_len: u64,
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), as bytes.
pub fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: Vec<u8> = text
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|c| (c as char).to_digit(16).unwrap_or(0) as u8)
        .collect();
    let mut id = [0u8; 16];
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        id[i] = pair[0] << 4 | pair.get(1).copied().unwrap_or(0);
    }
    id
}

/// Birth time of `file` in ns, 0 where the file system does not record it.
fn btime_ns(file: &File) -> u64 {
    // SAFETY: statx on our own descriptor with an empty path (AT_EMPTY_PATH) fills
    // the zeroed struct we own.
    unsafe {
        let mut st: libc::statx = std::mem::zeroed();
        let rc = libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME,
            &mut st,
        );
        if rc != 0 || st.stx_mask & libc::STATX_BTIME == 0 {
            return 0;
        }
        (st.stx_btime.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(st.stx_btime.tv_nsec as u64)
    }
}

impl MirrorKey {
    /// The key of the overlay `file` of `id` with a map of `map_len` bytes.
    pub fn of(file: &File, id: &OverlayIdentity, map_len: u64) -> Result<MirrorKey> {
        let m = file.metadata().map_err(|e| Error::io("overlay", e))?;
        Ok(MirrorKey {
            boot_id: boot_id(),
            dev: m.dev(),
            ino: m.ino(),
            btime_ns: btime_ns(file),
            index_sum: id.index_sum,
            device_size: id.device_size,
            map_len,
        })
    }

    /// The mirror's file name in `dir`.
    pub fn path_in(&self, dir: &Path) -> PathBuf {
        dir.join(format!("overlay-{:x}-{}.map", self.dev, self.ino))
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(&MAGIC);
        h[8..24].copy_from_slice(&self.boot_id);
        h[24..32].copy_from_slice(&self.dev.to_le_bytes());
        h[32..40].copy_from_slice(&self.ino.to_le_bytes());
        h[40..48].copy_from_slice(&self.btime_ns.to_le_bytes());
        h[48..80].copy_from_slice(&self.index_sum);
        h[80..88].copy_from_slice(&self.device_size.to_le_bytes());
        h[88..96].copy_from_slice(&self.map_len.to_le_bytes());
        let crc = crc32c::crc32c(&h[..4092]);
        h[4092..].copy_from_slice(&crc.to_le_bytes());
        h
    }
}

/// The map bits a mirror at `path` holds for `key`: `Ok(None)` if there is none,
/// `Err` (with the reason, for a warning) if it is not this overlay's of this boot.
pub fn load(path: &Path, key: &MirrorKey) -> std::result::Result<Option<SparseMap>, String> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    match f.metadata() {
        Ok(m) if m.file_type().is_file() && m.len() == HEADER_LEN + key.map_len => {}
        Ok(_) => return Err("not a regular file of the right length".into()),
        Err(e) => return Err(e.to_string()),
    }
    let mut h = vec![0u8; HEADER_LEN as usize];
    f.read_exact_at(&mut h, 0).map_err(|e| e.to_string())?;
    if h != key.header() {
        return Err("it belongs to another overlay file, snapshot or boot".into());
    }
    SparseMap::load(&f, HEADER_LEN, key.map_len)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// A mirror being kept up to date.
pub struct Mirror {
    file: File,
    path: PathBuf,
}

impl Mirror {
    /// Create (replace) the mirror of `key` at `path` holding `map`, 0600, never
    /// through a symlink.
    /// The new mirror is written under a temporary name and renamed over the old
    /// one only when complete: a crash meanwhile leaves the old mirror (whose bits
    /// the caller has merged) in place, never a partial one.
    pub fn create(path: &Path, key: &MirrorKey, map: &SparseMap) -> Result<Mirror> {
        let tmp = path.with_extension("map.new");
        let _ = std::fs::remove_file(&tmp);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .at(&tmp)?;
        // Sparse: only the map's existing pages take space on tmpfs.
        let written = file
            .write_all_at(&key.header(), 0)
            .and_then(|()| file.set_len(HEADER_LEN + key.map_len))
            .and_then(|()| {
                map.allocated_pages().try_for_each(|p| {
                    file.write_all_at(&map.page_bytes(p), HEADER_LEN + p * super::map::PAGE)
                })
            })
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io(path, e));
        }
        Ok(Mirror {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Write `bytes` of the map at map offset `at`.
    pub fn write(&self, at: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all_at(bytes, HEADER_LEN + at)
            .at(&self.path)
    }

    /// The mirror file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
