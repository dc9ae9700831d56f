//! Helpers for the chunk-store CLI tests: running the real `livemount` binary, building
//! disk images, an independent model of what a backup must report, and root-only
//! fixtures (loop devices, tmpfs mounts) with drop guards.

#![allow(dead_code)]

use serde_json::Value;
use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The `livemount` binary under test: `$LIVEMOUNT_BIN` if set (e.g. a release build),
/// else this package's build of driver/src/main.rs.
pub fn bin() -> PathBuf {
    let p = std::env::var_os("LIVEMOUNT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_livemount-under-test")));
    assert!(
        p.is_file(),
        "livemount binary {} not found: run the tests with `cargo test -p livemount-tests` \
         (cargo builds it first) or point LIVEMOUNT_BIN at a built binary",
        p.display()
    );
    p
}

/// A `livemount` command with a clean environment (no LIVEMOUNT_STORE, no terminal).
pub fn cmd<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut c = Command::new(bin());
    c.args(args)
        .env_remove("LIVEMOUNT_STORE")
        .stdin(Stdio::null());
    c
}

/// Outcome of one run of the binary.
#[derive(Debug)]
pub struct Run {
    /// What was run (for messages).
    pub what: String,
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Run `livemount ARGS…` to completion.
pub fn lm<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args
        .into_iter()
        .map(|a| a.as_ref().to_os_string())
        .collect();
    run_cmd(cmd(&args), &args)
}

/// Run a prepared command to completion.
pub fn run_cmd(mut c: Command, args: &[std::ffi::OsString]) -> Run {
    let what = format!(
        "livemount {}",
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    Run {
        what,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

impl Run {
    /// Panic unless the command succeeded.
    #[track_caller]
    pub fn ok(&self) -> &Run {
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

    /// The command succeeded and printed JSON: parse it.
    #[track_caller]
    pub fn json(&self) -> Value {
        self.ok();
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{}: stdout is not JSON ({e}):\n{}", self.what, self.stdout))
    }

    /// The command failed with exit code 1 and exactly one line on stderr, a
    /// `livemount: error: …` line containing every one of `needles`.
    #[track_caller]
    pub fn error(&self, needles: &[&str]) -> &Run {
        self.fails_with(1, needles);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: expected a one-line error, got:\n{}",
            self.what,
            self.stderr
        );
        assert!(
            lines[0].starts_with("livemount: error: "),
            "{}: {}",
            self.what,
            self.stderr
        );
        self
    }

    /// The command was refused by the argument parser (exit 2): clap's message starts
    /// with an `error: ` line and names every one of `needles`.
    #[track_caller]
    pub fn usage_error(&self, needles: &[&str]) -> &Run {
        self.fails_with(2, needles);
        let first = self.stderr.lines().next().unwrap_or("");
        assert!(
            first.starts_with("error: "),
            "{}: {}",
            self.what,
            self.stderr
        );
        self
    }

    #[track_caller]
    fn fails_with(&self, code: i32, needles: &[&str]) {
        assert_eq!(
            self.code,
            Some(code),
            "{}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "{}: stderr lacks {n:?}:\n{}",
                self.what,
                self.stderr
            );
        }
    }
}

/// True when running as root (loop devices, mounts, permission tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Report a skipped test (see [`livemount_tests::skip`]); `root`: whether running as
/// root would have let it run.
pub fn skip(test: &str, why: &str) {
    let tier = if is_root() {
        livemount_tests::Tier::Machine
    } else {
        livemount_tests::Tier::Root
    };
    livemount_tests::skip(test, tier, why);
}

/// Run an external tool, panicking with its output on failure.
#[track_caller]
pub fn sh(prog: &str, args: &[&OsStr]) -> String {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copy regular files from real directory trees (this repository's driver sources, then
/// /usr/share/doc) into `dst` until about `budget` bytes: realistic file-system content.
pub fn real_tree(dst: &Path, budget: u64) {
    fs::create_dir_all(dst).unwrap();
    let mut used = 0u64;
    let roots = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../driver"),
        PathBuf::from("/usr/share/doc"),
    ];
    let mut stack: Vec<PathBuf> = roots.iter().rev().cloned().collect();
    let mut n = 0u32;
    while let Some(p) = stack.pop() {
        if used >= budget {
            break;
        }
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            let Ok(rd) = fs::read_dir(&p) else { continue };
            let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            entries.sort();
            stack.extend(entries.into_iter().rev());
        } else if meta.is_file() && meta.len() <= budget - used {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            // Flatten into a few directories; names stay unique through the counter.
            let dir = dst.join(format!("d{:02}", n % 16));
            fs::create_dir_all(&dir).unwrap();
            if fs::copy(&p, dir.join(format!("{n:05}-{name}"))).is_ok() {
                used += meta.len();
                n += 1;
            }
        }
    }
    assert!(used > budget / 2, "found only {used} bytes of real files");
}

/// Make an ext4 image of `size_mib` MiB holding the tree `tree` (mkfs.ext4 -d).
pub fn mkfs_ext4(img: &Path, size_mib: u64, tree: &Path) {
    let f = fs::File::create(img).unwrap();
    f.set_len(size_mib << 20).unwrap();
    drop(f);
    sh(
        "mkfs.ext4",
        &[
            "-q".as_ref(),
            "-F".as_ref(),
            "-b".as_ref(),
            "4096".as_ref(),
            "-d".as_ref(),
            tree.as_os_str(),
            img.as_os_str(),
        ],
    );
}

/// Write a file into an ext4 image without mounting it (debugfs), replacing any old one.
pub fn debugfs_write(img: &Path, local: &Path, name: &str) {
    let req = format!("rm {name}\nwrite {} {name}\n", local.display());
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-"])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("debugfs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "debugfs failed: {out:?}");
}

/// `n` bytes from /dev/urandom (incompressible, never repeating).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut v)
        .unwrap();
    v
}

/// `mib` MiB of compressible data in which every MiB differs (real text from
/// /usr/share/doc and the sources, rotated and stamped per MiB), so that compression
/// takes real time and no chunk deduplicates against another.
pub fn compressible_image(mib: usize, salt: u64) -> Vec<u8> {
    let tree = tempfile::tempdir().unwrap();
    real_tree(tree.path(), 2 << 20);
    let mut text = Vec::new();
    let mut stack = vec![tree.path().to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            v.sort();
            stack.extend(v);
        } else {
            text.extend(fs::read(&p).unwrap());
        }
        if text.len() >= 1 << 20 {
            break;
        }
    }
    text.resize(1 << 20, b'\n');
    let mut out = Vec::with_capacity(mib << 20);
    for i in 0..mib {
        let rot = (i * 7919 + salt as usize * 104_729) % text.len();
        let start = out.len();
        out.extend_from_slice(&text[rot..]);
        out.extend_from_slice(&text[..rot]);
        // Stamp every 4 KiB so no two MiB (or frames) are alike.
        for (k, block) in out[start..].chunks_mut(4096).enumerate() {
            block[..24].copy_from_slice(&stamp(salt, i as u64, k as u64));
        }
    }
    out
}

fn stamp(a: u64, b: u64, c: u64) -> [u8; 24] {
    let mut s = [0u8; 24];
    s[..8].copy_from_slice(&a.to_le_bytes());
    s[8..16].copy_from_slice(&b.to_le_bytes());
    s[16..].copy_from_slice(&c.to_le_bytes());
    s
}

/// Chunk content as a set key: equality is a full comparison; the hash samples a few
/// bytes only (these tests run unoptimized), which is fine for a hash set.
#[derive(PartialEq, Eq)]
struct Content(Vec<u8>);

impl Hash for Content {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.len().hash(h);
        for at in (0..self.0.len()).step_by(509) {
            self.0[at].hash(h);
        }
    }
}

/// What a backup must report, computed independently of livemount from the image bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub chunks_new: u64,
    pub chunks_reused: u64,
    pub chunks_zero: u64,
    pub bytes_new: u64,
    pub bytes_reused: u64,
    pub bytes_zero: u64,
    /// Distinct non-zero chunks in this image.
    pub chunks_unique: u64,
    /// Bytes in non-zero frames of non-zero chunks: what a sparse restore writes.
    pub nonzero_frame_bytes: u64,
}

/// A model of a store's deduplication: the set of chunk contents it holds.
#[derive(Default)]
pub struct Model {
    seen: HashSet<Content>,
}

impl Model {
    pub fn new() -> Model {
        Model::default()
    }

    /// Distinct chunks the store holds.
    pub fn stored_chunks(&self) -> usize {
        self.seen.len()
    }

    /// Account for a backup of `img` (processed in order, one worker) and return what
    /// it must report.
    pub fn backup(&mut self, img: &[u8], chunk_size: usize, frame_size: usize) -> Expected {
        let mut e = Expected::default();
        let mut in_image = HashSet::new();
        for c in img.chunks(chunk_size) {
            let len = c.len() as u64;
            if c.iter().all(|&b| b == 0) {
                e.chunks_zero += 1;
                e.bytes_zero += len;
                continue;
            }
            e.nonzero_frame_bytes += c
                .chunks(frame_size)
                .filter(|f| f.iter().any(|&b| b != 0))
                .map(|f| f.len() as u64)
                .sum::<u64>();
            in_image.insert(Content(c.to_vec()));
            if self.seen.insert(Content(c.to_vec())) {
                e.chunks_new += 1;
                e.bytes_new += len;
            } else {
                e.chunks_reused += 1;
                e.bytes_reused += len;
            }
        }
        e.chunks_unique = in_image.len() as u64;
        e
    }

    /// Forget everything (after gc of all snapshots, say).
    pub fn clear(&mut self) {
        self.seen.clear();
    }
}

/// Check a backup's JSON report against the model.
#[track_caller]
pub fn check_backup_report(r: &Value, e: &Expected, image_size: u64) {
    let g = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("backup report lacks {k}: {r}"))
    };
    assert_eq!(g("image_size"), image_size, "{r}");
    // Every byte is read, skipped as a hole (never more than the zero bytes), or
    // (changed-block backups) taken from the previous snapshot.
    assert_eq!(
        g("bytes_read") + g("bytes_holes") + g("bytes_unchanged"),
        image_size,
        "{r}"
    );
    assert!(g("bytes_holes") <= e.bytes_zero, "{r}");
    assert_eq!(g("chunks_new"), e.chunks_new, "chunks_new: {r}");
    assert_eq!(g("chunks_reused"), e.chunks_reused, "chunks_reused: {r}");
    assert_eq!(g("chunks_zero"), e.chunks_zero, "chunks_zero: {r}");
    assert_eq!(g("bytes_new"), e.bytes_new, "bytes_new: {r}");
    assert_eq!(g("bytes_reused"), e.bytes_reused, "bytes_reused: {r}");
    assert_eq!(g("bytes_zero"), e.bytes_zero, "bytes_zero: {r}");
    if e.bytes_new > 0 {
        let stored = g("bytes_stored");
        assert!(stored > 0, "{r}");
        let ratio = r["compression_ratio"].as_f64().unwrap();
        assert!(
            (ratio - e.bytes_new as f64 / stored as f64).abs() < 1e-6,
            "{r}"
        );
    } else {
        assert_eq!(g("bytes_stored"), 0, "nothing new, nothing stored: {r}");
    }
}

/// Byte-for-byte comparison with `cmp` semantics: panics naming the first difference.
#[track_caller]
pub fn assert_same_content(a: &Path, b: &Path) {
    let (ma, mb) = (fs::metadata(a).unwrap(), fs::metadata(b).unwrap());
    let mut fa = fs::File::open(a).unwrap();
    let mut fb = fs::File::open(b).unwrap();
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if ba[..na] != bb[..nb] {
            let i = ba[..na.min(nb)]
                .iter()
                .zip(&bb[..na.min(nb)])
                .position(|(x, y)| x != y)
                .unwrap_or(na.min(nb));
            panic!(
                "{} and {} differ at byte {} (sizes {} and {})",
                a.display(),
                b.display(),
                off + i as u64,
                ma.len(),
                mb.len()
            );
        }
        if na == 0 {
            return;
        }
        off += na as u64;
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// Bytes allocated on disk for a file.
pub fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

/// Regular files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Chunk files in a store.
pub fn chunk_files(store: &Path) -> Vec<PathBuf> {
    files_under(&store.join("chunks"))
}

/// Index files in a store.
pub fn index_files(store: &Path) -> Vec<PathBuf> {
    files_under(&store.join("snapshots"))
}

/// Snapshot names `list --json` reports.
pub fn list_names(store: &Path) -> Vec<String> {
    let v = lm([
        "list".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--json".as_ref(),
    ])
    .json();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshot"].as_str().unwrap().to_string())
        .collect()
}

/// `verify --json` of the whole store; returns the report and the exit code.
pub fn verify_json(store: &Path) -> (Value, Option<i32>) {
    let r = lm([
        "verify".as_ref(),
        "--store".as_ref(),
        store.as_os_str(),
        "--json".as_ref(),
    ]);
    let v = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("verify output is not JSON ({e}): {r:?}"));
    (v, r.code)
}

/// Assert that the whole store verifies clean, and return how many chunks it checked.
#[track_caller]
pub fn assert_verifies(store: &Path) -> u64 {
    let (v, code) = verify_json(store);
    assert_eq!(code, Some(0), "verify failed: {v}");
    assert_eq!(v["bad_chunks"].as_array().unwrap().len(), 0, "{v}");
    assert_eq!(v["bad_indexes"].as_array().unwrap().len(), 0, "{v}");
    v["chunks_checked"].as_u64().unwrap()
}

/// A loop device over a file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    /// Attach `file`; None (with the reason) when loop devices are unavailable.
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LoopDev {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A tmpfs mounted on a directory, unmounted on drop.
pub struct TmpfsMount {
    pub dir: PathBuf,
}

impl TmpfsMount {
    pub fn mount(dir: &Path, size: &str) -> Result<TmpfsMount, String> {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(TmpfsMount {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}
