//! A delay-injecting TCP proxy on loopback: the network between livemount and an
//! object store, for tests and benchmarks on a host kernel without `netem`.
//!
//! # Model
//! Each direction is one link shared by every connection through the proxy, with a
//! one-way propagation `delay` and an optional `rate` (bytes/s). Bytes read from one
//! side at time `t` (in reads of up to 64 KiB) go onto the link when it is free,
//! take `len / rate` to serialize, and arrive `delay` later:
//! `arrival = max(t, link_free) + len / rate + delay`, `link_free` moving to the end
//! of serialization. Per connection the order of bytes is kept. The connect itself
//! costs one round trip (`2 × delay`), as a TCP handshake does. Not modelled: loss,
//! reordering, congestion control, per-connection windows (so a single stream gets
//! the whole rate at any delay; real TCP needs a window of rate × RTT).
//!
//! Only loopback is listened on and connected to (the network rule).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One direction of the modelled network.
struct Link {
    delay: Duration,
    rate: Option<u64>,
    free_at: Mutex<Instant>,
    bytes: AtomicU64,
}

impl Link {
    fn arrival(&self, now: Instant, len: usize) -> Instant {
        self.bytes.fetch_add(len as u64, Ordering::Relaxed);
        let sent = match self.rate {
            Some(r) if r > 0 => {
                let ser = Duration::from_secs_f64(len as f64 / r as f64);
                let mut free = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
                let start = (*free).max(now);
                *free = start + ser;
                *free
            }
            _ => now,
        };
        sent + self.delay
    }
}

/// A running proxy; stops accepting when dropped (open connections end with their
/// peers).
pub struct DelayProxy {
    /// Where clients connect: `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    up: Arc<Link>,
    down: Arc<Link>,
}

impl DelayProxy {
    /// Proxy to `upstream` (a loopback address) with `delay` each way and an
    /// optional shared `rate` in bytes/s per direction.
    pub fn start(upstream: SocketAddr, delay: Duration, rate: Option<u64>) -> DelayProxy {
        assert!(
            upstream.ip().is_loopback(),
            "the proxy only reaches loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let link = || {
            Arc::new(Link {
                delay,
                rate,
                free_at: Mutex::new(Instant::now()),
                bytes: AtomicU64::new(0),
            })
        };
        let (up, down) = (link(), link());
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (stop, up, down) = (stop.clone(), up.clone(), down.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let (up, down) = (up.clone(), down.clone());
                    std::thread::spawn(move || {
                        // The handshake's round trip.
                        std::thread::sleep(up.delay + down.delay);
                        let Ok(server) = TcpStream::connect(upstream) else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        relay(&client, &server, up);
                        relay(&server, &client, down);
                    });
                }
            });
        }
        DelayProxy {
            addr,
            stop,
            up,
            down,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes carried (client → server, server → client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.bytes.load(Ordering::Relaxed),
            self.down.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copy `from` → `to` through `link`: a reader stamps arrivals, a writer delivers.
fn relay(from: &TcpStream, to: &TcpStream, link: Arc<Link>) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let at = link.arrival(Instant::now(), n);
                    if tx.send((at, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping tx ends the writer after it delivered what is in flight.
    });
    std::thread::spawn(move || {
        for (at, bytes) in rx {
            let wait = at.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_cost_twice_the_delay_and_bytes_arrive_in_order() {
        let echo = TcpListener::bind("127.0.0.1:0").unwrap();
        let up = echo.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in echo.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    let mut w = s;
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        let p = DelayProxy::start(up, Duration::from_millis(25), None);
        let mut c = TcpStream::connect(p.addr).unwrap();
        let t = Instant::now();
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let m2 = msg.clone();
        std::thread::spawn(move || w.write_all(&m2).unwrap());
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got).unwrap();
        let rtt = t.elapsed();
        assert!(got == msg);
        // Handshake (50 ms) plus one round trip (50 ms), at least.
        assert!(rtt >= Duration::from_millis(100), "{rtt:?}");
        assert_eq!(p.bytes(), (msg.len() as u64, msg.len() as u64));
    }
}
