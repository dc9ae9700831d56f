//! Crash-safe file creation: temp file, fsync, rename, fsync the directory.

use crate::error::{IoContext, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A unique temp file name in `tmp_dir` (pid + sequence, so concurrent writers in
/// one store never collide).
pub fn temp_path(tmp_dir: &Path, tag: &str) -> PathBuf {
    let n = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    tmp_dir.join(format!("{tag}.{}.{n}.tmp", std::process::id()))
}

/// fsync a directory so that a rename or create inside it is durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    #[cfg(test)]
    SYNCED_DIRS.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

#[cfg(test)]
thread_local! {
    /// Directories this thread fsynced (tests check the durability protocol with it).
    pub static SYNCED_DIRS: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write `bytes` to `tmp` (mode 0600 or 0644 per `mode`), fsync it and rename it to
/// `dest`. The caller fsyncs `dest`'s directory (batched when writing many files).
/// On error the temp file is removed, so a full disk leaves nothing behind.
pub fn write_atomic_nosync_dir(tmp: &Path, dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let res = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(tmp)
            .at(tmp)?;
        f.write_all(bytes).at(tmp)?;
        f.sync_all().at(tmp)?;
        fs::rename(tmp, dest).at(dest)
    })();
    if res.is_err() {
        let _ = fs::remove_file(tmp);
    }
    res
}

/// [`write_atomic_nosync_dir`] followed by an fsync of `dest`'s directory.
pub fn write_atomic(tmp: &Path, dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_nosync_dir(tmp, dest, bytes, mode)?;
    if let Some(dir) = dest.parent() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// `flock(2)` on an open file; released when the file is closed.
pub fn flock(file: &File, exclusive: bool, wait: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    // SAFETY: flock on a valid open descriptor owned by `file`; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bytes available to unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the zeroed (plain C) struct we own; `c` is a valid C
    // string that outlives the call.
    let (rc, st) = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(c.as_ptr(), &mut st), st)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Deallocate `len` bytes at `at` of `f` (they read as zeros after).
pub fn punch_hole(f: &File, at: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor `f` owns; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Make `len` bytes at `at` of `f` read as zeros: a hole where `punch` and the file
/// system allow it, else written zeros (1 MiB at a time).
pub fn zero_range(f: &File, at: u64, len: u64, punch: bool) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    if punch && punch_hole(f, at, len).is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = at;
    while pos < at + len {
        let n = (at + len - pos).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// The data extents of `file` within `start..end`, as (start, end) pairs (SEEK_DATA /
/// SEEK_HOLE); where the file system cannot say, everything from there is data.
pub fn data_extents(file: &File, start: u64, end: u64) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        // SAFETY: lseek on our own open descriptor; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            // No SEEK_DATA here: every byte from here on may be data.
            out.push((pos, end));
            return out;
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole));
        pos = hole;
    }
    out
}
