//! The ublk frontend: serves the top of the block stack as `/dev/ublkbN` through the kernel's
//! ublk driver and libublk.
//!
//! One thread per hardware queue serves it with libublk's synchronous handler (its
//! async per-tag tasks cost ~70 µs more per request at QD1 under emulation, measured
//! with `rublk add null` vs `rublk add null -a`; docs/performance.md). Reads that hit
//! the memory tier and writes (which land in the overlay's page cache) complete on the
//! queue thread at once; everything that may block — store reads, decoding, fsync —
//! goes to the [`livemount_store::workers::Pool`], whose worker signals an eventfd that the queue reads
//! through its own io_uring (a target I/O of the request's tag), so other tags keep
//! being served meanwhile (the pattern of rublk's compress target).
//!
//! Devices are created with `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`:
//! if the daemon dies, the device stays, I/O waits, and a new daemon can take over
//! (`livemount mount --recover`). Re-issued writes are harmless for the overlay.

pub mod completion;

use crate::block::BlockDevice;
use crate::error::Result as LmResult;
use crate::frontend::{self, Op, Request, Step};
use crate::metrics::IoMetrics;
use completion::Completion;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkFlags, UblkIORes};
use livemount_store::workers::Pool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

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

/// The frontend-independent request of a ublk I/O descriptor's fields.
fn request(op_flags: u32, start_sector: u64, nr_sectors: u32) -> Request {
    let op = match op_flags & 0xff {
        OP_READ => Op::Read,
        OP_WRITE => Op::Write,
        OP_FLUSH => Op::Flush,
        OP_DISCARD => Op::Discard,
        OP_WRITE_ZEROES => Op::WriteZeroes,
        other => Op::Other(other),
    };
    Request {
        op,
        fua: op_flags & F_FUA != 0,
        // A sector number past 2^55 would wrap: saturate, and the range check fails.
        offset: start_sector.saturating_mul(512),
        len: (nr_sectors as usize) << 9,
    }
}

struct Shared {
    device: Arc<dyn BlockDevice>,
    metrics: Arc<IoMetrics>,
    pool: Arc<Pool>,
}

/// Per-tag state of work moved to the pool: the result slot, the eventfd the worker
/// signals, and the 8-byte buffer the io_uring read of that eventfd fills.
struct TagState {
    /// Completion result (bytes or -errno) the worker leaves for the queue thread.
    slot: Arc<Mutex<Option<i32>>>,
    done: Completion,
    counter: Box<u64>,
    start: Instant,
    op: Op,
}

/// The per-tag state of a queue of `depth` tags (one eventfd each).
fn tag_states(depth: usize) -> std::io::Result<Vec<TagState>> {
    (0..depth)
        .map(|_| {
            Ok(TagState {
                slot: Arc::new(Mutex::new(None)),
                done: Completion::new()?,
                counter: Box::new(0),
                start: Instant::now(),
                op: Op::Other(0),
            })
        })
        .collect()
}

/// Serve one queue with libublk's synchronous handler: requests that complete at
/// once (memory hits, writes to the overlay's page cache) cost no task switch; the
/// rest run on the pool and come back as the completion of an eventfd read on this
/// queue's io_uring, tagged as target I/O of the request's tag.
fn queue_fn(qid: u16, dev: &UblkDev, shared: Shared) {
    let depth = dev.dev_info.queue_depth as usize;
    // Shared with the pool: a worker fills the buffer of the tag it serves, and keeps
    // the buffers alive even if the queue stops while it is still running.
    let bufs = Arc::new(dev.alloc_queue_io_bufs());
    let mut tags = match tag_states(depth) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("livemount: queue {qid}: eventfd: {e}");
            return;
        }
    };
    let bufs2 = bufs.clone();
    let handler =
        move |q: &UblkQueue, tag: u16, io: &UblkIOCtx| {
            let buf = &bufs2[tag as usize];
            let t = &mut tags[tag as usize];
            let complete = |q: &UblkQueue, res: i32| {
                if let Err(e) = q.complete_io_cmd_unified(
                    tag,
                    BufDesc::Slice(buf.as_slice()),
                    Ok(UblkIORes::Result(res)),
                ) {
                    eprintln!("livemount: queue {qid}: completing tag {tag}: {e}");
                }
            };
            if io.is_tgt_io() {
                // The pool finished this tag's request.
                let res = t
                    .slot
                    .lock()
                    .ok()
                    .and_then(|mut g| g.take())
                    .unwrap_or(-libc::EIO);
                frontend::record_done(&shared.metrics, t.op, res, t.start);
                complete(q, res);
                return;
            }
            let iod = q.get_iod(tag);
            let req = request(iod.op_flags, iod.start_sector, iod.nr_sectors);
            let op_flags = iod.op_flags;
            t.start = Instant::now();
            t.op = req.op;
            // SAFETY: the tag's buffer is ours until we complete this request; the kernel
            // filled it with a write's data, and a read fills it here or on the worker.
            let tag_buf = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), buf.len()) };
            match frontend::start(&shared.device, &shared.metrics, req, tag_buf) {
                Step::Done(res) => {
                    frontend::record_done(&shared.metrics, req.op, res, t.start);
                    complete(q, res);
                }
                Step::Offload(job) => {
                    let slot = t.slot.clone();
                    let Ok(signaller) = t.done.signaller() else {
                        complete(q, -libc::EIO);
                        return;
                    };
                    let bufs = bufs2.clone();
                    let queued = shared.pool.spawn(move || {
                        let buf = &bufs[tag as usize];
                        let n = req.len.min(buf.len());
                        // SAFETY: the tag's buffer belongs to this request until the queue
                        // thread completes it, which it does only after this job signals;
                        // the queue thread does not touch it meanwhile, and `bufs` keeps
                        // the allocation alive.
                        let out = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr(), n) };
                        let res = job(out);
                        if let Ok(mut g) = slot.lock() {
                            *g = Some(res);
                        }
                        signaller.signal();
                    });
                    if !queued {
                        complete(q, -libc::EIO);
                        return;
                    }
                    let sqe =
                        io_uring::opcode::Read::new(
                            io_uring::types::Fd(t.done.raw()),
                            &mut *t.counter as *mut u64 as *mut u8,
                            8,
                        )
                        .build()
                        .user_data(UblkIOCtx::build_user_data(tag, op_flags & 0xff, 0, true));
                    if let Err(e) = q.ublk_submit_sqe_sync(sqe) {
                        eprintln!("livemount: queue {qid}: cannot wait for tag {tag}: {e}");
                    }
                }
            }
        };
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            eprintln!("livemount: queue {qid} setup failed: {e}");
            return;
        }
    };
    queue.wait_and_handle_io(handler);
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
    backend: Arc<dyn BlockDevice>,
    metrics: Arc<IoMetrics>,
    workers: usize,
    ready: impl FnOnce(&UblkCtrl) + Send + Sync + 'static,
) -> LmResult<()> {
    let size = backend.size();
    let read_only = backend.read_only();
    let pool = Pool::new("livemount-io", workers);
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
    // One Shared per queue thread; the Arcs inside are shared by all queues.
    let shared_parts = (backend, metrics, pool);
    let q_handler = move |qid: u16, dev: &UblkDev| {
        let shared = Shared {
            device: shared_parts.0.clone(),
            metrics: shared_parts.1.clone(),
            pool: shared_parts.2.clone(),
        };
        queue_fn(qid, dev, shared)
    };
    ctrl.run_target(tgt_init, q_handler, ready)
        .map_err(|e| crate::Error::Invalid(format!("ublk device failed: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_map_to_requests() {
        let r = request(OP_WRITE | F_FUA, 8, 16);
        assert_eq!(
            (r.op, r.fua, r.offset, r.len),
            (Op::Write, true, 4096, 8192)
        );
        let r = request(OP_READ, 0, 1);
        assert_eq!((r.op, r.fua, r.offset, r.len), (Op::Read, false, 0, 512));
        assert_eq!(request(OP_FLUSH, 0, 0).op, Op::Flush);
        assert_eq!(request(OP_DISCARD, 0, 8).op, Op::Discard);
        assert_eq!(request(OP_WRITE_ZEROES, 0, 8).op, Op::WriteZeroes);
        assert_eq!(request(0x7f, 0, 8).op, Op::Other(0x7f));
        // A crafted sector number cannot wrap around to a valid offset.
        assert_eq!(request(OP_READ, u64::MAX / 256, 8).offset, u64::MAX);
    }
}
