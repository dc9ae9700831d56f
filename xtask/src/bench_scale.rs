//! `cargo xtask bench-scale`: a 4 TiB thin disk, natively on the host, with the
//! release binary as an operator runs it.
//!
//! The image: a 4 TiB sparse file holding 2 GiB of data in 2,048 scattered 1 MiB
//! extents (half random, half compressible). References measured in the same run:
//! backing up a dense 2 GiB file of the same extents (page cache dropped before
//! each, two interleaved rounds, the faster shown), and writing 2 GiB (+ fsync).
//! Figures: first backup, a changed-block incremental of 100 MiB (`--changed`), the
//! time until `livemount serve` of the snapshot (with an overlay) has its export
//! ready, its RSS and /run use before writes and after writes at both ends and in
//! the middle (qemu-io over NBD), and `restore` of the 4 TiB snapshot. Table in
//! `results/bench-scale.md`. `LIVEMOUNT_BENCH_SCALE_DIR` picks the work directory
//! (default `.cache/bench-scale`, ~10 GiB while it runs; removed afterwards).

use crate::report::{Report, Table};
use crate::util::root;
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

const SIZE: u64 = 4 << 40;
const MIB: u64 = 1 << 20;
const EXTENTS: u64 = 2048;
const CHANGED: u64 = 100;

/// Extent `i`'s device offset: spread over the disk, 1 MiB aligned.
fn extent_at(i: u64) -> u64 {
    let stride = SIZE / EXTENTS;
    i * stride + (i * 7919 % 64) * MIB
}

fn extent_data(i: u64, generation: u64, buf: &mut [u8]) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i << 20) ^ generation;
    if i.is_multiple_of(2) {
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    } else {
        for (j, b) in buf.iter_mut().enumerate() {
            *b = ((j / 64) as u8).wrapping_mul(i as u8 | 1) ^ generation as u8;
        }
    }
}

fn lm() -> PathBuf {
    root().join("target/release/livemount")
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .output()
        .context("running livemount")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

fn backup(store: &Path, series: &str, src: &Path, extra: &[&str]) -> Result<f64> {
    timed(
        Command::new(lm())
            .args(["backup", "--store"])
            .arg(store)
            .args(["--name", series])
            .args(extra)
            .arg(src),
    )
}

/// A running `serve`, stopped (SIGTERM) when dropped.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        // SIGTERM: a clean stop (flush, release the mount lease).
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

/// Memory figures of the serve process's only export (from its status file).
fn memory(pid: u32) -> Result<serde_json::Value> {
    let p = format!("/run/livemount/serve-{pid}.json");
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&p) {
            let v: serde_json::Value = serde_json::from_str(&text)?;
            if let Some(e) = v["exports"].get(0).filter(|e| e["memory"].is_object()) {
                let mut m = e["memory"].clone();
                m["cache"] = e["cache"].clone();
                return Ok(m);
            }
        }
        if t.elapsed().as_secs() > 10 {
            bail!("no status in {p}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn qemu_io(uri: &str, cmds: &[String]) -> Result<()> {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(uri).output().context("running qemu-io")?;
    if !out.status.success() || String::from_utf8_lossy(&out.stdout).contains("failed") {
        bail!(
            "qemu-io {cmds:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn mib(b: f64) -> String {
    if b < MIB as f64 {
        format!("{:.0} KiB", b / 1024.0)
    } else {
        format!("{:.1} MiB", b / MIB as f64)
    }
}

/// Run the benchmark.
pub fn run() -> Result<()> {
    crate::util::build_release_tools()?;
    if !crate::util::is_root() {
        bail!("bench-scale reads serve's status in /run/livemount: run it as root");
    }
    let work = std::env::var_os("LIVEMOUNT_BENCH_SCALE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::util::cache_dir().join("bench-scale"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let res = measure(&work);
    let _ = std::fs::remove_dir_all(&work);
    res?.save()?;
    Ok(())
}

fn measure(work: &Path) -> Result<Report> {
    let (thin, dense) = (work.join("thin.img"), work.join("dense.img"));
    let (f, d) = (File::create(&thin)?, File::create(&dense)?);
    f.set_len(SIZE)?;
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..EXTENTS {
        extent_data(i, 0, &mut buf);
        f.write_all_at(&buf, extent_at(i))?;
        d.write_all_at(&buf, i * MIB)?;
    }
    f.sync_all()?;
    d.sync_all()?;
    drop((f, d));

    let (ref_store, store) = (work.join("ref-store"), work.join("store"));
    // Two interleaved rounds into fresh stores (the disk's speed drifts); the
    // table shows the faster of each.
    let (mut t_dense, mut t_thin) = (f64::MAX, f64::MAX);
    for _ in 0..2 {
        for st in [&ref_store, &store] {
            let _ = std::fs::remove_dir_all(st);
        }
        let _ = Command::new("sh")
            .args(["-c", "sync; echo 1 > /proc/sys/vm/drop_caches"])
            .status();
        t_dense = t_dense.min(backup(&ref_store, "dense", &dense, &[])?);
        t_thin = t_thin.min(backup(&store, "thin", &thin, &[])?);
    }

    // 100 MiB of changes: 100 of the extents rewritten, listed in a ranges file.
    let ranges = work.join("changed.txt");
    let mut r = File::create(&ranges)?;
    let f = OpenOptions::new().write(true).open(&thin)?;
    for k in 0..CHANGED {
        let i = k * (EXTENTS / CHANGED);
        extent_data(i, 1, &mut buf);
        f.write_all_at(&buf, extent_at(i))?;
        writeln!(r, "{} {}", extent_at(i), MIB)?;
    }
    f.sync_all()?;
    drop((f, r));
    let rs = ranges.to_string_lossy().into_owned();
    let t_changed = backup(&store, "thin", &thin, &["--changed", &rs])?;

    // serve: ready time, memory before and after writes.
    let sock = work.join("nbd.sock");
    let ovdir = work.join("overlays");
    std::fs::create_dir_all(&ovdir)?;
    let t = Instant::now();
    let mut child = Command::new(lm())
        .args(["serve", "--store"])
        .arg(&store)
        .args(["--export", "thin", "--cache-mem", "64M", "--overlay-dir"])
        .arg(&ovdir)
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting livemount serve")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let t_ready = t.elapsed().as_secs_f64();
    let serve = Serve(child);
    if !line.starts_with("export thin") {
        bail!("serve did not become ready: {line:?}");
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let before = memory(serve.0.id())?;
    let uri = format!("nbd+unix:///thin?socket={}", sock.display());
    let spots = [0, SIZE / 2, SIZE - 16 * MIB];
    let writes: Vec<String> = spots
        .iter()
        .map(|&at| format!("write -P 0x5a {at} 16M"))
        .chain(["flush".to_string()])
        .collect();
    qemu_io(&uri, &writes)?;
    let reads: Vec<String> = spots
        .iter()
        .map(|&at| format!("read -P 0x5a {at} 16M"))
        .collect();
    qemu_io(&uri, &reads)?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let after = memory(serve.0.id())?;
    drop(serve);

    // restore of the 4 TiB snapshot vs writing its 2 GiB of data (+ fsync), once
    // before and once after it (the disk's speed drifts): the reference is the mean.
    // The data is made before the clock starts (xtask is a debug build).
    let data = std::fs::read(&dense)?;
    let write_ref = |name: &str| -> Result<f64> {
        let t = Instant::now();
        let w = File::create(work.join(name))?;
        for (i, part) in data.chunks(MIB as usize).enumerate() {
            w.write_all_at(part, i as u64 * MIB)?;
        }
        w.sync_all()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let w1 = write_ref("written1.img")?;
    let t_restore = timed(
        Command::new(lm())
            .args(["restore", "--store"])
            .arg(&store)
            .arg("thin")
            .arg(work.join("restored.img")),
    )?;
    let w2 = write_ref("written2.img")?;
    let t_write = (w1 + w2) / 2.0;
    let restored = std::fs::metadata(work.join("restored.img"))?;
    let restored_alloc = std::os::unix::fs::MetadataExt::blocks(&restored) * 512;

    let g = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0) as f64;
    // RSS less what the read cache's memory tier holds (bounded by its budget).
    let beyond = |v: &serde_json::Value| {
        let (rss, cached) = (g(v, "rss_bytes"), g(&v["cache"], "mem_bytes"));
        format!("{} (RSS {})", mib(rss - cached.min(rss)), mib(rss))
    };
    let mut rep = Report::new("bench-scale", "sudo cargo xtask bench-scale");
    let mut t = Table::new(
        format!(
            "4 TiB sparse image, {EXTENTS} scattered 1 MiB extents (2 GiB), 1 MiB chunks; commit {}:",
            crate::util::git_head()
        ),
        &["figure", "measured", "reference (same run)", "ratio", "target"],
    );
    t.row([
        "first backup".to_string(),
        format!("{t_thin:.2} s"),
        format!("2 GiB dense file: {t_dense:.2} s"),
        format!("{:.2}×", t_thin / t_dense),
        "≤ 2×".into(),
    ]);
    t.row([
        "changed-block incremental, 100 MiB (`--changed`)".to_string(),
        format!("{t_changed:.2} s"),
        String::new(),
        String::new(),
        "≤ 5 s".into(),
    ]);
    t.row([
        "`serve` with overlay: export ready".to_string(),
        format!("{t_ready:.2} s"),
        String::new(),
        String::new(),
        "≤ 1 s".into(),
    ]);
    t.row([
        "RSS beyond the cache budget, before writes".to_string(),
        beyond(&before),
        String::new(),
        String::new(),
        "≤ 64 MiB".into(),
    ]);
    t.row([
        "overlay map in memory / mirror on /run, before writes".to_string(),
        format!(
            "{} / {}",
            mib(g(&before, "overlay_map_bytes")),
            mib(g(&before, "mirror_bytes"))
        ),
        String::new(),
        String::new(),
        "/run ≤ 16 MiB".into(),
    ]);
    t.row([
        "same after 48 MiB written at both ends and the middle, read back".to_string(),
        format!(
            "RSS beyond budget {}, map {} / mirror {}",
            beyond(&after),
            mib(g(&after, "overlay_map_bytes")),
            mib(g(&after, "mirror_bytes"))
        ),
        String::new(),
        String::new(),
        "grows with writes".into(),
    ]);
    t.row([
        "index in memory".to_string(),
        mib(g(&before, "index_bytes")),
    ]);
    t.row([
        format!(
            "`restore` to a sparse file ({} allocated)",
            mib(restored_alloc as f64)
        ),
        format!("{t_restore:.2} s"),
        format!("writing 2 GiB + fsync: {t_write:.2} s ({w1:.2}, {w2:.2})"),
        format!("{:.2}×", t_restore / t_write),
        "≤ 2×".into(),
    ]);
    rep.tables.push(t);
    Ok(rep)
}
