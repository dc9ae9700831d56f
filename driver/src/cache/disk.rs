//! Disk tier of the read cache: compressed chunk bytes copied from the store into a
//! local directory, so they survive a daemon restart and can be pre-staged.
//!
//! Each chunk has one sparse file `DIR/<hex id>` holding the fetched byte ranges of the
//! chunk file at their original offsets; ranges never fetched are holes. Nothing here
//! is trusted: every read is verified by the caller against the chunk id (a hole or a
//! damaged range fails verification and is fetched again). The budget is enforced by
//! evicting whole chunk files, least recently used first.

use crate::error::{IoContext, Result};
use hashbrown::HashMap;
use livemount_store::format::chunk::ChunkId;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Mutex;

struct State {
    /// Allocated bytes and last-use tick of each chunk file.
    files: HashMap<ChunkId, (u64, u64)>,
    total: u64,
    tick: u64,
}

/// The on-disk tier.
pub struct DiskTier {
    dir: PathBuf,
    budget: u64,
    state: Mutex<State>,
}

impl DiskTier {
    /// Open (creating, mode 0700) the cache directory `dir` with a budget of `budget`
    /// bytes, taking stock of files left by an earlier run.
    pub fn open(dir: impl Into<PathBuf>, budget: u64) -> Result<DiskTier> {
        let dir = dir.into();
        // A root daemon writes here: a planted symlink (the directory itself, or a
        // file in it) must never redirect those writes.
        crate::paths::ensure_dir(&dir)?;
        let mut files = HashMap::new();
        let mut total = 0;
        let mut by_age = Vec::new();
        for e in fs::read_dir(&dir).at(&dir)? {
            let e = e.at(&dir)?;
            let Some(id) = e.file_name().to_str().and_then(ChunkId::from_hex) else {
                continue;
            };
            let m = e.metadata().at(e.path())?;
            if !m.file_type().is_file() {
                continue; // not ours (a symlink or a FIFO planted here): never opened
            }
            by_age.push((m.mtime(), id, m.blocks() * 512));
        }
        by_age.sort();
        for (tick, (_, id, bytes)) in by_age.into_iter().enumerate() {
            files.insert(id, (bytes, tick as u64));
            total += bytes;
        }
        let tick = files.len() as u64;
        Ok(DiskTier {
            dir,
            budget,
            state: Mutex::new(State { files, total, tick }),
        })
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.state.lock().map(|s| s.total).unwrap_or(0)
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// True if writing `more` bytes would exceed the budget (pre-staging stops there
    /// instead of evicting what it already staged).
    pub fn would_exceed(&self, more: u64) -> bool {
        self.bytes() + more > self.budget
    }

    /// Read `len` bytes at `offset` of chunk `id`'s cached file, if the file exists.
    /// Holes read as zeros (and then fail the caller's verification).
    pub fn read(&self, id: &ChunkId, offset: u64, len: usize) -> Option<Vec<u8>> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(self.path(id))
            .ok()?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).ok()?;
        if let Ok(mut s) = self.state.lock() {
            s.tick += 1;
            let t = s.tick;
            if let Some(e) = s.files.get_mut(id) {
                e.1 = t;
            }
        }
        Some(buf)
    }

    /// Store bytes of chunk `id`'s file at `offset` (verified ranges, or a whole chunk
    /// fetched by read-ahead; either way every later read is verified again), then
    /// evict other chunks while over budget. Errors (e.g. a full disk) are returned; callers treat the
    /// cache as optional and keep serving from the store.
    pub fn write(&self, id: &ChunkId, offset: u64, bytes: &[u8]) -> Result<()> {
        let path = self.path(id);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .at(&path)?;
        if !f.metadata().at(&path)?.file_type().is_file() {
            return Err(crate::error::Error::Invalid(format!(
                "disk cache: {} is not a regular file",
                path.display()
            )));
        }
        f.write_all_at(bytes, offset).at(&path)?;
        let allocated = f.metadata().at(&path)?.blocks() * 512;
        let victims = {
            let Ok(mut s) = self.state.lock() else {
                return Ok(());
            };
            s.tick += 1;
            let t = s.tick;
            let old = s
                .files
                .insert(*id, (allocated, t))
                .map(|e| e.0)
                .unwrap_or(0);
            s.total = s.total.saturating_sub(old) + allocated;
            let mut victims = Vec::new();
            while s.total > self.budget {
                let Some((&vid, &(vb, _))) = s
                    .files
                    .iter()
                    .filter(|(k, _)| *k != id)
                    .min_by_key(|(_, v)| v.1)
                else {
                    break;
                };
                s.files.remove(&vid);
                s.total -= vb.min(s.total);
                victims.push(vid);
            }
            victims
        };
        for v in victims {
            let _ = fs::remove_file(self.path(&v));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_symlinks_are_never_written_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        // The cache directory itself a symlink: refused.
        let link_dir = d.path().join("cache-link");
        std::os::unix::fs::symlink(d.path(), &link_dir).unwrap();
        assert!(DiskTier::open(&link_dir, 1 << 20).is_err());
        // A chunk file in it a symlink: the write fails, the target is untouched,
        // and a read does not follow it either.
        let dir = d.path().join("cache");
        let tier = DiskTier::open(&dir, 1 << 20).unwrap();
        let id = ChunkId([7; 32]);
        std::os::unix::fs::symlink(&victim, dir.join(id.to_hex())).unwrap();
        assert!(tier.write(&id, 0, b"planted").is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(tier.read(&id, 0, 4).is_none());
        // Reopening skips it instead of counting it as a cached chunk.
        let again = DiskTier::open(&dir, 1 << 20).unwrap();
        assert_eq!(again.bytes(), 0);
    }
}
