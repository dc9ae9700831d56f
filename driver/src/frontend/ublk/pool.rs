//! Blocking work moved off the ublk queue threads.
//!
//! Store reads, zstd decoding and fsync can take milliseconds; doing them on a queue
//! thread would stall every other request of that queue. A job runs on a small pool
//! of threads and signals its completion on an eventfd that the waiting I/O task reads
//! through the queue's io_uring, so the queue thread keeps serving other tags
//! meanwhile (the pattern of rublk's compress target).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// A fixed pool of worker threads.
pub struct Pool {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Pool {
    /// Start `threads` workers.
    pub fn new(threads: usize) -> Arc<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let _ = std::thread::Builder::new()
                .name(format!("livemount-io-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        // A panicking job must not take the worker with it.
                        Ok(job) => {
                            let _ = crate::frontend::guarded("an I/O worker job", job);
                        }
                        Err(_) => return,
                    }
                });
        }
        Arc::new(Pool {
            tx: Mutex::new(Some(tx)),
        })
    }

    /// Queue `job`; false if the pool is shut down.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> bool {
        match self.tx.lock() {
            Ok(g) => g.as_ref().is_some_and(|tx| tx.send(Box::new(job)).is_ok()),
            Err(_) => false,
        }
    }
}

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
