//! The worker pool of the frontends: blocking work (store reads, zstd decoding,
//! fsync) moved off the threads that read requests, which must keep serving other
//! requests meanwhile. A panicking job is contained (the request already got EIO
//! through [`super::guarded`]); the worker lives on.

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
