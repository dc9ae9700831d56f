//! A fault-injecting HTTP/1.1 proxy on loopback, between the S3 client and a real
//! object store: the faults a real store and network give that a healthy local
//! server never does.
//!
//! # Model
//! Requests are relayed one at a time per client connection (as HTTP/1.1 without
//! pipelining works), each over the connection's own upstream connection. GETs are
//! counted across all connections; by the [`FaultPlan`]:
//! - every `slow_down_every`-th GET is answered by the proxy itself with
//!   `503 Slow Down` and S3's `SlowDown` error document (what AWS S3, Ceph and
//!   others send when throttling), without reaching the server;
//! - every `truncate_every`-th GET that the server answers with a body (200 or 206)
//!   gets its status line, headers and the first half of the body, then both
//!   connections are closed: a body cut off mid-stream, as by a reset connection;
//! - every `stall_every`-th GET is held for `stall` before it is forwarded: a
//!   request stuck behind a slow disk or a busy node of the store.
//!
//! Bodies are framed by `Content-Length` or chunked transfer encoding, both
//! parsed; HEAD responses and 204/304 carry none; interim 1xx responses are
//! relayed before the final one. Not supported (the S3 client used here sends
//! neither): `Expect: 100-continue` (a request's body is read whole before it is
//! forwarded) and bodies delimited by closing the connection. Only loopback is
//! listened on and connected to (the network rule).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Which GETs fail, and how (0: never).
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPlan {
    /// Every n-th GET gets `503 SlowDown` from the proxy.
    pub slow_down_every: u64,
    /// Every n-th GET answered with a body is cut off half way.
    pub truncate_every: u64,
    /// Every n-th GET waits `stall` before it is forwarded.
    pub stall_every: u64,
    /// How long a stalled GET waits.
    pub stall: Duration,
}

/// What the proxy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// GET requests seen.
    pub gets: u64,
    /// GETs answered with 503 SlowDown.
    pub slowed: u64,
    /// Responses cut off mid-body.
    pub truncated: u64,
    /// GETs held for the stall.
    pub stalled: u64,
}

#[derive(Default)]
struct Shared {
    plan: Mutex<FaultPlan>,
    gets: AtomicU64,
    bodies: AtomicU64,
    slowed: AtomicU64,
    truncated: AtomicU64,
    stalled: AtomicU64,
}

/// A running proxy; stops accepting when dropped.
pub struct FaultProxy {
    /// Where clients connect: `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Proxy to `upstream` (a loopback address) with faults by `plan`.
    pub fn start(upstream: SocketAddr, plan: FaultPlan) -> FaultProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the network rule: loopback only"
        );
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the fault proxy");
        let addr = l.local_addr().expect("proxy address");
        l.set_nonblocking(true).expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared::default());
        *shared.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
        let (s2, sh2) = (stop.clone(), shared.clone());
        std::thread::spawn(move || {
            while !s2.load(SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let sh = sh2.clone();
                        std::thread::spawn(move || {
                            let _ = relay(c, upstream, &sh);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy { addr, stop, shared }
    }

    /// `http://127.0.0.1:PORT`, for `--s3-endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Change the plan for the requests still to come.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.shared.plan.lock().unwrap_or_else(|p| p.into_inner()) = plan;
    }

    /// What the proxy did so far.
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            gets: self.shared.gets.load(SeqCst),
            slowed: self.shared.slowed.load(SeqCst),
            truncated: self.shared.truncated.load(SeqCst),
            stalled: self.shared.stalled.load(SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

/// A message head: the start line and the headers, as read.
struct Head {
    raw: Vec<u8>,
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> io::Result<u64> {
        match self.header("content-length") {
            None => Ok(0),
            Some(v) => v.trim().parse().map_err(|_| bad("bad Content-Length")),
        }
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Read one message head; None at a clean end of the stream.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut raw = Vec::new();
    loop {
        let before = raw.len();
        let n = r.read_until(b'\n', &mut raw)?;
        if n == 0 {
            return if raw.is_empty() {
                Ok(None)
            } else {
                Err(bad("stream ended inside a head"))
            };
        }
        if raw.len() > 64 << 10 {
            return Err(bad("head too long"));
        }
        if &raw[before..] == b"\r\n" || &raw[before..] == b"\n" {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = text.lines();
    let start = lines.next().unwrap_or("").to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(Head {
        raw,
        start,
        headers,
    }))
}

/// Copy exactly `n` bytes from `r` to `w`.
fn copy_n(r: &mut impl Read, w: &mut impl Write, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(n), w)?;
    if copied != n {
        return Err(bad("stream ended inside a body"));
    }
    Ok(())
}

/// Copy a chunked body verbatim (sizes, data, the last chunk and its trailers).
fn copy_chunked(r: &mut impl BufRead, w: &mut impl Write) -> io::Result<()> {
    loop {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line)?;
        w.write_all(&line)?;
        let text = String::from_utf8_lossy(&line);
        let size = u64::from_str_radix(text.trim().split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            // Trailers up to the empty line.
            loop {
                let mut t = Vec::new();
                if r.read_until(b'\n', &mut t)? == 0 {
                    return Err(bad("stream ended in trailers"));
                }
                w.write_all(&t)?;
                if t == b"\r\n" || t == b"\n" {
                    return Ok(());
                }
            }
        }
        copy_n(r, w, size + 2)?; // the data and its CRLF
    }
}

const SLOW_DOWN_BODY: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";

/// Relay one client connection.
fn relay(client: TcpStream, upstream: SocketAddr, sh: &Shared) -> io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    let mut up: Option<(TcpStream, BufReader<TcpStream>)> = None;
    while let Some(req) = read_head(&mut from_client)? {
        let method = req
            .start
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        let mut body = Vec::new();
        if req.chunked() {
            copy_chunked(&mut from_client, &mut body)?;
        } else {
            copy_n(&mut from_client, &mut body, req.content_length()?)?;
        }
        let plan = *sh.plan.lock().unwrap_or_else(|p| p.into_inner());
        let is_get = method == "GET";
        if is_get {
            let n = sh.gets.fetch_add(1, SeqCst) + 1;
            if plan.slow_down_every > 0 && n.is_multiple_of(plan.slow_down_every) {
                sh.slowed.fetch_add(1, SeqCst);
                write!(
                    to_client,
                    "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{SLOW_DOWN_BODY}",
                    SLOW_DOWN_BODY.len()
                )?;
                continue;
            }
            if plan.stall_every > 0 && n.is_multiple_of(plan.stall_every) {
                sh.stalled.fetch_add(1, SeqCst);
                std::thread::sleep(plan.stall);
            }
        }
        if up.is_none() {
            let s = TcpStream::connect(upstream)?;
            up = Some((s.try_clone()?, BufReader::new(s)));
        }
        let Some((up_w, up_r)) = up.as_mut() else {
            return Err(bad("no upstream"));
        };
        up_w.write_all(&req.raw)?;
        up_w.write_all(&body)?;
        let (resp, status) = loop {
            let Some(resp) = read_head(up_r)? else {
                return Err(bad("upstream closed"));
            };
            let status: u16 = resp
                .start
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            to_client.write_all(&resp.raw)?;
            // An interim response: the final one follows.
            if status / 100 != 1 {
                break (resp, status);
            }
        };
        let close = resp
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if method == "HEAD" || status == 204 || status == 304 {
            if close {
                return Ok(());
            }
            continue;
        }
        if resp.chunked() {
            copy_chunked(up_r, &mut to_client)?;
        } else {
            let len = resp.content_length()?;
            let cut = is_get
                && (status == 200 || status == 206)
                && len > 1
                && plan.truncate_every > 0
                && (sh.bodies.fetch_add(1, SeqCst) + 1).is_multiple_of(plan.truncate_every);
            if cut {
                copy_n(up_r, &mut to_client, len / 2)?;
                to_client.flush()?;
                sh.truncated.fetch_add(1, SeqCst);
                let _ = to_client.shutdown(Shutdown::Both);
                let _ = up_w.shutdown(Shutdown::Both);
                return Ok(());
            }
            copy_n(up_r, &mut to_client, len)?;
        }
        if close {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny HTTP server answering every request with `body` (keep-alive).
    fn server(body: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = BufReader::new(c.try_clone().unwrap());
                    let mut w = c;
                    while let Ok(Some(h)) = read_head(&mut r) {
                        let _ = copy_n(&mut r, &mut io::sink(), h.content_length().unwrap());
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                            body.len()
                        );
                        let _ = w.write_all(body);
                    }
                });
            }
        });
        addr
    }

    fn get(c: &mut TcpStream, r: &mut BufReader<TcpStream>) -> (String, Vec<u8>) {
        write!(c, "GET /x HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        let h = read_head(r).unwrap().unwrap();
        let mut body = Vec::new();
        let _ = r.take(h.content_length().unwrap()).read_to_end(&mut body);
        (h.start, body)
    }

    #[test]
    fn throttles_and_cuts_off_as_planned_and_relays_the_rest() {
        let up = server(b"0123456789");
        let p = FaultProxy::start(
            up,
            FaultPlan {
                slow_down_every: 2,
                truncate_every: 0,
                ..Default::default()
            },
        );
        let mut c = TcpStream::connect(p.addr).unwrap();
        let mut r = BufReader::new(c.try_clone().unwrap());
        assert_eq!(
            get(&mut c, &mut r),
            ("HTTP/1.1 200 OK".into(), b"0123456789".to_vec())
        );
        let (start, body) = get(&mut c, &mut r);
        assert!(start.contains("503"), "{start}");
        assert!(String::from_utf8_lossy(&body).contains("SlowDown"));
        assert_eq!(get(&mut c, &mut r).1, b"0123456789");
        p.set_plan(FaultPlan {
            slow_down_every: 0,
            truncate_every: 1,
            ..Default::default()
        });
        let (start, body) = get(&mut c, &mut r);
        assert!(start.contains("200"));
        assert_eq!(body, b"01234", "half the body, then the end");
        assert_eq!(
            p.counts(),
            FaultCounts {
                gets: 4,
                slowed: 1,
                truncated: 1,
                ..Default::default()
            }
        );
    }
}
