//! The run file of a mount, `/run/livemount/ublkbN.json` (0600 in a 0700
//! directory): what `status`, `unmount` and `mount --recover` read.

use crate::block::prestage::PrestageReport;
use crate::cache::CacheReport;
use crate::config::MountConfig;
use crate::error::{Error, Result};
use crate::metrics::IoReport;
use crate::paths::RUN_DIR;
use livemount_store::backend::RequestReport;
use livemount_store::StoreLocation;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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
    /// The overlay's state (None: read-only).
    #[serde(default)]
    pub overlay_state: Option<crate::block::overlay::OverlayState>,
    /// Read cache figures.
    #[serde(default)]
    pub cache: Option<CacheReport>,
    /// I/O figures.
    #[serde(default)]
    pub io: Option<IoReport>,
    /// Seconds since the device became ready.
    pub uptime_s: f64,
    /// Pre-staging progress, when a profile is used.
    #[serde(default)]
    pub prestage: Option<PrestageReport>,
    /// Where the daemon's memory goes.
    #[serde(default)]
    pub memory: Option<MemoryReport>,
    /// Requests to a remote store (None for a directory).
    #[serde(default)]
    pub store_requests: Option<RequestReport>,
    /// A migration to local storage (`livemount migrate`).
    #[serde(default)]
    pub migration: Option<crate::block::migrate::MigrationReport>,
}

/// The daemon's memory: what grows with the device size, and the budgets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Resident set of the daemon process.
    pub rss_bytes: u64,
    /// The overlay's sector map in memory.
    pub overlay_map_bytes: u64,
    /// Its mirror on /run (tmpfs: memory too).
    pub mirror_bytes: u64,
    /// The snapshot index's chunk list.
    pub index_bytes: u64,
    /// Budget of the read cache's memory tier.
    pub cache_mem_budget: u64,
}

impl MemoryReport {
    /// This process's figures for `stack`.
    pub fn of(stack: &crate::stack::Stack) -> MemoryReport {
        MemoryReport {
            rss_bytes: rss_bytes(),
            overlay_map_bytes: stack.overlay.as_ref().map(|o| o.map_bytes()).unwrap_or(0),
            mirror_bytes: stack
                .overlay
                .as_ref()
                .map(|o| o.mirror_bytes())
                .unwrap_or(0),
            index_bytes: stack.image.index_bytes(),
            cache_mem_budget: stack.config.cache_mem,
        }
    }
}

/// Resident bytes of this process (`/proc/self/statm`), 0 if unknown.
pub fn rss_bytes() -> u64 {
    // SAFETY: sysconf has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
        .unwrap_or(0)
}

/// The status file of a `livemount serve`, `/run/livemount/serve-PID.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServeStatus {
    /// The server's pid.
    pub pid: u32,
    /// Its Unix socket, if any.
    pub socket: Option<PathBuf>,
    /// Its TCP addresses.
    pub tcp: Vec<String>,
    /// Seconds since it started serving.
    pub uptime_s: f64,
    /// Every export.
    pub exports: Vec<ExportStatus>,
}

/// One NBD export's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportStatus {
    /// Export name.
    pub name: String,
    /// The snapshot it serves.
    pub snapshot: String,
    /// Bytes.
    pub size: u64,
    /// Refuses writes.
    pub read_only: bool,
    /// Its overlay file.
    pub overlay: Option<PathBuf>,
    /// Bytes the overlay holds.
    pub overlay_bytes: u64,
    /// The overlay's state (None: read-only).
    #[serde(default)]
    pub overlay_state: Option<crate::block::overlay::OverlayState>,
    /// Read cache figures.
    pub cache: CacheReport,
    /// I/O figures.
    pub io: IoReport,
    /// Requests to a remote store (None for a directory).
    #[serde(default)]
    pub store_requests: Option<RequestReport>,
    /// Where the server's memory goes (RSS is the whole process's, shared by
    /// every export).
    #[serde(default)]
    pub memory: Option<MemoryReport>,
    /// A migration to local storage (`livemount migrate EXPORT`).
    #[serde(default)]
    pub migration: Option<crate::block::migrate::MigrationReport>,
}

/// Where `livemount serve` with `pid` keeps its status.
pub fn serve_status_path(pid: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("serve-{pid}.json"))
}

/// Write a server's status atomically (0600).
pub fn write_serve_status(st: &ServeStatus) -> Result<()> {
    write_run_file(&serve_status_path(st.pid), st)
}

/// The status of every running `livemount serve` (files of dead servers skipped).
pub fn list_serve_status() -> Vec<ServeStatus> {
    let mut out: Vec<ServeStatus> = std::fs::read_dir(RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.starts_with("serve-") && n.ends_with(".json")
        })
        .filter_map(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).ok()?).ok())
        .filter(|s: &ServeStatus| pid_alive(s.pid))
        .collect();
    out.sort_by_key(|s| s.pid);
    out
}

#[cfg(test)]
impl MountStatus {
    /// A status of device `dev_id` served by `pid`, for tests of what reads it.
    pub(crate) fn for_test(dev_id: u32, pid: u32, store: &Path, snapshot: &str) -> MountStatus {
        MountStatus {
            device: format!("/dev/ublkb{dev_id}"),
            dev_id,
            pid,
            state: "running".into(),
            config: MountConfig::new(StoreLocation::from(store), snapshot.into(), None),
            size: 0,
            overlay_bytes: 0,
            overlay_state: None,
            cache: None,
            io: None,
            uptime_s: 0.0,
            prestage: None,
            memory: None,
            store_requests: None,
            migration: None,
        }
    }
}

/// The status file of device `dev_id`.
pub fn status_path(dev_id: u32) -> PathBuf {
    status_path_in(Path::new(RUN_DIR), dev_id)
}

fn status_path_in(dir: &Path, dev_id: u32) -> PathBuf {
    dir.join(format!("ublkb{dev_id}.json"))
}

/// True while the kernel still has block device `/dev/ublkbN` (it outlives a
/// killed daemon, waiting for `mount --recover`).
pub fn device_exists(dev_id: u32) -> bool {
    Path::new(&format!("/sys/block/ublkb{dev_id}")).exists()
}

/// Read the status file of device `dev` (`/dev/ublkbN`, `ublkbN` or `N`).
pub fn read_status(dev: &str) -> Result<MountStatus> {
    read_status_in(Path::new(RUN_DIR), dev)
}

/// [`read_status`] from the run directory `dir`.
pub fn read_status_in(dir: &Path, dev: &str) -> Result<MountStatus> {
    let id = parse_dev(dev)?;
    let path = status_path_in(dir, id);
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
    list_status_in(Path::new(RUN_DIR))
}

fn list_status_in(dir: &Path) -> Vec<MountStatus> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
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

/// Write `st` atomically (0600; the directory is created 0700).
pub fn write_status(st: &MountStatus) -> Result<()> {
    write_run_file(&status_path(st.dev_id), st)
}

/// Write `value` as JSON to the run file `path`, atomically, 0600 (a temp file a
/// killed writer left behind is replaced once).
fn write_run_file(path: &Path, value: &impl Serialize) -> Result<()> {
    crate::paths::run_dir()?;
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    livemount_store::fsutil::write_atomic_nosync_dir(&tmp, path, &text, 0o600).or_else(|_| {
        let _ = std::fs::remove_file(&tmp);
        livemount_store::fsutil::write_atomic_nosync_dir(&tmp, path, &text, 0o600)
    })
}

/// True if a process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// The devices that serve `snapshot` of the store at `store_root`, by their status
/// files: also those whose daemon died (SIGKILL, crash) and whose device still
/// exists, waiting for `mount --recover` — their snapshot's chunks must stay. The
/// mount's lease in the store says so too (for every host); this names the device.
pub fn devices_serving(store: &StoreLocation, snapshot: &str) -> Vec<MountStatus> {
    devices_serving_in(Path::new(RUN_DIR), store, snapshot, device_exists)
}

fn same_store(a: &StoreLocation, b: &StoreLocation) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    match (a, b) {
        (StoreLocation::Dir { path: a }, StoreLocation::Dir { path: b }) => canon(a) == canon(b),
        (StoreLocation::S3 { url: a, options: x }, StoreLocation::S3 { url: b, options: y }) => {
            a.trim_end_matches('/') == b.trim_end_matches('/') && x.endpoint == y.endpoint
        }
        _ => false,
    }
}

fn devices_serving_in(
    dir: &Path,
    store: &StoreLocation,
    snapshot: &str,
    exists: impl Fn(u32) -> bool,
) -> Vec<MountStatus> {
    list_status_in(dir)
        .into_iter()
        .filter(|s| s.config.snapshot == snapshot && same_store(&s.config.store, store))
        .filter(|s| exists(s.dev_id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(dir: &Path, dev_id: u32, store: &Path, snapshot: &str) {
        let st = MountStatus::for_test(dev_id, 999_999_999, store, snapshot);
        std::fs::write(
            status_path_in(dir, dev_id),
            serde_json::to_vec(&st).unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn a_device_whose_daemon_died_still_pins_its_snapshot() {
        let run = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        status(run.path(), 3, store.path(), "vm@t1");
        status(run.path(), 4, store.path(), "vm@t2");
        status(run.path(), 5, Path::new("/elsewhere"), "vm@t1");
        // Device 3 exists (its daemon's pid is long gone); device 4 was removed.
        let exists = |id: u32| id == 3 || id == 5;
        let loc = StoreLocation::from(store.path());
        let found = devices_serving_in(run.path(), &loc, "vm@t1", exists);
        assert_eq!(found.iter().map(|s| s.dev_id).collect::<Vec<_>>(), [3]);
        assert!(devices_serving_in(run.path(), &loc, "vm@t2", exists).is_empty());
        // The same store named by another path is the same store.
        let other_name = StoreLocation::from(store.path().join(".").as_path());
        assert_eq!(
            devices_serving_in(run.path(), &other_name, "vm@t1", exists).len(),
            1
        );
    }
}
