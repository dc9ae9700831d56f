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
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
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
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .at(&dir)?;
        let mut files = HashMap::new();
        let mut total = 0;
        let mut by_age = Vec::new();
        for e in fs::read_dir(&dir).at(&dir)? {
            let e = e.at(&dir)?;
            let Some(id) = e.file_name().to_str().and_then(ChunkId::from_hex) else {
                continue;
            };
            let m = e.metadata().at(e.path())?;
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
        let f = fs::File::open(self.path(id)).ok()?;
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
            .open(&path)
            .at(&path)?;
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
