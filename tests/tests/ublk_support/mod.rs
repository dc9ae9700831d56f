//! Helpers for the live-mount tests against the real ublk driver (tests/tests/ublk.rs):
//! the `livemount` binary, bounded command runs, a shared fixture (a real ext4 image
//! backed up into a store), daemon and file-system guards, aligned direct I/O.

#![allow(dead_code)]

pub mod dm;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// True when the kernel can create ublk devices; otherwise prints the SKIP line.
pub fn have_ublk(test: &str) -> bool {
    if Path::new("/dev/ublk-control").exists() {
        return true;
    }
    if std::env::var("LIVEMOUNT_IN_VM").is_ok_and(|v| v == "1") {
        panic!("{test}: LIVEMOUNT_IN_VM=1 but /dev/ublk-control is missing");
    }
    livemount_tests::skip(
        test,
        livemount_tests::Tier::Ublk,
        "needs ublk (runs inside the VM via cargo xtask vm-test)",
    );
    false
}

/// The `livemount` binary under test: `$LIVEMOUNT_BIN`, else this package's build of
/// driver/src/main.rs (the same approach as the store CLI tests), else `livemount`
/// next to the test executable's directory.
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LIVEMOUNT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_livemount-under-test") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join("livemount");
    assert!(p.is_file(), "no livemount binary at {}", p.display());
    p
}

/// Outcome of a bounded command.
#[derive(Debug)]
pub struct Out {
    pub what: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Out {
    #[track_caller]
    pub fn ok(&self) -> &Out {
        assert_eq!(
            self.code,
            Some(0),
            "{} failed\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Failed with exit 1 and a single `livemount: error: …` line containing `needles`.
    #[track_caller]
    pub fn one_line_error(&self, needles: &[&str]) -> String {
        assert_eq!(
            self.code,
            Some(1),
            "{}: expected exit 1\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: expected a one-line error:\n{}",
            self.what,
            self.stderr
        );
        assert!(
            lines[0].starts_with("livemount: error: "),
            "{}: {}",
            self.what,
            lines[0]
        );
        for n in needles {
            assert!(
                lines[0].contains(n),
                "{}: error lacks {n:?}: {}",
                self.what,
                lines[0]
            );
        }
        lines[0].to_string()
    }
}

/// Run `prog args…` with stdout/stderr captured, killing it after `limit` (a hang
/// fails the test).
#[track_caller]
pub fn run_bounded(prog: &Path, args: &[&OsStr], limit: Duration) -> Out {
    match try_run_bounded(prog, args, limit) {
        Ok(out) => out,
        Err(e) => panic!("{e}"),
    }
}

/// [`run_bounded`] without panicking (for drop guards): Err describes a hang.
pub fn try_run_bounded(prog: &Path, args: &[&OsStr], limit: Duration) -> Result<Out, String> {
    let what = format!(
        "{} {}",
        prog.display(),
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Files, not pipes: a daemon started by the command can never keep them open
    // and block us, and we never need to drain them while waiting.
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let start = Instant::now();
    let mut child = Command::new(prog)
        .args(args)
        .env_remove("LIVEMOUNT_STORE")
        .stdin(Stdio::null())
        .stdout(fs::File::create(&o).unwrap())
        .stderr(fs::File::create(&e).unwrap())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {what}: {err}"));
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{what} did not finish within {} s (hang)\nstdout:\n{}\nstderr:\n{}",
                limit.as_secs(),
                fs::read_to_string(&o).unwrap_or_default(),
                fs::read_to_string(&e).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(Out {
        what,
        code: status.code(),
        stdout: fs::read_to_string(&o).unwrap_or_default(),
        stderr: fs::read_to_string(&e).unwrap_or_default(),
        took: start.elapsed(),
    })
}

/// `livemount ARGS…`, bounded.
#[track_caller]
pub fn lm(args: &[&OsStr], limit: Duration) -> Out {
    run_bounded(&bin(), args, limit)
}

/// An external tool, bounded, panicking on failure; returns stdout.
#[track_caller]
pub fn tool(prog: &str, args: &[&OsStr], limit: Duration) -> String {
    let out = run_bounded(Path::new(prog), args, limit);
    assert_eq!(
        out.code,
        Some(0),
        "{} failed\nstdout:\n{}\nstderr:\n{}",
        out.what,
        out.stdout,
        out.stderr
    );
    out.stdout
}

pub fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// Deterministic pseudo-random bytes (xorshift64*), distinct per seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A 4096-aligned buffer for O_DIRECT.
pub struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    pub fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: non-zero size, valid alignment.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, len }
    }
    pub fn from(data: &[u8]) -> Aligned {
        let mut a = Aligned::new(data.len());
        a.as_mut().copy_from_slice(data);
        a
    }
    pub fn as_ref(&self) -> &[u8] {
        // SAFETY: allocated with at least len bytes, owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(4096), 4096).unwrap();
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

// SAFETY: plain owned memory.
unsafe impl Send for Aligned {}

/// Open a block device for direct I/O.
pub fn open_direct(dev: &str, write: bool) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
}

/// Read `len` bytes at `off` with O_DIRECT (both multiples of 512).
pub fn read_direct(f: &fs::File, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut b = Aligned::new(len);
    f.read_exact_at(b.as_mut(), off)?;
    Ok(b.as_ref().to_vec())
}

/// Write with O_DIRECT.
pub fn write_direct(f: &fs::File, off: u64, data: &[u8]) -> std::io::Result<()> {
    f.write_all_at(Aligned::from(data).as_ref(), off)
}

/// Run `f` on a thread and wait at most `limit` for it (a stuck read fails the test
/// instead of hanging it).
#[track_caller]
pub fn bounded<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {} s (hang)", limit.as_secs()),
    }
}

/// Size, mtime and inode of every file under a directory.
pub type Stamps = BTreeMap<PathBuf, (u64, i64, i64, u64)>;

pub fn stamps(dir: &Path) -> Stamps {
    let mut out = Stamps::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                // Leases (and their temp files) are how mounts tell other hosts
                // what they use: the one thing a mount writes into a store.
                let coordination = p.parent() == Some(dir)
                    && matches!(
                        p.file_name().and_then(|n| n.to_str()),
                        Some("leases" | "tmp")
                    );
                if !coordination {
                    stack.push(p);
                }
            } else {
                out.insert(p, (m.len(), m.mtime(), m.mtime_nsec(), m.ino()));
            }
        }
    }
    out
}

/// The shared fixture: a real ext4 image of a real tree, backed up into a store.
pub struct Fixture {
    pub dir: PathBuf,
    /// The files the image was made from.
    pub tree: PathBuf,
    /// The ext4 image: 64 MiB + 1536 bytes (random bytes after the file system).
    pub image: PathBuf,
    pub image_size: u64,
    /// 1 MiB + 700 random bytes (device rounds up to 512: zero tail).
    pub odd: PathBuf,
    pub store: PathBuf,
    /// `web01@…` and `odd@…`.
    pub snap: String,
    pub odd_snap: String,
    /// Chunk and index files as they were after the backups.
    pub stamps: Stamps,
}

pub const IMAGE_SIZE: u64 = (64 << 20) + 1536;

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

pub fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(build_fixture)
}

fn copy_tree(dst: &Path, budget: u64) -> u64 {
    let roots = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../driver/src"),
        PathBuf::from("/usr/share/doc"),
        PathBuf::from("/usr/share/perl5"),
    ];
    let mut used = 0u64;
    let mut n = 0u32;
    let mut stack: Vec<(PathBuf, PathBuf)> = roots
        .iter()
        .enumerate()
        .rev()
        .map(|(i, r)| (r.clone(), dst.join(format!("r{i}"))))
        .collect();
    while let Some((src, to)) = stack.pop() {
        if used >= budget {
            break;
        }
        let Ok(m) = fs::symlink_metadata(&src) else {
            continue;
        };
        if m.is_dir() {
            let Ok(rd) = fs::read_dir(&src) else { continue };
            let mut es: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            es.sort();
            for e in es.into_iter().rev() {
                let name = e.file_name().unwrap().to_owned();
                stack.push((e, to.join(name)));
            }
        } else if m.is_file() && m.len() <= budget - used {
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            if fs::copy(&src, &to).is_ok() {
                used += m.len();
                n += 1;
            }
        }
    }
    assert!(n > 100, "only {n} files copied");
    used
}

fn build_fixture() -> Fixture {
    let t0 = Instant::now();
    let base = tempfile::Builder::new()
        .prefix("lm-ublk-fixture-")
        .tempdir_in("/tmp")
        .unwrap()
        .keep();
    let tree = base.join("tree");
    let used = copy_tree(&tree, 12 << 20);
    let image = base.join("web01.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    tool(
        "mkfs.ext4",
        &[
            os("-q"),
            os("-F"),
            os("-b"),
            os("4096"),
            os("-E"),
            os("lazy_itable_init=0,lazy_journal_init=0"),
            os("-d"),
            tree.as_os_str(),
            image.as_os_str(),
        ],
        Duration::from_secs(120),
    );
    // Random bytes after the file system: the unaligned tail must read back exactly.
    let f = fs::OpenOptions::new().write(true).open(&image).unwrap();
    f.write_all_at(&pattern(0x7a11, 1536), 64 << 20).unwrap();
    drop(f);
    assert_eq!(fs::metadata(&image).unwrap().len(), IMAGE_SIZE);
    let odd = base.join("odd.img");
    fs::File::create(&odd)
        .unwrap()
        .write_all(&pattern(0x0dd, (1 << 20) + 700))
        .unwrap();
    let store = base.join("store");
    let snap = backup(&store, &image, "web01");
    let odd_snap = backup(&store, &odd, "odd");
    let stamps = stamps(&store);
    assert!(stamps.keys().any(|p| p.starts_with(store.join("chunks"))));
    eprintln!(
        "fixture: {} MiB of real files, image {IMAGE_SIZE} bytes, snapshots {snap} and {odd_snap}, {} store files, built in {:.1} s",
        used >> 20,
        stamps.len(),
        t0.elapsed().as_secs_f64()
    );
    Fixture {
        dir: base,
        tree,
        image,
        image_size: IMAGE_SIZE,
        odd,
        store,
        snap,
        odd_snap,
        stamps,
    }
}

impl Fixture {
    /// The store's chunk and index files have the sizes, mtimes and inodes they had
    /// right after the backups (a mount never writes to the store).
    #[track_caller]
    pub fn assert_store_untouched(&self) {
        let now = stamps(&self.store);
        let diff: Vec<_> = self
            .stamps
            .iter()
            .filter(|(p, s)| now.get(*p) != Some(s))
            .map(|(p, _)| p.display().to_string())
            .chain(
                now.keys()
                    .filter(|p| !self.stamps.contains_key(*p))
                    .map(|p| format!("new: {}", p.display())),
            )
            .collect();
        assert!(diff.is_empty(), "the store changed: {diff:?}");
    }
}

/// A live mount started with `--daemon`; unmounted (or killed and removed) on drop.
pub struct Mount {
    pub dev: String,
    pub id: u32,
    pub log: PathBuf,
    pub stdout: String,
}

/// `livemount backup IMG --store STORE --name SERIES`; the snapshot's name.
#[track_caller]
pub fn backup(store: &Path, img: &Path, series: &str) -> String {
    let out = lm(
        &[
            os("backup"),
            img.as_os_str(),
            os("--store"),
            store.as_os_str(),
            os("--name"),
            os(series),
            os("--json"),
        ],
        Duration::from_secs(300),
    );
    out.ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v["snapshot"].as_str().unwrap().to_string()
}

/// Start `livemount mount ARGS… --daemon --log LOG`.
pub fn try_mount(args: &[&OsStr], log: &Path) -> Out {
    let mut a: Vec<&OsStr> = vec![os("mount")];
    a.extend_from_slice(args);
    a.extend([os("--daemon"), os("--log"), log.as_os_str()]);
    lm(&a, Duration::from_secs(90))
}

#[track_caller]
pub fn mount(args: &[&OsStr], log: &Path) -> Mount {
    let out = try_mount(args, log);
    assert_eq!(
        out.code,
        Some(0),
        "{} failed\nstdout:\n{}\nstderr:\n{}\nlog:\n{}",
        out.what,
        out.stdout,
        out.stderr,
        fs::read_to_string(log).unwrap_or_default()
    );
    Mount::from_output(&out.stdout, log)
}

impl Mount {
    #[track_caller]
    pub fn from_output(stdout: &str, log: &Path) -> Mount {
        let dev = stdout
            .lines()
            .find_map(|l| {
                l.strip_prefix("device ")
                    .and_then(|r| r.strip_suffix(" ready"))
            })
            .unwrap_or_else(|| panic!("no `device … ready` line in:\n{stdout}"))
            .to_string();
        let id = dev.trim_start_matches("/dev/ublkb").parse().unwrap();
        assert!(Path::new(&dev).exists(), "{dev} does not exist");
        Mount {
            dev,
            id,
            log: log.to_path_buf(),
            stdout: stdout.to_string(),
        }
    }

    /// `livemount status DEV --json`, the device's entry.
    pub fn status(&self) -> serde_json::Value {
        let out = lm(
            &[os("status"), os(&self.dev), os("--json")],
            Duration::from_secs(20),
        );
        out.ok();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        v[0].clone()
    }

    pub fn pid(&self) -> i32 {
        self.status()["pid"].as_i64().unwrap() as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Clean unmount; asserts the device is gone.
    #[track_caller]
    pub fn unmount(self) {
        let out = lm(
            &[os("unmount"), os(&self.dev), os("--timeout"), os("30")],
            Duration::from_secs(60),
        );
        out.ok();
        wait_gone(&self.dev, self.id);
        std::mem::forget(self);
    }
}

/// Wait (bounded) until `/dev/ublkbN` and its char device are gone.
#[track_caller]
pub fn wait_gone(dev: &str, id: u32) {
    let start = Instant::now();
    let cdev = format!("/sys/class/ublk-char/ublkc{id}");
    while Path::new(dev).exists() || Path::new(&cdev).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{dev} still exists 20 s after unmount"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let r = try_run_bounded(
            &bin(),
            &[os("unmount"), os(&self.dev), os("--timeout"), os("20")],
            Duration::from_secs(40),
        );
        if let Err(e)
        | Ok(Out {
            stderr: e,
            code: Some(1..) | None,
            ..
        }) = r
        {
            eprintln!("cleanup: unmount {} failed: {}", self.dev, e.trim());
            if let Ok(st) = fs::read_to_string(format!("/run/livemount/ublkb{}.json", self.id)) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&st) {
                    if let Some(pid) = v["pid"].as_i64() {
                        // SAFETY: killing the daemon we started.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
            }
            if let Err(e) = try_run_bounded(
                &bin(),
                &[os("unmount"), os(&self.dev)],
                Duration::from_secs(40),
            ) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// A file system mounted on a directory; lazily unmounted on drop.
pub struct FsMount {
    pub dir: PathBuf,
    pub mounted: bool,
}

impl FsMount {
    #[track_caller]
    pub fn mount(dev: &str, dir: &Path, opts: &str) -> FsMount {
        fs::create_dir_all(dir).unwrap();
        tool(
            "mount",
            &[os("-o"), os(opts), os(dev), dir.as_os_str()],
            Duration::from_secs(60),
        );
        FsMount {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }
    #[track_caller]
    pub fn umount(mut self) {
        tool("umount", &[self.dir.as_os_str()], Duration::from_secs(60));
        self.mounted = false;
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// sha256 of every regular file under `dir`, by relative path.
pub fn checksums(dir: &Path) -> BTreeMap<PathBuf, String> {
    let out = tool(
        "sh",
        &[
            os("-c"),
            os("cd \"$1\" && find . -type f ! -path './lost+found/*' -print0 | sort -z | xargs -0 sha256sum"),
            os("sh"),
            dir.as_os_str(),
        ],
        Duration::from_secs(180),
    );
    out.lines()
        .map(|l| {
            let (sum, p) = l.split_once("  ").unwrap();
            (PathBuf::from(p), sum.to_string())
        })
        .collect()
}

/// `e2fsck -fn DEV` exits 0.
#[track_caller]
pub fn fsck_clean(dev: &str) {
    let out = run_bounded(
        Path::new("e2fsck"),
        &[os("-fn"), os(dev)],
        Duration::from_secs(120),
    );
    if out.code != Some(0) {
        // What the kernel and the file system say, for the failure message.
        let diag = |p: &str, a: &[&OsStr]| {
            try_run_bounded(Path::new(p), a, Duration::from_secs(60))
                .map(|o| format!("$ {}\n{}{}", o.what, o.stdout, o.stderr))
                .unwrap_or_else(|e| e)
        };
        let _ = fs::write("/proc/sys/vm/drop_caches", "3");
        panic!(
            "e2fsck -fn {dev} is not clean (exit {:?}):\n{}{}\n{}\n{}\n{}",
            out.code,
            out.stdout,
            out.stderr,
            diag("e2fsck", &[os("-fnv"), os(dev)]),
            diag("dumpe2fs", &[os("-h"), os(dev)]),
            diag(
                "sh",
                &[
                    os("-c"),
                    os("grep ublk /proc/*/mountinfo | head; dmesg | tail -20")
                ]
            ),
        );
    }
}

/// The daemon's mount namespace must not hold a mount of its own device.
#[track_caller]
pub fn assert_daemon_ns_clean(pid: i32, dev: &str) {
    let mi = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    assert!(
        !mi.lines().any(|l| l.contains(&format!(" {dev} "))),
        "the daemon's mount namespace holds a mount of its own device {dev}:\n{}",
        mi.lines()
            .filter(|l| l.contains("ublk"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Is process `pid` alive (not a zombie)?
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .is_some_and(|(_, r)| r.starts_with('Z') || r.starts_with('X')),
        Err(_) => false,
    }
}

pub fn write_file(p: &Path, data: &[u8]) {
    let mut f = fs::File::create(p).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Prints how long a test took (in the VM log) when dropped.
pub struct Timer(&'static str, Instant);

impl Timer {
    pub fn start(name: &'static str) -> Timer {
        Timer(name, Instant::now())
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        eprintln!("TIME {}: {:.1} s", self.0, self.1.elapsed().as_secs_f64());
    }
}
