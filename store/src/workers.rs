//! Worker threads, in one place and two shapes:
//!
//! - [`Pool`]: long-lived named threads serving jobs that arrive over time (the
//!   frontends' blocking request work, sequential read-ahead). A queue bounded or
//!   not; a panicking job is contained and the worker lives on.
//! - [`with_workers`]: a batch split across a few scoped threads that borrow the
//!   caller's state while the calling thread does its own part (backup's reader,
//!   a progress loop), joined before it returns. [`parallel_map`] is built on it
//!   (verify, restore); pre-staging and migration use it directly.
//!
//! Nothing else in the project spawns a group of workers.

use crate::error::Result;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Threads to use for CPU-bound store work (hashing, compression, decoding).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16)
}

type Job = Box<dyn FnOnce() + Send>;

enum Queue {
    Unbounded(Sender<Job>),
    Bounded(SyncSender<Job>),
}

/// A fixed set of named worker threads over one job queue. The threads end once
/// the pool is dropped (or [`Pool::shut_down`]) and the queued jobs have run.
pub struct Pool {
    name: String,
    queue: Mutex<Option<Queue>>,
}

impl Pool {
    /// `threads` workers named `NAME-k` over an unbounded queue.
    pub fn new(name: &str, threads: usize) -> Arc<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        Self::start(name, threads, Queue::Unbounded(tx), rx)
    }

    /// `threads` workers over a queue of at most `queue` waiting jobs:
    /// [`Pool::try_spawn`] refuses a job when it is full.
    pub fn bounded(name: &str, threads: usize, queue: usize) -> Arc<Pool> {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        Self::start(name, threads, Queue::Bounded(tx), rx)
    }

    fn start(name: &str, threads: usize, queue: Queue, rx: Receiver<Job>) -> Arc<Pool> {
        let rx = Arc::new(Mutex::new(rx));
        for k in 0..threads.max(1) {
            let (rx, what) = (rx.clone(), name.to_string());
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{k}"))
                .spawn(move || worker(&what, &rx));
            if let Err(e) = spawned {
                // The other workers (or, with none, `spawn`'s callers, who see the
                // jobs never run only if no thread started at all) carry on.
                eprintln!("livemount: {name} worker {k} not started: {e}");
            }
        }
        Arc::new(Pool {
            name: name.to_string(),
            queue: Mutex::new(Some(queue)),
        })
    }

    /// Queue `job`, waiting for room in a bounded queue; false once the pool is
    /// shut down.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) -> bool {
        // The wait for room happens outside the lock, so `try_spawn` and
        // `shut_down` never wait behind it.
        let q = match self.queue.lock() {
            Ok(q) => match q.as_ref() {
                Some(Queue::Unbounded(tx)) => Queue::Unbounded(tx.clone()),
                Some(Queue::Bounded(tx)) => Queue::Bounded(tx.clone()),
                None => return false,
            },
            Err(_) => return false,
        };
        match q {
            Queue::Unbounded(tx) => tx.send(Box::new(job)).is_ok(),
            Queue::Bounded(tx) => tx.send(Box::new(job)).is_ok(),
        }
    }

    /// Queue `job` unless a bounded queue is full or the pool is shut down.
    pub fn try_spawn(&self, job: impl FnOnce() + Send + 'static) -> bool {
        let Ok(q) = self.queue.lock() else {
            return false;
        };
        match q.as_ref() {
            Some(Queue::Unbounded(tx)) => tx.send(Box::new(job)).is_ok(),
            Some(Queue::Bounded(tx)) => !matches!(
                tx.try_send(Box::new(job)),
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_))
            ),
            None => false,
        }
    }

    /// Take no more jobs; the workers end after the queued ones.
    pub fn shut_down(&self) {
        if let Ok(mut q) = self.queue.lock() {
            q.take();
        }
    }

    /// The name its threads carry.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn worker(name: &str, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else {
            return; // the pool is gone
        };
        // A panicking job must not take the worker with it: callers that owe a
        // reply (a frontend request) catch their own panics first and answer EIO.
        if let Err(p) = catch_unwind(AssertUnwindSafe(job)) {
            eprintln!("livemount: a {name} job panicked: {}", panic_message(&*p));
        }
    }
}

/// The text of a caught panic.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Run `worker(k)` for each `k` in `0..threads` on scoped threads while `main`
/// runs on the calling thread; return `main`'s result once every worker has
/// returned. A worker's panic is passed on to the caller after the join.
pub fn with_workers<R>(
    threads: usize,
    worker: impl Fn(usize) + Sync,
    main: impl FnOnce() -> R,
) -> R {
    std::thread::scope(|s| {
        for k in 0..threads {
            let w = &worker;
            s.spawn(move || w(k));
        }
        main()
    })
}

/// Call `job(i)` for every `i` in `0..n` on `threads` threads and return the results
/// in order. Stops handing out work after the first error, which it returns.
pub fn parallel_map<R: Send>(
    n: usize,
    threads: usize,
    job: impl Fn(usize) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    let first_err = Mutex::new(None);
    let each = |_| loop {
        if failed.load(Ordering::Relaxed) {
            break;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        match job(i) {
            Ok(r) => {
                if let Ok(mut v) = results.lock() {
                    v[i] = Some(r);
                }
            }
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                if let Ok(mut fe) = first_err.lock() {
                    fe.get_or_insert(e);
                }
            }
        }
    };
    with_workers(threads.clamp(1, n.max(1)), each, || ());
    if let Some(e) = first_err.into_inner().ok().flatten() {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .map(|v| v.into_iter().flatten().collect())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn a_pool_runs_every_job_and_survives_a_panicking_one() {
        let pool = Pool::new("test-pool", 2);
        let (tx, rx) = channel();
        assert!(pool.spawn(|| panic!("on purpose")));
        for i in 0..10 {
            let tx = tx.clone();
            assert!(pool.spawn(move || tx.send(i).unwrap_or(())));
        }
        let mut got: Vec<i32> = (0..10)
            .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("a job ran"))
            .collect();
        got.sort();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        assert_eq!(pool.name(), "test-pool");
    }

    #[test]
    fn a_full_bounded_pool_refuses_a_job_and_a_shut_down_one_refuses_all() {
        let pool = Pool::bounded("test-bounded", 1, 1);
        let (hold_tx, hold_rx) = channel::<()>();
        let (started_tx, started_rx) = channel();
        // The worker waits in the first job; the second fills the queue.
        assert!(pool.spawn(move || {
            let _ = started_tx.send(());
            let _ = hold_rx.recv();
        }));
        started_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the worker started");
        assert!(pool.try_spawn(|| ()));
        assert!(!pool.try_spawn(|| ()), "a full queue took a job");
        let _ = hold_tx.send(());
        pool.shut_down();
        assert!(!pool.spawn(|| ()));
        assert!(!pool.try_spawn(|| ()));
    }

    #[test]
    fn with_workers_runs_each_worker_beside_main_and_joins_them() {
        let seen = Mutex::new(Vec::new());
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        // main waits for every worker's message: they really run beside it.
        let r = with_workers(
            3,
            |k| {
                seen.lock().unwrap().push(k);
                let _ = tx.lock().unwrap().send(k);
            },
            || {
                (0..3)
                    .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("a worker"))
                    .sum::<usize>()
            },
        );
        assert_eq!(r, 3);
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2]);
    }

    #[test]
    fn parallel_map_keeps_order_and_returns_the_first_error() {
        let v = parallel_map(100, 4, |i| Ok(i * 2)).unwrap();
        assert_eq!(v, (0..100).map(|i| i * 2).collect::<Vec<_>>());
        let e = parallel_map(100, 4, |i| {
            if i == 37 {
                Err(Error::Invalid("item 37".into()))
            } else {
                Ok(i)
            }
        })
        .unwrap_err();
        assert!(e.to_string().contains("item 37"), "{e}");
        assert!(parallel_map(0, 4, Ok).unwrap().is_empty());
    }
}
