//! The NBD frontend: serves the top of one or many block stacks as named exports
//! over a Unix socket and/or TCP, for hypervisors on other hosts or without ublk
//! (qemu, libvirt, Proxmox, `nbd-client`, libnbd).
//!
//! The handshake negotiates what qemu, libnbd and the kernel client ask for:
//! GO/INFO/EXPORT_NAME/LIST/ABORT, STARTTLS ([`tls`]), structured replies and the
//! `base:allocation` metadata context, so BLOCK_STATUS reports the device's zero
//! runs ([`BlockDevice::extents`]) as holes.
//!
//! One thread per connection reads requests in order; [`frontend::start`] decides
//! each one exactly as for ublk (memory hits and writes complete at once, anything
//! that may block goes to the shared worker pool), and replies — out of order, by
//! the client's handle — are written under one lock per connection. A connection
//! holds at most [`MAX_IN_FLIGHT`] requests; oversized or out-of-range requests get
//! the protocol's error, malformed ones close the connection; nothing a client sends
//! can write outside its export or stop the server. FLUSH makes every completed
//! write of the export durable, whichever connection made it, so writable exports
//! advertise multi-conn too.

pub mod proto;
pub mod tls;

use crate::block::BlockDevice;
use crate::frontend::{self, Op, Request, Step};
use crate::metrics::IoMetrics;
use livemount_store::workers::Pool;
use proto::*;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tls::TlsServer;

/// Requests of one connection in flight at once (each holds its buffer).
pub const MAX_IN_FLIGHT: usize = 64;
/// How long a client may take to finish the whole handshake (all options together).
const HANDSHAKE_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_millis(500)
} else {
    Duration::from_secs(30)
};
/// How long a reply may wait for a client that does not read: then the connection
/// is given up (its remaining replies dropped), never the server's workers.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Request buffers of every connection together, at most `limit` bytes: a client
/// pipelining large requests waits (back-pressure), it cannot exhaust memory.
pub struct Budget {
    used: Mutex<u64>,
    cv: Condvar,
    limit: u64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
            limit: limit.max(MAX_REQUEST as u64),
        })
    }

    fn acquire(&self, n: u64) {
        if let Ok(mut u) = self.used.lock() {
            while *u + n > self.limit {
                match self.cv.wait(u) {
                    Ok(g) => u = g,
                    Err(_) => return,
                }
            }
            *u += n;
        }
    }

    fn release(&self, n: u64) {
        if let Ok(mut u) = self.used.lock() {
            *u = u.saturating_sub(n);
        }
        self.cv.notify_all();
    }
}

/// One named export.
pub struct Export {
    /// What it serves.
    pub device: Arc<dyn BlockDevice>,
    /// Figures of its I/O.
    pub metrics: Arc<IoMetrics>,
    /// A description for `LIST` (the snapshot).
    pub description: String,
}

/// The exports a server offers, by name.
pub type Exports = BTreeMap<String, Export>;

/// A byte stream the server can talk on (Unix or TCP socket).
pub trait Conn: Read + Write + Send + 'static {
    /// Another handle on the same socket, for writing replies.
    fn try_clone_conn(&self) -> io::Result<Box<dyn Write + Send>>;
    /// Bound reads (None: no bound).
    fn set_read_deadline(&self, d: Option<Duration>) -> io::Result<()>;
    /// Bound writes (a client that stops reading its replies).
    fn set_write_deadline(&self, d: Option<Duration>) -> io::Result<()>;
    /// A new descriptor of the socket (for TLS, which takes it over).
    fn socket_fd(&self) -> io::Result<std::os::fd::OwnedFd>;
}

/// `Conn` for the std socket types, which have the same methods.
macro_rules! impl_conn {
    ($($t:ty),*) => {$(
        impl Conn for $t {
            fn try_clone_conn(&self) -> io::Result<Box<dyn Write + Send>> {
                Ok(Box::new(self.try_clone()?))
            }
            fn set_read_deadline(&self, d: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(d)
            }
            fn set_write_deadline(&self, d: Option<Duration>) -> io::Result<()> {
                self.set_write_timeout(d)
            }
            fn socket_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
                std::os::fd::AsFd::as_fd(self).try_clone_to_owned()
            }
        }
    )*};
}

impl_conn!(std::os::unix::net::UnixStream, std::net::TcpStream);

fn transmission_flags(dev: &dyn BlockDevice) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if dev.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// The TLS policy of one listener.
#[derive(Clone, Default)]
pub struct ListenerTls {
    /// The server's TLS, if it has a certificate.
    pub server: Option<Arc<TlsServer>>,
    /// Every option but STARTTLS/ABORT needs TLS first (TCP listeners).
    pub required: bool,
}

/// What a connection agreed on in its handshake.
struct Session<'e> {
    export: &'e Export,
    /// Structured replies (reads answer with OFFSET_DATA chunks, errors with error
    /// chunks).
    structured: bool,
    /// `base:allocation` selected for this export: BLOCK_STATUS is served.
    base_allocation: bool,
}

impl<'e> Session<'e> {
    /// The session of export `name`, given what was negotiated; `meta` is the export
    /// the last SET_META_CONTEXT selected `base:allocation` for.
    fn new(export: &'e Export, structured: bool, meta: &Option<String>, name: &str) -> Self {
        Session {
            export,
            structured,
            base_allocation: structured && meta.as_deref() == Some(name),
        }
    }
}

/// The handshake: options until the client picks an export (GO / EXPORT_NAME) or
/// leaves. `Ok(None)`: the client aborted or disconnected. After STARTTLS `c` is
/// the TLS session's plaintext side.
// One match over the option codes on purpose (~170 lines): every arm reads and
// changes the same negotiation state (structured replies, the selected meta
// context, TLS and the peer's certificate), in the order the protocol gives it;
// split, that state would be passed to and returned from every piece.
fn handshake<'e>(
    c: &mut Box<dyn Conn>,
    exports: &'e Exports,
    tls: &ListenerTls,
) -> io::Result<Option<Session<'e>>> {
    c.write_all(&greeting())?;
    let mut cf = [0u8; 4];
    c.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error("client does not speak fixed newstyle"));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut structured = false;
    // The export whose base:allocation the last SET_META_CONTEXT selected.
    let mut meta: Option<String> = None;
    let mut in_tls = false;
    let mut peer = None;
    loop {
        // The bound is on the whole handshake: a client trickling options cannot
        // hold its thread forever.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(protocol_error("handshake not finished in time"));
        }
        c.set_read_deadline(Some(left))?;
        let mut h = [0u8; 16];
        match c.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let (opt, len) = parse_option_header(&h).map_err(protocol_error)?;
        let mut payload = vec![0u8; len as usize];
        c.read_exact(&mut payload)?;
        let allowed = |name: &str, peer: &Option<_>| {
            tls.server
                .as_ref()
                .is_none_or(|t| t.allows(peer.as_ref(), name))
        };
        let tls_first = tls.required && !in_tls;
        let mut answer = |kind: u32, data: &[u8]| c.write_all(&option_reply(opt, kind, data));
        match opt {
            OPT_ABORT => {
                answer(REP_ACK, &[])?;
                return Ok(None);
            }
            OPT_STARTTLS => match &tls.server {
                None => answer(
                    REP_ERR_POLICY,
                    b"TLS is not configured on this server (serve --tls-cert)",
                )?,
                Some(_) if in_tls => answer(REP_ERR_INVALID, b"TLS is already on")?,
                Some(_) if !payload.is_empty() => {
                    answer(REP_ERR_INVALID, b"STARTTLS takes no data")?
                }
                Some(t) => {
                    answer(REP_ACK, &[])?;
                    let (plain, cert) = tls::accept(c.as_ref(), t)?;
                    *c = plain;
                    c.set_write_deadline(Some(REPLY_TIMEOUT))?;
                    (in_tls, peer) = (true, cert);
                    // Everything negotiated before TLS is forgotten (the protocol's rule).
                    (structured, meta) = (false, None);
                }
            },
            // EXPORT_NAME has no error reply: in clear on a TLS-only listener it closes.
            OPT_EXPORT_NAME if tls_first => {
                return Err(protocol_error(
                    "EXPORT_NAME before STARTTLS on a TLS-only listener",
                ))
            }
            _ if tls_first => answer(
                REP_ERR_TLS_REQD,
                b"TLS is required on this listener: STARTTLS first",
            )?,
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&payload).into_owned();
                // No error reply exists for EXPORT_NAME: an unknown name closes.
                let Some(e) = exports.get(&name).filter(|_| allowed(&name, &peer)) else {
                    return Err(protocol_error(format!("unknown export {name:?}")));
                };
                let mut r = Vec::with_capacity(134);
                r.extend_from_slice(&e.device.size().to_be_bytes());
                r.extend_from_slice(&transmission_flags(e.device.as_ref()).to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                c.write_all(&r)?;
                return Ok(Some(Session::new(e, structured, &meta, &name)));
            }
            OPT_LIST => {
                if !payload.is_empty() {
                    answer(REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in exports.keys().filter(|n| allowed(n, &peer)) {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    answer(REP_SERVER, &d)?;
                }
                answer(REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => match parse_info_request(&payload) {
                Err(why) => answer(REP_ERR_INVALID, why.as_bytes())?,
                Ok((name, _)) => match exports.get(&name) {
                    None => answer(REP_ERR_UNKNOWN, format!("no export {name:?}").as_bytes())?,
                    Some(_) if !allowed(&name, &peer) => answer(
                        REP_ERR_POLICY,
                        format!("export {name:?} is not allowed for this client certificate")
                            .as_bytes(),
                    )?,
                    Some(e) => {
                        let flags = transmission_flags(e.device.as_ref());
                        answer(REP_INFO, &info_export(e.device.size(), flags))?;
                        answer(REP_INFO, &info_block_size())?;
                        answer(REP_ACK, &[])?;
                        if opt == OPT_GO {
                            return Ok(Some(Session::new(e, structured, &meta, &name)));
                        }
                    }
                },
            },
            OPT_STRUCTURED_REPLY if !payload.is_empty() => {
                answer(REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                answer(REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection, even when it fails.
                    meta = None;
                }
                if !structured {
                    answer(REP_ERR_INVALID, b"negotiate structured replies first")?;
                    continue;
                }
                let (name, queries) = match parse_meta_request(&payload) {
                    Ok(q) => q,
                    Err(why) => {
                        answer(REP_ERR_INVALID, why.as_bytes())?;
                        continue;
                    }
                };
                if !exports.contains_key(&name) || !allowed(&name, &peer) {
                    answer(REP_ERR_UNKNOWN, format!("no export {name:?}").as_bytes())?;
                    continue;
                }
                // Queries of other namespaces are ignored (the protocol's rule); a
                // LIST with none, or with the `base:` wildcard, lists ours.
                let hit = queries.iter().any(|q| q == BASE_ALLOCATION)
                    || (!set && (queries.is_empty() || queries.iter().any(|q| q == "base:")));
                if hit {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    answer(REP_META_CONTEXT, &meta_context(id, BASE_ALLOCATION))?;
                    if set {
                        meta = Some(name);
                    }
                }
                answer(REP_ACK, &[])?;
            }
            _ => answer(REP_ERR_UNSUP, &[])?,
        }
    }
}

/// Requests in flight on one connection, bounded.
#[derive(Default)]
struct InFlight {
    n: Mutex<usize>,
    cv: Condvar,
}

impl InFlight {
    fn acquire(&self) {
        if let Ok(mut n) = self.n.lock() {
            while *n >= MAX_IN_FLIGHT {
                match self.cv.wait(n) {
                    Ok(g) => n = g,
                    Err(_) => return,
                }
            }
            *n += 1;
        }
    }
    fn release(&self) {
        if let Ok(mut n) = self.n.lock() {
            *n = n.saturating_sub(1);
        }
        self.cv.notify_all();
    }
    fn drain(&self) {
        if let Ok(mut n) = self.n.lock() {
            while *n > 0 {
                match self.cv.wait(n) {
                    Ok(g) => n = g,
                    Err(_) => return,
                }
            }
        }
    }
}

/// Read buffers of one connection, handed back by its writer once a reply is on
/// the wire. A fresh `vec![0; 1 MiB]` per read costs a calloc (glibc maps a
/// buffer that large, so its pages fault in again every time, or zeroes it) —
/// measured as a large share of a cold sequential read's CPU (docs/performance.md).
/// A recycled buffer keeps this connection's earlier bytes until the read
/// overwrites them; a failed read sends none of them (an error reply carries no
/// data), and no buffer passes between connections. Kept: at most
/// [`RECYCLED_MAX`] buffers of at most [`RECYCLED_LARGEST`] bytes each, so an idle
/// connection holds at most 4 MiB beyond the server's request budget.
#[derive(Default)]
struct Recycled(Mutex<Vec<Vec<u8>>>);

/// Buffers kept per connection: as many as reads in flight usually are.
const RECYCLED_MAX: usize = 4;
/// Larger buffers are freed, not kept (clients read 1 MiB or less at a time).
const RECYCLED_LARGEST: usize = 1 << 20;

impl Recycled {
    /// A buffer of exactly `len` bytes (contents unspecified).
    fn take(&self, len: usize) -> Vec<u8> {
        // The smallest that fits.
        let found = self.0.lock().ok().and_then(|mut v| {
            let i = (0..v.len())
                .filter(|&i| v[i].capacity() >= len)
                .min_by_key(|&i| v[i].capacity())?;
            Some(v.swap_remove(i))
        });
        match found {
            Some(mut b) => {
                // Only a part beyond the buffer's current length is zeroed.
                b.resize(len, 0);
                b
            }
            None => vec![0u8; len],
        }
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() > RECYCLED_LARGEST {
            return;
        }
        if let Ok(mut v) = self.0.lock() {
            if v.len() < RECYCLED_MAX {
                v.push(b);
            }
        }
    }
}

/// What a reply carries besides its result.
enum Body {
    /// Nothing (writes, flushes, errors).
    Empty,
    /// The data of a read at this offset.
    Read(u64, Vec<u8>),
    /// A whole BLOCK_STATUS chunk (structured replies only).
    Status(Vec<u8>),
}

/// One reply for the connection's writer: handle, result, what it carries, and the
/// bytes of budget the request held.
struct Reply {
    handle: u64,
    res: i32,
    body: Body,
    held: u64,
}

type Replies = std::sync::mpsc::Sender<Reply>;

/// Write one reply: simple, or structured where the connection negotiated it (a
/// read's data as one OFFSET_DATA chunk, every error as an error chunk).
fn write_reply(w: &mut dyn Write, structured: bool, r: &Reply) -> io::Result<()> {
    match nbd_error(r.res) {
        0 => {}
        e if structured => return w.write_all(&structured_error(r.handle, e)),
        e => return w.write_all(&simple_reply(r.handle, e)),
    }
    match &r.body {
        Body::Read(offset, d) if structured => {
            w.write_all(&read_chunk_header(r.handle, *offset, d.len() as u32))?;
            w.write_all(d)
        }
        Body::Read(_, d) => {
            w.write_all(&simple_reply(r.handle, 0))?;
            w.write_all(d)
        }
        // Only connections with structured replies get BLOCK_STATUS answered.
        Body::Status(chunk) => w.write_all(chunk),
        Body::Empty => w.write_all(&simple_reply(r.handle, 0)),
    }
}

/// The connection's writer: the only thread that writes replies to the socket, so a
/// client that stops reading stalls its own writer, never a worker. After a failed
/// write it drops the rest (releasing what they hold) until every sender is gone.
fn writer(
    mut w: Box<dyn Write + Send>,
    structured: bool,
    rx: std::sync::mpsc::Receiver<Reply>,
    inflight: Arc<InFlight>,
    budget: Arc<Budget>,
    recycled: Arc<Recycled>,
) {
    let mut broken = false;
    for r in rx {
        if !broken {
            broken = write_reply(w.as_mut(), structured, &r)
                .and_then(|()| w.flush())
                .is_err();
        }
        budget.release(r.held);
        if let Body::Read(_, d) = r.body {
            recycled.give(d);
        }
        inflight.release();
    }
}

fn reply(out: &Replies, handle: u64, res: i32, body: Body, held: u64) {
    // A send fails only once the writer is gone, i.e. the connection is over.
    let _ = out.send(Reply {
        handle,
        res,
        body,
        held,
    });
}

/// Extents in one BLOCK_STATUS reply (the protocol allows 2^20; 64 Ki descriptors
/// are 512 KiB, and a client asks again from where a reply ends).
const MAX_EXTENTS: usize = 1 << 16;

/// The BLOCK_STATUS chunk for `r`, or the negative errno to answer with.
fn block_status(dev: &dyn BlockDevice, r: &proto::Request) -> std::result::Result<Vec<u8>, i32> {
    let (offset, len) = (r.offset, r.len as u64);
    if len == 0
        || !offset.is_multiple_of(512)
        || !len.is_multiple_of(512)
        || offset.checked_add(len).is_none_or(|e| e > dev.size())
    {
        return Err(-libc::EINVAL);
    }
    let max = if r.flags & CMD_FLAG_REQ_ONE != 0 {
        1
    } else {
        MAX_EXTENTS
    };
    let mut ext = crate::block::Extents::new(max);
    if let Err(e) = dev.extents(offset, len, &mut ext) {
        eprintln!("livemount: nbd: block status of {len} bytes at {offset}: {e}");
        return Err(-libc::EIO);
    }
    // Each extent lies within the request, whose length is a u32.
    let list: Vec<(u32, bool)> = ext
        .into_vec()
        .into_iter()
        .map(|e| (e.len.min(len) as u32, e.zero))
        .collect();
    if list.is_empty() {
        return Err(-libc::EIO);
    }
    Ok(block_status_chunk(r.handle, &list))
}

/// The block request of an NBD command, or the NBD error to answer with.
fn to_request(r: &proto::Request) -> Result<Request, u32> {
    let op = match r.kind {
        CMD_READ => Op::Read,
        CMD_WRITE => Op::Write,
        CMD_FLUSH => Op::Flush,
        CMD_TRIM => Op::Discard,
        CMD_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(err::EINVAL),
    };
    if matches!(op, Op::Read | Op::Write) && r.len > MAX_REQUEST {
        return Err(err::EINVAL);
    }
    Ok(Request {
        op,
        fua: r.flags & CMD_FLAG_FUA != 0,
        offset: r.offset,
        len: r.len as usize,
    })
}

/// Serve one connection until it disconnects (or misbehaves).
pub fn serve_connection(
    mut c: Box<dyn Conn>,
    exports: &Exports,
    tls: &ListenerTls,
    pool: &Arc<Pool>,
    budget: &Arc<Budget>,
) -> io::Result<()> {
    c.set_read_deadline(Some(HANDSHAKE_TIMEOUT))?;
    c.set_write_deadline(Some(REPLY_TIMEOUT))?;
    let Some(session) = handshake(&mut c, exports, tls)? else {
        return Ok(());
    };
    c.set_read_deadline(None)?;
    let inflight = Arc::new(InFlight::default());
    let (tx, rx) = std::sync::mpsc::channel();
    let w = c.try_clone_conn()?;
    let recycled = Arc::new(Recycled::default());
    let (i2, b2, r2) = (inflight.clone(), budget.clone(), recycled.clone());
    let structured = session.structured;
    let writer = std::thread::spawn(move || writer(w, structured, rx, i2, b2, r2));
    let result = transmission(
        c.as_mut(),
        &session,
        pool,
        &tx,
        &inflight,
        budget,
        &recycled,
    );
    // Every reply of an accepted request is written (or given up) before the
    // connection closes.
    drop(tx);
    inflight.drain();
    let _ = writer.join();
    result
}

fn transmission(
    c: &mut dyn Conn,
    session: &Session,
    pool: &Arc<Pool>,
    out: &Replies,
    inflight: &Arc<InFlight>,
    budget: &Arc<Budget>,
    recycled: &Recycled,
) -> io::Result<()> {
    loop {
        let mut h = [0u8; 28];
        match c.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let r = parse_request(&h).map_err(protocol_error)?;
        if r.kind == CMD_DISC {
            return Ok(());
        }
        if r.kind == CMD_WRITE && r.len > MAX_REQUEST {
            // Its payload cannot be skipped safely: the stream is lost.
            return Err(protocol_error(format!("write of {} bytes", r.len)));
        }
        // Every request holds an in-flight slot until the writer has sent its reply.
        inflight.acquire();
        let export = session.export;
        if r.kind == CMD_BLOCK_STATUS && session.base_allocation {
            // Off the reader: an overlay answers with lseek calls.
            let (out2, dev) = (out.clone(), export.device.clone());
            let queued = pool.spawn(move || match block_status(dev.as_ref(), &r) {
                Ok(chunk) => reply(&out2, r.handle, 0, Body::Status(chunk), 0),
                Err(e) => reply(&out2, r.handle, e, Body::Empty, 0),
            });
            if !queued {
                reply(out, r.handle, -libc::EIO, Body::Empty, 0);
            }
            continue;
        }
        let req = match to_request(&r) {
            Ok(q) => q,
            Err(e) => {
                reply(out, r.handle, -(e as i32), Body::Empty, 0);
                continue;
            }
        };
        let held = if matches!(req.op, Op::Read | Op::Write) {
            req.len as u64
        } else {
            0
        };
        budget.acquire(held);
        let mut buf = match req.op {
            Op::Read => recycled.take(held as usize),
            _ => vec![0u8; held as usize],
        };
        if req.op == Op::Write {
            if let Err(e) = c.read_exact(&mut buf) {
                budget.release(held);
                inflight.release();
                return Err(e);
            }
        }
        let is_read = req.op == Op::Read;
        let body = move |buf: Vec<u8>| match is_read {
            true => Body::Read(req.offset, buf),
            false => Body::Empty,
        };
        let started = std::time::Instant::now();
        match frontend::start(&export.device, &export.metrics, req, &mut buf) {
            Step::Done(res) => {
                frontend::record_done(&export.metrics, req.op, res, started);
                reply(out, r.handle, res, body(buf), held);
            }
            Step::Offload(job) => {
                let out2 = out.clone();
                let metrics = export.metrics.clone();
                let queued = pool.spawn(move || {
                    let res = job(&mut buf);
                    frontend::record_done(&metrics, req.op, res, started);
                    reply(&out2, r.handle, res, body(buf), held);
                });
                if !queued {
                    reply(out, r.handle, -libc::EIO, Body::Empty, held);
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn recycled_buffers_are_bounded_and_the_smallest_fitting_one_is_reused() {
        let r = Recycled::default();
        r.give(vec![1u8; 64 << 10]);
        r.give(vec![2u8; 1 << 20]);
        r.give(vec![3u8; 2 << 20]); // too large to keep
        let b = r.take(4096);
        assert_eq!((b.len(), b[0]), (4096, 1), "not the smallest that fits");
        let b = r.take(512 << 10);
        assert_eq!((b.len(), b[0]), (512 << 10, 2));
        assert!(r.0.lock().unwrap().is_empty(), "the 2 MiB buffer was kept");
        for _ in 0..10 {
            r.give(vec![0u8; 4096]);
        }
        assert_eq!(r.0.lock().unwrap().len(), RECYCLED_MAX);
    }
    use crate::block::mem::MemDisk;
    use std::os::unix::net::UnixStream;

    fn exports(writable: bool) -> Exports {
        let d = MemDisk::new((0..1u32 << 20).map(|i| (i % 251) as u8).collect(), false);
        let d: Arc<dyn BlockDevice> = Arc::new(if writable { d.writable() } else { d });
        let mut e = Exports::new();
        e.insert(
            "vm".into(),
            Export {
                device: d,
                metrics: Arc::new(IoMetrics::default()),
                description: "test".into(),
            },
        );
        e
    }

    /// A server thread on one end of a socket pair; the client end.
    fn connect(e: Exports) -> (UnixStream, std::thread::JoinHandle<io::Result<()>>) {
        let (a, b) = UnixStream::pair().unwrap();
        let pool = Pool::new("test-io", 2);
        let budget = Budget::new(64 << 20);
        let t = std::thread::spawn(move || {
            serve_connection(Box::new(b), &e, &ListenerTls::default(), &pool, &budget)
        });
        (a, t)
    }

    pub(crate) fn option(c: &mut (impl Read + Write), opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        c.write_all(&m).unwrap();
    }

    /// (option, reply type, data) of the next option reply.
    pub(crate) fn read_reply(c: &mut (impl Read + Write)) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.read_exact(&mut d).unwrap();
        (
            u32::from_be_bytes(h[8..12].try_into().unwrap()),
            u32::from_be_bytes(h[12..16].try_into().unwrap()),
            d,
        )
    }

    pub(crate) fn hello(c: &mut (impl Read + Write)) {
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        assert_eq!(g, greeting());
        c.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
    }

    pub(crate) fn go(c: &mut (impl Read + Write), name: &str) -> u32 {
        hello(c);
        go_only(c, name)
    }

    pub(crate) fn go_only(c: &mut (impl Read + Write), name: &str) -> u32 {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        option(c, OPT_GO, &p);
        loop {
            let (_, kind, _) = read_reply(c);
            if kind != REP_INFO {
                return kind;
            }
        }
    }

    pub(crate) fn request(
        c: &mut (impl Read + Write),
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&handle.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(data);
        c.write_all(&h).unwrap();
    }

    /// (handle, error) of the next simple reply, and `len` bytes of data if no error.
    pub(crate) fn simple(c: &mut (impl Read + Write), len: usize) -> (u64, u32, Vec<u8>) {
        let mut h = [0u8; 16];
        c.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let e = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut d = vec![0u8; if e == 0 { len } else { 0 }];
        c.read_exact(&mut d).unwrap();
        (u64::from_be_bytes(h[8..].try_into().unwrap()), e, d)
    }

    #[test]
    fn reads_writes_and_errors_by_the_protocol() {
        let (mut c, t) = connect(exports(true));
        assert_eq!(go(&mut c, "vm"), REP_ACK);
        request(&mut c, CMD_READ, 1, 4096, 512, &[]);
        let (h, e, d) = simple(&mut c, 512);
        assert_eq!((h, e), (1, 0));
        assert_eq!(d[0], (4096 % 251) as u8);
        request(&mut c, CMD_WRITE, 2, 0, 512, &[0xab; 512]);
        assert_eq!(simple(&mut c, 0).1, 0);
        request(&mut c, CMD_READ, 3, 0, 512, &[]);
        assert_eq!(simple(&mut c, 512).2, vec![0xab; 512]);
        // Beyond the export, oversized, unknown: errors, and the connection lives on.
        request(&mut c, CMD_READ, 4, 1 << 20, 512, &[]);
        assert_eq!(simple(&mut c, 0).1, err::EINVAL);
        request(&mut c, CMD_READ, 5, 0, MAX_REQUEST + 1, &[]);
        assert_eq!(simple(&mut c, 0).1, err::EINVAL);
        request(&mut c, CMD_READ, 6, u64::MAX - 10, 512, &[]);
        assert_eq!(simple(&mut c, 0).1, err::EINVAL);
        request(&mut c, 42, 7, 0, 0, &[]);
        assert_eq!(simple(&mut c, 0).1, err::EINVAL);
        request(&mut c, CMD_FLUSH, 8, 0, 0, &[]);
        assert_eq!(simple(&mut c, 0).1, 0);
        request(&mut c, CMD_DISC, 9, 0, 0, &[]);
        t.join().unwrap().unwrap();
    }

    /// 64 KiB of data, 64 KiB of zeros, and so on.
    struct Striped(MemDisk);
    impl BlockDevice for Striped {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> crate::error::Result<()> {
            self.0.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> crate::error::Result<()> {
            self.0.write_at(offset, buf)
        }
        fn read_only(&self) -> bool {
            false
        }
        fn extents(
            &self,
            offset: u64,
            len: u64,
            out: &mut crate::block::Extents,
        ) -> crate::error::Result<()> {
            let mut at = offset;
            while at < offset + len && !out.stopped() {
                let n = (65536 - at % 65536).min(offset + len - at);
                out.push(n, (at / 65536) % 2 == 1);
                at += n;
            }
            Ok(())
        }
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    /// (flags, type, handle, payload) of the next structured reply chunk.
    pub(crate) fn chunk(c: &mut (impl Read + Write)) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let len = u32::from_be_bytes(h[16..].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        c.read_exact(&mut d).unwrap();
        (
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            d,
        )
    }

    pub(crate) fn striped() -> Exports {
        let d = MemDisk::new((0..1u32 << 20).map(|i| (i % 251) as u8).collect(), false);
        let mut e = Exports::new();
        e.insert(
            "vm".into(),
            Export {
                device: Arc::new(Striped(d.writable())),
                metrics: Arc::new(IoMetrics::default()),
                description: "test".into(),
            },
        );
        e
    }

    #[test]
    fn structured_replies_and_block_status_by_the_protocol() {
        let (mut c, t) = connect(striped());
        hello(&mut c);
        // Meta contexts need structured replies first.
        option(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_payload("vm", &[BASE_ALLOCATION]),
        );
        assert_eq!(read_reply(&mut c).1, REP_ERR_INVALID);
        option(&mut c, OPT_STRUCTURED_REPLY, &[1]);
        assert_eq!(read_reply(&mut c).1, REP_ERR_INVALID, "takes no data");
        option(&mut c, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        // LIST with no query lists ours; unknown namespaces are ignored.
        option(&mut c, OPT_LIST_META_CONTEXT, &meta_payload("vm", &[]));
        let (_, kind, d) = read_reply(&mut c);
        assert_eq!(
            (kind, &d[4..]),
            (REP_META_CONTEXT, BASE_ALLOCATION.as_bytes())
        );
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        option(
            &mut c,
            OPT_LIST_META_CONTEXT,
            &meta_payload("vm", &["qemu:x"]),
        );
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        option(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_payload("nope", &[BASE_ALLOCATION]),
        );
        assert_eq!(read_reply(&mut c).1, REP_ERR_UNKNOWN);
        let mut bad = meta_payload("vm", &[BASE_ALLOCATION]);
        bad.truncate(bad.len() - 3);
        option(&mut c, OPT_SET_META_CONTEXT, &bad);
        assert_eq!(read_reply(&mut c).1, REP_ERR_INVALID);
        option(
            &mut c,
            OPT_SET_META_CONTEXT,
            &meta_payload("vm", &["qemu:dirty-bitmap:b", BASE_ALLOCATION]),
        );
        let (_, kind, d) = read_reply(&mut c);
        assert_eq!(kind, REP_META_CONTEXT);
        assert_eq!(
            u32::from_be_bytes(d[..4].try_into().unwrap()),
            BASE_ALLOCATION_ID
        );
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        assert_eq!(go_only(&mut c, "vm"), REP_ACK);
        // A read: one OFFSET_DATA chunk, flagged done, with its offset.
        request(&mut c, CMD_READ, 1, 4096, 512, &[]);
        let (flags, kind, h, d) = chunk(&mut c);
        assert_eq!(
            (flags, kind, h),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1)
        );
        assert_eq!(u64::from_be_bytes(d[..8].try_into().unwrap()), 4096);
        assert_eq!(d[8], (4096 % 251) as u8);
        assert_eq!(d.len(), 8 + 512);
        // A failed read: an error chunk, never a simple reply.
        request(&mut c, CMD_READ, 2, 1 << 20, 512, &[]);
        let (flags, kind, h, d) = chunk(&mut c);
        assert_eq!((flags, kind, h), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 2));
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), err::EINVAL);
        // Block status: the stripes, in order, covering the request.
        request(&mut c, CMD_BLOCK_STATUS, 3, 32768, 4 * 65536, &[]);
        let (flags, kind, h, d) = chunk(&mut c);
        assert_eq!(
            (flags, kind, h),
            (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 3)
        );
        assert_eq!(
            u32::from_be_bytes(d[..4].try_into().unwrap()),
            BASE_ALLOCATION_ID
        );
        let desc: Vec<(u32, u32)> = d[4..]
            .chunks_exact(8)
            .map(|x| {
                (
                    u32::from_be_bytes(x[..4].try_into().unwrap()),
                    u32::from_be_bytes(x[4..].try_into().unwrap()),
                )
            })
            .collect();
        let hz = STATE_HOLE | STATE_ZERO;
        assert_eq!(
            desc,
            vec![(32768, 0), (65536, hz), (65536, 0), (65536, hz), (32768, 0)]
        );
        // REQ_ONE: exactly one descriptor.
        let mut h = REQUEST_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&CMD_FLAG_REQ_ONE.to_be_bytes());
        h.extend_from_slice(&CMD_BLOCK_STATUS.to_be_bytes());
        h.extend_from_slice(&4u64.to_be_bytes());
        h.extend_from_slice(&65536u64.to_be_bytes());
        h.extend_from_slice(&(8 * 65536u32).to_be_bytes());
        c.write_all(&h).unwrap();
        let (_, kind, _, d) = chunk(&mut c);
        assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(d.len(), 4 + 8, "one descriptor");
        assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 65536);
        // Unaligned, empty or beyond the export: EINVAL error chunks.
        for (handle, off, len) in [(5, 100, 512), (6, 0, 0), (7, (1 << 20) - 512, 1024)] {
            request(&mut c, CMD_BLOCK_STATUS, handle, off, len, &[]);
            let (_, kind, h, d) = chunk(&mut c);
            assert_eq!((kind, h), (REPLY_TYPE_ERROR, handle));
            assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), err::EINVAL);
        }
        // Writes may still get simple replies.
        request(&mut c, CMD_WRITE, 8, 0, 512, &[9; 512]);
        assert_eq!(simple(&mut c, 0), (8, 0, vec![]));
        request(&mut c, CMD_DISC, 9, 0, 0, &[]);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn block_status_needs_its_context_and_tls_is_refused_when_not_configured() {
        // Structured replies on, but no context selected: BLOCK_STATUS is EINVAL.
        let (mut c, t) = connect(striped());
        hello(&mut c);
        option(&mut c, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        option(&mut c, OPT_STARTTLS, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ERR_POLICY);
        // A context set for another export name does not carry over.
        option(&mut c, OPT_SET_META_CONTEXT, &meta_payload("vm", &[]));
        assert_eq!(read_reply(&mut c).1, REP_ACK, "no query selects nothing");
        assert_eq!(go_only(&mut c, "vm"), REP_ACK);
        request(&mut c, CMD_BLOCK_STATUS, 1, 0, 4096, &[]);
        let (_, kind, _, d) = chunk(&mut c);
        assert_eq!(kind, REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes(d[..4].try_into().unwrap()), err::EINVAL);
        drop(c);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_tls_only_listener_answers_nothing_in_clear() {
        let tls = ListenerTls {
            server: Some(Arc::new(tls::tests::server())),
            required: true,
        };
        let (mut c, b) = UnixStream::pair().unwrap();
        let e = striped();
        let t = std::thread::spawn(move || {
            serve_connection(
                Box::new(b),
                &e,
                &tls,
                &Pool::new("test-io", 1),
                &Budget::new(1 << 20),
            )
        });
        hello(&mut c);
        for opt in [OPT_LIST, OPT_STRUCTURED_REPLY, 99] {
            option(&mut c, opt, &[]);
            assert_eq!(read_reply(&mut c).1, REP_ERR_TLS_REQD, "option {opt}");
        }
        let mut p = 2u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"vm");
        p.extend_from_slice(&0u16.to_be_bytes());
        option(&mut c, OPT_GO, &p);
        assert_eq!(read_reply(&mut c).1, REP_ERR_TLS_REQD);
        option(&mut c, OPT_EXPORT_NAME, b"vm");
        assert!(t.join().unwrap().is_err(), "EXPORT_NAME in clear closes");
    }

    #[test]
    fn read_only_exports_refuse_writes_with_eperm() {
        let (mut c, t) = connect(exports(false));
        assert_eq!(go(&mut c, "vm"), REP_ACK);
        request(&mut c, CMD_WRITE, 1, 0, 512, &[1; 512]);
        assert_eq!(simple(&mut c, 0).1, err::EPERM);
        request(&mut c, CMD_TRIM, 2, 0, 512, &[]);
        assert_eq!(simple(&mut c, 0).1, err::EPERM);
        drop(c);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn hostile_handshakes_get_errors_or_a_closed_connection() {
        // An unknown export: an error reply, then the client may try again.
        let (mut c, t) = connect(exports(true));
        assert_eq!(go(&mut c, "nope"), REP_ERR_UNKNOWN);
        option(&mut c, 99, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ERR_UNSUP);
        option(&mut c, OPT_STARTTLS, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ERR_POLICY);
        option(&mut c, OPT_LIST, &[]);
        let (_, kind, d) = read_reply(&mut c);
        assert_eq!((kind, &d[4..]), (REP_SERVER, &b"vm"[..]));
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        option(&mut c, OPT_ABORT, &[]);
        assert_eq!(read_reply(&mut c).1, REP_ACK);
        t.join().unwrap().unwrap();
        // A huge option length: the connection is closed without reading it.
        let (mut c, t) = connect(exports(true));
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        c.write_all(&m).unwrap();
        assert!(t.join().unwrap().is_err());
        // Bad request magic after GO: closed. A write cut short: closed, no write.
        let e = exports(true);
        let dev = e["vm"].device.clone();
        let (mut c, t) = connect(e);
        assert_eq!(go(&mut c, "vm"), REP_ACK);
        request(&mut c, CMD_WRITE, 1, 0, 4096, &[0xee; 100]);
        drop(c);
        assert!(t.join().unwrap().is_err());
        let mut b = [0u8; 512];
        dev.read_at(0, &mut b).unwrap();
        assert_ne!(b[0], 0xee, "a partial write was applied");
        let (mut c, t) = connect(exports(true));
        assert_eq!(go(&mut c, "vm"), REP_ACK);
        c.write_all(&[0u8; 28]).unwrap();
        assert!(t.join().unwrap().is_err());
    }

    #[test]
    fn a_client_that_never_reads_its_replies_does_not_stall_the_others() {
        let e = Arc::new(exports(false));
        let pool = Pool::new("test-io", 1);
        let budget = Budget::new(64 << 20);
        let spawn = |b: UnixStream| {
            let (e, pool, budget) = (e.clone(), pool.clone(), budget.clone());
            std::thread::spawn(move || {
                serve_connection(Box::new(b), &e, &ListenerTls::default(), &pool, &budget)
            })
        };
        // A: 64 KiB reads (slow path: the disk has no fast path) whose replies it
        // never reads — far more than a socket buffer holds.
        let (mut a, ab) = UnixStream::pair().unwrap();
        let _ta = spawn(ab);
        assert_eq!(go(&mut a, "vm"), REP_ACK);
        for h in 0..200u64 {
            request(&mut a, CMD_READ, h, (h % 16) * 65536, 65536, &[]);
        }
        std::thread::sleep(Duration::from_millis(200));
        // B, on the same single worker, is still served.
        let (mut b, bb) = UnixStream::pair().unwrap();
        let tb = spawn(bb);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            assert_eq!(go(&mut b, "vm"), REP_ACK);
            request(&mut b, CMD_READ, 1, 4096, 4096, &[]);
            let _ = tx.send(simple(&mut b, 4096).1);
            request(&mut b, CMD_DISC, 2, 0, 0, &[]);
        });
        let got = rx.recv_timeout(Duration::from_secs(20));
        assert_eq!(got, Ok(0), "B got no reply while A stalled (hang)");
        tb.join().unwrap().unwrap();
        drop(a);
    }

    #[test]
    fn a_client_trickling_options_is_cut_off_at_the_handshake_deadline() {
        let (mut c, t) = connect(exports(true));
        let mut g = [0u8; 18];
        c.read_exact(&mut g).unwrap();
        c.write_all(&CLIENT_FIXED_NEWSTYLE.to_be_bytes()).unwrap();
        // An unknown option every 100 ms: each read is quick, the handshake never ends.
        let cut = std::thread::spawn(move || {
            for _ in 0..50 {
                let mut m = IHAVEOPT.to_be_bytes().to_vec();
                m.extend_from_slice(&99u32.to_be_bytes());
                m.extend_from_slice(&0u32.to_be_bytes());
                if c.write_all(&m).is_err() {
                    return true;
                }
                let mut h = [0u8; 20];
                if c.read_exact(&mut h).is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        });
        let r = t.join().unwrap();
        assert!(r.is_err(), "the server must give up on the handshake");
        assert!(cut.join().unwrap(), "the connection was closed");
    }
}
