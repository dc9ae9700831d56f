//! FIEMAP: where a file's bytes live on its file system's block device.

use crate::target::FileExtent;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// Flush dirty data first, so delayed allocations get real addresses.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extent flags meaning "no fixed disk address we could match block events to":
/// UNKNOWN, DELALLOC, ENCODED, NOT_ALIGNED, DATA_INLINE, DATA_TAIL.
const UNMAPPABLE: u32 = 0x2 | 0x4 | 0x8 | 0x100 | 0x200 | 0x400;
const BATCH: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    logical: u64,
    physical: u64,
    length: u64,
    _reserved64: [u64; 2],
    flags: u32,
    _reserved: [u32; 3],
}

#[repr(C)]
struct Request {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    _reserved: u32,
    extents: [RawExtent; BATCH],
}

/// The file's extents (offsets relative to the file system's device) and how many
/// were skipped because they have no stable disk address.
pub fn extents(path: &Path) -> std::io::Result<(Vec<FileExtent>, usize)> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    let mut skipped = 0;
    let mut start = 0u64;
    loop {
        let mut req = Request {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: BATCH as u32,
            _reserved: 0,
            extents: [RawExtent::default(); BATCH],
        };
        // SAFETY: `req` is a correctly laid out `struct fiemap` with room for
        // `extent_count` extents; the kernel writes only within it.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut req as *mut Request) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = (req.mapped_extents as usize).min(BATCH);
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &req.extents[..n] {
            if e.flags & UNMAPPABLE != 0 {
                skipped += 1;
            } else {
                out.push(FileExtent {
                    logical: e.logical,
                    physical: e.physical,
                    length: e.length,
                });
            }
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
            start = e.logical + e.length;
        }
        if last {
            break;
        }
    }
    Ok((out, skipped))
}
