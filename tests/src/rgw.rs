//! The second real S3 engine for the tests: Ceph's RADOS Gateway (radosgw, Debian's
//! `radosgw` package, installed by `cargo xtask setup`) on a throwaway single-node
//! cluster: one monitor, one OSD on `memstore` (objects in RAM: no block device is
//! needed, and this host has no loop devices), no manager, and radosgw's beast
//! frontend, all on loopback ports of their own, every file (config, monitor store,
//! sockets, logs) in one temporary directory. Ready in ~5 s.
//!
//! Daemons run in the foreground as children that die with the test process; the
//! cluster is killed when dropped. `kill`/`restart` stop and start the gateway only
//! (the objects live in the OSD's memory), which is what a client sees when the
//! store goes away and comes back.
//!
//! Choices that matter (each found necessary): `auth … required = none` between
//! the daemons with `ms mon client mode = crc` (radosgw otherwise insists on a
//! "secure" monitor session that auth none cannot give, and hangs); a 0.1 s paxos
//! interval (radosgw creates its pools one by one: 10 s → 2 s); pool size 1. S3
//! requests are SigV4-authenticated as usual; radosgw accepts any region name.

use crate::garage::free_port;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The region the tests sign with (radosgw accepts any; its zonegroup is "default").
pub const REGION: &str = "us-east-1";
/// The host under which buckets are addressed virtual-host style (`rgw dns name`).
pub const VHOST_DOMAIN: &str = "s3.rgw.localhost";

/// True when the Ceph daemons `cargo xtask setup` installs are on PATH.
pub fn available() -> bool {
    [
        "ceph-mon",
        "ceph-osd",
        "radosgw",
        "radosgw-admin",
        "monmaptool",
        "ceph",
        "curl",
    ]
    .iter()
    .all(|b| on_path(b))
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A running single-node Ceph cluster with radosgw.
pub struct Rgw {
    dir: tempfile::TempDir,
    /// Monitor and OSD.
    daemons: Vec<Child>,
    gateway: Option<Child>,
    port: u16,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The access key id of the test user.
    pub key_id: String,
    /// Its secret.
    pub secret: String,
}

impl Rgw {
    /// Start the cluster and the gateway and create a user. Panics with the daemons'
    /// logs if any step fails (a broken test server is a failed test).
    pub fn start() -> Rgw {
        // Admin socket paths must fit a sockaddr_un: keep the directory short.
        let dir = tempfile::Builder::new()
            .prefix("lm-rgw")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let (port, mon_port) = (free_port(), free_port());
        let d = dir.path().display().to_string();
        for sub in ["run", "log", "crash", "mon.a", "osd.0", "rgw.a"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let fsid = uuid();
        let conf = format!(
            "[global]\nfsid = {fsid}\nmon host = [v2:127.0.0.1:{mon_port}]\n\
             public addr = 127.0.0.1\ncluster addr = 127.0.0.1\npublic network = 127.0.0.0/8\n\
             ms bind msgr1 = false\nauth cluster required = none\nauth service required = none\n\
             auth client required = none\nms mon client mode = crc\n\
             run dir = {d}/run\nadmin socket = {d}/run/$name.asok\npid file = {d}/run/$name.pid\n\
             log file = {d}/log/$name.log\nmon cluster log file = {d}/log/cluster.log\n\
             crash dir = {d}/crash\nkeyring = {d}/keyring\nclient mount timeout = 30\n\
             osd pool default size = 1\nosd pool default min size = 1\n\
             osd pool default pg num = 8\nosd pool default pgp num = 8\n\
             osd pool default pg autoscale mode = off\nosd crush chooseleaf type = 0\n\
             mon allow pool size one = true\nmon max pg per osd = 1000\n\
             paxos propose interval = 0.1\nmon data avail warn = 1\nmon data avail crit = 1\n\
             mon warn on pool no redundancy = false\n\
             rados osd op timeout = 30\nrados mon op timeout = 30\n\
             [mon]\nmon data = {d}/mon.$id\n\
             [osd]\nosd data = {d}/osd.$id\nosd objectstore = memstore\n\
             memstore device bytes = 8589934592\n\
             [client.rgw.a]\nrgw data = {d}/rgw.a\n\
             rgw frontends = beast endpoint=127.0.0.1:{port}\nrgw thread pool size = 64\n\
             rgw init timeout = 60\nrgw dns name = {VHOST_DOMAIN}\n"
        );
        std::fs::write(dir.path().join("ceph.conf"), conf).expect("write ceph.conf");
        let mut r = Rgw {
            dir,
            daemons: Vec::new(),
            gateway: None,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            key_id: random_hex(10).to_uppercase(),
            secret: random_hex(20),
        };
        let monmap = r.path("monmap");
        r.run_ok(
            Command::new("monmaptool")
                .args(["--create", "--fsid", &fsid, "--addv", "a"])
                .arg(format!("[v2:127.0.0.1:{mon_port}]"))
                .arg(&monmap),
        );
        r.run_ok(
            r.ceph("ceph-mon")
                .args(["--mkfs", "-i", "a", "--monmap"])
                .arg(&monmap),
        );
        let mon = r.daemon(r.ceph("ceph-mon").args(["-f", "-i", "a"]), "mon.a");
        r.daemons.push(mon);
        let osd_uuid = uuid();
        let id =
            r.run_ok(
                r.ceph("ceph")
                    .args(["--connect-timeout", "20", "osd", "new", &osd_uuid]),
            );
        assert_eq!(id.trim(), "0", "ceph osd new printed {id:?}:\n{}", r.log());
        r.run_ok(
            r.ceph("ceph-osd")
                .args(["-i", "0", "--mkfs", "--osd-uuid", &osd_uuid]),
        );
        let osd = r.daemon(r.ceph("ceph-osd").args(["-f", "-i", "0"]), "osd.0");
        r.daemons.push(osd);
        r.wait("osd.0 up", || {
            r.ceph("ceph")
                .args(["--connect-timeout", "10", "osd", "stat", "-f", "json"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"num_up_osds\":1"))
        });
        r.spawn_gateway();
        r.run_ok(r.ceph("radosgw-admin").args([
            "user",
            "create",
            "--uid=livemount-test",
            "--display-name=livemount-test",
            &format!("--access-key={}", r.key_id),
            &format!("--secret={}", r.secret),
        ]));
        r
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A Ceph command on this cluster's config.
    fn ceph(&self, bin: &str) -> Command {
        let mut c = Command::new(bin);
        c.arg("-c").arg(self.path("ceph.conf"));
        c
    }

    /// Run a setup command; its stdout. Bounded: the CLI's `--connect-timeout`
    /// and the config's 30 s `rados … op timeout`s (Ceph otherwise waits forever
    /// on a request no placement group can serve).
    fn run_ok(&self, c: &mut Command) -> String {
        let out = c.stdin(Stdio::null()).output().expect("run a ceph command");
        assert!(
            out.status.success(),
            "{c:?} failed: {}\n{}\nlogs:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Start a daemon in the foreground, its output in `log/NAME.out`; it dies with
    /// the test process.
    fn daemon(&self, c: &mut Command, name: &str) -> Child {
        let out = std::fs::File::create(self.path(&format!("log/{name}.out"))).expect("log");
        c.stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out));
        // SAFETY: prctl in the child before exec; async-signal-safe, no allocation.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c.spawn().expect("start a ceph daemon")
    }

    /// Wait up to 60 s for `ready`, or panic with the logs.
    fn wait(&self, what: &str, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(
                Instant::now() < deadline,
                "radosgw test cluster: {what} not within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn_gateway(&mut self) {
        let c = self.daemon(
            self.ceph("radosgw").args(["-f", "-n", "client.rgw.a"]),
            "rgw.a",
        );
        self.gateway = Some(c);
        let port = self.port;
        self.wait("radosgw answering", || http_ok(port));
    }

    /// Create `bucket` (an S3 PutBucket signed with the test user's key), then write
    /// and delete one object, so that radosgw's data pool exists before a test times
    /// its requests.
    pub fn bucket(&self, bucket: &str) {
        let url = format!("{}/{bucket}", self.endpoint);
        self.s3(&["-X", "PUT", &url], "200");
        let probe = format!("{url}/.probe");
        self.s3(&["-X", "PUT", "--data-binary", "probe", &probe], "200");
        self.s3(&["-X", "DELETE", &probe], "204");
    }

    fn s3(&self, args: &[&str], want: &str) {
        let out = Command::new("curl")
            // Bounded, and straight to loopback whatever proxy or ~/.curlrc is set.
            .args(["-q", "-sS", "--max-time", "30", "--noproxy", "*"])
            .args(["-o", "/dev/null", "-w", "%{http_code}", "--aws-sigv4"])
            .arg(format!("aws:amz:{REGION}:s3"))
            .arg("--user")
            .arg(format!("{}:{}", self.key_id, self.secret))
            // radosgw requires the header curl's SigV4 does not send.
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(args)
            .output()
            .expect("run curl");
        let code = String::from_utf8_lossy(&out.stdout);
        assert!(
            code.trim() == want,
            "curl {args:?} against radosgw: HTTP {code} (want {want}): {}\nlogs:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The last lines of every daemon's log.
    pub fn log(&self) -> String {
        let mut s = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.path("log"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!("== {} ==\n", f.display()));
            for l in &lines[lines.len().saturating_sub(30)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Kill the gateway (the store "goes away"); the objects stay in the OSD.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.gateway.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start the gateway again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_gateway();
    }

    /// The cluster's directory (config, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Rgw {
    fn drop(&mut self) {
        self.kill();
        for c in &mut self.daemons {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True when `GET /` on the port answers 200 (radosgw listens before it serves).
fn http_ok(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = [0u8; 12];
    s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_ok()
        && s.read_exact(&mut head).is_ok()
        && head.ends_with(b" 200")
}

/// A random UUID (version 4) in its text form, as Ceph's fsid and OSD uuid want.
fn uuid() -> String {
    let h = random_hex(16);
    // Version 4, variant 10xx.
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}
