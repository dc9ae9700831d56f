//! The chunk store: a directory of deduplicated, compressed chunks and snapshot indexes.
//!
//! # Layout (format version 1; byte-level formats in [`chunk`] and [`index`])
//! ```text
//! STORE/
//!   livemount-store.json         {"format":"livemount-store","version":1,"frame_size":65536}
//!   .lock                        flock: shared by backups, exclusive by gc
//!   chunks/00 … chunks/ff/<id>   chunk files, named by the hex chunk id
//!   snapshots/<series>/<UTC time>.fidx   snapshot indexes, e.g. web01/2026-11-23T10:00:00Z.fidx
//!   tmp/                         temp files of writers in progress
//! ```
//!
//! # Crash safety
//! Every file appears atomically: written to `tmp/`, fsynced, renamed into place, and
//! its directory fsynced before anything that refers to it is written. A backup
//! writes and syncs all its chunks first and its index last, so a backup killed at
//! any point leaves no visible snapshot and no partial chunk, only temp files that
//! the next `gc` removes.
//!
//! # Concurrency and gc
//! Backups hold a shared `flock` on `.lock` for their whole run; `gc` takes it
//! exclusively (without waiting, failing with "store busy"), so it never runs while a
//! backup has written chunks that no index refers to yet. Two backups may run at once:
//! chunk files are content-addressed, so two writers of one chunk rename identical
//! bytes over each other. A mount holds a shared `flock` on its snapshot's index, and
//! `forget` takes it exclusively (without waiting), so a mounted snapshot cannot be
//! forgotten and its chunks stay referenced. `gc` marks every chunk referenced by any
//! index and removes the rest; if any index cannot be read it removes nothing.

use crate::backend::dir::DirChunkSource;
use crate::error::{Error, IoContext, Result};
use crate::format::chunk::ChunkId;
use crate::format::index::SnapshotIndex;
use crate::format::profile::Profile;
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
    root: PathBuf,
    config: StoreConfig,
    chunks: DirChunkSource,
    _lock: Option<File>,
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

/// Seconds since the epoch, now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Store {
    /// Open the store at `root`. With [`Access::Write`] a missing or empty directory
    /// becomes a new store.
    pub fn open(root: impl AsRef<Path>, access: Access) -> Result<Store> {
        let root = root.as_ref().to_path_buf();
        match fs::metadata(&root) {
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
            Err(e) => return Err(Error::io(&root, e)),
        }
        let config_path = root.join(CONFIG_FILE);
        let creating = !config_path.exists() && access == Access::Write;
        if creating {
            // Refuse a foreign directory before leaving anything (such as .lock) in it.
            if root.exists() && !Self::is_skeleton(&root)? {
                return Err(Error::Invalid(format!(
                    "{} is not empty and not a livemount store (no {CONFIG_FILE})",
                    root.display()
                )));
            }
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&root)
                .at(&root)?;
        } else {
            // Validates that this is a store before a lock file is created in it.
            Self::read_config(&root)?;
        }
        // Take the lock before a new store's config appears, so that from the moment
        // the directory is a store, a backup writing into it holds the lock.
        let lock = match access {
            Access::ReadOnly => None,
            Access::Write | Access::Exclusive => {
                let path = root.join(".lock");
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)
                    .at(&path)?;
                let exclusive = access == Access::Exclusive;
                fsutil::flock(&f, exclusive, !exclusive).map_err(|e| {
                    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                        Error::Busy(format!(
                            "store {} is busy: a backup is running (lock {})",
                            root.display(),
                            path.display()
                        ))
                    } else {
                        Error::io(&path, e)
                    }
                })?;
                Some(f)
            }
        };
        if creating && !config_path.exists() {
            Self::init(&root)?;
        }
        let config = Self::read_config(&root)?;
        Ok(Store {
            chunks: DirChunkSource::new(root.join("chunks")),
            root,
            config,
            _lock: lock,
        })
    }

    fn read_config(root: &Path) -> Result<StoreConfig> {
        let path = root.join(CONFIG_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Invalid(format!(
                    "{} is not a livemount store (no {CONFIG_FILE})",
                    root.display()
                )))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let config: StoreConfig = serde_json::from_str(&text).map_err(|e| {
            Error::Invalid(format!(
                "{}: malformed store configuration: {e}",
                path.display()
            ))
        })?;
        if config.format != "livemount-store" {
            return Err(Error::Invalid(format!(
                "{}: not a livemount store configuration",
                path.display()
            )));
        }
        if config.version != STORE_VERSION {
            return Err(Error::UnsupportedVersion {
                path,
                what: "store",
                found: config.version,
                supported: STORE_VERSION,
            });
        }
        if !(4096..=CHUNK_SIZE_RANGE.1).contains(&config.frame_size) {
            return Err(Error::Invalid(format!(
                "{}: invalid frame_size",
                path.display()
            )));
        }
        Ok(config)
    }

    /// True if `root` holds nothing but (part of) the skeleton [`init`](Self::init)
    /// creates before it writes the config: what a backup killed while creating the
    /// store leaves, or what a concurrent backup creating the same store has made so far.
    fn is_skeleton(root: &Path) -> Result<bool> {
        for e in fs::read_dir(root).at(root)? {
            let e = e.at(root)?;
            match e.file_name().to_str() {
                Some("tmp" | "chunks" | ".lock") => {}
                Some("snapshots") => {
                    let dir = e.path();
                    if fs::read_dir(&dir).at(&dir)?.next().is_some() {
                        return Ok(false);
                    }
                }
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Create the directory skeleton and, last, the config file that makes it a store.
    /// Completes a skeleton left by an interrupted or concurrent `init`.
    fn init(root: &Path) -> Result<()> {
        if root.exists() && !Self::is_skeleton(root)? {
            return Err(Error::Invalid(format!(
                "{} is not empty and not a livemount store (no {CONFIG_FILE})",
                root.display()
            )));
        }
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(root).at(root)?;
        for sub in ["tmp", "snapshots", "chunks"] {
            b.create(root.join(sub)).at(root.join(sub))?;
        }
        for i in 0..=255u8 {
            let d = root.join("chunks").join(format!("{i:02x}"));
            b.create(&d).at(&d)?;
        }
        fsutil::fsync_dir(&root.join("chunks"))?;
        let config = StoreConfig {
            format: "livemount-store".into(),
            version: STORE_VERSION,
            frame_size: DEFAULT_FRAME_SIZE,
        };
        let text =
            serde_json::to_string_pretty(&config).map_err(|e| Error::Invalid(e.to_string()))?;
        fsutil::write_atomic(
            &fsutil::temp_path(&root.join("tmp"), "config"),
            &root.join(CONFIG_FILE),
            text.as_bytes(),
            0o644,
        )?;
        fsutil::fsync_dir(root)
    }

    /// The store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store's configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The local chunk directory as a [`ChunkSource`](crate::backend::ChunkSource).
    pub fn chunks(&self) -> &DirChunkSource {
        &self.chunks
    }

    /// The directory for temp files.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Path of a snapshot's index file.
    pub fn index_path(&self, snap: &SnapshotRef) -> PathBuf {
        self.root
            .join("snapshots")
            .join(&snap.series)
            .join(format!("{}.fidx", snap.time))
    }

    /// The directory of profiles attached to series (`STORE/profiles/`).
    pub fn profiles_dir(&self) -> PathBuf {
        self.root.join("profiles")
    }

    /// Where the profile attached to `series` lives.
    pub fn profile_path(&self, series: &str) -> PathBuf {
        self.profiles_dir().join(format!("{series}.json"))
    }

    /// The profile attached to `series`, if any.
    pub fn attached_profile(&self, series: &str) -> Result<Option<Profile>> {
        let path = self.profile_path(series);
        if !path.exists() {
            return Ok(None);
        }
        Profile::load(&path)
            .map(Some)
            .map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Attach `profile` to `series` (replacing any attached before).
    pub fn attach_profile(&self, series: &str, profile: &Profile) -> Result<PathBuf> {
        validate_series(series)?;
        let dir = self.profiles_dir();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .at(&dir)?;
        let dest = self.profile_path(series);
        profile
            .save(&dest)
            .map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(dest)
    }

    /// Identity of a snapshot for overlays: its index's trailing checksum, which
    /// covers every byte of the index.
    pub fn snapshot_sum(&self, snap: &SnapshotRef) -> Result<[u8; 32]> {
        let path = self.index_path(snap);
        let bytes = fs::read(&path).at(&path)?;
        let mut sum = [0u8; 32];
        if bytes.len() >= 32 {
            sum.copy_from_slice(&bytes[bytes.len() - 32..]);
        }
        Ok(sum)
    }

    /// True if chunk `id` is stored.
    pub fn has_chunk(&self, id: &ChunkId) -> bool {
        self.chunks.path(id).exists()
    }

    /// Move a damaged chunk file aside, to `<id>.bad` next to it (kept for inspection;
    /// `gc` and backups ignore it). The chunk is then missing, so the next backup of
    /// data containing it writes it again, and every snapshot using it reads
    /// correctly again (its name is its content). Returns the new path.
    pub fn quarantine_chunk(&self, id: &ChunkId) -> Result<PathBuf> {
        let path = self.chunks.path(id);
        let bad = PathBuf::from(format!("{}.bad", path.display()));
        // A failure names the destination: the damaged file itself stays in place.
        fs::rename(&path, &bad).at(&bad)?;
        if let Some(dir) = path.parent() {
            fsutil::fsync_dir(dir)?;
        }
        Ok(bad)
    }

    /// Store an encoded chunk file atomically (no directory fsync: see
    /// [`sync_chunk_dirs`](Self::sync_chunk_dirs)).
    pub fn put_chunk(&self, id: &ChunkId, bytes: &[u8]) -> Result<()> {
        let tmp = fsutil::temp_path(&self.tmp_dir(), &id.to_hex()[..16]);
        fsutil::write_atomic_nosync_dir(&tmp, &self.chunks.path(id), bytes, 0o644)
    }

    /// fsync the prefix directories of `ids`, making their renames durable before an
    /// index that refers to them is written.
    pub fn sync_chunk_dirs<'a>(&self, ids: impl IntoIterator<Item = &'a ChunkId>) -> Result<()> {
        let mut prefixes: Vec<u8> = ids.into_iter().map(|id| id.0[0]).collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        for p in prefixes {
            fsutil::fsync_dir(&self.chunks.dir().join(format!("{p:02x}")))?;
        }
        Ok(())
    }

    /// Every snapshot, or those of one series, oldest first.
    pub fn list(&self, series: Option<&str>) -> Result<Vec<SnapshotRef>> {
        let snaps_dir = self.root.join("snapshots");
        let mut out = Vec::new();
        let series_names: Vec<String> = match series {
            Some(s) => {
                validate_series(s)?;
                vec![s.to_string()]
            }
            None => {
                let mut v = Vec::new();
                for e in fs::read_dir(&snaps_dir).at(&snaps_dir)? {
                    let e = e.at(&snaps_dir)?;
                    if let Some(name) = e.file_name().to_str() {
                        if validate_series(name).is_ok() {
                            v.push(name.to_string());
                        }
                    }
                }
                v
            }
        };
        for s in series_names {
            let dir = snaps_dir.join(&s);
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&dir, e)),
            };
            for e in rd {
                let e = e.at(&dir)?;
                let name = e.file_name();
                if let Some(time) = name.to_str().and_then(|n| n.strip_suffix(".fidx")) {
                    out.push(SnapshotRef {
                        series: s.clone(),
                        time: time.to_string(),
                    });
                }
            }
        }
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

    /// Read and check a snapshot's index.
    pub fn load_index(&self, snap: &SnapshotRef) -> Result<SnapshotIndex> {
        let path = self.index_path(snap);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::SnapshotNotFound(snap.to_string()))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        SnapshotIndex::decode(&path, &bytes)
    }

    /// Write `index` as a new snapshot of `series`, atomically, named by its creation
    /// time (bumped by a second while that name is taken, so two backups in the same
    /// second both land). Returns the new snapshot.
    pub fn commit_index(&self, series: &str, index: &mut SnapshotIndex) -> Result<SnapshotRef> {
        validate_series(series)?;
        let dir = self.root.join("snapshots").join(series);
        if !dir.exists() {
            fs::DirBuilder::new()
                .mode(0o755)
                .create(&dir)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .at(&dir)?;
            fsutil::fsync_dir(&self.root.join("snapshots"))?;
        }
        loop {
            let snap = SnapshotRef {
                series: series.to_string(),
                time: format_utc(index.created),
            };
            let dest = self.index_path(&snap);
            let tmp = fsutil::temp_path(&self.tmp_dir(), "index");
            let bytes = index.encode();
            // Write the temp file, then link (not rename) it into place: link fails if
            // the name exists, so a concurrent backup's snapshot is never replaced.
            let res = (|| {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(&tmp)?;
                io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()?;
                fs::hard_link(&tmp, &dest)
            })();
            let _ = fs::remove_file(&tmp);
            match res {
                Ok(()) => {
                    fsutil::fsync_dir(&dir)?;
                    // The series directory may be another backup's, created a moment
                    // ago and not yet durable in `snapshots/`: sync it every time.
                    fsutil::fsync_dir(&self.root.join("snapshots"))?;
                    return Ok(snap);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => index.created += 1,
                Err(e) => return Err(Error::io(&dest, e)),
            }
        }
    }

    /// Hold a shared lock on a snapshot's index for as long as the returned file is
    /// open (mounts), so `forget` refuses it.
    pub fn pin_snapshot(&self, snap: &SnapshotRef) -> Result<File> {
        let path = self.index_path(snap);
        let f = File::open(&path).at(&path)?;
        fsutil::flock(&f, false, true).at(&path)?;
        Ok(f)
    }

    /// Remove a snapshot's index (its chunks go at the next `gc`). Refused while the
    /// snapshot is mounted.
    pub fn forget(&self, snap: &SnapshotRef) -> Result<()> {
        let path = self.index_path(snap);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::SnapshotNotFound(snap.to_string()))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        fsutil::flock(&f, true, false).map_err(|e| {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                Error::Busy(format!(
                    "snapshot {snap} is mounted; unmount it before forgetting it"
                ))
            } else {
                Error::io(&path, e)
            }
        })?;
        fs::remove_file(&path).at(&path)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        fsutil::fsync_dir(&dir)?;
        // Remove the series directory when it became empty (ignore races with a backup).
        if fs::read_dir(&dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false)
        {
            let _ = fs::remove_dir(&dir);
        }
        Ok(())
    }

    /// Ids of every chunk file present in the store (for verify and gc).
    pub fn all_chunk_ids(&self) -> Result<Vec<ChunkId>> {
        let mut out = Vec::new();
        for i in 0..=255u8 {
            let d = self.chunks.dir().join(format!("{i:02x}"));
            let rd = match fs::read_dir(&d) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(&d, e)),
            };
            for e in rd {
                let e = e.at(&d)?;
                if let Some(id) = e.file_name().to_str().and_then(ChunkId::from_hex) {
                    out.push(id);
                }
            }
        }
        Ok(out)
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
    fn gc_lock_excludes_writers() {
        let d = tempfile::tempdir().unwrap();
        let _w = Store::open(d.path(), Access::Write).unwrap();
        let e = Store::open(d.path(), Access::Exclusive).unwrap_err();
        assert!(matches!(e, Error::Busy(_)), "{e}");
    }
}
