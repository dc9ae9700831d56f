//! Where a running livemount keeps its run files (status, logs, overlay map
//! mirrors), and how they are created: one place, so that layers and the daemon
//! agree without importing each other, and every run file is private.

use crate::error::{Error, IoContext, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The run directory (tmpfs on systemd hosts: gone after a reboot, by design).
pub const RUN_DIR: &str = "/run/livemount";

/// A directory the operator named (an overlay or cache directory, a socket's
/// parent): created 0700 if missing; if it exists it must be a real directory (not a
/// symlink). Its mode is never changed: it may be `/tmp` or a hypervisor's images
/// directory, shared with others; the files livemount creates in it are 0600.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => Ok(()),
        Ok(_) => Err(Error::Invalid(format!(
            "{} is not a directory (a symlink or file planted there?)",
            dir.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .at(dir),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Create livemount's own run directory `dir` (0700) or check an existing one: a
/// real directory (not a symlink), owned by us; its mode is tightened to 0700 if it
/// was looser. Only for directories livemount owns (never one the operator names).
fn ensure_private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir.parent().unwrap_or(Path::new("/")))
                .at(dir)?;
            return std::fs::DirBuilder::new().mode(0o700).create(dir).at(dir);
        }
        Err(e) => return Err(Error::io(dir, e)),
    }
    let m = std::fs::symlink_metadata(dir).at(dir)?;
    if !m.file_type().is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not a directory (a symlink or file planted there?); remove it",
            dir.display()
        )));
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(Error::Invalid(format!(
            "{} belongs to uid {}, not to us (uid {me}); remove it",
            dir.display(),
            m.uid()
        )));
    }
    if m.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).at(dir)?;
    }
    Ok(())
}

/// The run directory, created or checked by [`ensure_private_dir`].
pub fn run_dir() -> Result<&'static Path> {
    let dir = Path::new(RUN_DIR);
    ensure_private_dir(dir)?;
    Ok(dir)
}

/// Open `path` for reading and writing, created 0600 if missing, never through a
/// symlink (ELOOP then), never truncated: overlays, migration targets and maps.
pub fn open_private_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Open `path` for appending (a log), 0600, never through a symlink.
pub fn open_private_append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .at(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_dirs_are_checked_but_never_chmodded() {
        let d = tempfile::tempdir().unwrap();
        let shared = d.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_dir(&shared).unwrap();
        let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o1777, "a /tmp-like directory was chmodded");
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&shared, &link).unwrap();
        assert!(ensure_dir(&link).is_err());
        let fresh = d.path().join("a/b");
        ensure_dir(&fresh).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn private_dirs_are_created_tightened_and_never_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let fresh = d.path().join("a/b/run");
        ensure_private_dir(&fresh).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&fresh), 0o700);
        let loose = d.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&loose).unwrap();
        assert_eq!(
            mode(&loose),
            0o700,
            "an existing 0755 directory is tightened"
        );
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&loose, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        // A log is 0600 and a planted symlink is refused, its target untouched.
        let target = d.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let log = d.path().join("log");
        std::os::unix::fs::symlink(&target, &log).unwrap();
        assert!(open_private_append(&log).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let ok = d.path().join("ok.log");
        open_private_append(&ok).unwrap();
        assert_eq!(mode(&ok), 0o600);
    }
}
