//! `livemount restore`: write a snapshot back to a file or block device.
//!
//! Files are written under a temporary name next to the target and renamed when
//! complete and synced, so a killed restore never leaves a half image under the
//! target's name. Zero chunks and zero frames become holes in files; block devices get
//! explicit zeros, since their old content is not known to be zero.

use crate::backend::{read_verified, Expected, ReadClass};
use crate::error::{Error, IoContext, Result};
use crate::format::index::ChunkRef;
use crate::progress::Progress;
use crate::store::{SnapshotRef, Store};
use serde::Serialize;
use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Figures of one restore.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    /// The snapshot restored.
    pub snapshot: String,
    /// The target written.
    pub target: PathBuf,
    /// Image bytes.
    pub image_size: u64,
    /// Bytes actually written (holes excluded).
    pub bytes_written: u64,
    /// Wall time.
    pub seconds: f64,
    /// image_size / seconds, MiB/s.
    pub throughput_mib_s: f64,
}

/// Restore `snap` to `target`. An existing non-empty regular file is replaced only
/// with `force`.
pub fn restore(
    store: &Store,
    snap: &SnapshotRef,
    target: &Path,
    force: bool,
    threads: usize,
    progress: &dyn Progress,
) -> Result<RestoreReport> {
    let start = Instant::now();
    let index = store.load_index(snap)?;
    let (file, write_path, is_block) = open_target(target, snap, index.image_size, force)?;
    let written = std::sync::atomic::AtomicU64::new(0);
    let zeros = vec![0u8; index.chunk_size as usize];
    let res = crate::workers::parallel_map(index.chunks.len(), threads, |i| {
        let offset = i as u64 * index.chunk_size as u64;
        let len = index.chunk_len(i) as usize;
        match index.chunks[i] {
            ChunkRef::Zero => {
                if is_block {
                    file.write_all_at(&zeros[..len], offset).at(&write_path)?;
                    written.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
            ChunkRef::Stored(id) => {
                let expected = Expected {
                    content_len: len as u32,
                    frame_size: index.frame_size,
                };
                let data = read_verified(store.chunks(), &id, Some(expected), ReadClass::Demand)?;
                // Skip all-zero frames in files so the image stays sparse.
                for (j, part) in data.chunks(index.frame_size as usize).enumerate() {
                    if is_block || part.iter().any(|&b| b != 0) {
                        let at = offset + (j * index.frame_size as usize) as u64;
                        file.write_all_at(part, at).at(&write_path)?;
                        written.fetch_add(part.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        }
        progress.inc(len as u64);
        Ok(())
    });
    progress.finish();
    let finish = res.and_then(|_| file.sync_all().at(&write_path));
    if let Err(e) = finish {
        if !is_block {
            let _ = fs::remove_file(&write_path);
        }
        return Err(e);
    }
    if !is_block {
        fs::rename(&write_path, target).at(target)?;
        if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fsutil::fsync_dir(dir)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(RestoreReport {
        snapshot: snap.to_string(),
        target: target.to_path_buf(),
        image_size: index.image_size,
        bytes_written: written.into_inner(),
        seconds: secs,
        throughput_mib_s: index.image_size as f64 / 1048576.0 / secs.max(1e-9),
    })
}

/// Open the restore target: a block device large enough (written in place), or a
/// new sparse file `target.partial` (renamed over `target` when complete; an existing
/// non-empty file only with `force`). Returns the file, where it writes, and whether
/// it is a block device.
fn open_target(
    target: &Path,
    snap: &SnapshotRef,
    image_size: u64,
    force: bool,
) -> Result<(fs::File, PathBuf, bool)> {
    let is_block = fs::metadata(target)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let (file, write_path) = if is_block {
        let mut f = OpenOptions::new().write(true).open(target).at(target)?;
        let size = f.seek(SeekFrom::End(0)).at(target)?;
        if size < image_size {
            return Err(Error::Invalid(format!(
                "restore target {} is too small: {size} bytes, snapshot {snap} needs {}",
                target.display(),
                image_size
            )));
        }
        (f, target.to_path_buf())
    } else {
        match fs::metadata(target) {
            Ok(m) if m.is_dir() => {
                return Err(Error::Invalid(format!(
                    "restore target {} is a directory",
                    target.display()
                )))
            }
            Ok(m) if !m.is_file() => {
                return Err(Error::Invalid(format!(
                    "restore target {} is not a regular file or block device",
                    target.display()
                )))
            }
            Ok(m) if m.len() > 0 && !force => {
                return Err(Error::Invalid(format!(
                    "restore target {} exists; pass --force to overwrite it",
                    target.display()
                )))
            }
            _ => {}
        }
        let partial = partial_path(target);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .at(&partial)?;
        f.set_len(image_size).at(&partial)?;
        (f, partial)
    };

    Ok((file, write_path, is_block))
}

fn partial_path(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".livemount-partial");
    target.with_file_name(name)
}
