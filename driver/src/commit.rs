//! `livemount commit`: keep what a VM changed during a live mount, as a new snapshot.
//!
//! Reads the base snapshot through its overlay (exactly what the device showed) and
//! backs it up like any image: only chunks the store lacks are written, so a commit of
//! a lightly changed disk costs little. The overlay is locked while it is read, so it
//! cannot be committed while a mount is writing it.

use crate::backup::{backup_from, BackupOptions, BackupReport};
use crate::error::{Error, Result};
use crate::mount::{prepare, MountConfig};
use crate::overlay::read_identity;
use crate::progress::Progress;
use crate::store::{Access, Store};
use crate::ublk::BlockBackend;
use std::io::Read;
use std::path::Path;

/// Sequential reader over a block backend, for the backup pipeline. Reads are done in
/// whole sectors (the overlay's granularity) and trimmed to the image size.
struct DeviceReader<'a> {
    dev: &'a dyn BlockBackend,
    pos: u64,
    size: u64,
}

impl Read for DeviceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.size - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let aligned = n.div_ceil(512) * 512;
        let res = if aligned == n {
            self.dev.read(self.pos, &mut buf[..n])
        } else {
            let mut tmp = vec![0u8; aligned];
            self.dev
                .read(self.pos, &mut tmp)
                .map(|_| buf[..n].copy_from_slice(&tmp[..n]))
        };
        res.map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Commit `overlay` (over the snapshot it records) as a new snapshot of `opts.series`.
pub fn commit(
    store_dir: &Path,
    overlay: &Path,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    if !overlay.is_file() {
        return Err(Error::Invalid(format!(
            "overlay {} does not exist",
            overlay.display()
        )));
    }
    let identity = read_identity(overlay)?;
    let mut config = MountConfig::new(
        store_dir.to_path_buf(),
        identity.snapshot.clone(),
        Some(overlay.to_path_buf()),
    );
    config.cache_mem = 64 << 20;
    // Pre-staging is for boots, not for a sequential read of the whole disk.
    config.prestage = "none".into();
    let prepared = prepare(&config, |s| s)?;
    let store = Store::open(store_dir, Access::Write)?;
    let size = prepared.backend.image_size();
    let mut reader = DeviceReader {
        dev: prepared.backend.as_ref(),
        pos: 0,
        size,
    };
    let description = format!("{} + overlay {}", identity.snapshot, overlay.display());
    backup_from(
        &store,
        &mut reader,
        size,
        overlay,
        &description,
        opts,
        progress,
    )
}
