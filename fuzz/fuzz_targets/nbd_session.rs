//! A whole client byte stream against a real NBD server connection: the handshake
//! (options in any order, STARTTLS without TLS, META_CONTEXT, GO/EXPORT_NAME) and
//! then transmission requests (reads, writes, trims, zeroes, block status, flush,
//! disconnect) with their payloads, on a 1 MiB in-memory export. The first byte
//! picks a read-only or a writable export; the rest is what the client sends, after
//! which it closes its side. The server must return (no hang: libFuzzer's timeout),
//! never panic, and never touch a byte outside the export.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemount::block::mem::MemDisk;
use livemount::block::{BlockDevice, Extents};
use livemount::frontend::nbd::{serve_connection, Budget, Export, Exports, ListenerTls};
use livemount_store::workers::Pool;
use livemount::metrics::IoMetrics;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

const SIZE: u64 = 1 << 20;

/// Set when the server asked the device for anything outside it.
static OUTSIDE: AtomicBool = AtomicBool::new(false);

/// The export's device, checking every range the server passes down.
struct Guarded(MemDisk);

fn check(offset: u64, len: u64) {
    if offset.checked_add(len).is_none_or(|e| e > SIZE) {
        OUTSIDE.store(true, Ordering::SeqCst);
    }
}

impl BlockDevice for Guarded {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> livemount_store::Result<()> {
        check(offset, buf.len() as u64);
        self.0.read_at(offset, buf)
    }
    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        check(offset, buf.len() as u64);
        self.0.read_cached(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> livemount_store::Result<()> {
        check(offset, buf.len() as u64);
        self.0.write_at(offset, buf)
    }
    fn discard(&self, offset: u64, len: u64) -> livemount_store::Result<()> {
        check(offset, len);
        self.0.discard(offset, len)
    }
    fn flush(&self) -> livemount_store::Result<()> {
        self.0.flush()
    }
    fn extents(&self, offset: u64, len: u64, out: &mut Extents) -> livemount_store::Result<()> {
        check(offset, len);
        self.0.extents(offset, len, out)
    }
    fn read_only(&self) -> bool {
        self.0.read_only()
    }
}

fn exports(writable: bool) -> Exports {
    let d = MemDisk::new(vec![7u8; SIZE as usize], false);
    let d = Guarded(if writable { d.writable() } else { d });
    let mut e = Exports::new();
    e.insert(
        "vm".into(),
        Export {
            device: Arc::new(d),
            metrics: Arc::new(IoMetrics::default()),
            description: "fuzz".into(),
        },
    );
    e
}

fuzz_target!(|data: &[u8]| {
    static POOL: OnceLock<Arc<Pool>> = OnceLock::new();
    static SIGPIPE: OnceLock<()> = OnceLock::new();
    // libFuzzer's main is not Rust's: a write to a closed socket must be EPIPE,
    // not the signal's default (exit).
    SIGPIPE.get_or_init(|| {
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    });
    let pool = POOL.get_or_init(|| Pool::new("fuzz-io", 2)).clone();
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let e = exports(mode & 1 == 1);
    let (mut client, server) = UnixStream::pair().expect("socketpair");
    let stream = stream.to_vec();
    let mut rx = client.try_clone().expect("clone");
    // The client drains replies so that the server never blocks on a full socket.
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 65536];
        while matches!(rx.read(&mut sink), Ok(n) if n > 0) {}
    });
    let send = std::thread::spawn(move || {
        let _ = client.write_all(&stream);
        let _ = client.shutdown(std::net::Shutdown::Write);
    });
    let budget = Budget::new(8 << 20);
    let _ = serve_connection(
        Box::new(server),
        &e,
        &ListenerTls::default(),
        &pool,
        &budget,
    );
    drop(e);
    let _ = send.join();
    let _ = drain.join();
    assert!(
        !OUTSIDE.load(Ordering::SeqCst),
        "the server passed a range outside the export to the device"
    );
});
