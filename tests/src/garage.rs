//! A real S3 server for the tests: a single-node Garage (installed by `cargo xtask
//! setup` into `.cache/tools/garage`), started on loopback ports of its own with a
//! sqlite metadata engine, replication factor 1 and no block compression (chunks
//! are zstd already: compressing them again only costs the server CPU), its layout applied, one access
//! key and buckets created through its own CLI. Stopped (SIGKILL) when dropped;
//! `kill`/`restart` let tests take the store away and bring it back.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The region the test servers are configured with (and requests are signed with).
pub const REGION: &str = "garage";
/// The host under which buckets are addressed virtual-host style (`root_domain`).
pub const VHOST_DOMAIN: &str = "s3.garage.localhost";

/// The garage binary: `$LIVEMOUNT_GARAGE`, the one `cargo xtask setup` built, or PATH.
pub fn garage_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LIVEMOUNT_GARAGE") {
        return Some(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .to_path_buf();
    let cache = std::env::var_os("LIVEMOUNT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache"));
    let built = cache.join("tools/garage/bin/garage");
    if built.is_file() {
        return Some(built);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("garage"))
        .find(|p| p.is_file())
}

/// A free TCP port on loopback (bound and released: good enough for a test server).
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A running single-node Garage.
pub struct Garage {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Option<Child>,
    s3_port: u16,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The access key id of the test key.
    pub key_id: String,
    /// Its secret.
    pub secret: String,
}

impl Garage {
    /// Start a server, apply its layout, create a key. Panics with the server's
    /// output if any step fails (a broken test server is a failed test).
    pub fn start(bin: &Path) -> Garage {
        Self::cluster(bin, 1).remove(0)
    }

    /// Start `n` nodes that form one cluster with replication factor `n` (a zone
    /// per node, so every object is on every node), its layout applied and a key
    /// created. The first node is the endpoint to use (every node serves S3) and
    /// holds the key; all are stopped when dropped.
    pub fn cluster(bin: &Path, n: usize) -> Vec<Garage> {
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
            .collect();
        let mut nodes: Vec<(Garage, u16)> = (0..n.max(1))
            .map(|_| Self::node(bin, n.max(1), &secret))
            .collect();
        let ids: Vec<String> = nodes
            .iter()
            .map(|(g, _)| {
                let id = g.cli_ok(&["node", "id", "-q"]);
                id.trim().split('@').next().unwrap_or("").to_string()
            })
            .collect();
        let first = &nodes[0].0;
        for (k, (_, rpc)) in nodes.iter().enumerate().skip(1) {
            first.cli_ok(&["node", "connect", &format!("{}@127.0.0.1:{rpc}", ids[k])]);
        }
        for (k, id) in ids.iter().enumerate() {
            first.cli_ok(&[
                "layout",
                "assign",
                "-z",
                &format!("dc{}", k + 1),
                "-c",
                "1G",
                id,
            ]);
        }
        first.cli_ok(&["layout", "apply", "--version", "1"]);
        let out = first.cli_ok(&["key", "create", "livemount-test"]);
        let g = &mut nodes[0].0;
        for line in out.lines() {
            let val = || line.split(':').nth(1).unwrap_or("").trim().to_string();
            if line.trim_start().starts_with("Key ID") {
                g.key_id = val();
            } else if line.trim_start().starts_with("Secret key") {
                g.secret = val();
            }
        }
        assert!(
            !g.key_id.is_empty() && !g.secret.is_empty(),
            "garage key create printed no key:\n{out}"
        );
        nodes.into_iter().map(|(g, _)| g).collect()
    }

    /// One node of a cluster with replication factor `rf`, started; its RPC port.
    fn node(bin: &Path, rf: usize, secret: &str) -> (Garage, u16) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s3, rpc, admin) = (free_port(), free_port(), free_port());
        let cfg = format!(
            "metadata_dir = \"{d}/meta\"\ndata_dir = \"{d}/data\"\ndb_engine = \"sqlite\"\n\
             replication_factor = {rf}\ncompression_level = \"none\"\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
             [s3_api]\ns3_region = \"{REGION}\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
             root_domain = \".{VHOST_DOMAIN}\"\n\
             [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
            d = dir.path().display()
        );
        std::fs::write(dir.path().join("garage.toml"), cfg).expect("write garage.toml");
        let mut g = Garage {
            bin: bin.to_path_buf(),
            dir,
            child: None,
            s3_port: s3,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret: String::new(),
        };
        g.spawn();
        (g, rpc)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("garage.toml")
    }

    /// Start the server process and wait (bounded) until its S3 port answers.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("garage.log"))
            .expect("garage log");
        let mut c = Command::new(&self.bin);
        c.arg("-c")
            .arg(self.config())
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        // SAFETY: prctl in the child before exec; async-signal-safe, no allocation.
        // The server dies with the test process (a crashed test leaves no server).
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(c.spawn().expect("start garage"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok() {
                // The RPC side comes up with it; give the CLI a moment.
                if self.cli(&["status"]).status.success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "garage did not start within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(self.config())
            .args(args)
            .output()
            .expect("run garage CLI")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "garage {args:?} failed: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Create `bucket` and give the test key read and write access to it.
    pub fn bucket(&self, bucket: &str) {
        self.cli_ok(&["bucket", "create", bucket]);
        self.cli_ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            bucket,
            "--key",
            "livemount-test",
        ]);
    }

    /// Kill the server (the store "goes away"); its data stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A 0600 credentials file (AWS INI format) holding the test key.
    pub fn credentials_file(&self) -> PathBuf {
        crate::s3server::write_credentials(
            &self.dir.path().join("credentials"),
            &self.key_id,
            &self.secret,
        )
    }

    /// The environment a livemount command needs for this server.
    pub fn env<'a>(&self, c: &'a mut Command) -> &'a mut Command {
        crate::s3server::s3_env(c, &self.endpoint, REGION, &self.key_id, &self.secret)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}
