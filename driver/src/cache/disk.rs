//! Disk tier of the read cache: compressed chunk bytes copied from the store into a
//! local directory, shared by every mount and process on the host that names the
//! same `--cache-dir`, so a chunk fetched by one mount is a hit for all the others
//! (VMs cloned from one template share most chunks), and kept across restarts.
//!
//! # Layout
//! ```text
//! DIR/<hex id>   one sparse file per chunk: the fetched byte ranges of the chunk file
//!                at their original offsets; ranges never fetched are holes
//! DIR/.usage     8 bytes, little-endian: bytes allocated by chunk files, for the one
//!                budget of every process (updated under flock of this file)
//! DIR/.users     flock: shared by every open tier; exclusive (once, at open) means
//!                "nobody else uses the directory": the counter is recomputed then
//! DIR/.evict     flock: held by the one process evicting at a time
//! ```
//!
//! A fetch from the store holds an OFD byte-range lock on the range of the chunk
//! file it fills ([`DiskTier::lock_fill`]): a mount of this or another process that
//! misses the same bytes meanwhile waits for it and then reads them here, so N
//! mounts of clones of one template fetch a shared chunk once, not N times.
//! Disjoint ranges do not wait for each other; the wait is bounded
//! ([`FILL_WAIT`]) and a killed holder's lock goes with its process.
//!
//! Nothing here is trusted: every read is verified by the caller against the chunk
//! id (a hole, a damaged range, or a file another process evicted between open and
//! read fails verification or reads nothing, and is fetched again). Files are only
//! ever written with verified bytes at their offsets, so two processes filling one
//! chunk write identical bytes. Eviction unlinks whole chunk files, least recently
//! used first by modification time (a read touches it, at most every
//! [`TOUCH_EVERY`] per process), down to 90% of the budget, and rewrites the counter
//! from what it found (so a process killed between a write and its count leaves no
//! lasting drift).

use crate::error::{IoContext, Result};
use hashbrown::HashMap;
use livemount_store::format::chunk::ChunkId;
use std::fs::{self, File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often one process refreshes a chunk file's last-use time.
pub const TOUCH_EVERY: Duration = Duration::from_secs(10);

/// How long a fetch waits for another mount's fill of the same bytes before it
/// fetches them itself (a holder waiting on a store that went away must not hold
/// every other mount for the whole store timeout).
pub const FILL_WAIT: Duration = Duration::from_secs(5);

/// After a wait for a chunk's fill timed out, fetches of that chunk do not wait
/// for this long (a stopped or stuck holder must not cost every later read
/// [`FILL_WAIT`] again).
const STUCK_FOR: Duration = Duration::from_secs(60);

/// Background fills (pre-staging, read-ahead, a migration's copier) lock their
/// ranges this far into the file's lock space, so a demand fetch never waits behind
/// one: the store holds background requests back while demand reads wait, which
/// would make the two wait for each other. A background fill does wait while a
/// demand fill of its bytes runs.
const BACKGROUND_LANE: i64 = 1 << 62;

/// A held fill lock ([`DiskTier::lock_fill`]); released when dropped.
pub struct FillLock {
    _file: File,
    /// Another fill held the range first: its bytes may be in the tier now.
    pub waited: bool,
}

/// The on-disk tier.
pub struct DiskTier {
    dir: PathBuf,
    budget: u64,
    usage: File,
    evict: File,
    /// Held (shared) for the tier's life: see the module docs.
    _users: File,
    touched: Mutex<HashMap<ChunkId, Instant>>,
    /// Chunks whose fill lock a wait timed out on, and when.
    stuck: Mutex<HashMap<ChunkId, Instant>>,
    /// flock excludes other open files, not this process's threads (they share one
    /// descriptor): updates and evictions also take this.
    local: Mutex<()>,
    evicting: Mutex<()>,
}

fn open_private(path: &Path, read: bool) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(!read)
        .create(!read)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .at(path)?;
    if !f.metadata().at(path)?.file_type().is_file() {
        return Err(crate::error::Error::Invalid(format!(
            "disk cache: {} is not a regular file",
            path.display()
        )));
    }
    Ok(f)
}

fn lock(f: &File, exclusive: bool, wait: bool) -> std::io::Result<()> {
    livemount_store::fsutil::flock(f, exclusive, wait)
}

/// Set the OFD lock `fl` on `f` without waiting: None when taken, Some(true) when
/// another holds an overlapping range, Some(false) when it cannot be had at all.
fn set_lock(f: &File, fl: &libc::flock) -> Option<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor `f` owns, with a pointer to a live flock.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, fl) } == 0 {
        return None;
    }
    Some(matches!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EAGAIN | libc::EACCES)
    ))
}

/// Some(true) while another open file holds a lock overlapping `fl` (a demand
/// fill of those bytes), None when there is none; Some(false) on an error.
fn demand_filling(f: &File, mut fl: libc::flock) -> Option<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor `f` owns, with a pointer to a live flock it
    // fills in.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Some(false);
    }
    (fl.l_type != libc::F_UNLCK as libc::c_short).then_some(true)
}

fn unlock(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid descriptor owned by `f`; no memory is passed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
}

/// Allocated bytes of every chunk file, with its last-use time.
fn scan(dir: &Path) -> Result<Vec<(i64, ChunkId, u64)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).at(dir)? {
        let e = e.at(dir)?;
        let Some(id) = e.file_name().to_str().and_then(ChunkId::from_hex) else {
            continue;
        };
        // Removed by another process since readdir: not there.
        let Ok(m) = e.metadata() else { continue };
        if m.file_type().is_file() {
            out.push((m.mtime(), id, m.blocks() * 512));
        }
    }
    Ok(out)
}

impl DiskTier {
    /// Open (creating, mode 0700) the cache directory `dir` with a budget of `budget`
    /// bytes for every process that uses it. The budget of the latest opener wins
    /// (the counter is shared, the budget is each process's own check).
    pub fn open(dir: impl Into<PathBuf>, budget: u64) -> Result<DiskTier> {
        let dir = dir.into();
        // A root daemon writes here: a planted symlink (the directory itself, or a
        // file in it) must never redirect those writes.
        crate::paths::ensure_dir(&dir)?;
        let users = open_private(&dir.join(".users"), false)?;
        let usage = open_private(&dir.join(".usage"), false)?;
        let evict = open_private(&dir.join(".evict"), false)?;
        let tier = DiskTier {
            dir,
            budget,
            usage,
            evict,
            _users: users,
            touched: Mutex::new(HashMap::new()),
            stuck: Mutex::new(HashMap::new()),
            local: Mutex::new(()),
            evicting: Mutex::new(()),
        };
        // Alone: count what earlier runs left. Not alone: trust the shared counter.
        if lock(&tier._users, true, false).is_ok() {
            let total = scan(&tier.dir)?.iter().map(|f| f.2).sum();
            tier.update(|_| total)?;
        }
        lock(&tier._users, false, true).at(tier.dir.join(".users"))?;
        Ok(tier)
    }

    fn path(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// Apply `f` to the shared counter under its lock; returns the new value.
    fn update(&self, f: impl FnOnce(u64) -> u64) -> Result<u64> {
        let path = self.dir.join(".usage");
        let _local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a process stopped while holding it (SIGSTOP, a frozen cgroup)
        // must not stall every other mount's reads; an uncounted write is
        // corrected by the next eviction's scan.
        let mut tries = 0;
        while let Err(e) = lock(&self.usage, true, false) {
            tries += 1;
            if tries > 200 {
                return Err(crate::error::Error::io(&path, e));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let res = (|| {
            let mut b = [0u8; 8];
            let n = self.usage.read_at(&mut b, 0).at(&path)?;
            let old = if n == 8 { u64::from_le_bytes(b) } else { 0 };
            let new = f(old);
            self.usage.write_all_at(&new.to_le_bytes(), 0).at(&path)?;
            Ok(new)
        })();
        unlock(&self.usage);
        res
    }

    /// Bytes on disk, by every process using the directory.
    pub fn bytes(&self) -> u64 {
        let mut b = [0u8; 8];
        match self.usage.read_at(&mut b, 0) {
            Ok(8) => u64::from_le_bytes(b),
            _ => 0,
        }
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
        let due = match self.touched.lock() {
            Ok(mut t) => {
                let now = Instant::now();
                let due = t
                    .get(id)
                    .is_none_or(|at| now.duration_since(*at) >= TOUCH_EVERY);
                if due {
                    // Bounded: forgetting touches only costs an early re-touch.
                    if t.len() >= 65_536 {
                        t.clear();
                    }
                    t.insert(*id, now);
                }
                due
            }
            Err(_) => false,
        };
        if due {
            // The last-use time every process's eviction sees (best effort).
            let _ = f.set_modified(SystemTime::now());
        }
        Some(buf)
    }

    /// Take the host-wide fill lock of `range` of chunk `id`'s file (in the demand
    /// or the background lane, see [`BACKGROUND_LANE`]), waiting at most `limit`
    /// while another fill (this process or another) holds an overlapping range.
    /// `None` when it cannot be had (timed out, or the file system has no OFD
    /// locks): the caller fetches anyway; the lock only saves duplicate fetches,
    /// correctness never depends on it (every read is verified).
    pub fn lock_fill(
        &self,
        id: &ChunkId,
        range: Range<u64>,
        demand: bool,
        limit: Duration,
    ) -> Option<FillLock> {
        let f = open_private(&self.path(id), false).ok()?;
        let start = i64::try_from(range.start)
            .ok()
            .filter(|s| *s < BACKGROUND_LANE)?;
        let len = i64::try_from(range.end.saturating_sub(range.start).max(1)).ok()?;
        let lock = |at: i64| {
            // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            (fl.l_start, fl.l_len) = (at, len);
            fl
        };
        let limit = match self.stuck.lock() {
            Ok(s) if s.get(id).is_some_and(|t| t.elapsed() < STUCK_FOR) => Duration::ZERO,
            _ => limit,
        };
        let started = Instant::now();
        let mut pause = Duration::from_micros(200);
        let mut waited = false;
        loop {
            let busy = if demand {
                set_lock(&f, &lock(start))
            } else {
                // A demand fill of these bytes first, then our own lane.
                demand_filling(&f, lock(start))
                    .or_else(|| set_lock(&f, &lock(start + BACKGROUND_LANE)))
            };
            match busy {
                None => return Some(FillLock { _file: f, waited }),
                Some(false) => return None,
                Some(true) => {}
            }
            if started.elapsed() >= limit {
                if limit > Duration::ZERO {
                    if let Ok(mut s) = self.stuck.lock() {
                        s.retain(|_, t| t.elapsed() < STUCK_FOR);
                        s.insert(*id, Instant::now());
                    }
                }
                return None;
            }
            // Polled, not blocking: a blocking lock could not be given up after
            // `limit`. The pause stays far below a store request's latency.
            waited = true;
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
    }

    /// Store bytes of chunk `id`'s file at `offset` (verified ranges, or a whole chunk
    /// fetched by read-ahead; either way every later read is verified again), then
    /// evict while the directory is over budget. Errors (e.g. a full disk) are
    /// returned; callers treat the cache as optional and keep serving from the store.
    pub fn write(&self, id: &ChunkId, offset: u64, bytes: &[u8]) -> Result<()> {
        let path = self.path(id);
        let f = open_private(&path, false)?;
        let before = f.metadata().at(&path)?.blocks() * 512;
        f.write_all_at(bytes, offset).at(&path)?;
        let after = f.metadata().at(&path)?.blocks() * 512;
        let total = self.update(|t| t + after.saturating_sub(before))?;
        if total > self.budget {
            self.evict(id)?;
        }
        Ok(())
    }

    /// Remove least recently used chunk files (never `keep`) until the directory
    /// holds at most 90% of the budget. One process evicts at a time; the others
    /// go on (they will find the directory below budget again).
    fn evict(&self, keep: &ChunkId) -> Result<()> {
        // One evicting thread per process, and one process at a time.
        let Ok(_evicting) = self.evicting.try_lock() else {
            return Ok(());
        };
        if lock(&self.evict, true, false).is_err() {
            return Ok(());
        }
        let res = (|| {
            let mut files = scan(&self.dir)?;
            files.sort();
            let mut total: u64 = files.iter().map(|f| f.2).sum();
            let target = self.budget / 10 * 9;
            for (_, id, bytes) in files {
                if total <= target {
                    break;
                }
                if id == *keep {
                    continue;
                }
                match fs::remove_file(self.path(&id)) {
                    Ok(()) => total = total.saturating_sub(bytes),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        total = total.saturating_sub(bytes)
                    }
                    Err(e) => return Err(crate::error::Error::io(self.path(&id), e)),
                }
            }
            self.update(|_| total)
        })();
        unlock(&self.evict);
        res.map(|_| ())
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
        drop(tier);
        // Reopening skips it instead of counting it as a cached chunk.
        let again = DiskTier::open(&dir, 1 << 20).unwrap();
        assert_eq!(again.bytes(), 0);
        // A planted .usage symlink is refused too.
        let dir2 = d.path().join("cache2");
        std::fs::create_dir(&dir2).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir2, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&victim, dir2.join(".usage")).unwrap();
        assert!(DiskTier::open(&dir2, 1 << 20).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    fn id(n: u32) -> ChunkId {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&n.to_le_bytes());
        ChunkId(b)
    }

    #[test]
    fn tiers_sharing_a_directory_share_one_budget_and_each_others_chunks() {
        let d = tempfile::tempdir().unwrap();
        let budget = 8 << 20;
        // Two tiers on one directory: what two processes (two mounts) have.
        let a = DiskTier::open(d.path(), budget).unwrap();
        let b = DiskTier::open(d.path(), budget).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        a.write(&id(0), 0, &chunk).unwrap();
        // A chunk fetched by one is a hit for the other.
        assert_eq!(b.read(&id(0), 0, 16).unwrap(), vec![0x5a; 16]);
        for n in 1..40 {
            let t = if n % 2 == 0 { &a } else { &b };
            t.write(&id(n), 0, &chunk).unwrap();
            let on_disk: u64 = scan(d.path()).unwrap().iter().map(|f| f.2).sum();
            // Within the budget (plus the chunk being written) at every step, and
            // both see the same count.
            assert!(on_disk <= budget + (1 << 20), "{on_disk} > {budget} at {n}");
            assert_eq!(a.bytes(), b.bytes());
        }
        assert!(a.bytes() <= budget);
        // The newest survived, the oldest went.
        assert!(b.read(&id(39), 0, 1).is_some());
        assert!(a.read(&id(1), 0, 1).is_none());
    }

    #[test]
    fn threads_of_one_process_never_lose_a_count() {
        let d = tempfile::tempdir().unwrap();
        let tier = std::sync::Arc::new(DiskTier::open(d.path(), 1 << 40).unwrap());
        std::thread::scope(|s| {
            for t in 0..8u32 {
                let tier = tier.clone();
                s.spawn(move || {
                    for n in 0..40 {
                        tier.write(&id(t * 1000 + n), 0, &[t as u8; 8192]).unwrap();
                    }
                });
            }
        });
        let on_disk: u64 = scan(d.path()).unwrap().iter().map(|f| f.2).sum();
        assert_eq!(tier.bytes(), on_disk);
    }

    #[test]
    fn a_lone_opener_recounts_what_a_killed_process_left() {
        let d = tempfile::tempdir().unwrap();
        let a = DiskTier::open(d.path(), 64 << 20).unwrap();
        a.write(&id(1), 0, &vec![1u8; 1 << 20]).unwrap();
        drop(a);
        // A killed writer's bytes that never reached the counter.
        std::fs::write(d.path().join(id(2).to_hex()), vec![2u8; 1 << 20]).unwrap();
        let b = DiskTier::open(d.path(), 64 << 20).unwrap();
        let on_disk: u64 = scan(d.path()).unwrap().iter().map(|f| f.2).sum();
        assert_eq!(b.bytes(), on_disk);
        assert!(on_disk >= 2 << 20);
    }
}
