//! What `--disk PATH` means to the tracer: which kernel device (or file) to filter
//! on, and how an event's sectors map back into the VM disk's address space.

use livemount_ebpf_abi::{kernel_dev, Event, KIND_BLOCK, KIND_PAGE_CACHE};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Errors resolving a traced disk.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The path cannot be inspected.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Sysfs did not describe the device the way we expect.
    #[error("{}: {msg}", path.display())]
    Sysfs {
        /// The sysfs path read.
        path: PathBuf,
        /// What was wrong.
        msg: String,
    },
    /// Anything else that makes the path untraceable.
    #[error("{}: {msg}", path.display())]
    Unsupported {
        /// The traced path.
        path: PathBuf,
        /// Why it cannot be traced.
        msg: String,
    },
}

/// One extent of an image file on its host disk (bytes), from FIEMAP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileExtent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the whole host disk (partition start already added).
    pub physical: u64,
    /// Length in bytes.
    pub length: u64,
}

/// How events are turned into VM-disk byte ranges.
#[derive(Clone, Debug)]
pub enum Translate {
    /// Block events of `dev`; sectors `[start, start + size)` are the VM disk
    /// (start is 0 for a whole disk, the partition's start for a partition).
    Range {
        /// Kernel dev_t of the whole disk.
        dev: u32,
        /// First byte of the VM disk on that device.
        start: u64,
    },
    /// Block events of the host disk holding an image file; host bytes map back
    /// to file offsets through the file's FIEMAP extents (sorted by `physical`).
    File {
        /// Kernel dev_t of the host's whole disk.
        dev: u32,
        /// The file's extents, sorted by physical offset.
        extents: Vec<FileExtent>,
    },
    /// Page-cache lookups of one file (`mm_filemap_get_pages`), by page index.
    PageCache {
        /// Kernel dev_t of the file system (`s_dev`).
        dev: u32,
        /// Inode number.
        ino: u64,
    },
}

/// A resolved `--disk` argument.
#[derive(Clone, Debug)]
pub struct Target {
    /// The path as given.
    pub path: PathBuf,
    /// Short name for file names (`loop3`, `vm1.img`).
    pub name: String,
    /// Size of the VM disk in bytes.
    pub disk_size: u64,
    /// Event translation.
    pub translate: Translate,
    /// Human-readable description for the start-up message.
    pub description: String,
}

const SECTOR: u64 = 512;

impl Target {
    /// Resolve `path`: a block device (disk, partition, loop, ublk) or an image file.
    /// `page_cache` selects page-cache tracing for image files.
    pub fn resolve(path: &Path, page_cache: bool) -> Result<Target, TargetError> {
        let io = |source| TargetError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "disk".into());
        let ft = meta.file_type();
        if ft.is_block_device() {
            if page_cache {
                return Err(TargetError::Unsupported {
                    path: path.to_owned(),
                    msg: "--page-cache applies to image files, not block devices".into(),
                });
            }
            let (major, minor) = split_dev(meta.rdev());
            let blk = BlockDev::from_numbers(major, minor)?;
            let description = match &blk.partition_of {
                Some((pmaj, pmin, start)) => format!(
                    "partition {major}:{minor} of disk {pmaj}:{pmin} starting at byte {start}"
                ),
                None => format!("block device {major}:{minor}"),
            };
            let (dev, start) = match blk.partition_of {
                Some((pmaj, pmin, start)) => (kernel_dev(pmaj, pmin), start),
                None => (kernel_dev(major, minor), 0),
            };
            return Ok(Target {
                path: path.to_owned(),
                name,
                disk_size: blk.size,
                translate: Translate::Range { dev, start },
                description,
            });
        }
        if !ft.is_file() {
            return Err(TargetError::Unsupported {
                path: path.to_owned(),
                msg: "neither a block device nor a regular file".into(),
            });
        }
        let (major, minor) = split_dev(meta.dev());
        if page_cache {
            return Ok(Target {
                path: path.to_owned(),
                name,
                disk_size: meta.size(),
                translate: Translate::PageCache {
                    dev: kernel_dev(major, minor),
                    ino: meta.ino(),
                },
                description: format!(
                    "buffered reads of inode {} on file system {major}:{minor}",
                    meta.ino()
                ),
            });
        }
        let blk = BlockDev::from_numbers(major, minor).map_err(|_| TargetError::Unsupported {
            path: path.to_owned(),
            msg: format!(
                "its file system ({major}:{minor}) is not on a single block device; use --page-cache"
            ),
        })?;
        let (dev, part_start) = match blk.partition_of {
            Some((pmaj, pmin, start)) => (kernel_dev(pmaj, pmin), start),
            None => (kernel_dev(major, minor), 0),
        };
        let (mut extents, skipped) = crate::fiemap::extents(path).map_err(io)?;
        if skipped > 0 {
            eprintln!(
                "warning: {}: {skipped} extents have no stable disk address (inline, delayed \
                 allocation or encoded) and cannot be traced at the block layer",
                path.display()
            );
        }
        for e in &mut extents {
            e.physical += part_start;
        }
        extents.sort_by_key(|e| e.physical);
        Ok(Target {
            path: path.to_owned(),
            name,
            disk_size: meta.size(),
            description: format!(
                "image file with {} extents on disk {}:{} (block reads; page-cache hits are invisible here, see --page-cache)",
                extents.len(),
                dev >> 20,
                dev & 0xfffff
            ),
            translate: Translate::File { dev, extents },
        })
    }

    /// The kernel device the block programs must let through, if any.
    pub fn block_dev(&self) -> Option<u32> {
        match self.translate {
            Translate::Range { dev, .. } | Translate::File { dev, .. } => Some(dev),
            Translate::PageCache { .. } => None,
        }
    }

    /// Map one event to VM-disk byte ranges (appended to `out`); returns false
    /// when the event does not concern this target at all.
    pub fn map_event(&self, ev: &Event, out: &mut Vec<(u64, u64)>) -> bool {
        match &self.translate {
            Translate::Range { dev, start } => {
                if ev.kind != KIND_BLOCK || ev.dev != *dev {
                    return false;
                }
                let a = ev.start.saturating_mul(SECTOR);
                let b = a.saturating_add(u64::from(ev.len) * SECTOR);
                let (lo, hi) = (*start, start.saturating_add(self.disk_size));
                if b <= lo || a >= hi {
                    return false;
                }
                let (a, b) = (a.max(lo), b.min(hi));
                out.push((a - start, b - a));
                true
            }
            Translate::File { dev, extents } => {
                if ev.kind != KIND_BLOCK || ev.dev != *dev {
                    return false;
                }
                let a = ev.start.saturating_mul(SECTOR);
                let b = a.saturating_add(u64::from(ev.len) * SECTOR);
                // First extent that could overlap: the last one starting at or before `a`.
                let i = extents
                    .partition_point(|e| e.physical <= a)
                    .saturating_sub(1);
                let mut hit = false;
                for e in &extents[i..] {
                    if e.physical >= b {
                        break;
                    }
                    let (lo, hi) = (a.max(e.physical), b.min(e.physical + e.length));
                    if lo < hi {
                        out.push((e.logical + (lo - e.physical), hi - lo));
                        hit = true;
                    }
                }
                hit
            }
            Translate::PageCache { dev, .. } => {
                if ev.kind != KIND_PAGE_CACHE || ev.dev != *dev {
                    return false;
                }
                let page = page_size();
                out.push((ev.start.saturating_mul(page), u64::from(ev.len) * page));
                true
            }
        }
    }
}

/// The page size, which `mm_filemap_get_pages` indexes are counted in.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as u64
    } else {
        4096
    }
}

/// Userspace `dev_t` to (major, minor).
pub fn split_dev(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// A block device as sysfs describes it.
struct BlockDev {
    /// Size in bytes.
    size: u64,
    /// For a partition: parent disk's (major, minor) and the partition's start in bytes.
    partition_of: Option<(u32, u32, u64)>,
}

impl BlockDev {
    fn from_numbers(major: u32, minor: u32) -> Result<BlockDev, TargetError> {
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let dir = fs::canonicalize(&sys).map_err(|e| TargetError::Sysfs {
            path: sys.clone(),
            msg: format!("no such block device ({e})"),
        })?;
        let size = read_u64(&dir.join("size"))? * SECTOR;
        let partition_of = if dir.join("partition").exists() {
            let start = read_u64(&dir.join("start"))? * SECTOR;
            let parent = dir.parent().ok_or_else(|| TargetError::Sysfs {
                path: dir.clone(),
                msg: "partition without a parent disk".into(),
            })?;
            let (pmaj, pmin) = read_dev(&parent.join("dev"))?;
            Some((pmaj, pmin, start))
        } else {
            None
        };
        Ok(BlockDev { size, partition_of })
    }
}

fn read_u64(path: &Path) -> Result<u64, TargetError> {
    let text = fs::read_to_string(path).map_err(|source| TargetError::Io {
        path: path.to_owned(),
        source,
    })?;
    text.trim().parse().map_err(|_| TargetError::Sysfs {
        path: path.to_owned(),
        msg: format!("expected a number, found {:?}", text.trim()),
    })
}

fn read_dev(path: &Path) -> Result<(u32, u32), TargetError> {
    let text = fs::read_to_string(path).map_err(|source| TargetError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = || TargetError::Sysfs {
        path: path.to_owned(),
        msg: format!("expected MAJOR:MINOR, found {:?}", text.trim()),
    };
    let (a, b) = text.trim().split_once(':').ok_or_else(bad)?;
    Ok((a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(start: u64, len: u32, dev: u32) -> Event {
        Event {
            ts_ns: 0,
            start,
            len,
            dev,
            tgid: 0,
            kind: KIND_BLOCK,
            flags: 0,
            _pad: [0; 2],
        }
    }

    fn target(translate: Translate, disk_size: u64) -> Target {
        Target {
            path: "x".into(),
            name: "x".into(),
            disk_size,
            translate,
            description: String::new(),
        }
    }

    #[test]
    fn partition_range_is_clipped_and_shifted() {
        let t = target(
            Translate::Range {
                dev: 7,
                start: 1 << 20,
            },
            1 << 20,
        );
        let mut out = Vec::new();
        assert!(!t.map_event(&ev(0, 8, 7), &mut out));
        assert!(!t.map_event(&ev(2048, 8, 8), &mut out));
        assert!(t.map_event(&ev(2048 + 8, 8, 7), &mut out));
        assert!(t.map_event(&ev(4096 - 4, 8, 7), &mut out));
        assert_eq!(out, vec![(4096, 4096), ((1 << 20) - 2048, 2048)]);
    }

    #[test]
    fn file_extents_translate_back() {
        let extents = vec![
            FileExtent {
                logical: 8192,
                physical: 1 << 20,
                length: 8192,
            },
            FileExtent {
                logical: 0,
                physical: 4 << 20,
                length: 8192,
            },
        ];
        let t = target(Translate::File { dev: 7, extents }, 16384);
        let mut out = Vec::new();
        // Host read spanning the end of the first extent and a foreign block.
        assert!(t.map_event(&ev(((1 << 20) + 4096) / 512, 16, 7), &mut out));
        assert!(t.map_event(&ev((4 << 20) / 512, 8, 7), &mut out));
        assert!(!t.map_event(&ev(0, 8, 7), &mut out));
        assert_eq!(out, vec![(12288, 4096), (0, 4096)]);
    }
}
