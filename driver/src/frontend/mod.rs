//! Frontends: what turns the top of the block stack into a device a hypervisor
//! attaches. Each frontend is a module of its own ([`ublk`] today) and sees the
//! stack only as an `Arc<dyn BlockDevice>`.
//!
//! The protocol-independent part lives here: [`start`] maps one request (read,
//! write, flush, discard, write-zeroes, with FUA) to block calls, decides what can
//! complete at once on the frontend's own thread (memory hits, writes into the
//! overlay's page cache) and what must move to a worker (anything that may block),
//! and turns every error — a panic on the I/O path included — into an errno for
//! that request alone.

pub mod nbd;
pub mod ublk;

use crate::block::BlockDevice;
use crate::metrics::IoMetrics;
use livemount_store::error::Error;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// A block request as every frontend sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes.
    Read,
    /// Write `len` bytes from the request's buffer.
    Write,
    /// Make completed writes durable.
    Flush,
    /// Release a range (reads back as zeros).
    Discard,
    /// Write zeros to a range.
    WriteZeroes,
    /// Anything else: EOPNOTSUPP.
    Other(u32),
}

/// One request: operation, flags and range.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Forced unit access: a write that is durable when it completes.
    pub fua: bool,
    /// Byte offset.
    pub offset: u64,
    /// Bytes.
    pub len: usize,
}

/// Work moved to a worker: gets the request's part of its buffer (a READ fills it in
/// place, so the data is copied once, from the cache into the buffer) and returns
/// the completion result (bytes or -errno).
pub type Job = Box<dyn FnOnce(&mut [u8]) -> i32 + Send>;

/// One request, decided on the frontend's thread.
pub enum Step {
    /// Complete at once with this result (bytes or -errno).
    Done(i32),
    /// Run this on a worker, then complete with its result.
    Offload(Job),
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Done(r) => write!(f, "Done({r})"),
            Step::Offload(_) => write!(f, "Offload"),
        }
    }
}

/// The errno (negative) a request completes with after `e`.
pub fn errno(e: &Error) -> i32 {
    -e.errno().abs().max(1)
}

/// Run `f`, turning a panic into `Err(message)`: a bug or a crafted input that
/// panics must fail one request with EIO, never hang the device or kill the daemon.
pub fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        let msg = livemount_store::workers::panic_message(&*p);
        eprintln!("livemount: {what} panicked: {msg}; failing the request with EIO");
        msg
    })
}

/// A job that runs `f` on the worker and logs `what` when it fails.
fn job(
    what: String,
    ok: i32,
    f: impl FnOnce(&mut [u8]) -> livemount_store::Result<()> + Send + 'static,
) -> Step {
    Step::Offload(Box::new(move |out: &mut [u8]| {
        match guarded(&what, || f(out)) {
            Ok(Ok(())) => ok,
            Ok(Err(e)) => {
                eprintln!("livemount: {what} failed: {e}");
                errno(&e)
            }
            Err(_) => -libc::EIO,
        }
    }))
}

/// Decide request `req` against `dev`. `buf` is the request's buffer (for a write,
/// its data); it must hold `req.len` bytes for reads and writes.
pub fn start(dev: &Arc<dyn BlockDevice>, m: &IoMetrics, req: Request, buf: &mut [u8]) -> Step {
    let Request {
        op,
        fua,
        offset,
        len,
    } = req;
    let in_range = offset
        .checked_add(len as u64)
        .is_some_and(|e| e <= dev.size());
    let needs_buf = matches!(op, Op::Read | Op::Write);
    if op != Op::Flush && (!in_range || (needs_buf && len > buf.len())) {
        return Step::Done(-libc::EINVAL);
    }
    match op {
        Op::Read => {
            m.reads.fetch_add(1, Relaxed);
            let hit = guarded("a cached read", || dev.read_cached(offset, &mut buf[..len]));
            if hit == Ok(true) {
                m.inline_reads.fetch_add(1, Relaxed);
                return Step::Done(len as i32);
            }
            let dev = dev.clone();
            job(
                format!("read of {len} bytes at {offset}"),
                len as i32,
                move |out| dev.read_at(offset, &mut out[..len]),
            )
        }
        Op::Write | Op::Discard | Op::WriteZeroes if dev.read_only() => Step::Done(-libc::EROFS),
        Op::Write => {
            m.writes.fetch_add(1, Relaxed);
            let what = format!("write of {len} bytes at {offset}");
            match guarded(&what, || dev.write_at(offset, &buf[..len])) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    eprintln!("livemount: {what} failed: {e}");
                    return Step::Done(errno(&e));
                }
                Err(_) => return Step::Done(-libc::EIO),
            }
            m.write_bytes.fetch_add(len as u64, Relaxed);
            if !fua {
                return Step::Done(len as i32);
            }
            m.flushes.fetch_add(1, Relaxed);
            let dev = dev.clone();
            job("flush (FUA write)".into(), len as i32, move |_| dev.flush())
        }
        Op::Flush => {
            m.flushes.fetch_add(1, Relaxed);
            if dev.read_only() {
                return Step::Done(0);
            }
            let dev = dev.clone();
            job("flush".into(), 0, move |_| dev.flush())
        }
        Op::Discard | Op::WriteZeroes => {
            m.discards.fetch_add(1, Relaxed);
            let dev = dev.clone();
            // FUA on a discard or write-zeroes: durable before it completes too.
            job(
                format!("discard of {len} bytes at {offset}"),
                0,
                move |_| {
                    dev.discard(offset, len as u64)?;
                    if fua {
                        dev.flush()?;
                    }
                    Ok(())
                },
            )
        }
        Op::Other(_) => Step::Done(-libc::EOPNOTSUPP),
    }
}

/// Count a completed request (bytes, latency since `start`, errors): every frontend
/// calls this once per request, whether it completed at once or on a worker.
pub fn record_done(m: &IoMetrics, op: Op, res: i32, start: std::time::Instant) {
    match op {
        Op::Read => {
            if res > 0 {
                m.read_bytes.fetch_add(res as u64, Relaxed);
            }
            m.read_latency.record(start.elapsed());
        }
        Op::Write => m.write_latency.record(start.elapsed()),
        _ => {}
    }
    if res < 0 {
        m.errors.fetch_add(1, Relaxed);
    }
}

/// Run a [`Step`] to its result right here (tests, and frontends without queues).
pub fn finish(step: Step, buf: &mut [u8]) -> i32 {
    match step {
        Step::Done(r) => r,
        Step::Offload(job) => job(buf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::mem::MemDisk;

    fn req(op: Op, offset: u64, len: usize) -> Request {
        Request {
            op,
            fua: false,
            offset,
            len,
        }
    }

    fn disk(cached: bool, writable: bool) -> Arc<dyn BlockDevice> {
        let d = MemDisk::new((0..65536u32).map(|i| i as u8).collect(), cached);
        Arc::new(if writable { d.writable() } else { d })
    }

    #[test]
    fn reads_complete_inline_on_a_hit_and_on_a_worker_otherwise() {
        let m = IoMetrics::default();
        let mut buf = vec![0u8; 8192];
        let step = start(&disk(true, false), &m, req(Op::Read, 4096, 4096), &mut buf);
        assert!(matches!(step, Step::Done(4096)), "{step:?}");
        assert_eq!(buf[0], 0);
        assert_eq!(buf[1], 1);
        let mut buf = vec![0u8; 8192];
        let step = start(&disk(false, false), &m, req(Op::Read, 4096, 4096), &mut buf);
        assert!(matches!(step, Step::Offload(_)));
        assert_eq!(finish(step, &mut buf), 4096);
        assert_eq!(buf[1], 1);
        assert_eq!(m.reads.load(Relaxed), 2);
        assert_eq!(m.inline_reads.load(Relaxed), 1);
    }

    #[test]
    fn out_of_range_oversized_and_unknown_requests_are_refused() {
        let m = IoMetrics::default();
        let d = disk(false, true);
        let mut buf = vec![0u8; 4096];
        for r in [
            req(Op::Read, 65536 - 512, 1024),
            req(Op::Write, u64::MAX - 100, 512),
            req(Op::Read, 0, 8192),
            req(Op::Discard, 65536, 512),
        ] {
            assert!(
                matches!(start(&d, &m, r, &mut buf), Step::Done(e) if e == -libc::EINVAL),
                "{r:?}"
            );
        }
        let step = start(&d, &m, req(Op::Other(99), 0, 512), &mut buf);
        assert!(matches!(step, Step::Done(e) if e == -libc::EOPNOTSUPP));
    }

    #[test]
    fn writes_land_below_and_read_only_devices_refuse_them() {
        let m = IoMetrics::default();
        let d = disk(false, true);
        let mut data = vec![0xabu8; 1024];
        assert!(matches!(
            start(&d, &m, req(Op::Write, 512, 1024), &mut data),
            Step::Done(1024)
        ));
        let fua = Request {
            fua: true,
            ..req(Op::Write, 0, 512)
        };
        let step = start(&d, &m, fua, &mut data);
        assert!(
            matches!(step, Step::Offload(_)),
            "a FUA write waits for its flush"
        );
        assert_eq!(finish(step, &mut data), 512);
        let mut back = vec![0u8; 2048];
        d.read_at(0, &mut back).unwrap();
        assert!(back[..1536].iter().all(|&b| b == 0xab));
        let ro = disk(false, false);
        for op in [Op::Write, Op::Discard, Op::WriteZeroes] {
            let step = start(&ro, &m, req(op, 0, 512), &mut data);
            assert!(matches!(step, Step::Done(e) if e == -libc::EROFS), "{op:?}");
        }
        assert!(matches!(
            start(&ro, &m, req(Op::Flush, 0, 0), &mut data),
            Step::Done(0)
        ));
    }

    /// A layer that panics on every call, as a crafted chunk once made the cache do.
    struct Panics;
    impl BlockDevice for Panics {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: u64, _: &mut [u8]) -> livemount_store::Result<()> {
            panic!("index out of bounds")
        }
        fn read_cached(&self, _: u64, _: &mut [u8]) -> bool {
            panic!("index out of bounds")
        }
        fn write_at(&self, _: u64, _: &[u8]) -> livemount_store::Result<()> {
            panic!("boom")
        }
        fn read_only(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_panic_on_the_io_path_fails_that_request_with_eio() {
        let m = IoMetrics::default();
        let d: Arc<dyn BlockDevice> = Arc::new(Panics);
        let mut buf = vec![0u8; 4096];
        let step = start(&d, &m, req(Op::Read, 0, 4096), &mut buf);
        assert_eq!(finish(step, &mut buf), -libc::EIO);
        let step = start(&d, &m, req(Op::Write, 0, 4096), &mut buf);
        assert!(matches!(step, Step::Done(e) if e == -libc::EIO));
    }
}
