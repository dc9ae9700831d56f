//! `livemount mount`, `unmount` and `status`: a snapshot as a live block device.
//!
//! The layers, top to bottom: ublk frontend → overlay → snapshot image (index) → read
//! cache → chunk source. The daemon runs in its own mount namespace (libublk's advice:
//! a file system mounted on our own device must not be in the daemon's namespace) and
//! keeps a status file `/run/livemount/ublkbN.json` (mode 0600) that `status`,
//! `unmount` and `mount --recover` read.

use crate::cache::disk::DiskTier;
use crate::cache::readahead::ReadAheadMode;
use crate::cache::ReadCache;
use crate::error::{Error, IoContext, Result};
use crate::image::{BlockRead, SnapshotImage};
use crate::metrics::IoMetrics;
use crate::overlay::{Overlay, OverlayIdentity};
use crate::store::source::{ChunkSource, DirChunkSource};
use crate::store::{Access, Store};
use crate::ublk::{self, BlockBackend, DeviceOptions};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where status files live.
pub const RUN_DIR: &str = "/run/livemount";

/// Everything a mount needs; saved in the status file so `--recover` can reuse it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountConfig {
    /// Store directory.
    pub store: PathBuf,
    /// Snapshot spec as resolved (`series@time`).
    pub snapshot: String,
    /// Overlay file (None: read-only).
    pub overlay: Option<PathBuf>,
    /// True when the overlay is temporary (removed at unmount).
    pub temporary_overlay: bool,
    /// Memory-tier budget, bytes.
    pub cache_mem: u64,
    /// Disk-tier directory.
    pub cache_dir: Option<PathBuf>,
    /// Disk-tier budget, bytes.
    pub cache_size: u64,
    /// Queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// Profile that drives pre-staging (default: the one attached to the series).
    #[serde(default)]
    pub profile: Option<PathBuf>,
    /// How much of the profile to stage before ready: seconds, `all` or `none`.
    #[serde(default = "default_prestage")]
    pub prestage: String,
    /// Model a remote store: latency per request, milliseconds.
    #[serde(default)]
    pub store_latency_ms: Option<f64>,
    /// Model a remote store: bandwidth, bytes/s.
    #[serde(default)]
    pub store_bandwidth: Option<u64>,
    /// Write what the VM read, as a profile, to this file at unmount (and every
    /// `record_profile_every_s` seconds while serving, so a crash loses little; a
    /// recovered daemon continues the file).
    #[serde(default)]
    pub record_profile: Option<PathBuf>,
    /// Seconds between writes of the learned profile while serving (0: only at stop).
    #[serde(default = "default_record_profile_every")]
    pub record_profile_every_s: u64,
    /// Chunk read-ahead on demand misses (a quarter of `cache_mem` holds compressed
    /// chunks): `auto` chooses by measured store request times.
    #[serde(default)]
    pub readahead: ReadAheadMode,
    /// Sequential read-ahead window in bytes (0: off), capped at `cache_mem / 16` so
    /// read-ahead frames stay in the memory tier's probation segment until read.
    #[serde(default = "default_seq_readahead")]
    pub seq_readahead: u64,
}

/// Default sequential read-ahead window: 16 MiB.
pub fn default_seq_readahead() -> u64 {
    16 << 20
}

/// Threads of sequential read-ahead: requests in flight ahead of a reader.
const SEQ_READAHEAD_THREADS: usize = 2;

fn default_record_profile_every() -> u64 {
    30
}

/// Default pre-staging window: the profile's first 2 s before the device is ready,
/// the rest in the background (measured: ready in 0.46 s instead of 1.34 s with
/// `all`, and the same boot time; docs/performance.md, Boot).
pub fn default_prestage() -> String {
    "2".into()
}

impl MountConfig {
    /// A configuration with defaults for everything but store, snapshot and overlay.
    pub fn new(store: PathBuf, snapshot: String, overlay: Option<PathBuf>) -> Self {
        MountConfig {
            store,
            snapshot,
            read_only: overlay.is_none(),
            overlay,
            temporary_overlay: false,
            cache_mem: 256 << 20,
            cache_dir: None,
            cache_size: 0,
            queues: 1,
            depth: 64,
            profile: None,
            prestage: default_prestage(),
            store_latency_ms: None,
            store_bandwidth: None,
            record_profile: None,
            record_profile_every_s: default_record_profile_every(),
            readahead: ReadAheadMode::Auto,
            seq_readahead: default_seq_readahead(),
        }
    }
}

/// The status file's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountStatus {
    /// Device path.
    pub device: String,
    /// Device id (N of ublkbN).
    pub dev_id: u32,
    /// Daemon pid.
    pub pid: u32,
    /// "running" or "stopped".
    pub state: String,
    /// Configuration.
    pub config: MountConfig,
    /// Device bytes.
    pub size: u64,
    /// Bytes mapped in the overlay.
    pub overlay_bytes: u64,
    /// Read cache figures.
    #[serde(default)]
    pub cache: Option<CacheReportSer>,
    /// I/O figures.
    #[serde(default)]
    pub io: Option<IoReportSer>,
    /// Seconds since the device became ready.
    pub uptime_s: f64,
    /// Pre-staging progress, when a profile is used.
    #[serde(default)]
    pub prestage: Option<serde_json::Value>,
    /// The copy the read path uses, as measured at mount (see [`crate::copy`]).
    #[serde(default)]
    pub read_copy: Option<String>,
}

/// JSON form of [`CacheReport`](crate::cache::CacheReport).
pub type CacheReportSer = serde_json::Value;
/// JSON form of [`IoReport`](crate::metrics::IoReport).
pub type IoReportSer = serde_json::Value;

/// The snapshot image plus optional overlay, as seen by the frontend.
pub struct MountBackend {
    image: Arc<SnapshotImage>,
    overlay: Option<Arc<Overlay>>,
    size: u64,
    recorder: Option<std::sync::Mutex<Recording>>,
    /// Serializes writes of the learned profile (periodic and final ones share a
    /// temporary file name).
    save_lock: std::sync::Mutex<()>,
}

/// What `--record-profile` has seen so far.
struct Recording {
    extents: crate::profile::ExtentBuilder,
    /// Times are `offset_ns` + time since `clock` (device ready).
    clock: Instant,
    /// Duration of the recording a recovered daemon continues (0 for a new one).
    offset_ns: u64,
    /// Reads recorded, to skip periodic writes when nothing changed.
    reads: u64,
}

impl Recording {
    fn now_ns(&self) -> u64 {
        self.offset_ns + self.clock.elapsed().as_nanos() as u64
    }
}

impl BlockBackend for MountBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.record(offset, buf.len());
        match &self.overlay {
            Some(o) => o.read(offset, buf),
            None => self.image.read_at(offset, buf),
        }
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        let ok = match &self.overlay {
            Some(o) if !o.untouched(offset, buf.len() as u64) => false,
            _ => self.image.read_cached(offset, buf),
        };
        if ok {
            self.record(offset, buf.len());
        }
        ok
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.overlay()?.write(offset, buf)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay()?.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        match &self.overlay {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }
    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }
}

impl MountBackend {
    fn record(&self, offset: u64, len: usize) {
        if let Some(r) = &self.recorder {
            if let Ok(mut g) = r.lock() {
                let ns = g.now_ns();
                g.extents.add(offset, len as u64, ns);
                g.reads += 1;
            }
        }
    }

    /// Reads recorded so far for the learned profile (0 without `--record-profile`).
    pub fn recorded_reads(&self) -> u64 {
        self.recorder
            .as_ref()
            .and_then(|r| r.lock().ok().map(|g| g.reads))
            .unwrap_or(0)
    }

    /// Continue the learned profile `previous` (written by a daemon that died): its
    /// reads come first, and this daemon's follow them in time. False (nothing
    /// changed) if it is of another disk or granularity.
    pub fn resume_recording(&self, previous: &crate::profile::Profile) -> bool {
        let Some(r) = &self.recorder else {
            return false;
        };
        let Ok(mut g) = r.lock() else { return false };
        if previous.disk_size != self.image_size() || previous.block_size != g.extents.block_size()
        {
            return false;
        }
        for e in previous.extents_in_access_order() {
            // Counts say how often a range was read; a bound keeps a hostile or
            // huge count from stalling the recovery.
            for _ in 0..e.count.clamp(1, 64) {
                g.extents.add(e.offset, e.length, e.first_access_ns);
            }
        }
        g.offset_ns = previous.stats.duration_ns;
        g.clock = Instant::now();
        true
    }

    /// Write the learned profile so far to `path` (atomically; callers may race).
    pub fn save_learned_profile(&self, device: &str, path: &Path) -> Result<()> {
        let Some(p) = self.learned_profile(device) else {
            return Ok(());
        };
        let _g = self
            .save_lock
            .lock()
            .map_err(|_| Error::Invalid("learned profile: internal lock poisoned".into()))?;
        p.save(path).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// The learned profile so far (`--record-profile`), in the profile format.
    pub fn learned_profile(&self, device: &str) -> Option<crate::profile::Profile> {
        let r = self.recorder.as_ref()?.lock().ok()?;
        let source = crate::profile::Source {
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .to_string(),
            device: device.to_string(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            tracer: "livemount mount --record-profile".into(),
            started_unix: crate::store::now_secs().max(0) as u64,
            runs: 1,
        };
        let mut p = crate::profile::Profile::new(self.image_size(), r.extents.block_size(), source);
        p.extents = r.extents.finish();
        p.stats.events_seen = p.extents.iter().map(|e| e.count).sum();
        p.stats.duration_ns = r.now_ns();
        Some(p)
    }

    /// Start the clock of the learned profile (at device ready).
    pub fn restart_recording(&self) {
        if let Some(r) = &self.recorder {
            if let Ok(mut g) = r.lock() {
                g.clock = Instant::now();
            }
        }
    }

    /// The snapshot image below the overlay.
    pub fn image(&self) -> &Arc<SnapshotImage> {
        &self.image
    }

    /// Bytes in the snapshot's image (the device may be rounded up to 512).
    pub fn image_size(&self) -> u64 {
        self.image.index().image_size
    }

    fn overlay(&self) -> Result<&Overlay> {
        self.overlay
            .as_deref()
            .ok_or_else(|| Error::io("device", std::io::Error::from_raw_os_error(libc::EROFS)))
    }
}

/// Identity of a snapshot for overlays: its index's trailing checksum.
pub fn snapshot_identity(
    store: &Store,
    snap: &crate::store::SnapshotRef,
    device_size: u64,
) -> Result<OverlayIdentity> {
    let path = store.index_path(snap);
    let bytes = std::fs::read(&path).at(&path)?;
    let mut sum = [0u8; 32];
    if bytes.len() >= 32 {
        sum.copy_from_slice(&bytes[bytes.len() - 32..]);
    }
    Ok(OverlayIdentity {
        snapshot: snap.to_string(),
        index_sum: sum,
        device_size,
    })
}

/// An opened mount: layers built, device not yet created.
pub struct PreparedMount {
    /// The configuration.
    pub config: MountConfig,
    /// The backend.
    pub backend: Arc<MountBackend>,
    /// The read cache (for status).
    pub cache: Arc<ReadCache>,
    /// Pre-staging, when a profile applies.
    pub prestager: Option<Arc<crate::prestage::Prestager>>,
    _pin: std::fs::File,
}

/// Where profiles attached to a series live in a store.
pub fn attached_profile_path(store: &Store, series: &str) -> PathBuf {
    store.root().join("profiles").join(format!("{series}.json"))
}

/// The profile attached to `series`, if any.
pub fn attached_profile(store: &Store, series: &str) -> Result<Option<crate::profile::Profile>> {
    let path = attached_profile_path(store, series);
    if !path.exists() {
        return Ok(None);
    }
    crate::profile::Profile::load(&path)
        .map(Some)
        .map_err(|e| Error::Invalid(e.to_string()))
}

/// Build the layers of a mount (store opened read-only).
pub fn prepare(
    config: &MountConfig,
    origin_wrap: impl FnOnce(Arc<dyn ChunkSource>) -> Arc<dyn ChunkSource>,
) -> Result<PreparedMount> {
    let store = Store::open(&config.store, Access::ReadOnly)?;
    let snap = store.resolve(&config.snapshot)?;
    let pin = store.pin_snapshot(&snap)?;
    let index = store.load_index(&snap)?;
    let device_size = index.image_size.div_ceil(512) * 512;
    let mut origin: Arc<dyn ChunkSource> = Arc::new(DirChunkSource::new(store.chunks().dir()));
    if config.store_latency_ms.is_some() || config.store_bandwidth.is_some() {
        origin = Arc::new(crate::store::throttle::ThrottledSource::new(
            origin,
            Duration::from_secs_f64(config.store_latency_ms.unwrap_or(0.0) / 1000.0),
            config.store_bandwidth,
        ));
    }
    let origin = origin_wrap(origin);
    let profile = match &config.profile {
        Some(p) => {
            Some(crate::profile::Profile::load(p).map_err(|e| Error::Invalid(e.to_string()))?)
        }
        None => attached_profile(&store, &snap.series)?,
    };
    let disk = match &config.cache_dir {
        Some(d) => Some(DiskTier::open(d, config.cache_size)?),
        None => None,
    };
    let cache = Arc::new(
        ReadCache::new(origin, config.cache_mem, disk, index.frame_size)
            .with_chunk_readahead(config.readahead, config.cache_mem / 4),
    );
    let image = Arc::new(
        SnapshotImage::new(index, cache.clone()).with_sequential_readahead(
            config.seq_readahead.min(config.cache_mem / 16),
            SEQ_READAHEAD_THREADS,
        ),
    );
    let overlay = match (&config.overlay, config.read_only) {
        (Some(p), false) => {
            let id = snapshot_identity(&store, &snap, device_size)?;
            Some(Arc::new(Overlay::open(
                p,
                image.clone() as Arc<dyn BlockRead>,
                &id,
            )?))
        }
        _ => None,
    };
    let mut config = config.clone();
    config.snapshot = snap.to_string();
    let recorder = config.record_profile.as_ref().map(|_| {
        std::sync::Mutex::new(Recording {
            extents: crate::profile::ExtentBuilder::new(
                image.index().image_size,
                crate::profile::DEFAULT_BLOCK_SIZE,
                crate::profile::DEFAULT_COALESCE_NS,
            ),
            clock: Instant::now(),
            offset_ns: 0,
            reads: 0,
        })
    });
    let prestager = match &profile {
        Some(p) => Some(Arc::new(crate::prestage::Prestager::new(
            Arc::new(image.index().clone()),
            cache.clone(),
            p,
            true,
            8,
        )?)),
        None => None,
    };
    Ok(PreparedMount {
        config,
        backend: Arc::new(MountBackend {
            image,
            overlay,
            size: device_size,
            recorder,
            save_lock: std::sync::Mutex::new(()),
        }),
        cache,
        prestager,
        _pin: pin,
    })
}

fn status_path(dev_id: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("ublkb{dev_id}.json"))
}

/// Read the status file of device `dev` (`/dev/ublkbN`, `ublkbN` or `N`).
pub fn read_status(dev: &str) -> Result<MountStatus> {
    let id = parse_dev(dev)?;
    let path = status_path(id);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Invalid(format!(
                "/dev/ublkb{id} is not a livemount device (no {})",
                path.display()
            ))
        } else {
            Error::io(&path, e)
        }
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: malformed status: {e}", path.display())))
}

/// Every status file.
pub fn list_status() -> Vec<MountStatus> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(RUN_DIR) {
        for e in rd.flatten() {
            if let Some(s) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                out.push(s);
            }
        }
    }
    out.sort_by_key(|s: &MountStatus| s.dev_id);
    out
}

/// Parse `/dev/ublkbN`, `ublkbN` or `N`.
pub fn parse_dev(dev: &str) -> Result<u32> {
    let s = dev.trim_start_matches("/dev/").trim_start_matches("ublkb");
    s.parse().map_err(|_| {
        Error::Invalid(format!(
            "{dev:?} is not a ublk device (expected /dev/ublkbN)"
        ))
    })
}

fn write_status(st: &MountStatus) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(RUN_DIR)
        .at(RUN_DIR)?;
    let path = status_path(st.dev_id);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(st).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::store::fsutil::write_atomic_nosync_dir(&tmp, &path, &text, 0o600).or_else(|_| {
        let _ = std::fs::remove_file(&tmp);
        crate::store::fsutil::write_atomic_nosync_dir(&tmp, &path, &text, 0o600)
    })
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Put the daemon in its own mount namespace with private propagation, so a file
/// system mounted on its device elsewhere can never deadlock its exit.
fn private_mount_namespace() {
    // SAFETY: unshare/mount with constant, valid arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) == 0 {
            let root = c"/";
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            detach_ublk_mounts();
        } else {
            eprintln!("livemount: warning: cannot create a private mount namespace; do not mount the device in this process's namespace");
        }
    }
}

/// In the daemon's fresh namespace, lazily unmount every file system on a ublk device
/// that the copy of the caller's namespace brought along (e.g. `mount --recover` while
/// the device's ext4 is mounted): holding them would keep their superblocks alive after
/// the user unmounts them, and their final write-back would then target a device whose
/// daemon is this process.
fn detach_ublk_mounts() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let unescape = |s: &str| -> Vec<u8> {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && i + 3 < b.len()
                && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            {
                out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    };
    let targets: Vec<Vec<u8>> = info
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let source = right.split(' ').nth(1)?;
            let point = left.split(' ').nth(4)?;
            source.starts_with("/dev/ublkb").then(|| unescape(point))
        })
        .collect();
    for t in targets.into_iter().rev() {
        if let Ok(c) = std::ffi::CString::new(t) {
            // SAFETY: valid C string; affects only this process's private namespace.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Options of the mount command beyond the configuration.
pub struct RunOptions {
    /// Recover this device id instead of creating one.
    pub recover: Option<u32>,
    /// Bounded wait for the kernel to create the device.
    pub create_timeout: Duration,
    /// Worker threads.
    pub workers: usize,
    /// Largest request.
    pub max_io_bytes: u32,
}

/// Run a mount in the foreground until SIGTERM/SIGINT or `unmount`. Prints the device
/// path (and how to attach it) on stdout once it is usable.
pub fn run(config: MountConfig, opts: RunOptions) -> Result<()> {
    // A new temporary overlay is ours alone until the device exists: a mount that
    // fails removes it (a recovered daemon's overlay holds the VM's writes: never).
    let fresh_overlay = match (&config.overlay, opts.recover) {
        (Some(p), None) if config.temporary_overlay => Some(p.clone()),
        _ => None,
    };
    let result = serve(config, opts, fresh_overlay.clone());
    if let (Err(_), Some(p)) = (&result, &fresh_overlay) {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// [`run`], which removes `fresh_overlay` when this fails.
fn serve(config: MountConfig, opts: RunOptions, fresh_overlay: Option<PathBuf>) -> Result<()> {
    private_mount_namespace();
    let prepared = prepare(&config, |s| s)?;
    let PreparedMount {
        config,
        backend,
        cache,
        prestager,
        _pin,
    } = prepared;
    // A recovered daemon continues the learned profile its predecessor wrote.
    if let (Some(_), Some(path)) = (opts.recover, &config.record_profile) {
        if path.exists() {
            match crate::profile::Profile::load(path) {
                Ok(prev) if backend.resume_recording(&prev) => eprintln!(
                    "livemount: continuing the learned profile {} ({} extents)",
                    path.display(),
                    prev.extents.len()
                ),
                Ok(_) => eprintln!(
                    "livemount: warning: {} is a profile of another disk; recording a new one",
                    path.display()
                ),
                Err(e) => eprintln!(
                    "livemount: warning: cannot continue the learned profile: {e}; recording a new one"
                ),
            }
        }
    }
    if let Some(p) = &prestager {
        let window: crate::prestage::PrestageWindow =
            config.prestage.parse().map_err(Error::Invalid)?;
        p.stage_before_ready(window);
    }
    // Pick the read path's copy now (measured), not on the first request; `status`
    // shows the choice.
    let (copy, speedup) = crate::copy::init();
    let read_copy = format!("{} ({speedup:.1}x memmove's speed here)", copy.name());
    let metrics = Arc::new(IoMetrics::default());
    let dev_opts = DeviceOptions {
        queues: config.queues,
        depth: config.depth,
        max_io_bytes: opts.max_io_bytes,
        recover: opts.recover,
        workers: opts.workers,
    };
    ublk::check_driver()?;
    // Device creation can hang in a buggy kernel (ubiblk#480): a watchdog bounds the
    // wait and exits with a clear error. The control ring of libublk is per thread,
    // so the device itself stays on this thread.
    let is_ready = Arc::new(AtomicBool::new(false));
    {
        let is_ready = is_ready.clone();
        let timeout = opts.create_timeout;
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            if !is_ready.load(Ordering::SeqCst) {
                // The exit skips `run`'s clean-up of a new temporary overlay.
                if let Some(p) = fresh_overlay {
                    let _ = std::fs::remove_file(p);
                }
                eprintln!(
                    "livemount: error: the kernel did not answer ublk device creation within {} s; check dmesg",
                    timeout.as_secs()
                );
                std::process::exit(1);
            }
        });
    }
    // Fault injection for the test of the bounded wait: a kernel that never answers.
    if let Some(ms) = std::env::var("LIVEMOUNT_FAULT_CREATE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let ctrl = Arc::new(ublk::control(&dev_opts)?);
    let dev_id = ctrl.dev_info().dev_id;
    let device = ctrl.get_bdev_path();
    let stopping = Arc::new(AtomicBool::new(false));

    // SIGTERM / SIGINT: stop the device; run_target then returns and we clean up.
    {
        let ctrl = ctrl.clone();
        let stopping = stopping.clone();
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
            .map_err(|e| Error::io("signal handler", e))?;
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                stopping.store(true, Ordering::SeqCst);
                // libublk's control ring is per thread: give this one its own.
                let _ = libublk::ctrl::ublk_init_ctrl_task_ring(|r| {
                    if r.is_none() {
                        *r = Some(
                            io_uring::IoUring::builder()
                                .build(16)
                                .map_err(libublk::UblkError::IOError)?,
                        );
                    }
                    Ok(())
                });
                let _ = ctrl.kill_dev();
            }
        });
    }

    let started = Instant::now();
    let make_status = {
        let config = config.clone();
        let prestager = prestager.clone();
        let backend = backend.clone();
        let cache = cache.clone();
        let metrics = metrics.clone();
        let device = device.clone();
        move |state: &str| MountStatus {
            device: device.clone(),
            dev_id,
            pid: std::process::id(),
            state: state.into(),
            config: config.clone(),
            size: backend.size,
            overlay_bytes: backend
                .overlay
                .as_ref()
                .map(|o| o.mapped_sectors.load(Ordering::Relaxed) * 512)
                .unwrap_or(0),
            cache: serde_json::to_value(cache.report()).ok(),
            io: serde_json::to_value(metrics.report()).ok(),
            uptime_s: started.elapsed().as_secs_f64(),
            prestage: prestager
                .as_ref()
                .and_then(|p| serde_json::to_value(p.progress.report()).ok()),
            read_copy: Some(read_copy.clone()),
        }
    };
    let ready_status = make_status.clone();
    let ready_backend = backend.clone();
    let ready_prestager = prestager.clone();
    let ready = move |c: &libublk::ctrl::UblkCtrl| {
        is_ready.store(true, Ordering::SeqCst);
        ready_backend.restart_recording();
        // Keep fetching ahead of the VM in profile order, yielding to demand reads.
        if let Some(p) = ready_prestager {
            std::thread::spawn(move || p.continue_in_background());
        }
        let _ = write_status(&ready_status("running"));
        let dev = c.get_bdev_path();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "device {dev} ready");
        let _ = writeln!(
            out,
            "attach with qemu:    -drive file={dev},format=raw,if=virtio,cache=none,aio=native"
        );
        let _ = writeln!(out, "attach with libvirt: <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/><source dev='{dev}'/><target dev='vdb' bus='virtio'/></disk>");
        let _ = out.flush();
    };
    // Refresh the status file every second while serving; write the learned profile
    // every `record_profile_every_s` seconds when it changed (a killed daemon then
    // loses at most that much of it).
    {
        let make_status = make_status.clone();
        let stopping = stopping.clone();
        let backend = backend.clone();
        let device = device.clone();
        let profile_path = config.record_profile.clone();
        let every = config.record_profile_every_s;
        std::thread::spawn(move || {
            let (mut tick, mut saved_reads, mut warned) = (0u64, 0u64, false);
            while !stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(1));
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let _ = write_status(&make_status("running"));
                tick += 1;
                let Some(path) = profile_path.as_ref().filter(|_| every > 0) else {
                    continue;
                };
                let reads = backend.recorded_reads();
                if tick % every == 0 && reads != saved_reads {
                    match backend.save_learned_profile(&device, path) {
                        Ok(()) => saved_reads = reads,
                        Err(e) if !warned => {
                            eprintln!("livemount: warning: cannot write the learned profile: {e}");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                }
            }
        });
    }
    let result = ublk::serve(&ctrl, backend.clone(), metrics.clone(), opts.workers, ready);
    stopping.store(true, Ordering::SeqCst);
    // Clean stop: make every write durable, remove the device and our files.
    let flushed = backend.flush();
    if let Some(path) = &config.record_profile {
        match backend.save_learned_profile(&device, path) {
            Ok(()) => eprintln!("livemount: wrote the learned profile to {}", path.display()),
            Err(e) => eprintln!("livemount: cannot write the learned profile: {e}"),
        }
    }
    let _ = ctrl.del_dev();
    let _ = std::fs::remove_file(status_path(dev_id));
    if config.temporary_overlay {
        if let Some(p) = &config.overlay {
            let _ = std::fs::remove_file(p);
        }
    }
    result?;
    flushed
}

/// Create a new, empty temporary overlay file (mode 0600) in `dir` and return its
/// path. Never an existing file (O_EXCL): an overlay left behind by a mount that
/// crashed must not lend its writes to a new mount that happens to get its name.
pub fn create_temporary_overlay(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let tag = seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9));
        let path = dir.join(format!(
            "livemount-overlay-{}-{tag:08x}.img",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            // Taken: try another name (the last failure is the error).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
}

/// Stop the daemon serving `dev` and wait for the device to go away.
pub fn unmount(dev: &str, timeout: Duration) -> Result<()> {
    let id = parse_dev(dev)?;
    match read_status(dev) {
        Ok(st) if pid_alive(st.pid) => {
            // SAFETY: sending SIGTERM to the daemon's pid.
            unsafe { libc::kill(st.pid as i32, libc::SIGTERM) };
            let start = Instant::now();
            while pid_alive(st.pid) {
                if start.elapsed() > timeout {
                    return Err(Error::Busy(format!(
                        "daemon {} of /dev/ublkb{id} did not stop within {} s (is the device still in use?)",
                        st.pid,
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        }
        _ => {
            // The daemon is gone (crashed, killed): remove the device ourselves.
            let ctrl = libublk::ctrl::UblkCtrl::new_simple(id as i32)
                .map_err(|e| Error::Invalid(format!("/dev/ublkb{id}: {e}")))?;
            ctrl.del_dev()
                .map_err(|e| Error::Invalid(format!("cannot delete /dev/ublkb{id}: {e}")))?;
            let _ = std::fs::remove_file(status_path(id));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn temporary_overlays_are_new_private_files() {
        let d = tempfile::tempdir().unwrap();
        let a = create_temporary_overlay(d.path()).unwrap();
        std::fs::write(&a, b"stale writes of a crashed mount").unwrap();
        let b = create_temporary_overlay(d.path()).unwrap();
        assert_ne!(a, b, "an existing overlay file was handed out again");
        let m = std::fs::metadata(&b).unwrap();
        assert_eq!(m.len(), 0);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let e = create_temporary_overlay(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }
}
