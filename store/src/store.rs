//! The chunk store: deduplicated, compressed chunks and snapshot indexes, in a local
//! directory or an S3 bucket (the same objects either way, see [`crate::backend`]).
//!
//! # Layout (format version 1; byte-level formats in [`chunk`] and [`index`])
//! ```text
//! STORE/  (a directory, or s3://BUCKET/PREFIX/)
//!   livemount-store.json         {"format":"livemount-store","version":1,"frame_size":65536}
//!   chunks/00 … chunks/ff/<id>   chunk files, named by the hex chunk id
//!   snapshots/<series>/<UTC time>.fidx   snapshot indexes, e.g. web01/2026-11-23T10:00:00Z.fidx
//!   profiles/<series>.json       the profile attached to a series
//!   leases/<kind>-<host>-<pid>-<nonce>.json   live backups, gc, mounts, forgets (crate::lease)
//!   tmp/                         (directory store) temp files of writers in progress
//! ```
//!
//! # Crash safety
//! Every file appears atomically: written to `tmp/`, fsynced, renamed into place, and
//! its directory fsynced before anything that refers to it is written. A backup
//! writes and syncs all its chunks first and its index last, so a backup killed at
//! any point leaves no visible snapshot and no partial chunk, only temp files that
//! the next `gc` removes.
//!
//! On an object store a completed PUT is durable and appears whole; chunks are
//! uploaded many at once and all awaited before the index is written.
//!
//! # Concurrency and gc
//! Leases ([`crate::lease`]), not locks, on both back ends: backups hold a backup
//! lease for their whole run and `gc` a gc lease, and the two exclude each other
//! (a backup waits for a running gc; gc fails "store busy" while a backup runs), so
//! gc never runs while a backup has written or reused chunks that no index refers to
//! yet. Two backups may run at once: chunks are content-addressed, so two writers of
//! one chunk write identical bytes. A mount holds a mount lease on its snapshot,
//! renewed while its daemon lives and kept when the daemon dies (until `mount
//! --recover` adopts it, `unmount` removes it, or it expires), and `forget` refuses
//! a snapshot with a live mount lease, so a mounted snapshot's chunks stay
//! referenced. `gc` marks every chunk referenced by any index and removes the rest;
//! if any index cannot be read it removes nothing.

use crate::backend::dir::DirBackend;
use crate::backend::s3::{S3Backend, S3Options};
use crate::backend::{chunk_key, Backend, BackendChunks, ObjectMeta, Put, PutMode, ReadClass};
use crate::error::{Error, IoContext, Result};
use crate::format::chunk::ChunkId;
use crate::format::index::SnapshotIndex;
use crate::format::profile::Profile;
use crate::fsutil;
use crate::lease::{Lease, LeaseKind};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest configuration or profile object read.
const SMALL_OBJECT_LIMIT: u64 = 16 << 20;
/// Largest index object read (64 TiB at 64 KiB chunks, with headroom).
const INDEX_LIMIT: u64 = 64 << 30;
/// Markers of chunks moved aside in a remote store.
const QUARANTINE_PREFIX: &str = "quarantine/";
/// How long a backup waits for a running gc before it gives up.
const GC_WAIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Where a store is: a local directory or an S3 bucket and prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StoreLocation {
    /// A directory on this host.
    Dir {
        /// The store directory.
        path: PathBuf,
    },
    /// `s3://BUCKET/PREFIX` with how to reach it (no secrets: those are read from
    /// their usual places when the store is opened).
    S3 {
        /// The URL.
        url: String,
        /// Endpoint, region, credential source, request limits.
        options: S3Options,
    },
}

impl StoreLocation {
    /// `s3://…` becomes an S3 location with `options`; anything else a directory.
    pub fn parse(spec: &str, options: S3Options) -> StoreLocation {
        if spec.starts_with("s3://") {
            StoreLocation::S3 {
                url: spec.to_string(),
                options,
            }
        } else {
            StoreLocation::Dir {
                path: PathBuf::from(spec),
            }
        }
    }

    /// The directory of a local store, absolute (relative paths resolved against
    /// the current directory, for daemons that change it).
    pub fn absolute(self) -> Result<StoreLocation> {
        match self {
            StoreLocation::Dir { path } if path.is_relative() => {
                let cwd = std::env::current_dir().at(".")?;
                Ok(StoreLocation::Dir {
                    path: cwd.join(path),
                })
            }
            other => Ok(other),
        }
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Dir { path } => write!(f, "{}", path.display()),
            StoreLocation::S3 { url, .. } => write!(f, "{url}"),
        }
    }
}

impl From<&Path> for StoreLocation {
    fn from(p: &Path) -> Self {
        StoreLocation::Dir {
            path: p.to_path_buf(),
        }
    }
}

/// Store format version this build writes and reads.
pub const STORE_VERSION: u32 = 1;
/// Name of the store's configuration file.
pub const CONFIG_FILE: &str = "livemount-store.json";
/// Default uncompressed frame size inside chunks: a 4 KiB read decodes at most this.
pub const DEFAULT_FRAME_SIZE: u32 = 64 * 1024;
/// Default chunk size of a new backup series (see docs/format.md for the study).
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;
/// Allowed chunk sizes.
pub use crate::format::index::CHUNK_SIZE_RANGE;

/// The store's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreConfig {
    /// Always "livemount-store".
    pub format: String,
    /// Store format version.
    pub version: u32,
    /// Uncompressed bytes per frame in every chunk of this store (fixed, because it is
    /// part of the chunk id and so of deduplication).
    pub frame_size: u32,
}

/// How a store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only; creates nothing (mounts, restore, verify, list).
    ReadOnly,
    /// Backups: create the store if needed, shared lock.
    Write,
    /// gc: exclusive lock, fail if busy.
    Exclusive,
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    backend: Arc<dyn Backend>,
    config: StoreConfig,
    chunks: BackendChunks,
    lease: Option<Lease>,
}

/// A snapshot in the store: `series@time`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapshotRef {
    /// The backup series (one VM disk), e.g. `web01`.
    pub series: String,
    /// UTC creation time, `YYYY-MM-DDTHH:MM:SSZ`.
    pub time: String,
}

impl std::fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.series, self.time)
    }
}

/// Check a series name: letters, digits, `.`, `_`, `-`, not starting with `.`.
pub fn validate_series(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid series name {name:?}: use letters, digits, '.', '_' and '-' (not starting with '.')"
        )))
    }
}

/// Format seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// This host's name (for snapshot descriptions and leases).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into())
}

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open the directory store at `root`. With [`Access::Write`] a missing or empty
    /// directory becomes a new store.
    pub fn open(root: impl AsRef<Path>, access: Access) -> Result<Store> {
        Self::open_at(&StoreLocation::from(root.as_ref()), access)
    }

    /// Open the store at `location` (a directory or a bucket).
    pub fn open_at(location: &StoreLocation, access: Access) -> Result<Store> {
        let backend: Arc<dyn Backend> = match location {
            StoreLocation::Dir { path } => {
                Self::prepare_dir(path, access)?;
                Arc::new(DirBackend::new(path))
            }
            StoreLocation::S3 { url, options } => Arc::new(S3Backend::open(url, options)?),
        };
        Self::open_backend(backend, access)
    }

    /// Open the store in `backend`.
    pub fn open_backend(backend: Arc<dyn Backend>, access: Access) -> Result<Store> {
        let existing = Self::read_config(&*backend)?;
        if existing.is_none() && access != Access::Write {
            // A listing tells a missing bucket or a refused key from an empty prefix.
            backend.list("")?;
            return Err(Error::Invalid(format!(
                "{} is not a livemount store (no {CONFIG_FILE})",
                backend.describe()
            )));
        }
        // The lease comes before a new store's config appears, so that from the moment
        // the location is a store, a backup writing into it is visible to gc.
        let lease = match access {
            Access::ReadOnly => None,
            Access::Write => Some(Self::backup_lease(&backend)?),
            Access::Exclusive => Some(Lease::acquire(backend.clone(), LeaseKind::Gc)?),
        };
        let config = match existing {
            Some(c) => c,
            None => {
                Self::init(&*backend)?;
                Self::read_config(&*backend)?.ok_or_else(|| {
                    Error::Invalid(format!(
                        "{}: store configuration vanished",
                        backend.describe()
                    ))
                })?
            }
        };
        Ok(Store {
            chunks: BackendChunks::new(backend.clone()),
            backend,
            config,
            lease,
        })
    }

    /// A backup's lease, waiting (bounded) while a gc runs.
    fn backup_lease(backend: &Arc<dyn Backend>) -> Result<Lease> {
        let deadline = std::time::Instant::now() + GC_WAIT;
        let mut said = false;
        loop {
            match Lease::acquire(backend.clone(), LeaseKind::Backup) {
                Err(Error::Busy(why)) if std::time::Instant::now() < deadline => {
                    if !said {
                        eprintln!("livemount: waiting: {why}");
                        said = true;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// Directory checks before a directory store is opened: it exists (or may be
    /// created), is a directory, and is not someone else's.
    fn prepare_dir(root: &Path, access: Access) -> Result<()> {
        match fs::metadata(root) {
            Ok(m) if !m.is_dir() => {
                return Err(Error::Invalid(format!(
                    "store {} is not a directory",
                    root.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound && access == Access::Write => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Invalid(format!(
                    "store {} does not exist",
                    root.display()
                )))
            }
            Err(e) => return Err(Error::io(root, e)),
        }
        if access == Access::Write && !root.join(CONFIG_FILE).exists() {
            // Refuse a foreign directory before leaving anything (a lease) in it.
            if root.exists() && !Self::is_skeleton(root)? {
                return Err(Error::Invalid(format!(
                    "{} is not empty and not a livemount store (no {CONFIG_FILE})",
                    root.display()
                )));
            }
            let mut b = fs::DirBuilder::new();
            b.recursive(true).mode(0o700);
            for sub in ["tmp", "snapshots", "chunks", "leases"] {
                b.create(root.join(sub)).at(root.join(sub))?;
            }
            fsutil::fsync_dir(root)?;
        }
        if root.join(CONFIG_FILE).exists() {
            // Stores made before leases existed have no leases/ or a missing tmp/.
            for sub in ["tmp", "leases"] {
                let d = root.join(sub);
                if !d.exists() && access != Access::ReadOnly {
                    fs::DirBuilder::new().mode(0o755).create(&d).at(&d)?;
                }
            }
        }
        Ok(())
    }

    fn read_config(backend: &dyn Backend) -> Result<Option<StoreConfig>> {
        let what = backend.describe_key(CONFIG_FILE);
        let Some(bytes) = backend.get(CONFIG_FILE, SMALL_OBJECT_LIMIT, ReadClass::Demand)? else {
            return Ok(None);
        };
        let config: StoreConfig = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("{what}: malformed store configuration: {e}")))?;
        if config.format != "livemount-store" {
            return Err(Error::Invalid(format!(
                "{what}: not a livemount store configuration"
            )));
        }
        if config.version != STORE_VERSION {
            return Err(Error::UnsupportedVersion {
                path: PathBuf::from(what),
                what: "store",
                found: config.version,
                supported: STORE_VERSION,
            });
        }
        if !(4096..=CHUNK_SIZE_RANGE.1).contains(&config.frame_size) {
            return Err(Error::Invalid(format!("{what}: invalid frame_size")));
        }
        Ok(Some(config))
    }

    /// True if `root` holds nothing but (part of) the skeleton a new store starts
    /// with: what a backup killed while creating the store leaves, or what a
    /// concurrent backup creating the same store has made so far.
    fn is_skeleton(root: &Path) -> Result<bool> {
        for e in fs::read_dir(root).at(root)? {
            let e = e.at(root)?;
            match e.file_name().to_str() {
                Some("tmp" | "chunks" | ".lock") => {}
                Some(d @ ("snapshots" | "leases")) => {
                    let dir = e.path();
                    // Leases of backups creating the store at the same time are fine.
                    if d == "snapshots" && fs::read_dir(&dir).at(&dir)?.next().is_some() {
                        return Ok(false);
                    }
                }
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Write the configuration that makes `backend` a store, after checking that
    /// nothing but leases is there yet (a bucket prefix holding other objects is not
    /// ours).
    fn init(backend: &dyn Backend) -> Result<()> {
        if backend.local_root().is_none() {
            let foreign = backend
                .list("")?
                .into_iter()
                .find(|m| !m.key.starts_with(crate::lease::LEASE_PREFIX));
            if let Some(m) = foreign {
                return Err(Error::Invalid(format!(
                    "{} is not empty and not a livemount store (it holds {} and no {CONFIG_FILE})",
                    backend.describe(),
                    m.key
                )));
            }
        }
        let config = StoreConfig {
            format: "livemount-store".into(),
            version: STORE_VERSION,
            frame_size: DEFAULT_FRAME_SIZE,
        };
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
        // Create-only: two backups creating one store agree on the first config.
        backend.put(CONFIG_FILE, text.as_bytes(), PutMode::Create)?;
        backend.sync(&[CONFIG_FILE.to_string()])
    }

    /// Where the store is, for messages (no secrets).
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// The store's directory when it is a local one.
    pub fn local_root(&self) -> Option<&Path> {
        self.backend.local_root()
    }

    /// The back end (for leases held by mounts and for tests).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Threads for work that reads the whole store (restore, verify): the CPUs for a
    /// local store; for a remote one enough to keep its requests in flight (latency,
    /// not CPU, bounds them).
    pub fn io_threads(&self) -> usize {
        let cpus = crate::workers::default_threads();
        match self.backend.local_root() {
            Some(_) => cpus,
            None => cpus.max(crate::backend::s3::S3Options::default().in_flight),
        }
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The store's chunks as a [`ChunkSource`](crate::backend::ChunkSource).
    pub fn chunks(&self) -> &BackendChunks {
        &self.chunks
    }

    /// The lease this handle holds (a backup's or gc's), if any.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Key of a snapshot's index object.
    pub fn index_key(snap: &SnapshotRef) -> String {
        format!("snapshots/{}/{}.fidx", snap.series, snap.time)
    }

    /// Name of a snapshot's index for messages (a path or an `s3://` URL).
    pub fn index_name(&self, snap: &SnapshotRef) -> PathBuf {
        PathBuf::from(self.backend.describe_key(&Self::index_key(snap)))
    }

    fn profile_key(series: &str) -> String {
        format!("profiles/{series}.json")
    }

    /// The profile attached to `series`, if any.
    pub fn attached_profile(&self, series: &str) -> Result<Option<Profile>> {
        validate_series(series)?;
        let key = Self::profile_key(series);
        let Some(bytes) = self
            .backend
            .get(&key, SMALL_OBJECT_LIMIT, ReadClass::Demand)?
        else {
            return Ok(None);
        };
        let what = self.backend.describe_key(&key);
        let text = String::from_utf8(bytes)
            .map_err(|_| Error::Invalid(format!("{what}: not a profile (not UTF-8)")))?;
        Profile::from_json(&text)
            .map(Some)
            .map_err(|e| Error::Invalid(format!("{what}: {e}")))
    }

    /// Series that have a profile attached.
    pub fn profiled_series(&self) -> Result<Vec<String>> {
        let mut out: Vec<String> = self
            .backend
            .list("profiles/")?
            .into_iter()
            .filter_map(|m| {
                let s = m.key.strip_prefix("profiles/")?.strip_suffix(".json")?;
                validate_series(s).is_ok().then(|| s.to_string())
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Attach `profile` to `series` (replacing any attached before); returns where.
    pub fn attach_profile(&self, series: &str, profile: &Profile) -> Result<String> {
        validate_series(series)?;
        let key = Self::profile_key(series);
        self.backend
            .put(&key, profile.to_json().as_bytes(), PutMode::Overwrite)?;
        self.backend.sync(std::slice::from_ref(&key))?;
        Ok(self.backend.describe_key(&key))
    }

    /// Identity of a snapshot for overlays: its index's trailing checksum, which
    /// covers every byte of the index.
    pub fn snapshot_sum(&self, snap: &SnapshotRef) -> Result<[u8; 32]> {
        let bytes = self.index_bytes(snap)?;
        let mut sum = [0u8; 32];
        if bytes.len() >= 32 {
            sum.copy_from_slice(&bytes[bytes.len() - 32..]);
        }
        Ok(sum)
    }

    /// True if chunk `id` is stored.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.backend.head(&chunk_key(id))?.is_some())
    }

    /// Size of chunk `id`'s object, None when it is missing.
    pub fn chunk_size(&self, id: &ChunkId) -> Result<Option<u64>> {
        Ok(self.backend.head(&chunk_key(id))?.map(|m| m.size))
    }

    /// Move a damaged chunk aside, to `<id>.bad` next to it (kept for inspection;
    /// `gc` and backups ignore it). The chunk is then missing, so the next backup of
    /// data containing it writes it again, and every snapshot using it reads
    /// correctly again (its name is its content). Returns where it went.
    pub fn quarantine_chunk(&self, id: &ChunkId) -> Result<String> {
        let key = chunk_key(id);
        let bad = format!("{key}.bad");
        if let Some(root) = self.backend.local_root() {
            let (from, to) = (root.join(&key), root.join(&bad));
            // A failure names the destination: the damaged file itself stays in place.
            fs::rename(&from, &to).at(&to)?;
            if let Some(dir) = from.parent() {
                fsutil::fsync_dir(dir)?;
            }
            return Ok(to.display().to_string());
        }
        let limit = crate::format::chunk::ChunkLayout::max_file_len(
            crate::format::chunk::MAX_CONTENT_LEN,
            crate::format::chunk::MIN_FRAME_SIZE,
        );
        // A damaged object too large to copy is deleted without a copy.
        if let Ok(Some(bytes)) = self.backend.get(&key, limit, ReadClass::Background) {
            self.backend.put(&bad, &bytes, PutMode::Overwrite)?;
        }
        self.distrust(id)?;
        self.backend.delete(&key)?;
        Ok(self.backend.describe_key(&bad))
    }

    /// Backups of a remote store trust the previous index instead of asking for each
    /// chunk; this marker (for a chunk verify found damaged or missing) tells them
    /// not to trust it for `id`, so the next backup of its data uploads it again.
    /// A directory store needs none (backups stat every chunk).
    pub fn distrust(&self, id: &ChunkId) -> Result<()> {
        if self.backend.local_root().is_some() {
            return Ok(());
        }
        self.backend
            .put(
                &format!("{QUARANTINE_PREFIX}{}", id.to_hex()),
                b"",
                PutMode::Overwrite,
            )
            .map(|_| ())
    }

    /// Chunks `verify --repair` moved aside in a remote store (see
    /// [`quarantine_chunk`](Self::quarantine_chunk)).
    pub fn quarantined(&self) -> Result<std::collections::HashSet<ChunkId>> {
        Ok(self
            .backend
            .list(QUARANTINE_PREFIX)?
            .into_iter()
            .filter_map(|m| ChunkId::from_hex(m.key.strip_prefix(QUARANTINE_PREFIX)?))
            .collect())
    }

    /// Store an encoded chunk (create-only; it becomes durable, and a failed upload
    /// is reported, at [`sync_chunks`](Self::sync_chunks)).
    pub fn put_chunk(&self, id: &ChunkId, bytes: Vec<u8>) -> Result<()> {
        self.backend.put_deferred(&chunk_key(id), bytes)
    }

    /// Make the chunks `ids` durable (and wait for their uploads) before an index
    /// that refers to them is written.
    pub fn sync_chunks<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) -> Result<()> {
        let keys: Vec<String> = ids.into_iter().map(chunk_key).collect();
        self.backend.sync(&keys)
    }

    /// Every snapshot, or those of one series, oldest first.
    pub fn list(&self, series: Option<&str>) -> Result<Vec<SnapshotRef>> {
        let prefix = match series {
            Some(s) => {
                validate_series(s)?;
                format!("snapshots/{s}/")
            }
            None => "snapshots/".to_string(),
        };
        let mut out: Vec<SnapshotRef> = self
            .backend
            .list(&prefix)?
            .into_iter()
            .filter_map(|m| {
                let rest = m.key.strip_prefix("snapshots/")?;
                let (s, name) = rest.split_once('/')?;
                let time = name.strip_suffix(".fidx")?;
                (validate_series(s).is_ok() && !time.contains('/')).then(|| SnapshotRef {
                    series: s.to_string(),
                    time: time.to_string(),
                })
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Resolve `series@time` or `series` (its latest snapshot).
    pub fn resolve(&self, spec: &str) -> Result<SnapshotRef> {
        let (series, time) = match spec.split_once('@') {
            Some((s, t)) => (s, Some(t)),
            None => (spec, None),
        };
        validate_series(series)?;
        let all = self.list(Some(series))?;
        let found = match time {
            Some(t) => all.into_iter().find(|s| s.time == t),
            None => all.into_iter().next_back(),
        };
        found.ok_or_else(|| Error::SnapshotNotFound(spec.to_string()))
    }

    fn index_bytes(&self, snap: &SnapshotRef) -> Result<Vec<u8>> {
        self.backend
            .get(&Self::index_key(snap), INDEX_LIMIT, ReadClass::Demand)?
            .ok_or_else(|| Error::SnapshotNotFound(snap.to_string()))
    }

    /// Read and check a snapshot's index.
    pub fn load_index(&self, snap: &SnapshotRef) -> Result<SnapshotIndex> {
        let bytes = self.index_bytes(snap)?;
        SnapshotIndex::decode(&self.index_name(snap), &bytes)
    }

    /// Write `index` as a new snapshot of `series`, atomically, named by its creation
    /// time (bumped by a second while that name is taken, so two backups in the same
    /// second both land and neither replaces the other). Returns the new snapshot.
    pub fn commit_index(&self, series: &str, index: &mut SnapshotIndex) -> Result<SnapshotRef> {
        validate_series(series)?;
        // The chunks this index names are protected from gc by our backup lease
        // only while it lives.
        if let Some(l) = &self.lease {
            l.check_fresh()?;
        }
        // A directory's link() is create-only everywhere; an object store's
        // If-None-Match may be ignored: names are then taken under a commit lease.
        let naming = match self.backend.local_root() {
            Some(_) => None,
            None => Some(self.commit_lease(series)?),
        };
        loop {
            let snap = SnapshotRef {
                series: series.to_string(),
                time: format_utc(index.created),
            };
            let key = Self::index_key(&snap);
            if naming.is_some() && self.backend.head(&key)?.is_some() {
                index.created += 1;
                continue;
            }
            match self.backend.put(&key, &index.encode(), PutMode::Create)? {
                Put::Written => {
                    // The index and, for a directory store, the series directory
                    // (which may be another backup's, created a moment ago).
                    self.backend.sync(&[key, format!("snapshots/{series}")])?;
                    return Ok(snap);
                }
                Put::Existed => index.created += 1,
            }
        }
    }

    /// The lease under which a backup names its index in `series`; both of two
    /// backups finishing together may back off, so retry — for as long as a
    /// killed process's stale commit lease can live (its ttl and the skew margin),
    /// rather than failing a backup that has uploaded everything.
    fn commit_lease(&self, series: &str) -> Result<Lease> {
        let wait = crate::lease::WRITER_TTL + crate::lease::MAX_CLOCK_SKEW as u64 + 30;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait);
        let mut said = false;
        let mut pause = 20u64;
        loop {
            let kind = LeaseKind::Commit {
                series: series.to_string(),
            };
            match Lease::acquire(self.backend.clone(), kind) {
                Err(Error::Busy(why)) if std::time::Instant::now() < deadline => {
                    if !said && pause >= 1000 {
                        eprintln!("livemount: waiting to name the snapshot: {why}");
                        said = true;
                    }
                    // Jittered, so two backing-off writers do not collide again.
                    let jitter = u64::from(std::process::id()) % pause;
                    std::thread::sleep(std::time::Duration::from_millis(pause + jitter));
                    pause = (pause * 2).min(2000);
                }
                other => return other,
            }
        }
    }

    /// A mount's lease on `snap` (see [`crate::lease`]): `forget` refuses the
    /// snapshot while it lives. With `adopt`, take over the lease a killed daemon
    /// left (`mount --recover`).
    pub fn lease_mount(&self, snap: &SnapshotRef, adopt: Option<&str>) -> Result<Lease> {
        let kind = LeaseKind::Mount {
            snapshot: snap.to_string(),
        };
        let lease = match adopt {
            Some(key) => Lease::adopt(self.backend.clone(), key, kind)?,
            None => Lease::acquire(self.backend.clone(), kind)?,
        };
        // A forget that completed before our lease was written: the snapshot is gone.
        if self.backend.head(&Self::index_key(snap))?.is_none() {
            return Err(Error::SnapshotNotFound(snap.to_string()));
        }
        Ok(lease)
    }

    /// Remove a snapshot's index (its chunks go at the next `gc`). Refused while the
    /// snapshot is mounted.
    pub fn forget(&self, snap: &SnapshotRef) -> Result<()> {
        let key = Self::index_key(snap);
        if self.backend.head(&key)?.is_none() {
            return Err(Error::SnapshotNotFound(snap.to_string()));
        }
        let _lease = Lease::acquire(
            self.backend.clone(),
            LeaseKind::Forget {
                snapshot: snap.to_string(),
            },
        )
        .map_err(|e| match e {
            Error::Busy(why) => Error::Busy(format!(
                "snapshot {snap} is mounted ({why}); unmount it before forgetting it"
            )),
            e => e,
        })?;
        self.backend.delete(&key)?;
        self.backend.sync(std::slice::from_ref(&key))?;
        if let Some(root) = self.backend.local_root() {
            // Remove the series directory when it became empty (ignore races with a backup).
            let dir = root.join("snapshots").join(&snap.series);
            if fs::read_dir(&dir)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
            {
                let _ = fs::remove_dir(&dir);
            }
        }
        Ok(())
    }

    /// Every chunk object present in the store (for verify, info and gc).
    pub fn all_chunks(&self) -> Result<Vec<(ChunkId, ObjectMeta)>> {
        Ok(self
            .backend
            .list("chunks/")?
            .into_iter()
            .filter_map(|m| {
                let name = m.key.rsplit('/').next()?;
                Some((ChunkId::from_hex(name)?, m))
            })
            .collect())
    }

    /// Ids of every chunk present in the store.
    pub fn all_chunk_ids(&self) -> Result<Vec<ChunkId>> {
        Ok(self.all_chunks()?.into_iter().map(|(id, _)| id).collect())
    }

    /// Remove chunk `id` (gc).
    pub fn delete_chunk(&self, id: &ChunkId) -> Result<()> {
        self.backend.delete(&chunk_key(id))
    }

    /// Temp files of killed writers (directory store), removed by gc: every one but
    /// a lease write of a process still running here, younger than an hour (mounts
    /// and forgets renew or write leases while gc runs; backups, whose temp files
    /// these mostly are, cannot run then). Returns how many.
    pub fn remove_temp_files(&self) -> Result<u64> {
        let Some(root) = self.backend.local_root() else {
            return Ok(0);
        };
        let tmp = root.join("tmp");
        let mut n = 0;
        let rd = match fs::read_dir(&tmp) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(&tmp, e)),
        };
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for e in rd {
            let e = e.at(&tmp)?;
            let name = e.file_name();
            let name = name.to_string_lossy();
            let lease_write = ["mount-", "backup-", "gc-", "forget-", "commit-"]
                .iter()
                .any(|k| name.starts_with(k));
            // Temp names are `<tag>.<pid>.<seq>.tmp` (fsutil::temp_path): a lease
            // write whose writer no longer runs here is as dead as any other.
            let writer_gone = name
                .rsplit('.')
                .nth(2)
                .and_then(|p| p.parse::<i32>().ok())
                .is_some_and(|pid| {
                    // SAFETY: kill with signal 0 only checks that the process exists.
                    let rc = unsafe { libc::kill(pid, 0) };
                    rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
                });
            let stale = !lease_write
                || writer_gone
                || e.metadata()
                    .and_then(|m| m.modified())
                    .map(|t| t < old)
                    .unwrap_or(false);
            if stale {
                fs::remove_file(e.path()).at(e.path())?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_795_428_000), "2026-11-23T10:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn series_names() {
        assert!(validate_series("web01").is_ok());
        assert!(validate_series("db-2.disk_0").is_ok());
        for bad in ["", ".x", "a/b", "a@b", "../x"] {
            assert!(validate_series(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn store_path_that_is_a_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("file");
        fs::write(&f, b"x").unwrap();
        let e = Store::open(&f, Access::Write).unwrap_err();
        assert!(e.to_string().contains("is not a directory"), "{e}");
    }

    #[test]
    fn interrupted_init_is_completed_but_foreign_dirs_are_refused() {
        let d = tempfile::tempdir().unwrap();
        // A backup killed before the config was written leaves the skeleton.
        let root = d.path().join("store");
        for sub in ["tmp", "snapshots", "chunks/00"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let st = Store::open(&root, Access::Write).unwrap();
        assert_eq!(st.config().version, STORE_VERSION);
        drop(st);
        // Two writers creating one store at once: the second sees the first's skeleton.
        let root2 = d.path().join("store2");
        fs::create_dir_all(root2.join("chunks")).unwrap();
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| Store::open(&root2, Access::Write).map(|_| ()));
            let b = s.spawn(|| Store::open(&root2, Access::Write).map(|_| ()));
            (a.join().unwrap(), b.join().unwrap())
        });
        a.unwrap();
        b.unwrap();
        // Anything else in the directory is not ours: refused, left alone.
        let other = d.path().join("other");
        fs::create_dir_all(other.join("snapshots/web01")).unwrap();
        let e = Store::open(&other, Access::Write).unwrap_err();
        assert!(e.to_string().contains("not a livemount store"), "{e}");
        let other2 = d.path().join("other2");
        fs::create_dir_all(&other2).unwrap();
        fs::write(other2.join("data"), b"x").unwrap();
        assert!(Store::open(&other2, Access::Write).is_err());
        assert!(!other2.join(CONFIG_FILE).exists());
    }

    #[test]
    fn gc_removes_lease_temp_files_of_dead_writers_only() {
        let d = tempfile::tempdir().unwrap();
        let st = Store::open(d.path(), Access::Write).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let tmp = d.path().join("tmp");
        let live = format!("mount-h-1-ab.json.{}.0.tmp", std::process::id());
        fs::write(tmp.join(format!("backup-h-1-ab.json.{dead}.3.tmp")), b"x").unwrap();
        fs::write(tmp.join(&live), b"x").unwrap();
        fs::write(
            tmp.join(format!("0123abcd.{}.1.tmp", std::process::id())),
            b"x",
        )
        .unwrap();
        // The dead backup's lease write and a chunk temp file go; the lease write of
        // a process still running (a mount renewing) stays.
        assert_eq!(st.remove_temp_files().unwrap(), 2);
        let left: Vec<_> = fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from(live)]);
    }

    #[test]
    fn gc_lock_excludes_writers() {
        let d = tempfile::tempdir().unwrap();
        let _w = Store::open(d.path(), Access::Write).unwrap();
        let e = Store::open(d.path(), Access::Exclusive).unwrap_err();
        assert!(matches!(e, Error::Busy(_)), "{e}");
    }
}
