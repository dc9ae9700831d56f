//! Live migration: copy a running mount to local storage (a raw image file or a
//! block device, the TARGET) without stopping it, then serve from TARGET alone.
//!
//! The layer sits under the recorder, over the overlay. Idle, it passes everything
//! through. Migrating:
//! - a background copier reads every region (one snapshot chunk) of the device from
//!   the layer below — overlay where the VM wrote, snapshot elsewhere — and writes it
//!   into TARGET, profile regions first, yielding to demand reads and at most
//!   `rate` bytes/s;
//! - every VM write and discard goes below *and* into TARGET before it completes, so
//!   TARGET never misses a write;
//! - a copy races a VM write to its region: the copier reads without a lock, then
//!   takes the region's stripe lock and writes into TARGET only if no VM write
//!   touched the stripe meanwhile (its generation is unchanged), else it reads again.
//!   VM writes hold the same lock while they write below and into TARGET. No stale
//!   copy can land over a newer write;
//! - once every region is copied, the layer serves reads and writes from TARGET
//!   alone: the store, the cache and the overlay are no longer used.
//!
//! # Progress map (`TARGET.lmmig`, or `OVERLAY.lmmig` for a block-device target)
//! ```text
//!  0 magic [u8; 8] b"LMMIGR\x01\0"   8 boot_id [u8; 16]   24 device_size u64
//! 32 region u64    40 index_sum [u8; 32]   72 state u32 (0 copying, 1 done)
//! 4092 crc32c of 0..4092;   4096: one bit per region, 1 = TARGET holds it
//! ```
//! Same discipline as the overlay: a flush (the VM's, or the copier's every second)
//! snapshots the dirty map pages, fdatasyncs TARGET, writes the pages, fsyncs the
//! map. A bit is durable only after the data it stands for. After a daemon kill the
//! page cache keeps every acknowledged write in both places, so `mount --recover`
//! resumes from the durable bits. After a power cut it does not (a write that was
//! not flushed may have reached TARGET and not the overlay, or the other way round),
//! so a map from another boot is reset: the copy starts over, never wrong.

use super::{BlockDevice, Extents};
pub use crate::config::MigrationConfig;
use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

const MAGIC: [u8; 8] = *b"LMMIGR\x01\0";
const HEADER: u64 = 4096;
const PAGE: u64 = 4096;
/// Stripe locks for the copy/write race (regions hash onto them).
const STRIPES: usize = 1024;

/// What `status` shows of a migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    /// `copying`, `paused`, `migrated` or `failed`.
    pub state: String,
    /// TARGET.
    pub target: PathBuf,
    /// Bytes of the device TARGET holds.
    pub copied_bytes: u64,
    /// Device bytes.
    pub total_bytes: u64,
    /// Regions still to copy.
    pub regions_left: u64,
    /// Bytes per second copied since this daemon started (or resumed) the copy.
    pub rate_bytes_s: f64,
    /// Seconds to go at that rate (None before there is a rate).
    pub eta_s: Option<f64>,
    /// Why it is paused or failed.
    pub error: Option<String>,
}

/// Identity of the device a map belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceKey {
    /// Device bytes.
    pub size: u64,
    /// Bytes per region (the snapshot's chunk size).
    pub region: u64,
    /// The snapshot index's checksum.
    pub index_sum: [u8; 32],
}

/// Phases of the layer.
const IDLE: u8 = 0;
const COPYING: u8 = 1;
const DONE: u8 = 2;

/// The migration layer.
pub struct Migrating {
    lower: Arc<dyn BlockDevice>,
    key: DeviceKey,
    phase: AtomicU8,
    /// Held shared by every VM write while it runs; exclusively to switch phases
    /// (so no write is half in the old phase).
    switch: RwLock<()>,
    job: Mutex<Option<Arc<Job>>>,
    /// Whether the device refuses writes (None: as the layer below does).
    read_only: Option<bool>,
}

struct Job {
    config: MigrationConfig,
    target: File,
    is_block: bool,
    map_file: File,
    regions: u64,
    done: Mutex<DoneMap>,
    done_count: AtomicU64,
    stripes: Vec<Mutex<u64>>,
    /// Serializes map persistence (VM flushes and the copier's).
    persist: Mutex<()>,
    copied_now: AtomicU64,
    started: Instant,
    paused: Mutex<Option<String>>,
    failed: Mutex<Option<String>>,
    stop: AtomicBool,
    wake: (Mutex<()>, Condvar),
    /// The copiers' thread (joined before a new job replaces a failed one).
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// A sync of TARGET failed after the migration completed: TARGET is the only
    /// copy and the kernel may have dropped what it could not write, so every later
    /// request fails (as the overlay does, see its module docs).
    target_failed: AtomicBool,
}

struct DoneMap {
    bits: Vec<u64>,
    dirty: std::collections::BTreeSet<u64>,
}

impl DoneMap {
    fn get(&self, r: u64) -> bool {
        self.bits[(r / 64) as usize] >> (r % 64) & 1 == 1
    }
    fn set(&mut self, r: u64) -> bool {
        let (w, b) = ((r / 64) as usize, r % 64);
        let new = self.bits[w] >> b & 1 == 0;
        self.bits[w] |= 1 << b;
        if new {
            self.dirty.insert(w as u64 * 8 / PAGE);
        }
        new
    }
    fn page(&self, p: u64) -> Vec<u8> {
        let words = (PAGE / 8) as usize;
        let start = p as usize * words;
        (start..start + words)
            .flat_map(|w| self.bits.get(w).copied().unwrap_or(0).to_le_bytes())
            .collect()
    }
}

fn map_len(regions: u64) -> u64 {
    regions.div_ceil(8).div_ceil(PAGE).max(1) * PAGE
}

fn header(key: &DeviceKey, done: bool) -> Vec<u8> {
    let mut h = vec![0u8; HEADER as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..24].copy_from_slice(&crate::block::overlay::mirror::boot_id());
    h[24..32].copy_from_slice(&key.size.to_le_bytes());
    h[32..40].copy_from_slice(&key.region.to_le_bytes());
    h[40..72].copy_from_slice(&key.index_sum);
    h[72..76].copy_from_slice(&(done as u32).to_le_bytes());
    let crc = crc32c::crc32c(&h[..4092]);
    h[4092..].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The device a *completed* migration's map at `map` belongs to (None: no map, not
/// complete, or damaged). A mount whose migration is complete needs nothing but
/// TARGET, so it can be rebuilt from this when its store is gone.
pub fn completed(map: &Path) -> Option<DeviceKey> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(map)
        .ok()?;
    let mut h = vec![0u8; HEADER as usize];
    f.read_exact_at(&mut h, 0).ok()?;
    let u64_at = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().unwrap_or([0; 8]));
    let crc = u32::from_le_bytes([h[4092], h[4093], h[4094], h[4095]]);
    let done = u32::from_le_bytes([h[72], h[73], h[74], h[75]]) == 1;
    if h[..8] != MAGIC || crc32c::crc32c(&h[..4092]) != crc || !done {
        return None;
    }
    let mut index_sum = [0u8; 32];
    index_sum.copy_from_slice(&h[40..72]);
    let key = DeviceKey {
        size: u64_at(24),
        region: u64_at(32),
        index_sum,
    };
    (key.region >= 512 && key.size > 0).then_some(key)
}

fn invalid(msg: String) -> Error {
    Error::Invalid(msg)
}

impl Migrating {
    /// An idle migration layer over `lower`, for a device of `key`.
    pub fn new(lower: Arc<dyn BlockDevice>, key: DeviceKey) -> Migrating {
        Migrating {
            lower,
            key,
            phase: AtomicU8::new(IDLE),
            switch: RwLock::new(()),
            job: Mutex::new(None),
            read_only: None,
        }
    }

    /// The same, refusing writes or not whatever the layer below does (a mount
    /// rebuilt from a completed migration's TARGET over a stand-in image).
    pub fn with_read_only(mut self, read_only: bool) -> Migrating {
        self.read_only = Some(read_only);
        self
    }

    fn job(&self) -> Option<Arc<Job>> {
        self.job.lock().ok().and_then(|j| j.clone())
    }

    /// The migration's figures (None when there is none).
    pub fn report(&self) -> Option<MigrationReport> {
        let job = self.job()?;
        let done = job.done_count.load(SeqCst);
        let region = self.key.region;
        let copied = (done * region).min(self.key.size);
        let secs = job.started.elapsed().as_secs_f64().max(1e-3);
        let rate = job.copied_now.load(SeqCst) as f64 / secs;
        let left = self.key.size - copied;
        let failed = job.failed.lock().ok().and_then(|f| f.clone()).or_else(|| {
            job.target_failed
                .load(SeqCst)
                .then(|| "a flush of the migrated disk failed; the device refuses I/O".into())
        });
        let paused = job.paused.lock().ok().and_then(|p| p.clone());
        let state = match (self.phase.load(SeqCst), &failed, &paused) {
            (DONE, None, _) => "migrated",
            (_, Some(_), _) => "failed",
            (_, _, Some(_)) => "paused",
            _ => "copying",
        };
        Some(MigrationReport {
            state: state.into(),
            target: job.config.target.clone(),
            copied_bytes: copied,
            total_bytes: self.key.size,
            regions_left: job.regions - done,
            rate_bytes_s: rate,
            eta_s: (rate > 0.0 && state != "migrated").then(|| left as f64 / rate),
            error: failed.or(paused),
        })
    }

    /// The configuration of the migration in progress or done, if any (a failed
    /// one is not continued by a recovery: the operator starts it again).
    pub fn config(&self) -> Option<MigrationConfig> {
        self.job()
            .filter(|j| j.failed.lock().map(|f| f.is_none()).unwrap_or(false))
            .map(|j| j.config.clone())
    }

    /// True once the device is served from TARGET alone.
    pub fn migrated(&self) -> bool {
        self.phase.load(SeqCst) == DONE
    }

    /// Start (or, with an existing map of this device, resume) migrating to
    /// `config.target`; `order` lists regions to copy first (the profile's). The
    /// copier runs on its own thread; `wait_idle` lets it yield to demand reads.
    ///
    /// `resume`: continue from the map's durable bits (a recovered mount, a
    /// restarted server); a new `livemount migrate` starts over even if a map of an
    /// earlier attempt is there, since the VM may have written while no migration
    /// mirrored its writes. `only_if_complete`: refuse to copy at all (a mount
    /// rebuilt without its store has nothing correct to copy from).
    pub fn start(
        self: &Arc<Self>,
        config: MigrationConfig,
        overlay: Option<&Path>,
        order: Vec<u64>,
        wait_idle: Arc<dyn Fn(usize) -> bool + Send + Sync>,
        resume: bool,
        only_if_complete: bool,
    ) -> Result<()> {
        if let Some(j) = self.job() {
            if j.failed.lock().map(|f| f.is_none()).unwrap_or(false) {
                return Err(Error::Busy(format!(
                    "the device is already migrating to {}",
                    j.config.target.display()
                )));
            }
            // A failed job's copiers must be gone before a new job writes TARGET:
            // their stale reads would pass the old job's generation checks.
            j.stop.store(true, SeqCst);
            j.wake.1.notify_all();
            let handle = j.thread.lock().ok().and_then(|mut h| h.take());
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
        let job = Arc::new(Job::open(&config, &self.key, overlay, resume)?);
        let complete = job.done_count.load(SeqCst) == job.regions;
        if only_if_complete && !complete {
            return Err(invalid(format!(
                "the migration to {} is not complete and there is nothing to copy from",
                config.target.display()
            )));
        }
        if let Ok(mut j) = self.job.lock() {
            *j = Some(job.clone());
        }
        let _w = self.switch.write().map_err(|_| poisoned())?;
        if complete {
            // Also on disk: a later open (after a reboot too) knows TARGET is whole.
            job.mark_done(&self.key)?;
            self.phase.store(DONE, SeqCst);
            return Ok(());
        }
        self.phase.store(COPYING, SeqCst);
        drop(_w);
        let me = self.clone();
        let j = job.clone();
        let handle = std::thread::Builder::new()
            .name("migrate".into())
            .spawn(move || me.copy_all(j, order, wait_idle))
            .map_err(|e| Error::io("migration thread", e))?;
        if let Ok(mut h) = job.thread.lock() {
            *h = Some(handle);
        }
        Ok(())
    }

    /// Stop the copier (the daemon is stopping); the map keeps what was copied.
    pub fn stop(&self) {
        if let Some(j) = self.job() {
            j.stop.store(true, SeqCst);
            j.wake.1.notify_all();
            let _ = j.persist_map();
        }
    }

    fn copy_all(
        self: Arc<Self>,
        job: Arc<Job>,
        order: Vec<u64>,
        wait_idle: Arc<dyn Fn(usize) -> bool + Send + Sync>,
    ) {
        let regions = job.regions;
        let queue: Mutex<Box<dyn Iterator<Item = u64> + Send>> = Mutex::new(Box::new(
            order
                .into_iter()
                .filter(move |&r| r < regions)
                .chain(0..regions),
        ));
        let shared = Copiers {
            queue,
            budget: Mutex::new(RateBudget::new(job.config.rate)),
            last_persist: Mutex::new(Instant::now()),
            exhausted: AtomicBool::new(false),
        };
        // Two copiers: one decodes while the other waits for the store or TARGET
        // (measured: one alone copied at 0.65x the speed of a 2-thread restore).
        // `wait_idle(k)` lets copier k go on: the first after the VM's fetches in
        // flight, the others only while the VM is not reading from the store.
        let wait = wait_idle.as_ref();
        livemount_store::workers::with_workers(
            COPIERS,
            |k| self.copy_worker(&job, &shared, k, wait),
            || (),
        );
        let stopped = job.stop.load(SeqCst);
        let failed = job.failed.lock().map(|f| f.is_some()).unwrap_or(true);
        if !stopped && !failed && job.done_count.load(SeqCst) == job.regions {
            if let Err(e) = self.complete(&job) {
                job.fail(&e.to_string());
            }
        }
    }

    fn copy_worker(
        &self,
        job: &Job,
        shared: &Copiers,
        k: usize,
        wait_idle: &(dyn Fn(usize) -> bool + Send + Sync),
    ) {
        let region = self.key.region;
        let mut buf = vec![0u8; region as usize];
        loop {
            // An extra copier takes no region while the VM is busy (so it never
            // sits on one that the first copier would otherwise copy).
            if k > 0 && !wait_idle(k) {
                if shared.exhausted.load(SeqCst) || job.stop.load(SeqCst) {
                    return;
                }
                continue;
            }
            let Some(r) = shared.queue.lock().ok().and_then(|mut q| q.next()) else {
                shared.exhausted.store(true, SeqCst);
                return;
            };
            if job.stop.load(SeqCst) || job.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                return;
            }
            if job.done.lock().map(|d| d.get(r)).unwrap_or(true) {
                continue;
            }
            let start = r * region;
            let len = region.min(self.key.size - start) as usize;
            let mut backoff = Duration::from_secs(1);
            let mut raced = 0;
            loop {
                if job.stop.load(SeqCst) || job.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                    return;
                }
                wait_idle(0);
                if let Ok(mut b) = shared.budget.lock() {
                    b.take(len as u64);
                }
                // A region the VM keeps writing would starve optimistic copies:
                // after two lost races, copy it holding its lock (its writes wait
                // for one region read).
                match self.copy_region(job, r, start, &mut buf[..len], raced >= 2) {
                    Ok(true) => break,
                    Ok(false) => raced += 1, // a VM write raced the copy: read again
                    Err(CopyError::Source(e)) => {
                        // The store went away (or a chunk is bad): pause, retry.
                        if let Ok(mut p) = job.paused.lock() {
                            *p = Some(format!("reading the device failed, retrying: {e}"));
                        }
                        job.sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                    Err(CopyError::Target(e)) => {
                        job.fail(&e.to_string());
                        return;
                    }
                }
            }
            if let Ok(mut p) = job.paused.lock() {
                *p = None;
            }
            job.copied_now.fetch_add(len as u64, SeqCst);
            let due = shared.last_persist.lock().is_ok_and(|mut t| {
                let due = t.elapsed() >= Duration::from_secs(1);
                if due {
                    *t = Instant::now();
                }
                due
            });
            if due {
                if let Err(e) = job.persist_map() {
                    job.fail(&e.to_string());
                    return;
                }
            }
        }
    }

    /// Copy region `r`; Ok(false) if a VM write raced it. `locked`: hold the
    /// region's stripe lock across the read, so no write can race it.
    fn copy_region(
        &self,
        job: &Job,
        r: u64,
        start: u64,
        buf: &mut [u8],
        locked: bool,
    ) -> std::result::Result<bool, CopyError> {
        let stripe = &job.stripes[r as usize % STRIPES];
        let lock = || stripe.lock().map_err(|_| CopyError::Target(poisoned()));
        let g = if locked {
            let g = lock()?;
            crate::cache::as_background(|| self.lower.read_at(start, buf))
                .map_err(CopyError::Source)?;
            g
        } else {
            let gen = *lock()?;
            crate::cache::as_background(|| self.lower.read_at(start, buf))
                .map_err(CopyError::Source)?;
            let g = lock()?;
            if *g != gen {
                return Ok(false);
            }
            g
        };
        if job.stop.load(SeqCst) || job.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
            return Ok(false);
        }
        job.write_target(start, buf).map_err(CopyError::Target)?;
        if let Ok(mut d) = job.done.lock() {
            if d.set(r) {
                job.done_count.fetch_add(1, SeqCst);
            }
        }
        drop(g);
        Ok(true)
    }

    /// Every region is in TARGET: make that durable, then serve from TARGET alone.
    fn complete(&self, job: &Job) -> Result<()> {
        let _w = self.switch.write().map_err(|_| poisoned())?;
        // A VM write that failed to reach TARGET since the copiers checked.
        if let Some(why) = job.failed.lock().map_err(|_| poisoned())?.clone() {
            return Err(invalid(why));
        }
        job.persist_map()?;
        job.mark_done(&self.key)?;
        self.phase.store(DONE, SeqCst);
        eprintln!(
            "livemount: migration to {} complete: the device is served from it alone",
            job.config.target.display()
        );
        Ok(())
    }

    /// Run `f` (a VM write or discard of `offset..offset+len`) below and into
    /// TARGET under the stripe locks of its regions.
    fn mirrored(
        &self,
        offset: u64,
        len: u64,
        below: impl FnOnce() -> Result<()>,
        into_target: impl FnOnce(&Job) -> std::io::Result<()>,
    ) -> Result<()> {
        let _s = self.switch.read().map_err(|_| poisoned())?;
        match self.phase.load(SeqCst) {
            COPYING => {}
            DONE => {
                let job = self.job().ok_or_else(poisoned)?;
                job.check_target()?;
                return into_target(&job).at(&job.config.target);
            }
            _ => return below(),
        }
        let Some(job) = self.job() else {
            return below();
        };
        if job.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
            return below();
        }
        let region = self.key.region;
        let (first, last) = (offset / region, (offset + len.max(1) - 1) / region);
        let mut idx: Vec<usize> = (first..=last.min(first + STRIPES as u64))
            .map(|r| r as usize % STRIPES)
            .collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(job.stripes[i].lock().map_err(|_| poisoned())?);
        }
        // A failed write below may still have changed some sectors: the
        // generations move in every case, so no copy read before it is trusted.
        let result = below();
        if let Err(e) = result.as_ref().map_or(Ok(()), |()| into_target(&job)) {
            // The VM's write is safe below; TARGET lacks it, so this migration can
            // no longer finish: it fails (the map's bits for this region would lie).
            job.fail(&format!("writing {}: {e}", job.config.target.display()));
        }
        for g in guards.iter_mut() {
            **g += 1;
        }
        result
    }
}

/// What the copier threads share.
struct Copiers {
    queue: Mutex<Box<dyn Iterator<Item = u64> + Send>>,
    budget: Mutex<RateBudget>,
    last_persist: Mutex<Instant>,
    /// The queue is empty.
    exhausted: AtomicBool,
}

/// Open TARGET: a block device (exclusively, at least the device's size) or a
/// regular file (new, or this mount's earlier target: its map exists). Refuses the
/// overlay itself, and a missing TARGET whose migration was complete.
fn open_target(
    config: &MigrationConfig,
    key: &DeviceKey,
    overlay: Option<&Path>,
    resume: bool,
) -> Result<OpenedTarget> {
    let t = &config.target;
    if let Some(a) = overlay.and_then(|o| std::fs::metadata(o).ok()) {
        let b = std::fs::metadata(t).ok();
        if b.is_some_and(|b| b.dev() == a.dev() && b.ino() == a.ino()) {
            return Err(invalid(format!(
                "{} is the mount's overlay; migrate to another file or device",
                t.display()
            )));
        }
    }
    let existing = std::fs::symlink_metadata(t).ok();
    if resume && existing.is_none() && completed(&config.map).is_some() {
        // Every write since completion went to TARGET alone: copying again
        // from below would bring back stale data.
        return Err(invalid(format!(
            "{} is missing, but its migration was complete and it alone held the disk; put it back (or remove the map {} to start over from the device's older state)",
            t.display(),
            config.map.display()
        )));
    }
    let is_block = existing
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device());
    let file = if is_block {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_EXCL)
            .open(t)
            .at(t)?
    } else {
        if existing.as_ref().is_some_and(|m| !m.file_type().is_file()) {
            return Err(invalid(format!(
                "{} is neither a regular file nor a block device",
                t.display()
            )));
        }
        if existing.is_some() && !config.map.exists() {
            return Err(invalid(format!(
                "{} exists and is not this mount's migration target; name a new file (created sparse) or a block device",
                t.display()
            )));
        }
        crate::paths::open_private_rw(t).at(t)?
    };
    let size = if is_block {
        use std::io::Seek;
        (&file).seek(std::io::SeekFrom::End(0)).at(t)?
    } else {
        file.metadata().at(t)?.len()
    };
    if is_block && size < key.size {
        return Err(invalid(format!(
            "{} holds {size} bytes, the device {}: too small",
            t.display(),
            key.size
        )));
    }
    Ok(OpenedTarget {
        file,
        is_block,
        size,
        created: existing.is_none(),
    })
}

/// The regions already copied, from the progress map, and whether it says the
/// migration is complete; all zero where the map cannot be trusted for this
/// TARGET (a new `migrate`, a new or shortened TARGET, another boot).
fn read_map(
    config: &MigrationConfig,
    key: &DeviceKey,
    map_file: &File,
    resume: bool,
    tg: &OpenedTarget,
    short: bool,
) -> Result<(Vec<u64>, bool)> {
    let t = &config.target;
    let regions = key.size.div_ceil(key.region);
    let ml = map_len(regions);
    let mut bits = vec![0u64; (ml / 8) as usize];
    let mut h = vec![0u8; HEADER as usize];
    if map_file.read_exact_at(&mut h, 0).is_err() {
        return Ok((bits, false)); // a new map
    }
    let same_device = h[..8] == MAGIC
        && crc32c::crc32c(&h[..4092]) == u32::from_le_bytes([h[4092], h[4093], h[4094], h[4095]])
        && h[24..72] == header(key, false)[24..72];
    if !same_device {
        return Err(invalid(format!(
            "{} is the progress map of another device or damaged; remove it (and the target) to start over",
            config.map.display()
        )));
    }
    let same_boot = h[8..24] == header(key, false)[8..24];
    let was_done = u32::from_le_bytes([h[72], h[73], h[74], h[75]]) == 1;
    if !resume || tg.created {
        // A new `migrate` (the VM may have written while nothing mirrored its
        // writes), or a TARGET that was just created: start over.
        if resume {
            eprintln!(
                "livemount: warning: migration target {} was missing: copying everything again",
                t.display()
            );
        }
    } else if was_done && short {
        // TARGET alone held the disk, and it lost its tail: nothing else has those
        // bytes, and zeros in their place would be wrong data.
        return Err(invalid(format!(
            "{} holds {} bytes but its migration to a {}-byte device was complete: it was truncated since; restore it from a copy (the map {} says what it held)",
            t.display(),
            tg.size,
            key.size,
            config.map.display()
        )));
    } else if was_done {
        // Complete: TARGET was synced whole and every later write went to it
        // alone, so it is the disk, in any boot.
        for r in 0..regions {
            bits[(r / 64) as usize] |= 1 << (r % 64);
        }
        return Ok((bits, true));
    } else if short {
        // Bits for regions the file no longer holds would lie.
        eprintln!(
            "livemount: warning: migration target {} is shorter than the device: copying everything again",
            t.display()
        );
    } else if same_boot {
        let mut raw = vec![0u8; ml as usize];
        map_file
            .read_exact_at(&mut raw, HEADER)
            .map_err(|_| invalid(format!("{}: truncated", config.map.display())))?;
        for (w, c) in raw.chunks_exact(8).enumerate() {
            bits[w] = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
    } else {
        eprintln!(
            "livemount: warning: the migration map {} is from another boot (a power cut may have kept writes in one place and not the other): copying everything again",
            config.map.display()
        );
    }
    Ok((bits, false))
}

/// Copier threads.
const COPIERS: usize = 2;

enum CopyError {
    Source(Error),
    Target(Error),
}

/// TARGET, opened and checked against the device.
struct OpenedTarget {
    file: File,
    is_block: bool,
    size: u64,
    /// TARGET did not exist before this open.
    created: bool,
}

impl Job {
    fn open(
        config: &MigrationConfig,
        key: &DeviceKey,
        overlay: Option<&Path>,
        resume: bool,
    ) -> Result<Job> {
        let t = &config.target;
        let tg = open_target(config, key, overlay, resume)?;
        // A file shorter than the device: created just now, or cut short since.
        let short = !tg.is_block && tg.size < key.size;
        let regions = key.size.div_ceil(key.region);
        let ml = map_len(regions);
        let map_file = crate::paths::open_private_rw(&config.map).at(&config.map)?;
        let (bits, done_state) = read_map(config, key, &map_file, resume, &tg, short)?;
        if short {
            tg.file.set_len(key.size).at(t)?;
        }
        // Bits past the last region are never set.
        let done_count = bits
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum::<u64>()
            .min(regions);
        map_file
            .write_all_at(&header(key, done_state), 0)
            .and_then(|()| map_file.set_len(HEADER + ml))
            .and_then(|()| {
                let raw: Vec<u8> = bits.iter().flat_map(|w| w.to_le_bytes()).collect();
                map_file.write_all_at(&raw, HEADER)
            })
            .and_then(|()| map_file.sync_all())
            .at(&config.map)?;
        if let Some(dir) = config.map.parent().filter(|d| !d.as_os_str().is_empty()) {
            livemount_store::fsutil::fsync_dir(dir)?;
        }
        let mut stripes = Vec::with_capacity(STRIPES);
        stripes.resize_with(STRIPES, || Mutex::new(0));
        Ok(Job {
            config: config.clone(),
            target: tg.file,
            is_block: tg.is_block,
            map_file,
            regions,
            done: Mutex::new(DoneMap {
                bits,
                dirty: Default::default(),
            }),
            done_count: AtomicU64::new(done_count),
            stripes,
            persist: Mutex::new(()),
            copied_now: AtomicU64::new(0),
            started: Instant::now(),
            paused: Mutex::new(None),
            failed: Mutex::new(None),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            thread: Mutex::new(None),
            target_failed: AtomicBool::new(false),
        })
    }

    /// EIO once a sync of TARGET failed in the migrated phase.
    fn check_target(&self) -> Result<()> {
        if self.target_failed.load(SeqCst) {
            return Err(Error::io(
                &self.config.target,
                std::io::Error::other(
                    "an earlier flush of the migrated disk failed (the disk may have lost data it had accepted); refusing I/O",
                ),
            ));
        }
        Ok(())
    }

    /// fdatasync TARGET in the migrated phase; a failure is final.
    fn sync_migrated(&self) -> Result<()> {
        self.check_target()?;
        self.target.sync_data().map_err(|e| {
            self.target_failed.store(true, SeqCst);
            Error::io(&self.config.target, e)
        })
    }

    /// Record in the map's header, durably, that TARGET holds the whole device.
    fn mark_done(&self, key: &DeviceKey) -> Result<()> {
        let _p = self.persist.lock().map_err(|_| poisoned())?;
        self.map_file
            .write_all_at(&header(key, true), 0)
            .and_then(|()| self.map_file.sync_data())
            .at(&self.config.map)
    }

    fn write_target(&self, at: u64, data: &[u8]) -> Result<()> {
        if data.iter().all(|&b| b == 0) {
            return self
                .discard_target(at, data.len() as u64)
                .at(&self.config.target);
        }
        self.target.write_all_at(data, at).at(&self.config.target)
    }

    /// Zeros as a hole in a file TARGET (where the file system can punch one),
    /// written zeros otherwise.
    fn discard_target(&self, at: u64, len: u64) -> std::io::Result<()> {
        livemount_store::fsutil::zero_range(&self.target, at, len, !self.is_block)
    }

    /// Make TARGET's data, then the map bits that stand for it, durable.
    fn persist_map(&self) -> Result<()> {
        let _p = self.persist.lock().map_err(|_| poisoned())?;
        if self.failed.lock().map(|f| f.is_some()).unwrap_or(true) {
            return Ok(()); // the map was invalidated; nothing may be written to it
        }
        let pages: Vec<(u64, Vec<u8>)> = {
            let mut d = self.done.lock().map_err(|_| poisoned())?;
            let dirty = std::mem::take(&mut d.dirty);
            dirty.into_iter().map(|p| (p, d.page(p))).collect()
        };
        self.target.sync_data().at(&self.config.target)?;
        for (p, bytes) in &pages {
            self.map_file
                .write_all_at(bytes, HEADER + p * PAGE)
                .at(&self.config.map)?;
        }
        if !pages.is_empty() {
            self.map_file.sync_data().at(&self.config.map)?;
        }
        Ok(())
    }

    fn fail(&self, why: &str) {
        eprintln!(
            "livemount: error: migration to {} failed: {why}",
            self.config.target.display()
        );
        // Under the persist lock: no map write can land after the truncation.
        let _p = self.persist.lock();
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert_with(|| why.to_string());
        }
        // The map is no longer true (a VM write may have missed TARGET): make sure
        // a recovery never resumes from it.
        let _ = self
            .map_file
            .set_len(0)
            .and_then(|()| self.map_file.sync_all());
    }

    fn sleep(&self, d: Duration) {
        if let Ok(g) = self.wake.0.lock() {
            let _ = self.wake.1.wait_timeout(g, d);
        }
    }
}

/// At most `rate` bytes per second (0: unlimited), in 100 ms slices.
struct RateBudget {
    rate: u64,
    start: Instant,
    taken: u64,
}

impl RateBudget {
    fn new(rate: u64) -> RateBudget {
        RateBudget {
            rate,
            start: Instant::now(),
            taken: 0,
        }
    }

    fn take(&mut self, n: u64) {
        if self.rate == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.taken as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
        self.taken += n;
    }
}

fn poisoned() -> Error {
    Error::io(
        "migration",
        std::io::Error::other("migration lock poisoned by a panic"),
    )
}

impl BlockDevice for Migrating {
    fn size(&self) -> u64 {
        self.lower.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.phase.load(SeqCst) == DONE {
            if let Some(job) = self.job() {
                job.check_target()?;
                return job.target.read_exact_at(buf, offset).at(&job.config.target);
            }
        }
        self.lower.read_at(offset, buf)
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        self.phase.load(SeqCst) != DONE && self.lower.read_cached(offset, buf)
    }

    fn known_zero(&self, offset: u64, len: u64) -> bool {
        self.phase.load(SeqCst) != DONE && self.lower.known_zero(offset, len)
    }

    /// Below until done (TARGET gets every write meanwhile, so both agree); then
    /// TARGET's holes, which read as zeros.
    fn extents(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        if self.phase.load(SeqCst) == DONE {
            if let Some(job) = self.job() {
                job.check_target()?;
                out.push_file(&job.target, offset, offset + len);
                return Ok(());
            }
        }
        self.lower.extents(offset, len, out)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.mirrored(
            offset,
            buf.len() as u64,
            || self.lower.write_at(offset, buf),
            |job| job.target.write_all_at(buf, offset),
        )
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // While copying, a large discard (mkfs discards the whole disk) goes one
        // region at a time: each piece holds one stripe lock, not all of them for
        // as long as zeroing a block-device TARGET takes.
        let region = self.key.region;
        let (mut at, end) = (offset, offset + len);
        while at < end {
            let n = if self.phase.load(SeqCst) == COPYING {
                (region - at % region).min(end - at)
            } else {
                end - at
            };
            self.mirrored(
                at,
                n,
                || self.lower.discard(at, n),
                |job| job.discard_target(at, n),
            )?;
            at += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        match self.phase.load(SeqCst) {
            DONE => match self.job() {
                Some(job) => job.sync_migrated(),
                None => Ok(()),
            },
            COPYING => {
                self.lower.flush()?;
                match self.job() {
                    Some(job) if job.failed.lock().map(|f| f.is_none()).unwrap_or(false) => {
                        if let Err(e) = job.persist_map() {
                            job.fail(&e.to_string());
                        }
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
            _ => self.lower.flush(),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only.unwrap_or_else(|| self.lower.read_only())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::mem::MemDisk;

    fn key(size: u64) -> DeviceKey {
        DeviceKey {
            size,
            region: 65536,
            index_sum: [7; 32],
        }
    }

    fn noop() -> Arc<dyn Fn(usize) -> bool + Send + Sync> {
        Arc::new(|_| true)
    }

    fn wait_done(m: &Migrating) {
        let t = Instant::now();
        while m.report().is_some_and(|r| r.state != "migrated") {
            assert!(t.elapsed() < Duration::from_secs(30), "{:?}", m.report());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn an_idle_migration_copies_everything_then_serves_from_the_target() {
        let d = tempfile::tempdir().unwrap();
        let size = 1u64 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 | 1).collect();
        let lower = Arc::new(MemDisk::new(data.clone(), false).writable());
        let m = Arc::new(Migrating::new(lower.clone(), key(size)));
        let cfg = MigrationConfig {
            target: d.path().join("t.raw"),
            map: d.path().join("t.raw.lmmig"),
            rate: 0,
        };
        m.start(cfg.clone(), None, vec![7, 3], noop(), false, false)
            .unwrap();
        wait_done(&m);
        assert_eq!(std::fs::read(&cfg.target).unwrap(), data);
        // Served from TARGET alone: a write lands there, not below.
        m.write_at(4096, &[0xee; 512]).unwrap();
        m.flush().unwrap();
        let mut buf = [0u8; 512];
        m.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0xee; 512]);
        lower.read_at(4096, &mut buf).unwrap();
        assert_eq!(
            buf[0],
            8 | 1,
            "the layer below was written after completion"
        );
        let e = m.start(cfg, None, vec![], noop(), false, false);
        assert!(e.is_err(), "a second migration of the same device");
    }

    /// A migration started (copying) of a `size`-byte device filled with `fill`
    /// whose reads take `delay`, profile regions `order` first.
    fn copying(
        size: u64,
        fill: u8,
        delay: Duration,
        order: Vec<u64>,
    ) -> (
        tempfile::TempDir,
        Arc<MemDisk>,
        MigrationConfig,
        Arc<Migrating>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let lower = Arc::new(
            MemDisk::new(vec![fill; size as usize], false)
                .writable()
                .slow(delay),
        );
        let cfg = MigrationConfig {
            target: d.path().join("t.raw"),
            map: d.path().join("t.raw.lmmig"),
            rate: 0,
        };
        let m = Arc::new(Migrating::new(lower.clone(), key(size)));
        m.start(cfg.clone(), None, order, noop(), false, false)
            .unwrap();
        (d, lower, cfg, m)
    }

    /// A completed migration of a `size`-byte device filled with `fill`.
    fn migrated(
        size: u64,
        fill: u8,
    ) -> (
        tempfile::TempDir,
        Arc<MemDisk>,
        MigrationConfig,
        Arc<Migrating>,
    ) {
        let r = copying(size, fill, Duration::ZERO, vec![]);
        wait_done(&r.3);
        r
    }

    /// Change a map's header with `f` and seal it again (its crc is no secret).
    fn edit_map_header(map: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let mut h = std::fs::read(map).unwrap();
        f(&mut h);
        let crc = crc32c::crc32c(&h[..4092]);
        h[4092..4096].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(map, &h).unwrap();
    }

    /// Found in review: a completed map from another boot was reset and the copy
    /// started again over TARGET (which, by then, alone held the VM's writes).
    #[test]
    fn a_completed_migration_stays_complete_after_a_reboot() {
        let size = 1u64 << 20;
        let (_d, lower, cfg, m) = migrated(size, 0x21);
        m.write_at(0, &[0x99; 512]).unwrap(); // TARGET only, from now on
        m.flush().unwrap();
        drop(m);
        // Another boot: its boot id differs.
        edit_map_header(&cfg.map, |h| h[8] ^= 0xff);
        let m = Arc::new(Migrating::new(lower, key(size)));
        m.start(cfg.clone(), None, vec![], noop(), true, false)
            .unwrap();
        assert!(m.migrated(), "{:?}", m.report());
        assert!(
            completed(&cfg.map).is_some(),
            "the map no longer says complete"
        );
        let mut buf = [0u8; 512];
        m.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0x99; 512], "TARGET was copied over");
    }

    /// A power cut may leave a write in TARGET and not below, or the other way
    /// round: a copying map from another boot is never resumed.
    #[test]
    fn a_copying_map_from_another_boot_starts_over() {
        let size = 2u64 << 20;
        let (_d, lower, cfg, m) = copying(size, 0x31, Duration::from_millis(20), vec![]);
        std::thread::sleep(Duration::from_millis(60));
        m.flush().unwrap();
        m.stop();
        assert!(m.report().unwrap().copied_bytes > 0);
        drop(m);
        // Below, the power cut kept a write that TARGET (already copied) lacks.
        lower.write_at(0, &[0x77; 4096]).unwrap();
        edit_map_header(&cfg.map, |h| h[8] ^= 0xff);
        let m = Arc::new(Migrating::new(lower, key(size)));
        m.start(cfg.clone(), None, vec![], noop(), true, false)
            .unwrap();
        assert_eq!(
            m.report().unwrap().copied_bytes,
            0,
            "resumed another boot's map"
        );
        wait_done(&m);
        let t = std::fs::read(&cfg.target).unwrap();
        assert!(
            t[..4096].iter().all(|&b| b == 0x77),
            "stale region in TARGET"
        );
        assert!(t[4096..].iter().all(|&b| b == 0x31));
    }

    /// A complete map whose region size was damaged is not taken for the device's
    /// (a region of 0 would divide by zero, a huge one would cover the disk with
    /// one bit).
    #[test]
    fn a_map_with_a_damaged_region_size_is_refused() {
        let size = 1u64 << 20;
        let (_d, lower, cfg, m) = migrated(size, 0x12);
        drop(m);
        for region in [0u64, 1, 1 << 40] {
            edit_map_header(&cfg.map, |h| {
                h[32..40].copy_from_slice(&region.to_le_bytes())
            });
            let got = completed(&cfg.map);
            assert!(
                got.is_none_or(|k| k.region != key(size).region),
                "region {region}: {got:?}"
            );
            let m = Arc::new(Migrating::new(lower.clone(), key(size)));
            let e = m
                .start(cfg.clone(), None, vec![], noop(), true, false)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("another device or damaged"),
                "region {region}: {e}"
            );
        }
    }

    /// TARGET alone holds a completed migration's disk: cut short, its tail is gone,
    /// and serving zeros in its place would be wrong data.
    #[test]
    fn a_truncated_target_of_a_completed_migration_is_refused() {
        let size = 1u64 << 20;
        let (_d, lower, cfg, m) = migrated(size, 0x5a);
        drop(m);
        let f = OpenOptions::new().write(true).open(&cfg.target).unwrap();
        f.set_len(size / 2).unwrap();
        drop(f);
        let m = Arc::new(Migrating::new(lower.clone(), key(size)));
        let e = m
            .start(cfg.clone(), None, vec![], noop(), true, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        assert_eq!(std::fs::metadata(&cfg.target).unwrap().len(), size / 2);
        assert!(!m.migrated());
        // A copy in progress whose TARGET was cut short copies everything again.
        edit_map_header(&cfg.map, |h| h[72] = 0);
        let m = Arc::new(Migrating::new(lower, key(size)));
        m.start(cfg.clone(), None, vec![], noop(), true, false)
            .unwrap();
        wait_done(&m);
        assert!(std::fs::read(&cfg.target).unwrap() == vec![0x5a; size as usize]);
    }

    /// Found in review: a new `migrate` resumed an earlier attempt's map, so regions
    /// the VM wrote while nothing mirrored its writes were never copied again.
    #[test]
    fn a_new_migration_starts_over_and_a_recovery_resumes() {
        let size = 2u64 << 20;
        let (_d, lower, cfg, m) = migrated(size, 0x44);
        m.stop();
        drop(m);
        // The map is complete, but the mount went on without the migration layer
        // (say, a clean stop and a plain mount): the VM wrote below alone.
        edit_map_header(&cfg.map, |h| h[72] = 0);
        lower.write_at(65536, &[0x55; 4096]).unwrap();
        let m = Arc::new(Migrating::new(lower.clone(), key(size)));
        m.start(cfg.clone(), None, vec![], noop(), false, false)
            .unwrap();
        assert!(!m.migrated(), "a new migration took the old map's bits");
        wait_done(&m);
        let t = std::fs::read(&cfg.target).unwrap();
        assert!(
            t[65536..65536 + 4096].iter().all(|&b| b == 0x55),
            "the write is not in TARGET"
        );
    }

    #[test]
    fn a_large_discard_during_the_copy_lands_everywhere() {
        let size = 4u64 << 20;
        let (_d, lower, cfg, m) = copying(size, 0x66, Duration::from_millis(20), vec![]);
        // Not region aligned at either end: pieces of every shape.
        m.discard(65536 + 4096, size - 3 * 65536).unwrap();
        wait_done(&m);
        let t = std::fs::read(&cfg.target).unwrap();
        let mut want = vec![0x66u8; size as usize];
        want[65536 + 4096..(size - 2 * 65536 + 4096) as usize].fill(0);
        assert!(t == want, "TARGET differs after a discard during the copy");
        let mut below = vec![0u8; size as usize];
        lower.read_at(0, &mut below).unwrap();
        assert!(below == want);
    }

    #[test]
    fn the_profile_regions_are_copied_first() {
        let size = 16 * 65536u64;
        // Every region read takes 500 ms: at 750 ms the two copiers have copied
        // exactly the first two regions they were given.
        let (_d, _lower, cfg, m) = copying(size, 0x33, Duration::from_millis(500), vec![11, 6]);
        std::thread::sleep(Duration::from_millis(750));
        let t = std::fs::read(&cfg.target).unwrap();
        let copied: Vec<usize> = (0..16).filter(|r| t[r * 65536] == 0x33).collect();
        assert_eq!(copied, vec![6, 11], "{:?}", m.report());
        m.stop();
    }

    #[test]
    fn writes_racing_the_copy_are_never_lost() {
        let size = 4u64 << 20;
        let (_d, _lower, cfg, m) = copying(size, 0x11, Duration::from_micros(300), vec![]);
        // Write every sector once, round-robin over the regions, while the copier
        // runs: a copy landing over one of these writes is never repaired by a
        // later one, so any lost update shows. `want`: the device as written.
        let regions = size / 65536;
        let mut want = vec![0x11u8; size as usize];
        for i in 0..size / 512 {
            if m.report().is_some_and(|r| r.state == "migrated") {
                break;
            }
            let (r, k) = (i % regions, i / regions);
            let at = (r * 65536 + k * 512) as usize;
            let v = (i % 251) as u8 + 2;
            m.write_at(at as u64, &[v; 512]).unwrap();
            want[at..at + 512].fill(v);
        }
        wait_done(&m);
        // TARGET holds every write (one that raced the completion only there).
        let below = want;
        let target = std::fs::read(&cfg.target).unwrap();
        let lost = (0..size as usize / 512)
            .filter(|&s| target[s * 512..(s + 1) * 512] != below[s * 512..(s + 1) * 512])
            .count();
        assert_eq!(lost, 0, "sectors of TARGET differ from the device");
    }

    #[test]
    fn bad_targets_are_refused_with_one_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let size = 1u64 << 20;
        let m = Arc::new(Migrating::new(
            Arc::new(MemDisk::new(vec![1; size as usize], false).writable()),
            key(size),
        ));
        let ov = d.path().join("ov");
        std::fs::write(&ov, b"x").unwrap();
        let cfg = |t: &Path| MigrationConfig {
            target: t.to_path_buf(),
            map: t.with_extension("lmmig"),
            rate: 0,
        };
        let e = m
            .start(cfg(&ov), Some(&ov), vec![], noop(), false, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlay"), "{e}");
        let other = d.path().join("existing.raw");
        std::fs::write(&other, b"precious").unwrap();
        let e = m
            .start(cfg(&other), None, vec![], noop(), false, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exists"), "{e}");
        assert_eq!(std::fs::read(&other).unwrap(), b"precious");
        let e = m
            .start(
                cfg(&d.path().join("no/such/dir/t.raw")),
                None,
                vec![],
                noop(),
                false,
                false,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("no/such/dir"), "{e}");
    }

    #[test]
    fn a_killed_migration_resumes_from_its_durable_map() {
        let d = tempfile::tempdir().unwrap();
        let size = 2u64 << 20;
        let data: Vec<u8> = (0..size).map(|i| (i / 4096) as u8).collect();
        let lower = Arc::new(MemDisk::new(data.clone(), false).writable());
        let cfg = MigrationConfig {
            target: d.path().join("t.raw"),
            map: d.path().join("t.raw.lmmig"),
            rate: 4 << 20,
        };
        let m = Arc::new(Migrating::new(lower.clone(), key(size)));
        m.start(cfg.clone(), None, vec![], noop(), false, false)
            .unwrap();
        std::thread::sleep(Duration::from_millis(150));
        m.write_at(size - 512, &[0x99; 512]).unwrap();
        m.flush().unwrap();
        let copied = m.report().unwrap().copied_bytes;
        assert!(copied > 0 && copied < size, "{copied}");
        m.stop(); // the daemon dies; a new one opens the same map
        let m2 = Arc::new(Migrating::new(lower.clone(), key(size)));
        let cfg2 = MigrationConfig {
            rate: 0,
            ..cfg.clone()
        };
        m2.start(cfg2, None, vec![], noop(), true, false).unwrap();
        assert!(m2.report().unwrap().copied_bytes >= copied.saturating_sub(256 << 10));
        wait_done(&m2);
        let mut want = data;
        want[(size - 512) as usize..].fill(0x99);
        assert!(std::fs::read(&cfg.target).unwrap() == want);
    }
}
