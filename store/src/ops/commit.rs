//! `livemount commit`: keep what a VM changed during a live mount, as a new snapshot.
//!
//! The caller hands over the merged image (base snapshot + overlay, exactly what the
//! device showed) as an [`ImageRead`]; it is backed up like any image, so only chunks
//! the store lacks are written and a commit of a lightly changed disk costs little.
//! The store crate knows nothing of overlays or block devices: the driver builds the
//! stack and locks the overlay while it is read.

use crate::error::Result;
use crate::format::index::ChunkRef;
use crate::ops::backup::{backup_from, BackupOptions, BackupReport};
use crate::progress::Progress;
use crate::store::Store;
use std::io::Read;
use std::path::Path;

/// Something read like a disk, at any offset: what a commit backs up.
pub trait ImageRead: Send + Sync {
    /// Bytes in the image.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset` (whole 512-byte sectors; the caller trims).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// If `offset..offset+len` is exactly one chunk of the base snapshot that the
    /// overlay never wrote, its entry: taken without reading, so a commit costs
    /// what the VM wrote, not the size of the disk.
    fn unchanged(&self, offset: u64, len: u64) -> Option<ChunkRef> {
        let _ = (offset, len);
        None
    }
}

/// Sequential reader over an [`ImageRead`], for the backup pipeline. Reads are done
/// in whole sectors (the overlay's granularity) and trimmed to the image size.
struct SequentialReader<'a> {
    image: &'a dyn ImageRead,
    pos: u64,
    size: u64,
}

/// Chunks the overlay never wrote come from the base snapshot's index.
impl crate::ops::backup::SourceRead for SequentialReader<'_> {
    fn unchanged(&mut self, start: u64, end: u64) -> Option<ChunkRef> {
        (start == self.pos)
            .then(|| self.image.unchanged(start, end - start))
            .flatten()
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        self.pos = (self.pos + n).min(self.size);
        Ok(())
    }
}

impl Read for SequentialReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.size - self.pos).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let aligned = n.div_ceil(512) * 512;
        let res = if aligned == n {
            self.image.read_at(self.pos, &mut buf[..n])
        } else {
            let mut tmp = vec![0u8; aligned];
            self.image
                .read_at(self.pos, &mut tmp)
                .map(|_| buf[..n].copy_from_slice(&tmp[..n]))
        };
        res.map_err(|e| std::io::Error::other(e.to_string()))?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Back up `image` (read from `source`, described as `description` in the index) as a
/// new snapshot of `opts.series`.
pub fn commit(
    store: &Store,
    image: &dyn ImageRead,
    source: &Path,
    description: &str,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let size = image.size();
    let mut reader = SequentialReader {
        image,
        pos: 0,
        size,
    };
    backup_from(
        store,
        &mut reader,
        crate::ops::backup::SourceInfo {
            size,
            path: source,
            description,
        },
        opts,
        None,
        progress,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Access;

    /// An image whose byte at `i` is `i % 251`, with an odd size so the last read is
    /// trimmed from a whole sector.
    struct Pattern(u64);

    impl ImageRead for Pattern {
        fn size(&self) -> u64 {
            self.0
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            assert_eq!(offset % 512, 0, "sector-aligned reads only");
            assert_eq!(buf.len() % 512, 0, "whole sectors only");
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset + i as u64) % 251) as u8;
            }
            Ok(())
        }
    }

    #[test]
    fn commit_backs_up_exactly_the_image_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Access::Write).unwrap();
        let image = Pattern(3 * 1024 * 1024 + 700);
        let opts = BackupOptions {
            series: "vm".into(),
            chunk_size: Some(1 << 20),
            level: 1,
            threads: 1,
        };
        let report = commit(
            &store,
            &image,
            Path::new("/overlay"),
            "test",
            &opts,
            &crate::progress::NoProgress,
        )
        .unwrap();
        let snap = store.resolve(&report.snapshot).unwrap();
        let out = dir.path().join("restored");
        crate::ops::restore::restore(&store, &snap, &out, false, 1, &crate::progress::NoProgress)
            .unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len() as u64, image.0);
        assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }
}
