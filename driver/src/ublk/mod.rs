//! The ublk frontend: serves a [`BlockBackend`] as `/dev/ublkbN` through the kernel's
//! ublk driver and libublk.
//!
//! One thread per hardware queue runs one async task per tag (libublk's async style).
//! Reads that hit the memory tier and writes (which land in the overlay's page cache)
//! complete on the queue thread; everything that may block — store reads, decoding,
//! fsync — goes to a [`pool::Pool`] and the task waits on an eventfd read submitted
//! to the queue's io_uring, so other tags keep being served.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! if the daemon dies, the device stays, I/O waits, and a new daemon can take over
//! (`livemount mount --recover`). Re-issued writes are harmless for the overlay.

pub mod pool;

use crate::error::Result as LmResult;
use crate::metrics::IoMetrics;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError, UblkFlags};
use pool::{Completion, Pool};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the device serves: the layer below the frontend.
pub trait BlockBackend: Send + Sync {
    /// Bytes in the device.
    fn size(&self) -> u64;
    /// Read (may block).
    fn read(&self, offset: u64, buf: &mut [u8]) -> LmResult<()>;
    /// Read only if it needs no I/O (memory hits); false otherwise.
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool;
    /// Write (to the overlay's page cache; not durable before `flush`).
    fn write(&self, offset: u64, buf: &[u8]) -> LmResult<()>;
    /// Discard / write zeroes.
    fn discard(&self, offset: u64, len: u64) -> LmResult<()>;
    /// Make completed writes durable.
    fn flush(&self) -> LmResult<()>;
    /// Refuse writes.
    fn read_only(&self) -> bool;
}

/// Device settings.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Hardware queues.
    pub queues: u16,
    /// Depth of each queue.
    pub depth: u16,
    /// Largest request, bytes.
    pub max_io_bytes: u32,
    /// Recover device `N` (after its daemon died) instead of adding a new one.
    pub recover: Option<u32>,
    /// Worker threads for blocking work.
    pub workers: usize,
}

/// Check that the kernel can create ublk devices, with advice if not.
pub fn check_driver() -> LmResult<()> {
    if std::path::Path::new("/dev/ublk-control").exists() {
        return Ok(());
    }
    let loaded = std::fs::read_to_string("/proc/modules")
        .map(|m| m.contains("ublk_drv"))
        .unwrap_or(false);
    Err(crate::Error::Invalid(if loaded {
        "ublk_drv is loaded but /dev/ublk-control is missing (is /dev a devtmpfs?)".into()
    } else {
        "the kernel's ublk driver is not loaded: run `modprobe ublk_drv` (needs CONFIG_BLK_DEV_UBLK, Linux 6.0+)".into()
    }))
}

const OP_READ: u32 = libublk::sys::UBLK_IO_OP_READ;
const OP_WRITE: u32 = libublk::sys::UBLK_IO_OP_WRITE;
const OP_FLUSH: u32 = libublk::sys::UBLK_IO_OP_FLUSH;
const OP_DISCARD: u32 = libublk::sys::UBLK_IO_OP_DISCARD;
const OP_WRITE_ZEROES: u32 = libublk::sys::UBLK_IO_OP_WRITE_ZEROES;
const F_FUA: u32 = libublk::sys::UBLK_IO_F_FUA;

struct Shared {
    backend: Arc<dyn BlockBackend>,
    metrics: Arc<IoMetrics>,
    pool: Arc<Pool>,
}

/// Run `job` on the pool and wait for it without blocking the queue thread.
async fn offload<R: Send + 'static>(
    shared: &Shared,
    done: &Completion,
    job: impl FnOnce() -> R + Send + 'static,
) -> Option<R> {
    let slot: Arc<Mutex<Option<R>>> = Arc::new(Mutex::new(None));
    let signaller = done.signaller().ok()?;
    let s2 = slot.clone();
    if !shared.pool.spawn(move || {
        let r = job();
        if let Ok(mut g) = s2.lock() {
            *g = Some(r);
        }
        signaller.signal();
    }) {
        return None;
    }
    let mut counter = Box::new(0u64);
    let sqe = io_uring::opcode::Read::new(
        io_uring::types::Fd(done.raw()),
        &mut *counter as *mut u64 as *mut u8,
        8,
    )
    .build();
    // The eventfd read completes when the worker signals; `counter` outlives it
    // because we await the completion right here.
    let _ = libublk::uring_async::ublk_submit_sqe_async(sqe, libublk::UblkUringData::Target as u64)
        .await;
    let r = slot.lock().ok()?.take();
    r
}

fn errno(e: &crate::Error) -> i32 {
    -e.errno().abs().max(1)
}

async fn handle(
    q: &UblkQueue<'_>,
    tag: u16,
    shared: &Rc<Shared>,
    buf: &IoBuf<u8>,
    done: &Completion,
) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let fua = iod.op_flags & F_FUA != 0;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    let be = &shared.backend;
    let m = &shared.metrics;
    let start = Instant::now();
    if op != OP_FLUSH
        && (len > buf.len() && matches!(op, OP_READ | OP_WRITE)
            || offset.checked_add(len as u64).is_none_or(|e| e > be.size()))
    {
        m.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return -libc::EINVAL;
    }
    use std::sync::atomic::Ordering::Relaxed;
    let res = match op {
        OP_READ => {
            m.reads.fetch_add(1, Relaxed);
            // SAFETY: the tag's buffer is ours until we commit this request.
            let out = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), len) };
            let r = if be.read_cached(offset, out) {
                m.inline_reads.fetch_add(1, Relaxed);
                len as i32
            } else {
                let be2 = be.clone();
                let res = offload(shared, done, move || {
                    let mut v = vec![0u8; len];
                    be2.read(offset, &mut v).map(|_| v)
                })
                .await;
                match res {
                    Some(Ok(v)) => {
                        out.copy_from_slice(&v);
                        len as i32
                    }
                    Some(Err(e)) => {
                        eprintln!("livemount: read of {len} bytes at {offset} failed: {e}");
                        errno(&e)
                    }
                    None => -libc::EIO,
                }
            };
            if r > 0 {
                m.read_bytes.fetch_add(len as u64, Relaxed);
            }
            m.read_latency.record(start.elapsed());
            r
        }
        OP_WRITE if be.read_only() => -libc::EROFS,
        OP_WRITE => {
            m.writes.fetch_add(1, Relaxed);
            // SAFETY: as above; the kernel filled the buffer with the data to write.
            let data = unsafe { std::slice::from_raw_parts(buf.as_ptr(), len) };
            let mut r = match be.write(offset, data) {
                Ok(()) => len as i32,
                Err(e) => {
                    eprintln!("livemount: write of {len} bytes at {offset} failed: {e}");
                    errno(&e)
                }
            };
            if r > 0 {
                m.write_bytes.fetch_add(len as u64, Relaxed);
                if fua {
                    m.flushes.fetch_add(1, Relaxed);
                    let be2 = be.clone();
                    r = match offload(shared, done, move || be2.flush()).await {
                        Some(Ok(())) => r,
                        Some(Err(e)) => errno(&e),
                        None => -libc::EIO,
                    };
                }
            }
            m.write_latency.record(start.elapsed());
            r
        }
        OP_FLUSH => {
            m.flushes.fetch_add(1, Relaxed);
            if be.read_only() {
                0
            } else {
                let be2 = be.clone();
                match offload(shared, done, move || be2.flush()).await {
                    Some(Ok(())) => 0,
                    Some(Err(e)) => {
                        eprintln!("livemount: flush failed: {e}");
                        errno(&e)
                    }
                    None => -libc::EIO,
                }
            }
        }
        OP_DISCARD | OP_WRITE_ZEROES if be.read_only() => -libc::EROFS,
        OP_DISCARD | OP_WRITE_ZEROES => {
            m.discards.fetch_add(1, Relaxed);
            let be2 = be.clone();
            match offload(shared, done, move || be2.discard(offset, len as u64)).await {
                Some(Ok(())) => 0,
                Some(Err(e)) => errno(&e),
                None => -libc::EIO,
            }
        }
        _ => -libc::EOPNOTSUPP,
    };
    if res < 0 {
        m.errors.fetch_add(1, Relaxed);
    }
    res
}

async fn io_task(q: &UblkQueue<'_>, tag: u16, shared: Rc<Shared>) -> Result<(), UblkError> {
    let buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    let done = Completion::new().map_err(UblkError::IOError)?;
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = handle(q, tag, &shared, &buf, &done).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

fn queue_fn(qid: u16, dev: &UblkDev, shared: Rc<Shared>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            eprintln!("livemount: queue {qid} setup failed: {e}");
            return;
        }
    };
    let exe_rc = Rc::new(smol::LocalExecutor::new());
    let exe = exe_rc.clone();
    let mut tasks = Vec::new();
    for tag in 0..dev.dev_info.queue_depth {
        let q = q.clone();
        let sh = shared.clone();
        tasks.push(exe.spawn(async move { io_task(&q, tag, sh).await }));
    }
    let q2 = q.clone();
    smol::block_on(exe_rc.run(async move {
        let run_ops = || while exe.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q2, Some(20), run_ops, done).await {
            eprintln!("livemount: queue {qid}: {e}");
        }
    }));
}

/// Build the control device (new or recovered).
pub fn control(opts: &DeviceOptions) -> LmResult<UblkCtrl> {
    check_driver()?;
    let (id, flags) = match opts.recover {
        Some(id) => (id as i32, UblkFlags::UBLK_DEV_F_RECOVER_DEV),
        None => (-1, UblkFlags::UBLK_DEV_F_ADD_DEV),
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("livemount")
        .id(id)
        .nr_queues(opts.queues.max(1))
        .depth(opts.depth.clamp(1, 1024))
        .io_buf_bytes(opts.max_io_bytes)
        .ctrl_flags(
            (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE)
                as u64,
        )
        .dev_flags(flags)
        .build()
        .map_err(|e| {
            crate::Error::Invalid(format!(
                "cannot {} ublk device: {e}",
                if opts.recover.is_some() {
                    "recover"
                } else {
                    "create"
                }
            ))
        })?;
    if let Some(id) = opts.recover {
        // The kernel only lets a new daemon fetch I/O of a quiesced device after
        // START_USER_RECOVERY (libublk retries it while the dead daemon's char device
        // is still being released); run_target then ends the recovery.
        match ctrl.start_user_recover() {
            Ok(r) if r >= 0 => {}
            Ok(r) => return Err(recover_error(id, std::io::Error::from_raw_os_error(-r))),
            Err(e) => return Err(recover_error(id, e)),
        }
    }
    Ok(ctrl)
}

fn recover_error(id: u32, e: impl std::fmt::Display) -> crate::Error {
    crate::Error::Invalid(format!(
        "cannot recover /dev/ublkb{id}: {e} (is its daemon still running? `livemount status`)"
    ))
}

/// Serve `backend` on `ctrl` until the device is stopped. `ready` runs once the
/// device is live, with the control device (to learn its id and path).
pub fn serve(
    ctrl: &UblkCtrl,
    backend: Arc<dyn BlockBackend>,
    metrics: Arc<IoMetrics>,
    workers: usize,
    ready: impl FnOnce(&UblkCtrl) + Send + Sync + 'static,
) -> LmResult<()> {
    let size = backend.size();
    let read_only = backend.read_only();
    let pool = Pool::new(workers);
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        let p = &mut dev.tgt.params;
        let mut attrs = libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA;
        if read_only {
            attrs |= libublk::sys::UBLK_ATTR_READ_ONLY;
        } else {
            p.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
            p.discard = libublk::sys::ublk_param_discard {
                discard_alignment: 0,
                discard_granularity: 4096,
                max_discard_sectors: u32::MAX >> 9,
                max_write_zeroes_sectors: u32::MAX >> 9,
                max_discard_segments: 1,
                ..Default::default()
            };
        }
        p.basic.attrs = attrs;
        p.basic.io_min_shift = 9;
        Ok(())
    };
    // Rc<Shared> is per queue thread; the Arcs inside are shared by all queues.
    let shared_parts = (backend, metrics, pool);
    let q_handler = move |qid: u16, dev: &UblkDev| {
        let shared = Rc::new(Shared {
            backend: shared_parts.0.clone(),
            metrics: shared_parts.1.clone(),
            pool: shared_parts.2.clone(),
        });
        queue_fn(qid, dev, shared)
    };
    ctrl.run_target(tgt_init, q_handler, ready)
        .map_err(|e| crate::Error::Invalid(format!("ublk device failed: {e}")))?;
    Ok(())
}
