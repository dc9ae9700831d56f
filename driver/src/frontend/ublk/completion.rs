//! How a job on the worker pool ([`livemount_store::workers::Pool`]) tells a ublk queue it is
//! done: an eventfd that the waiting I/O task reads through the queue's io_uring, so
//! the queue thread keeps serving other tags meanwhile (the pattern of rublk's
//! compress target).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// An eventfd a worker writes when a job is done.
pub struct Completion {
    fd: OwnedFd,
}

impl Completion {
    /// A new eventfd.
    pub fn new() -> std::io::Result<Completion> {
        // SAFETY: eventfd has no memory arguments; the returned descriptor is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(Completion {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The raw descriptor (for the io_uring read).
    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// A handle workers use to signal.
    pub fn signaller(&self) -> std::io::Result<Signaller> {
        Ok(Signaller {
            fd: self.fd.try_clone()?,
        })
    }
}

/// Signals a [`Completion`] from another thread.
pub struct Signaller {
    fd: OwnedFd,
}

impl Signaller {
    /// Wake the waiting task.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
    }
}
