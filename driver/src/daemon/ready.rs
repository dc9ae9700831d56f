//! How a mount tells whoever started it (`--daemon`, `--auto-recover`) that its
//! device is ready: one typed JSON line on an inherited pipe whose number is in
//! `LIVEMOUNT_READY_FD`. No log text is parsed; a child that exits without a
//! message is reported with its exit status or signal.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus};

/// The environment variable naming the pipe's write end in the child.
pub const READY_FD_ENV: &str = "LIVEMOUNT_READY_FD";

/// What a mount reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    /// The device is live.
    Ready {
        /// Its path, e.g. `/dev/ublkb0`.
        device: String,
        /// The pid of the daemon serving it.
        pid: u32,
    },
}

/// Report `msg` to the parent, if one is listening (once; later calls do nothing).
pub fn notify(msg: &Readiness) {
    let Some(fd) = ready_fd() else {
        return;
    };
    static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    // SAFETY: the parent passed this descriptor to us for exactly this message; we
    // take ownership once (TAKEN above) and close it after.
    let mut f = unsafe { File::from_raw_fd(fd) };
    if let Ok(mut line) = serde_json::to_string(msg) {
        line.push('\n');
        let _ = f.write_all(line.as_bytes());
    }
}

/// The readiness pipe named in the environment, if it is one: at least fd 3 (never
/// stdin, stdout or stderr) and a pipe; anything else is ignored.
fn ready_fd() -> Option<i32> {
    let fd = std::env::var(READY_FD_ENV).ok()?.parse::<i32>().ok()?;
    if fd < 3 {
        return None;
    }
    // SAFETY: fstat on a descriptor number into a zeroed struct we own; a closed or
    // invalid number only makes it fail.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return None;
    }
    Some(fd)
}

/// A child started with a readiness pipe.
pub struct Watched {
    /// The child process.
    pub child: Child,
    reader: BufReader<File>,
}

/// Spawn `cmd` with a readiness pipe.
pub fn spawn(cmd: &mut Command) -> Result<Watched> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own. O_CLOEXEC on both:
    // the write end is duplicated without it into the child below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("readiness pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // An inheritable copy for the child; ours closes after the spawn, so EOF on
    // the read end means every holder of the write end is gone.
    // SAFETY: fcntl F_DUPFD on a descriptor we own; the result is owned below.
    let inheritable = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_DUPFD, 3) };
    if inheritable < 0 {
        return Err(Error::io("readiness pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh descriptor from F_DUPFD (without FD_CLOEXEC).
    let inheritable = unsafe { OwnedFd::from_raw_fd(inheritable) };
    drop(w);
    let child = cmd
        .env(READY_FD_ENV, inheritable.as_raw_fd().to_string())
        .spawn()
        .map_err(|e| Error::io("livemount child process", e))?;
    drop(inheritable);
    Ok(Watched {
        child,
        reader: BufReader::new(File::from(r)),
    })
}

impl Watched {
    /// Wait for the child's message; `Err` with how it ended if it exits first.
    pub fn wait_ready(&mut self) -> std::result::Result<Readiness, ExitStatus> {
        let mut line = String::new();
        if self.reader.read_line(&mut line).is_ok() {
            if let Ok(msg) = serde_json::from_str::<Readiness>(line.trim()) {
                return Ok(msg);
            }
        }
        match self.child.wait() {
            Ok(status) => Err(status),
            Err(_) => Err(std::os::unix::process::ExitStatusExt::from_raw(1 << 8)),
        }
    }
}

/// "exit status 1", "killed by signal 9 (SIGKILL)": how a child ended, for errors.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(9)) => "killed by signal 9 (SIGKILL; out of memory?)".into(),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_reports_is_ready_and_one_that_dies_is_described() {
        let msg = Readiness::Ready {
            device: "/dev/ublkb7".into(),
            pid: 42,
        };
        let line = serde_json::to_string(&msg).unwrap();
        let mut w = spawn(
            // Through /proc: dash's `>&N` takes one digit only, and with other tests'
            // files open the pipe's number may be 10 or more.
            Command::new("sh").args([
                "-c",
                &format!("echo '{line}' > /proc/self/fd/${READY_FD_ENV}; sleep 0.1"),
            ]),
        )
        .unwrap();
        assert_eq!(w.wait_ready().unwrap(), msg);
        let _ = w.child.wait();
        let mut w = spawn(Command::new("sh").args(["-c", "kill -9 $$"])).unwrap();
        let st = w.wait_ready().unwrap_err();
        assert_eq!(describe(st), "killed by signal 9 (SIGKILL; out of memory?)");
        let mut w = spawn(Command::new("sh").args(["-c", "exit 3"])).unwrap();
        assert_eq!(describe(w.wait_ready().unwrap_err()), "exit status 3");
    }

    #[test]
    fn only_an_inherited_pipe_is_taken_as_the_readiness_channel() {
        // Run in a child so the variable is set for it alone.
        let me = std::env::current_exe().unwrap();
        for (fd, want) in [("1", "none"), ("2", "none"), ("999", "none"), ("x", "none")] {
            let out = Command::new(&me)
                .args([
                    "--exact",
                    "daemon::ready::tests::print_ready_fd",
                    "--nocapture",
                ])
                .env(READY_FD_ENV, fd)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&format!("ready_fd={want}")),
                "fd {fd}: {text}"
            );
        }
    }

    /// Helper of the test above (prints what `ready_fd` found).
    #[test]
    fn print_ready_fd() {
        match ready_fd() {
            Some(fd) => println!("ready_fd={fd}"),
            None => println!("ready_fd=none"),
        }
    }
}
