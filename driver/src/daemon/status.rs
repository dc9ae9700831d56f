//! The run file of a mount, `/run/livemount/ublkbN.json` (0600 in a 0700
//! directory): what `status`, `unmount` and `mount --recover` read.

use crate::config::MountConfig;
use crate::block::prestage::PrestageReport;
use crate::cache::CacheReport;
use crate::error::{Error, Result};
use crate::metrics::IoReport;
use crate::paths::RUN_DIR;
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
    /// The copy the read path uses, as measured at mount (see [`crate::copy`]).
    #[serde(default)]
    pub read_copy: Option<String>,
}

/// The status file of device `dev_id`.
pub fn status_path(dev_id: u32) -> PathBuf {
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

/// Write `st` atomically (0600; the directory is created 0700).
pub fn write_status(st: &MountStatus) -> Result<()> {
    crate::paths::run_dir()?;
    let path = status_path(st.dev_id);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(st).map_err(|e| Error::Invalid(e.to_string()))?;
    livemount_store::fsutil::write_atomic_nosync_dir(&tmp, &path, &text, 0o600).or_else(|_| {
        let _ = std::fs::remove_file(&tmp);
        livemount_store::fsutil::write_atomic_nosync_dir(&tmp, &path, &text, 0o600)
    })
}

/// True if a process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}
