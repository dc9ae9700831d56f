//! Integration tests of `livemount-profiler` against the real kernel: real eBPF
//! verifier, real tracepoints, real loop devices.
//!
//! Tests that attach eBPF programs need root (CAP_BPF, CAP_PERFMON) and loop
//! devices; without them they print `SKIP <test>: <reason>` and pass. The
//! profile-file tests (merge/show/rejections) run everywhere.
//!
//! They run the `livemount-profiler` binary from this target directory:
//! `cargo test --workspace` builds it (the profiler crate has an integration test,
//! so cargo builds its binary first). Running this file alone needs
//! `cargo build -p livemount-profiler` first; a missing or stale binary fails the
//! test rather than testing old code.

use livemount_store::format::profile::Profile;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

// ---------------------------------------------------------------- helpers

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            let t = if p.is_dir() {
                newest_mtime(&p)
            } else {
                e.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH)
            };
            newest = newest.max(t);
        }
    }
    newest
}

/// The profiler binary next to this test's `deps/` directory, checked to be
/// newer than its sources.
fn profiler_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LIVEMOUNT_PROFILER") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("livemount-profiler");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} missing: run `cargo build -p livemount-profiler` (cargo test --workspace builds it)",
                bin.display()
            )
        });
    let root = workspace_root();
    let sources = [
        root.join("profiler/src"),
        root.join("ebpf/src"),
        root.join("ebpf-abi/src"),
    ]
    .iter()
    .map(|d| newest_mtime(d))
    .chain(std::iter::once(
        std::fs::metadata(root.join("driver/src/profile.rs"))
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH),
    ))
    .max()
    .unwrap_or(std::time::UNIX_EPOCH);
    assert!(
        built >= sources,
        "{} is older than its sources: run `cargo build -p livemount-profiler`",
        bin.display()
    );
    bin
}

/// Why tracing tests cannot run here, if they cannot.
fn cannot_trace() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (CAP_BPF, CAP_PERFMON) to attach eBPF programs".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control (loop devices unavailable)".into());
    }
    if !Path::new("/sys/kernel/tracing").exists()
        && !Path::new("/sys/kernel/debug/tracing").exists()
    {
        return Some("no tracefs mount point".into());
    }
    None
}

macro_rules! require_tracing {
    ($name:expr) => {
        if let Some(reason) = cannot_trace() {
            // SAFETY: geteuid has no preconditions.
            let tier = if unsafe { libc::geteuid() } == 0 {
                livemount_tests::Tier::Machine
            } else {
                livemount_tests::Tier::Root
            };
            livemount_tests::skip($name, tier, &reason);
            return;
        }
    };
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A loop device over a file, detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn attach(file: &Path, partitions: bool) -> Loop {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if partitions {
            cmd.arg("-P");
        }
        let dev = PathBuf::from(run(cmd.arg(file)));
        Loop { dev }
    }

    /// Block device node of partition `n`, creating it if devtmpfs has not.
    fn partition(&self, n: u32, scratch: &Path) -> PathBuf {
        let name = format!("{}p{n}", self.dev.file_name().unwrap().to_string_lossy());
        let node = Path::new("/dev").join(&name);
        let sys = Path::new("/sys/class/block").join(&name).join("dev");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut asked = false;
        while !node.exists() && Instant::now() < deadline {
            if !sys.exists() && !asked {
                // `losetup -P` left no partitions on this host (the kernel's scan
                // found none in time); add them explicitly with BLKPG.
                std::thread::sleep(Duration::from_millis(300));
                if !sys.exists() {
                    let _ = Command::new("partx").arg("-a").arg(&self.dev).status();
                }
                asked = true;
            }
            if sys.exists() {
                let mm = std::fs::read_to_string(&sys).unwrap();
                let (ma, mi) = mm.trim().split_once(':').unwrap();
                let alt = scratch.join(&name);
                let c = std::ffi::CString::new(alt.to_str().unwrap()).unwrap();
                let dev = libc::makedev(ma.parse().unwrap(), mi.parse().unwrap());
                // SAFETY: valid C string; mknod creates a device node in our temp dir.
                if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, dev) } == 0 {
                    return alt;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(node.exists(), "{} never appeared", node.display());
        node
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A sparse file of `size` bytes.
fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(size).unwrap();
    p
}

/// A file of `size` bytes of real data (allocated on disk), synced.
fn data_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let mut f = File::create(&p).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    for _ in 0..size / MIB {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    p
}

/// An O_DIRECT read of `len` bytes at `off` (both 4 KiB aligned).
fn direct_read(path: &Path, off: u64, len: u64) {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", path.display()));
    let mut buf = vec![0u8; (len + 4096) as usize];
    let shift = buf.as_ptr().align_offset(4096);
    f.read_exact_at(&mut buf[shift..shift + len as usize], off)
        .unwrap_or_else(|e| panic!("O_DIRECT read {}+{len}: {e}", off));
}

/// A buffered read that goes to the device exactly: the range is dropped from
/// the page cache first and readahead is off for the file (POSIX_FADV_RANDOM),
/// so the kernel reads precisely the requested pages.
fn buffered_read_uncached(f: &File, off: u64, len: u64) {
    // SAFETY: fadvise on a valid fd; advisory only.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            off as i64,
            len as i64,
            libc::POSIX_FADV_DONTNEED,
        );
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, off).unwrap();
}

fn drop_caches() {
    // Sync first so dirty pages can be dropped too.
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
}

/// A running `record` or `watch`, started once the program is attached.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Spawn the profiler and wait for the line saying it is attached. A profiler
    /// that exits before attaching is started once more (seen once, on a fresh
    /// machine, in `cgroup_filter_keeps_only_that_cgroup_reads`, with its message
    /// lost): the first failure is printed whole, and a second one fails the test
    /// with both.
    fn start(args: &[&str], ready_prefix: &str) -> Running {
        match Self::try_start(args, ready_prefix) {
            Ok(r) => r,
            Err(first) => {
                eprintln!("FLAKY: {first}\n(starting the profiler once more)");
                Self::try_start(args, ready_prefix)
                    .unwrap_or_else(|second| panic!("{first}\nand again: {second}"))
            }
        }
    }

    fn try_start(args: &[&str], ready_prefix: &str) -> Result<Running, String> {
        let mut child = Command::new(profiler_bin())
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn livemount-profiler");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut reader = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                let status = child.wait().unwrap();
                let said = stderr.lock().unwrap().clone();
                return Err(format!(
                    "profiler {args:?} exited ({status}) before attaching:\n{said}"
                ));
            }
            stderr.lock().unwrap().push_str(&line);
            if line.starts_with(ready_prefix) {
                break;
            }
        }
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Ok(Running { child, stderr })
    }

    /// Ctrl-C, wait, and return stderr.
    fn stop(mut self) -> String {
        // Let the last events reach the ring buffer's consumer.
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let err = self.stderr.lock().unwrap().clone();
        assert!(status.success(), "profiler failed ({status}): {err}");
        err
    }
}

fn record(disk: &Path, out: &Path, extra: &[&str]) -> Running {
    let mut args = vec![
        "record",
        "--disk",
        disk.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Running::start(&args, "recording ")
}

/// (offset, length) of the extents in access order, checking each was read once.
/// The profile's extents in access order, with neighbours that continue each other
/// joined: the block layer may split one read into several requests (a 2 MiB O_DIRECT
/// read was seen as 512 KiB + 1.5 MiB issued more than the coalescing window apart on
/// a busy machine); the profile must still show the bytes read, in order. The reads
/// the tests issue are never adjacent to each other, so joining hides nothing else.
/// How many requests touched an extent is not compared: the kernel may issue a read
/// twice (seen once on a busy host: a 16 KiB O_DIRECT read of an image file counted 2).
fn extents(p: &Profile) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in p.extents_in_access_order() {
        assert!(e.count >= 1, "extent {e} without a read");
        match out.last_mut() {
            Some(last) if last.0 + last.1 == e.offset => last.1 += e.length,
            _ => out.push((e.offset, e.length)),
        }
    }
    out
}

fn pause() {
    // Longer than the 1 ms coalescing window, so each read is its own extent.
    std::thread::sleep(Duration::from_millis(20));
}

fn tmpdir() -> tempfile::TempDir {
    // On the host's disk file system (not tmpfs): the file-image test needs FIEMAP
    // extents on a real block device.
    tempfile::Builder::new()
        .prefix("lm-profiler-")
        .tempdir_in(std::env::temp_dir())
        .unwrap()
}

// ---------------------------------------------------------------- tracing tests

#[test]
fn exact_reads_on_a_loop_device_and_nothing_from_others() {
    require_tracing!("exact_reads_on_a_loop_device_and_nothing_from_others");
    let dir = tmpdir();
    let a = Loop::attach(&sparse_file(dir.path(), "a.img", 64 * MIB), false);
    let b = Loop::attach(&sparse_file(dir.path(), "b.img", 64 * MIB), false);
    // Hold both devices open: the kernel drops a block device's cache on last close.
    let fa = File::open(&a.dev).unwrap();
    let fb = File::open(&b.dev).unwrap();
    drop_caches();
    let out = dir.path().join("a.json");
    let rec = record(&a.dev, &out, &[]);
    let mut expected = Vec::new();
    let direct = [
        (MIB, 4 * KIB),
        (8 * MIB, 64 * KIB),
        (3 * MIB, 2 * MIB),
        (20 * MIB + 4 * KIB, 12 * KIB),
    ];
    for (i, &(off, len)) in direct.iter().enumerate() {
        direct_read(&a.dev, off, len);
        expected.push((off, len));
        // Interleave reads of the other device: they must not show up.
        direct_read(&b.dev, 10 * MIB + i as u64 * MIB, 64 * KIB);
        buffered_read_uncached(&fb, 30 * MIB + i as u64 * MIB, 8 * KIB);
        pause();
    }
    for &(off, len) in &[
        (30 * MIB, 4 * KIB),
        (40 * MIB + 8 * KIB, 32 * KIB),
        (50 * MIB, 256 * KIB),
    ] {
        buffered_read_uncached(&fa, off, len);
        expected.push((off, len));
        pause();
    }
    let log = rec.stop();
    let p = Profile::load(&out).unwrap();
    assert_eq!(
        extents(&p),
        expected,
        "profile differs from the reads issued; log: {log}"
    );
    assert_eq!(p.disk_size, 64 * MIB);
    assert_eq!(p.stats.events_lost, 0);
    assert_eq!(
        p.stats.events_outside, 0,
        "other devices leaked through the kernel filter"
    );
    assert_eq!(p.source.tracer, "block_rq_issue");
    // Times follow the order of the reads and start at 0.
    let times: Vec<u64> = p
        .extents_in_access_order()
        .map(|e| e.first_access_ns)
        .collect();
    assert_eq!(times[0], 0);
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    drop((fa, fb));
}

/// A process started now that runs its program only when released: a shell that
/// waits for a line on stdin, then `exec`s the program (same pid). Its pid, the tgid
/// its reads are submitted under, is known before it reads anything, so a profiler
/// can be started with a filter naming it.
struct Held {
    child: Child,
}

impl Held {
    fn spawn(program: &str, args: &[String]) -> Held {
        let child = Command::new("sh")
            .arg("-c")
            .arg("read go && exec \"$0\" \"$@\"")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sh for {program}: {e}"));
        Held { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Let it run and wait for it to succeed.
    fn release_and_wait(mut self) {
        let mut go = self.child.stdin.take().expect("stdin is piped");
        go.write_all(b"go\n").unwrap();
        drop(go);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "held process failed: {status}");
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dd` reading `len` bytes at `off` of `dev` with O_DIRECT, held until released.
fn held_dd(dev: &Path, off: u64, len: u64) -> Held {
    let bs = 64 * KIB;
    Held::spawn(
        "dd",
        &[
            format!("if={}", dev.display()),
            "of=/dev/null".into(),
            "iflag=direct".into(),
            format!("bs={bs}"),
            format!("skip={}", off / bs),
            format!("count={}", len / bs),
            "status=none".into(),
        ],
    )
}

/// Reads of one process among reads of others from the same device: the profile
/// holds only that process's, with `--pid`, or with `--cgroup` of a cgroup it is in.
fn task_filter_case(name: &str, filter: impl FnOnce(&Held, &Path) -> Vec<String>) {
    let dir = tmpdir();
    let a = Loop::attach(&sparse_file(dir.path(), "a.img", 64 * MIB), false);
    let fa = File::open(&a.dev).unwrap();
    drop_caches();
    let reader = held_dd(&a.dev, 8 * MIB, 256 * KIB);
    let args = filter(&reader, dir.path());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = dir.path().join(format!("{name}.json"));
    let rec = record(&a.dev, &out, &args);
    // Reads of this test process before, and after, the filtered one.
    direct_read(&a.dev, MIB, 64 * KIB);
    buffered_read_uncached(&fa, 20 * MIB, 16 * KIB);
    pause();
    reader.release_and_wait();
    pause();
    direct_read(&a.dev, 30 * MIB, 64 * KIB);
    let log = rec.stop();
    let p = Profile::load(&out).unwrap();
    assert_eq!(
        extents(&p),
        vec![(8 * MIB, 256 * KIB)],
        "{name}: the profile holds other processes' reads or misses the filtered one; log: {log}"
    );
    assert_eq!(p.source.tracer, "block_bio_queue", "{name}");
    drop(fa);
}

#[test]
fn pid_filter_keeps_only_that_process_reads() {
    require_tracing!("pid_filter_keeps_only_that_process_reads");
    task_filter_case("pid", |reader, _| {
        vec!["--pid".into(), reader.pid().to_string()]
    });
}

/// A cgroup v2 directory created for a test and removed after it.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Where cgroup v2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on
/// hybrid hosts), if it is.
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
    })
}

#[test]
fn cgroup_filter_keeps_only_that_cgroup_reads() {
    require_tracing!("cgroup_filter_keeps_only_that_cgroup_reads");
    let Some(root) = cgroup2_root() else {
        livemount_tests::skip(
            "cgroup_filter_keeps_only_that_cgroup_reads",
            livemount_tests::Tier::Machine,
            "no cgroup v2 mount",
        );
        return;
    };
    let cg = TestCgroup(root.join(format!("livemount-test-{}", std::process::id())));
    if let Err(e) = std::fs::create_dir(&cg.0) {
        livemount_tests::skip(
            "cgroup_filter_keeps_only_that_cgroup_reads",
            livemount_tests::Tier::Machine,
            &format!("cannot create {}: {e}", cg.0.display()),
        );
        return;
    }
    task_filter_case("cgroup", |reader, _| {
        std::fs::write(cg.0.join("cgroup.procs"), reader.pid().to_string())
            .unwrap_or_else(|e| panic!("move {} into {}: {e}", reader.pid(), cg.0.display()));
        vec!["--cgroup".into(), cg.0.display().to_string()]
    });
}

#[test]
fn partition_reads_are_translated_to_partition_offsets() {
    require_tracing!("partition_reads_are_translated_to_partition_offsets");
    let dir = tmpdir();
    let img = sparse_file(dir.path(), "parted.img", 64 * MIB);
    // p1: 1 MiB .. 17 MiB, p2: 18 MiB .. 64 MiB.
    let mut sfdisk = Command::new("sfdisk")
        .arg("--no-reread")
        .arg("-q")
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk (cargo xtask setup installs it)");
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, size=32768, type=83\nstart=36864, type=83\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let lo = Loop::attach(&img, true);
    let p1 = lo.partition(1, dir.path());
    let p2 = lo.partition(2, dir.path());
    let out = dir.path().join("p2.json");
    let rec = record(&p2, &out, &[]);
    direct_read(&p2, MIB, 8 * KIB);
    pause();
    direct_read(&p1, MIB, 64 * KIB); // other partition, same disk: not ours
    pause();
    direct_read(&p2, 40 * MIB, 64 * KIB);
    pause();
    direct_read(&lo.dev, 18 * MIB + 5 * MIB, 4 * KIB); // whole disk, inside p2
    pause();
    let log = rec.stop();
    let p = Profile::load(&out).unwrap();
    assert_eq!(p.disk_size, 46 * MIB);
    assert_eq!(
        extents(&p),
        vec![(MIB, 8 * KIB), (40 * MIB, 64 * KIB), (5 * MIB, 4 * KIB)],
        "log: {log}"
    );
    assert!(
        p.stats.events_outside >= 1,
        "the p1 read should be counted outside"
    );
}

#[test]
fn image_file_reads_are_translated_with_fiemap() {
    require_tracing!("image_file_reads_are_translated_with_fiemap");
    let dir = tmpdir();
    let img = data_file(dir.path(), "vm.img", 16 * MIB);
    let out = dir.path().join("img.json");
    let rec = record(&img, &out, &[]);
    let reads = [(4 * MIB, 16 * KIB), (MIB, 4 * KIB), (12 * MIB, 128 * KIB)];
    for &(off, len) in &reads {
        direct_read(&img, off, len);
        pause();
    }
    let log = rec.stop();
    let p = Profile::load(&out).unwrap();
    assert_eq!(p.disk_size, 16 * MIB);
    assert_eq!(extents(&p), reads.to_vec(), "log: {log}");
    assert!(
        log.contains("page cache"),
        "record should explain what the page cache hides: {log}"
    );

    // Page-cache mode sees buffered reads by file offset, cached or not.
    let out = dir.path().join("img-pc.json");
    let rec = record(&img, &out, &["--page-cache"]);
    let f = File::open(&img).unwrap();
    let mut buf = vec![0u8; 8192];
    f.read_exact_at(&mut buf, 2 * MIB).unwrap();
    pause();
    f.read_exact_at(&mut buf[..4096], 6 * MIB + 4 * KIB)
        .unwrap();
    pause();
    rec.stop();
    let p = Profile::load(&out).unwrap();
    assert_eq!(p.source.tracer, "mm_filemap_get_pages");
    assert_eq!(
        extents(&p),
        vec![(2 * MIB, 8 * KIB), (6 * MIB + 4 * KIB, 4 * KIB)]
    );
}

#[test]
fn watch_writes_one_profile_per_boot_and_rotates() {
    require_tracing!("watch_writes_one_profile_per_boot_and_rotates");
    let dir = tmpdir();
    let lo = Loop::attach(&sparse_file(dir.path(), "w.img", 32 * MIB), false);
    let out = dir.path().join("profiles");
    let w = Running::start(
        &[
            "watch",
            "--disk",
            lo.dev.to_str().unwrap(),
            "--dir",
            out.to_str().unwrap(),
            "--idle",
            "0.5",
            "--min-events",
            "1",
            "--keep",
            "2",
        ],
        "watching ",
    );
    for boot in 0..3u64 {
        direct_read(&lo.dev, boot * MIB, 4 * KIB);
        pause();
        direct_read(&lo.dev, 16 * MIB + boot * MIB, 8 * KIB);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let log = w.stop();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "keep 2 of 3 boots: {files:?}; log: {log}");
    assert_eq!(log.matches("boot of").count(), 3, "{log}");
    let last = Profile::load(&files[1]).unwrap();
    assert_eq!(
        extents(&last),
        vec![(2 * MIB, 4 * KIB), (18 * MIB, 8 * KIB)]
    );
}

#[test]
fn without_privileges_it_says_so_in_one_line() {
    if let Some(why) = cannot_trace() {
        livemount_tests::skip(
            "without_privileges_it_says_so_in_one_line",
            livemount_tests::Tier::Root,
            &format!("needs root to drop privileges ({why})"),
        );
        return;
    }
    let dir = tmpdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.path().join("livemount-profiler");
    std::fs::copy(profiler_bin(), &bin).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["record", "--disk", "/dev/null", "--out", "/tmp/never.json"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("root") && err.contains("CAP_BPF"), "{err}");
}

// ---------------------------------------------------------------- profile files

fn write_json(dir: &Path, name: &str, v: &serde_json::Value) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, serde_json::to_string_pretty(v).unwrap()).unwrap();
    p
}

fn handcrafted(extents: &[(u64, u64, u64, u64)]) -> serde_json::Value {
    serde_json::json!({
        "format": "livemount-profile",
        "version": 1,
        "disk_size": 64 * MIB,
        "block_size": 4096,
        "source": {"host": "h1", "device": "/dev/vdb", "kernel": "6.18", "tracer": "block_rq_issue", "started_unix": 1, "runs": 1},
        "stats": {"events_seen": 10, "events_lost": 0, "events_outside": 0, "duration_ns": 1000},
        "extents": extents.iter().map(|&(o, l, t, c)| serde_json::json!({
            "offset": o, "length": l, "first_access_ns": t, "count": c, "runs": 1
        })).collect::<Vec<_>>(),
    })
}

fn profiler(args: &[&str]) -> std::process::Output {
    Command::new(profiler_bin())
        .args(args)
        .output()
        .expect("run livemount-profiler")
}

#[test]
fn merge_uses_median_order_and_show_plots() {
    let dir = tmpdir();
    // Three boots read the same kernel blocks; boot c is slow (odd) and also reads
    // a block nobody else reads.
    let a = write_json(
        dir.path(),
        "a.json",
        &handcrafted(&[(0, 64 * KIB, 0, 1), (MIB, 4 * KIB, 100, 1)]),
    );
    let b = write_json(
        dir.path(),
        "b.json",
        &handcrafted(&[(0, 64 * KIB, 0, 2), (MIB, 4 * KIB, 300, 1)]),
    );
    let c = write_json(
        dir.path(),
        "c.json",
        &handcrafted(&[
            (MIB, 4 * KIB, 5, 1),
            (0, 64 * KIB, 90_000, 1),
            (32 * MIB, 4 * KIB, 7, 1),
        ]),
    );
    let m = dir.path().join("m.json");
    let s = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let out = profiler(&["merge", &s(&a), &s(&b), &s(&c), "--out", &s(&m)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = Profile::load(&m).unwrap();
    assert_eq!(p.source.runs, 3);
    let got: Vec<(u64, u64, u64, u64, u32)> = p
        .extents_in_access_order()
        .map(|e| (e.offset, e.length, e.first_access_ns, e.count, e.runs))
        .collect();
    // Median first access: [0,64K) -> 0 (not the odd 90 µs), 1 MiB -> 100.
    assert_eq!(
        got,
        vec![
            (0, 64 * KIB, 0, 4, 3),
            (32 * MIB, 4 * KIB, 7, 1, 1),
            (MIB, 4 * KIB, 100, 3, 3)
        ]
    );
    // --min-runs 2 drops the block only the odd boot read.
    let m2 = dir.path().join("m2.json");
    let out = profiler(&[
        "merge",
        &s(&a),
        &s(&b),
        &s(&c),
        "--min-runs",
        "2",
        "--out",
        &s(&m2),
    ]);
    assert!(out.status.success());
    assert_eq!(Profile::load(&m2).unwrap().extents.len(), 2);

    let svg = dir.path().join("m.svg");
    let out = profiler(&["show", &s(&m), "--plot", &s(&svg)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "bytes read       72.0 KiB",
        "extents          3",
        "share of disk",
        "time to 50%",
        "time to 100%",
        "3 run(s)",
    ] {
        assert!(text.contains(want), "show lacks {want:?}:\n{text}");
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<title>").count(), 3, "one mark per extent");
    assert!(svg.contains("heat strip"));
}

#[test]
fn bad_profiles_are_rejected_with_one_line() {
    let dir = tmpdir();
    let mut future = handcrafted(&[(0, 4096, 0, 1)]);
    future["version"] = 2.into();
    future["extents"] = serde_json::json!("a new encoding");
    let mut past_end = handcrafted(&[(64 * MIB - 4096, 8192, 0, 1)]);
    past_end["source"]["runs"] = 1.into();
    let mut overlap = handcrafted(&[(0, 8192, 0, 1), (4096, 4096, 1, 1)]);
    overlap["stats"]["events_seen"] = 2.into();
    let mut missing = handcrafted(&[]);
    missing.as_object_mut().unwrap().remove("disk_size");
    let cases: Vec<(PathBuf, &str)> = vec![
        (dir.path().join("truncated.json"), "malformed profile"),
        (
            write_json(dir.path(), "future.json", &future),
            "unsupported profile version 2",
        ),
        (
            write_json(dir.path(), "past.json", &past_end),
            "past the disk size",
        ),
        (write_json(dir.path(), "overlap.json", &overlap), "overlaps"),
        (
            write_json(dir.path(), "missing.json", &missing),
            "disk_size",
        ),
        (
            write_json(
                dir.path(),
                "other.json",
                &serde_json::json!({"format": "qcow2"}),
            ),
            "not a livemount profile",
        ),
    ];
    std::fs::write(
        &cases[0].0,
        "{\"format\": \"livemount-profile\", \"version\": 1, \"disk",
    )
    .unwrap();
    for (path, want) in &cases {
        let out = profiler(&["show", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {err}", path.display());
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
        assert!(
            err.contains(want),
            "{}: {err} should contain {want:?}",
            path.display()
        );
        assert!(
            err.contains(path.file_name().unwrap().to_str().unwrap()),
            "names the file: {err}"
        );
    }
    // merge refuses them too, and profiles of different disks.
    let good = write_json(dir.path(), "good.json", &handcrafted(&[(0, 4096, 0, 1)]));
    let mut other = handcrafted(&[(0, 4096, 0, 1)]);
    other["disk_size"] = (128 * MIB).into();
    let other = write_json(dir.path(), "bigger.json", &other);
    let out = profiler(&[
        "merge",
        good.to_str().unwrap(),
        other.to_str().unwrap(),
        "--out",
        "/nonexistent/x.json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("disk size"));
}
