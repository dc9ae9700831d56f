//! The NBD frontend against real clients, natively on the host: `qemu-img`
//! (info, convert), `qemu-io` (writes, flushes, pattern checks), and libnbd's
//! `nbdinfo`/`nbdcopy` (installed by `cargo xtask setup`). A `livemount serve` child
//! serves a backed-up image over a Unix socket (and TCP on loopback); writes go to
//! per-export overlays that survive a restart and a SIGKILL after FLUSH.

#[path = "common/store.rs"]
mod helpers;

use helpers::*;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `livemount serve`.
struct Server {
    child: Child,
    socket: PathBuf,
    /// What it printed before it was ready (its `export …` lines).
    banner: String,
}

impl Server {
    /// Start `livemount serve ARGS…` on `socket` and wait (bounded) until it lists
    /// its exports.
    fn start(socket: &Path, args: &[&OsStr]) -> Server {
        let mut c = cmd(["serve"]);
        c.args(args)
            .arg("--socket")
            .arg(socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = c.spawn().expect("spawn livemount serve");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut banner = String::new();
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                banner.push_str(&line);
                banner.push('\n');
                let _ = tx.send(banner.clone());
            }
        });
        let start = Instant::now();
        let mut banner = String::new();
        while !(banner.contains("export ") && socket.exists()) {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("livemount serve exited early ({st}): {banner}");
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "serve not ready: {banner}"
            );
            if let Ok(b) = rx.recv_timeout(Duration::from_millis(50)) {
                banner = b;
            }
        }
        Server {
            child,
            socket: socket.to_path_buf(),
            banner,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// SIGTERM and wait: a clean stop (overlays flushed).
    fn stop(mut self) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let st = self.child.wait().unwrap();
        assert!(st.success(), "serve exited {st} after SIGTERM");
        assert!(!self.socket.exists(), "socket left behind");
        std::mem::forget(self);
    }

    /// SIGKILL: a crash.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run a tool, returning (success, stdout + stderr).
fn tool(prog: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e} (installed by `cargo xtask setup`)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[track_caller]
fn ok(prog: &str, args: &[&str]) -> String {
    let (success, text) = tool(prog, args);
    assert!(success, "{prog} {args:?} failed:\n{text}");
    text
}

/// `qemu-img convert` of `uri` to DIR/out.raw; its bytes.
fn convert(uri: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("out.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(&out).unwrap()
}

/// A store with one backed-up image of `size` bytes (data, then a zero region).
fn store_with_image(dir: &Path, size: usize) -> (PathBuf, Vec<u8>) {
    let mut img = compressible_image(size.div_ceil(1 << 20), 7);
    img.truncate(size);
    img[size / 2..].fill(0);
    let src = dir.join("disk.img");
    std::fs::write(&src, &img).unwrap();
    let store = dir.join("store");
    lm([
        OsStr::new("backup"),
        src.as_os_str(),
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--name"),
        OsStr::new("vm"),
        OsStr::new("--quiet"),
    ])
    .ok();
    (store, img)
}

#[test]
fn qemu_img_and_libnbd_read_exactly_the_backup() {
    let d = tempfile::tempdir().unwrap();
    let size = (6 << 20) + 4096;
    let (store, img) = store_with_image(d.path(), size);
    let sock = d.path().join("run/nbd.sock");
    let s = Server::start(
        &sock,
        &[
            OsStr::new("--store"),
            store.as_os_str(),
            OsStr::new("--export"),
            OsStr::new("vm"),
            OsStr::new("--read-only"),
        ],
    );
    assert!(s.banner.contains("read-only"), "{}", s.banner);
    let mode = std::fs::metadata(&sock).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600, "socket mode");
    let info = ok("qemu-img", &["info", "--output=json", &s.uri("vm")]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(size as u64), "{info}");
    assert!(
        convert(&s.uri("vm"), d.path()) == img,
        "qemu-img convert differs"
    );
    // libnbd: the export list, and a copy with several connections.
    let list = ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix:///?socket={}", sock.display())],
    );
    assert!(
        list.contains("export=\"vm\"") || list.contains("vm"),
        "{list}"
    );
    let out2 = d.path().join("out2.raw");
    ok(
        "nbdcopy",
        &["--connections=4", &s.uri("vm"), out2.to_str().unwrap()],
    );
    assert!(std::fs::read(&out2).unwrap() == img, "nbdcopy differs");
    // Writes to a read-only export fail, and the client says so.
    let (success, text) = tool(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x11 0 4096", &s.uri("vm")],
    );
    assert!(!success || text.contains("failed"), "{text}");
    // An export that does not exist: a clear client error, and the server lives on.
    let (success, text) = tool("qemu-img", &["info", &s.uri("nope")]);
    assert!(!success, "{text}");
    ok("qemu-img", &["info", &s.uri("vm")]);
    // Status: the server and its export with the bytes read (refreshed every second),
    // as JSON and in Prometheus' text format.
    let pid = s.child.id() as u64;
    let start = Instant::now();
    let export = loop {
        let st = lm(["status", "--nbd", "--json"]);
        st.ok();
        let v: serde_json::Value = serde_json::from_str(&st.stdout).unwrap();
        let mine = v
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["pid"].as_u64() == Some(pid))
            .map(|x| x["exports"][0].clone());
        if let Some(e) = mine.filter(|e| e["io"]["read_bytes"].as_u64() >= Some(size as u64)) {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no status of pid {pid}: {}",
            st.stdout
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(export["name"], "vm");
    assert_eq!(export["read_only"], true);
    let prom = lm(["status", "--prometheus"]);
    prom.ok();
    assert!(
        prom.stdout.contains(&format!(
            "livemount_read_bytes_total{{export=\"vm\",pid=\"{pid}\"}}"
        )),
        "{}",
        prom.stdout
    );
    assert!(prom
        .stdout
        .contains("# TYPE livemount_errors_total counter"));
    s.stop();
    assert!(
        !Path::new(&format!("/run/livemount/serve-{pid}.json")).exists(),
        "status file left after a clean stop"
    );
}

#[test]
fn flushed_writes_survive_a_restart_and_a_crash_and_the_store_is_untouched() {
    let d = tempfile::tempdir().unwrap();
    let (store, img) = store_with_image(d.path(), 4 << 20);
    let sock = d.path().join("run/nbd.sock");
    let ovdir = d.path().join("overlays");
    let args = [
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--export"),
        OsStr::new("vm"),
        OsStr::new("--overlay-dir"),
        ovdir.as_os_str(),
    ];
    let s = Server::start(&sock, &args);
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 4096 8192",
            "-c",
            "write -z 1048576 65536",
            "-c",
            "flush",
            &s.uri("vm"),
        ],
    );
    s.stop();
    // A clean restart on the same overlay.
    let s = Server::start(&sock, &args);
    let text = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 4096 8192",
            "-c",
            "read -P 0 1048576 65536",
            "-c",
            "write -P 0xcd 65536 4096",
            "-c",
            "flush",
            &s.uri("vm"),
        ],
    );
    assert!(!text.contains("verification failed"), "{text}");
    // A crash after the FLUSH: the flushed write is there after a restart.
    s.kill();
    let s = Server::start(&sock, &args);
    let text = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xcd 65536 4096",
            "-c",
            "read -P 0xab 4096 8192",
            &s.uri("vm"),
        ],
    );
    assert!(!text.contains("verification failed"), "{text}");
    // Untouched bytes still come from the backup.
    let got = convert(&s.uri("vm"), d.path());
    assert_eq!(got[8192 + 4096..65536], img[8192 + 4096..65536]);
    assert_eq!(got[2 << 20..], img[2 << 20..]);
    s.stop();
    assert!(ovdir.join("vm.overlay").exists());
    lm([
        OsStr::new("verify"),
        OsStr::new("--store"),
        store.as_os_str(),
    ])
    .ok();
}

#[test]
fn serve_refuses_bad_setups_with_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    let (store, _) = store_with_image(d.path(), 1 << 20);
    let sock = d.path().join("nbd.sock");
    // Writable without a place for overlays.
    lm([
        OsStr::new("serve"),
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--export"),
        OsStr::new("vm"),
        OsStr::new("--socket"),
        sock.as_os_str(),
    ])
    .error(&["--overlay-dir"]);
    // An unknown snapshot.
    lm([
        OsStr::new("serve"),
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--export"),
        OsStr::new("x=nosuch"),
        OsStr::new("--read-only"),
        OsStr::new("--socket"),
        sock.as_os_str(),
    ])
    .error(&["nosuch"]);
    // A regular file where the socket should go is not replaced.
    std::fs::write(&sock, b"keep").unwrap();
    lm([
        OsStr::new("serve"),
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--export"),
        OsStr::new("vm"),
        OsStr::new("--read-only"),
        OsStr::new("--socket"),
        sock.as_os_str(),
    ])
    .error(&["not a socket"]);
    assert_eq!(std::fs::read(&sock).unwrap(), b"keep");
    // TLS: a certificate that is not there, an allow-list that does not parse.
    let tls = |extra: &[&str]| {
        let missing = d.path().join("no-such-cert.pem");
        let mut args = vec![
            OsStr::new("serve"),
            OsStr::new("--store"),
            store.as_os_str(),
            OsStr::new("--export"),
            OsStr::new("vm"),
            OsStr::new("--read-only"),
            OsStr::new("--socket"),
            OsStr::new("/nonexistent/dir/nbd.sock"),
            OsStr::new("--tls-cert"),
            missing.as_os_str(),
            OsStr::new("--tls-key"),
            missing.as_os_str(),
        ]
        .into_iter()
        .map(|a| a.to_os_string())
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|a| a.into()));
        lm(args)
    };
    tls(&[]).error(&["no-such-cert.pem"]);
    tls(&["--tls-client-ca", "/x", "--tls-allow", "vm"]).error(&["--tls-allow", "EXPORT=NAME"]);
}

/// The migration of `export` in the serve status file of `pid` (as root:
/// /run/livemount/serve-PID.json, written every second), waiting until it has one.
fn export_migration(pid: u32, export: &str) -> serde_json::Value {
    let p = format!("/run/livemount/serve-{pid}.json");
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&p) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(e) = v["exports"]
                    .as_array()
                    .and_then(|a| a.iter().find(|e| e["name"] == export))
                    .filter(|e| !e["migration"].is_null())
                {
                    return e["migration"].clone();
                }
            }
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no migration in {p}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `livemount migrate EXPORT` against a running `serve`, natively (an export name of
/// its own: other tests' servers export `vm` at the same time): the copy runs
/// while qemu-io writes, survives a SIGKILL of the server (a restart continues it),
/// completes with TARGET = snapshot + writes, then the store is removed and the
/// export keeps serving reads and writes from TARGET.
#[test]
fn migrate_an_export_across_a_crash_then_serve_without_the_store() {
    if !is_root() {
        println!("SKIP migrate_an_export_across_a_crash_then_serve_without_the_store: needs root (/run/livemount)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (store, mut img) = store_with_image(d.path(), 16 << 20);
    let sock = d.path().join("nbd.sock");
    let ovdir = d.path().join("overlays");
    let target = d.path().join("vm.raw");
    let args = [
        OsStr::new("--store"),
        store.as_os_str(),
        OsStr::new("--export"),
        OsStr::new("migrant=vm"),
        OsStr::new("--overlay-dir"),
        ovdir.as_os_str(),
        OsStr::new("--cache-mem"),
        OsStr::new("1M"),
    ];
    let s = Server::start(&sock, &args);
    // Bad input: an unknown export, the overlay as target.
    let e = lm([
        OsStr::new("migrate"),
        OsStr::new("nosuch"),
        OsStr::new("--to"),
        target.as_os_str(),
    ]);
    e.error(&["nosuch"]);
    let ov = ovdir.join("migrant.overlay");
    lm([
        OsStr::new("migrate"),
        OsStr::new("migrant"),
        OsStr::new("--to"),
        ov.as_os_str(),
    ])
    .error(&["overlay"]);
    // `--wait` with nothing to follow: an error, not a wait forever.
    lm([
        OsStr::new("migrate"),
        OsStr::new("migrant"),
        OsStr::new("--wait"),
    ])
    .error(&["migrant", "no migration in progress"]);
    // A second server exporting the same name: the name alone is ambiguous.
    let other = Server::start(
        &d.path().join("other.sock"),
        &[
            OsStr::new("--store"),
            store.as_os_str(),
            OsStr::new("--export"),
            OsStr::new("migrant=vm"),
            OsStr::new("--read-only"),
        ],
    );
    lm([
        OsStr::new("migrate"),
        OsStr::new("migrant"),
        OsStr::new("--to"),
        target.as_os_str(),
    ])
    .error(&["several servers", "--server"]);
    let pid = s.child.id().to_string();
    lm([
        OsStr::new("migrate"),
        OsStr::new("migrant"),
        OsStr::new("--server"),
        OsStr::new(&pid),
        OsStr::new("--to"),
        target.as_os_str(),
        OsStr::new("--rate"),
        OsStr::new("4M"),
    ])
    .ok();
    other.stop();
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 12288 8192",
            "-c",
            "flush",
            &s.uri("migrant"),
        ],
    );
    img[12288..20480].fill(0x5a);
    let m = export_migration(s.child.id(), "migrant");
    assert_eq!(m["state"], "copying", "{m}");
    s.kill();
    // The restarted server continues the migration (kept beside the overlay).
    let s = Server::start(&sock, &args);
    let m = export_migration(s.child.id(), "migrant");
    assert!(m["state"] == "copying" || m["state"] == "migrated", "{m}");
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x6b 9437184 65536",
            "-c",
            "flush",
            &s.uri("migrant"),
        ],
    );
    img[9437184..9437184 + 65536].fill(0x6b);
    // `migrate EXPORT --wait` follows the migration in progress until it is done.
    let w = lm([
        OsStr::new("migrate"),
        OsStr::new("migrant"),
        OsStr::new("--wait"),
    ]);
    w.ok();
    assert!(w.stdout.contains("migrated to"), "{}", w.stdout);
    assert_eq!(
        export_migration(s.child.id(), "migrant")["state"],
        "migrated"
    );
    assert!(
        std::fs::read(&target).unwrap() == img,
        "TARGET differs from snapshot + writes"
    );
    // The store goes away: the export keeps working, from TARGET.
    std::fs::rename(&store, d.path().join("store.gone")).unwrap();
    let text = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x6b 9437184 65536",
            "-c",
            "write -P 0x7c 0 4096",
            "-c",
            "flush",
            &s.uri("migrant"),
        ],
    );
    assert!(!text.contains("verification failed"), "{text}");
    img[..4096].fill(0x7c);
    assert!(convert(&s.uri("migrant"), d.path()) == img);
    s.stop();
    assert!(
        std::fs::read(&target).unwrap() == img,
        "TARGET after the stop"
    );
    assert!(
        !d.path().join("vm.raw.lmmig").exists(),
        "progress map left behind"
    );
}

/// The `serve` status of `export` (as root: /run/livemount/serve-PID.json, written
/// every second) once `pred` holds for it.
fn export_status(
    pid: u32,
    export: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let p = format!("/run/livemount/serve-{pid}.json");
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&p) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                if let Some(e) = v["exports"]
                    .as_array()
                    .and_then(|a| a.iter().find(|e| e["name"] == export))
                    .filter(|e| pred(e))
                {
                    return e.clone();
                }
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no such status of {export} in {p}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `nbdinfo --map` lines as (offset, length, description).
fn map(uri: &str) -> Vec<(u64, u64, String)> {
    ok("nbdinfo", &["--map", uri])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(3..)?.join(" "),
            ))
        })
        .collect()
}

/// BLOCK_STATUS through real clients: `nbdinfo --map` shows the snapshot's zero
/// chunks and the guest's discards as holes and its writes as data; `nbdcopy`
/// skips the holes (the export reads only the data part) and still copies the
/// exact image; `qemu-img map` agrees.
#[test]
fn zero_chunks_and_discards_are_holes_that_real_clients_skip() {
    let d = tempfile::tempdir().unwrap();
    let mib = 1u64 << 20;
    let size = 8 * mib as usize;
    let (store, mut img) = store_with_image(d.path(), size);
    let sock = d.path().join("run/nbd.sock");
    let ovl = d.path().join("ovl");
    let s = Server::start(
        &sock,
        &[
            OsStr::new("--store"),
            store.as_os_str(),
            OsStr::new("--export"),
            OsStr::new("holes2=vm"),
            OsStr::new("--overlay-dir"),
            ovl.as_os_str(),
        ],
    );
    // Not "vm": export names are unique per test (the status is read by name).
    let uri = s.uri("holes2");
    // Data for the first half (four 1 MiB chunks), zero chunks after it.
    assert_eq!(
        map(&uri),
        vec![
            (0, 4 * mib, "data".into()),
            (4 * mib, 4 * mib, "hole,zero".into())
        ]
    );
    // The guest discards 1 MiB of data and writes 4 KiB into the zeros.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "discard 1M 1M",
            "-c",
            "write -P 0x5a 6M 4k",
            "-c",
            "flush",
            &uri,
        ],
    );
    img[mib as usize..2 * mib as usize].fill(0);
    img[6 * mib as usize..6 * mib as usize + 4096].fill(0x5a);
    assert_eq!(
        map(&uri),
        vec![
            (0, mib, "data".into()),
            (mib, mib, "hole,zero".into()),
            (2 * mib, 2 * mib, "data".into()),
            (4 * mib, 2 * mib, "hole,zero".into()),
            (6 * mib, 4096, "data".into()),
            (6 * mib + 4096, 2 * mib - 4096, "hole,zero".into()),
        ]
    );
    let qmap = ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    let v: serde_json::Value = serde_json::from_str(&qmap).unwrap();
    let zero_at = |off: u64| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["start"].as_u64() <= Some(off)
                    && e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap() > off
            })
            .map(|e| e["zero"] == true)
    };
    assert_eq!(zero_at(mib + 4096), Some(true), "{qmap}");
    assert_eq!(zero_at(7 * mib), Some(true), "{qmap}");
    assert_eq!(zero_at(4096), Some(false), "{qmap}");
    // nbdcopy reads only what is not a hole, and the copy is exact.
    let pid = s.child.id();
    let before = export_status(pid, "holes2", |_| true)["io"]["read_bytes"]
        .as_u64()
        .unwrap();
    let out = d.path().join("out.raw");
    ok("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == img, "nbdcopy differs");
    let copied = export_status(pid, "holes2", |e| {
        e["io"]["read_bytes"].as_u64() > Some(before)
    })["io"]["read_bytes"]
        .as_u64()
        .unwrap()
        - before;
    // 3 MiB + 4 KiB of data; nbdcopy reads in 256 KiB requests, so the 4 KiB costs
    // one such request; the 4.75 MiB of holes cost nothing.
    assert!(
        copied <= 3 * mib + (256 << 10),
        "nbdcopy read {copied} bytes: the holes were not skipped"
    );
    s.stop();
}

/// A self-signed CA and certificates it issues (openssl), laid out as qemu's and
/// libnbd's GnuTLS clients want them: DIR/ca-cert.pem, client-cert.pem,
/// client-key.pem.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
        ok(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=livemount test CA",
                "-keyout",
                &p("ca-key.pem"),
                "-out",
                &p("ca-cert.pem"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    /// `prefix`-cert.pem / `prefix`-key.pem for `san` (e.g. "DNS:hv1.test"),
    /// issued by this CA (or self-signed: a rogue client).
    fn issue(&self, prefix: &str, san: &str, usage: &str, rogue: bool) -> (String, String) {
        let p = |f: &str| self.dir.join(f).to_str().unwrap().to_string();
        let (cert, key, csr, ext) = (
            p(&format!("{prefix}-cert.pem")),
            p(&format!("{prefix}-key.pem")),
            p(&format!("{prefix}.csr")),
            p(&format!("{prefix}.ext")),
        );
        std::fs::write(
            &ext,
            format!("subjectAltName={san}\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        ok(
            "openssl",
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={prefix}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        let mut args = vec![
            "x509", "-req", "-in", &csr, "-days", "2", "-out", &cert, "-extfile", &ext,
        ];
        let (ca, cakey) = (p("ca-cert.pem"), p("ca-key.pem"));
        if rogue {
            args.extend(["-signkey", &key]);
        } else {
            args.extend(["-CA", &ca, "-CAkey", &cakey, "-CAcreateserial"]);
        }
        ok("openssl", &args);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        (cert, key)
    }

    /// A client directory for qemu/libnbd: the CA and one client's certificate.
    fn client_dir(&self, name: &str, san: &str, rogue: bool) -> PathBuf {
        let (cert, key) = self.issue(name, san, "clientAuth", rogue);
        let dir = self.dir.join(format!("client-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.dir.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
        std::fs::copy(cert, dir.join("client-cert.pem")).unwrap();
        std::fs::copy(key, dir.join("client-key.pem")).unwrap();
        dir
    }
}

/// TLS with real GnuTLS clients: TCP requires it (a client in clear is refused),
/// a client certificate of the CA reads the exact image with nbdcopy and
/// `qemu-img compare`, the allow-list hides and refuses an export, a certificate
/// from another issuer is refused; the Unix socket still serves in clear.
#[test]
fn tls_on_tcp_with_client_certificates_and_allow_lists() {
    let d = tempfile::tempdir().unwrap();
    let (store, img) = store_with_image(d.path(), (4 << 20) + 4096);
    let src = d.path().join("disk.img");
    let pki = Pki::new(&d.path().join("pki"));
    let (cert, key) = pki.issue("server", "DNS:localhost,IP:127.0.0.1", "serverAuth", false);
    let hv1 = pki.client_dir("hv1", "DNS:hv1.test", false);
    let rogue = pki.client_dir("rogue", "DNS:hv1.test", true);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let sock = d.path().join("run/nbd.sock");
    let ca = pki.dir.join("ca-cert.pem");
    let s = Server::start(
        &sock,
        &[
            OsStr::new("--store"),
            store.as_os_str(),
            OsStr::new("--export"),
            OsStr::new("tlsvm=vm"),
            OsStr::new("--export"),
            OsStr::new("secret=vm"),
            OsStr::new("--read-only"),
            OsStr::new("--tcp"),
            OsStr::new(&addr),
            OsStr::new("--tls-cert"),
            OsStr::new(&cert),
            OsStr::new("--tls-key"),
            OsStr::new(&key),
            OsStr::new("--tls-client-ca"),
            ca.as_os_str(),
            OsStr::new("--tls-allow"),
            OsStr::new("secret=db.test"),
        ],
    );
    assert!(
        s.banner.contains(&format!("nbds://{addr}/secret")),
        "{}",
        s.banner
    );
    let tls_uri = |export: &str, dir: &Path| {
        format!("nbds://{addr}/{export}?tls-certificates={}", dir.display())
    };
    // In clear over TCP: refused, nothing listed.
    let (success, text) = tool("nbdinfo", &[&format!("nbd://{addr}/tlsvm")]);
    assert!(!success, "served in clear over TCP: {text}");
    // With hv1's certificate: the exact image, by libnbd and by qemu.
    let out = d.path().join("out.raw");
    ok(
        "nbdcopy",
        &[
            "--connections=2",
            &tls_uri("tlsvm", &hv1),
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == img,
        "nbdcopy over TLS differs"
    );
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        hv1.display()
    );
    ok(
        "qemu-img",
        &[
            "compare",
            "--object",
            &creds,
            "--image-opts",
            &format!("driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=tlsvm,tls-creds=tls0"),
            &format!("driver=file,filename={}", src.display()),
        ],
    );
    // The allow-list: hv1 neither sees nor opens "secret".
    let list = ok("nbdinfo", &["--list", &tls_uri("", &hv1)]);
    assert!(list.contains("tlsvm") && !list.contains("secret"), "{list}");
    let (success, text) = tool("nbdinfo", &[&tls_uri("secret", &hv1)]);
    assert!(!success, "secret opened by hv1: {text}");
    // A certificate the CA did not issue: refused.
    let (success, text) = tool("nbdinfo", &[&tls_uri("tlsvm", &rogue)]);
    assert!(!success, "served a rogue certificate: {text}");
    // The local socket serves in clear (TLS offered, not required).
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &s.uri("secret"),
            src.to_str().unwrap(),
        ],
    );
    s.stop();
}

/// `serve --daemon` returns once the exports are served, printing their URIs and
/// the server's pid; SIGTERM stops it cleanly. A server that cannot start says why
/// (its error line, not "see the log") and exits non-zero.
#[test]
fn serve_daemon_returns_when_ready_and_reports_startup_errors() {
    let d = tempfile::tempdir().unwrap();
    let (store, img) = store_with_image(d.path(), 2 << 20);
    let sock = d.path().join("run/nbd.sock");
    let log = d.path().join("serve.log");
    let daemon = |export: &str| {
        lm([
            OsStr::new("serve"),
            OsStr::new("--store"),
            store.as_os_str(),
            OsStr::new("--export"),
            OsStr::new(export),
            OsStr::new("--read-only"),
            OsStr::new("--socket"),
            sock.as_os_str(),
            OsStr::new("--daemon"),
            OsStr::new("--log"),
            log.as_os_str(),
        ])
    };
    let out = daemon("daemonvm=vm");
    out.ok();
    assert!(out.stdout.contains("export daemonvm:"), "{}", out.stdout);
    let pid: i32 = out
        .stdout
        .split("server pid ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {}", out.stdout));
    let uri = format!("nbd+unix:///daemonvm?socket={}", sock.display());
    assert!(convert(&uri, d.path()) == img, "served bytes differ");
    // SAFETY: signalling the server this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "server {pid} still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sock.exists(), "socket left behind");
    // A snapshot that does not exist: the error itself, and a failure.
    daemon("nope").error(&["nope"]);
}
