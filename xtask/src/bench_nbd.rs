//! `cargo xtask bench-nbd`: the NBD frontend natively on the host, with fio's nbd
//! engine, against the NBD servers a user would pick instead, in the same run.
//!
//! Targets, on the 512 MiB image of `bench-vm` (and its store): `qemu-nbd` over the
//! raw file (page-cache warm after its first job), `qemu-nbd` over a zstd-compressed
//! qcow2 of it (what a user would store instead of raw), `nbdkit file` over the raw
//! file, and `livemount serve` with an overlay, cold (a fresh server per job: empty
//! read cache, store files in the host page cache, i.e. a local store) and warm
//! (after one full read). Jobs: 4 KiB random read at QD1 and QD32, 1 MiB sequential
//! read, 4 KiB random write at QD32 (every writer on a scratch copy or its overlay).
//! The server's CPU time per job is read from /proc (CPU seconds per GiB moved).
//! [`ROUNDS`] interleaved rounds; each fio run's JSON goes to `results/bench-nbd/`,
//! and the report (medians, ratios) to `results/bench-nbd.{json,md}`.

use crate::bench_vm::{image, median, parse};
use crate::report::{Report, Table};
use crate::util::root;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JOBS: &[(&str, &str)] = &[
    (
        "rr4k_qd1",
        "--rw=randread --bs=4k --iodepth=1 --runtime=8 --time_based",
    ),
    (
        "rr4k_qd32",
        "--rw=randread --bs=4k --iodepth=32 --runtime=8 --time_based",
    ),
    ("seq1m", "--rw=read --bs=1M --iodepth=4 --io_size=512M"),
    (
        "rw4k_qd32",
        "--rw=randwrite --bs=4k --iodepth=32 --runtime=8 --time_based",
    ),
];
const ROUNDS: usize = 3;
/// Columns of the tables, in order.
const TARGETS: [&str; 5] = ["qemu-nbd", "qcow2", "nbdkit", "cold", "warm"];

/// A server child, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(sock: &Path) -> Result<()> {
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{} did not appear", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// `qemu-nbd` over `img` (raw or qcow2), writable, through the host page cache
/// (`--cache=writeback`), as livemount reads its store files.
fn qemu_nbd(img: &Path, format: &str, sock: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(sock);
    let c = Command::new("qemu-nbd")
        .args(["--persistent", "--shared=8", "--cache=writeback"])
        .arg(format!("--format={format}"))
        .arg(format!("--socket={}", sock.display()))
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-nbd")?;
    wait_for(sock)?;
    Ok(Server(c))
}

/// `nbdkit file` over `img`, writable, on a Unix socket.
fn nbdkit(img: &Path, sock: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(sock);
    let c = Command::new("nbdkit")
        .args(["--foreground", "--exit-with-parent", "--unix"])
        .arg(sock)
        .arg("file")
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .context("starting nbdkit (installed by `cargo xtask setup`)")?;
    wait_for(sock)?;
    Ok(Server(c))
}

/// `livemount serve` of the bench snapshot with a fresh overlay in `ovl`.
fn livemount(store: &Path, ovl: &Path, sock: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(sock);
    let _ = std::fs::remove_dir_all(ovl);
    let c = Command::new(root().join("target/release/livemount"))
        .args(["serve", "--store"])
        .arg(store)
        .args(["--export", "bench", "--cache-mem", "1G", "--overlay-dir"])
        .arg(ovl)
        .arg("--socket")
        .arg(sock)
        .stdout(Stdio::null())
        .spawn()
        .context("starting livemount serve")?;
    wait_for(sock)?;
    Ok(Server(c))
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // In clock ticks of USER_HZ, which Linux fixes at 100 for /proc on x86.
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

fn uri(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn fio(uri: &str, job: &str, args: &str, out: &Path) -> Result<()> {
    let st = Command::new("fio")
        .args(["--ioengine=nbd", "--numjobs=1", "--output-format=json"])
        .arg(format!("--uri={uri}"))
        .arg(format!("--name={job}"))
        .args(args.split_whitespace())
        .arg(format!("--output={}", out.display()))
        .stdout(Stdio::null())
        .status()
        .context("running fio")?;
    if !st.success() {
        bail!("fio {job} on {uri} failed: {st}");
    }
    Ok(())
}

/// Run one fio job against `server`, saving its JSON and the server's CPU time.
fn job(server: &Server, uri: &str, name: &str, args: &str, out: &Path) -> Result<()> {
    let before = cpu_seconds(server.0.id());
    fio(uri, name, args, out)?;
    let cpu = cpu_seconds(server.0.id()) - before;
    std::fs::write(out.with_extension("cpu"), format!("{cpu}"))?;
    Ok(())
}

/// Executions of the NBD fuzz targets in every benchmark run: the parsers alone
/// (~1M exec/s) and whole client streams against a server connection (~3k exec/s).
const FUZZ_RUNS: &[(&str, u64)] = &[("nbd_proto", 10_000_000), ("nbd_session", 1_000_000)];

/// Run the benchmark.
pub fn run() -> Result<()> {
    crate::util::build_release_tools()?;
    let (img, store) = image()?;
    let results = root().join("results/bench-nbd");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    let scratch = tempfile::tempdir_in(root().join(".cache"))?;
    let (sock, ovl) = (scratch.path().join("nbd.sock"), scratch.path().join("ovl"));
    let (raw, qcow2) = (
        scratch.path().join("copy.raw"),
        scratch.path().join("copy.qcow2"),
    );
    let zstd_qcow2 = scratch.path().join("zstd.qcow2");
    eprintln!("bench-nbd: a zstd-compressed qcow2 of the image (qemu-img convert -c)");
    let st = Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "-f",
            "raw",
        ])
        .arg(&img)
        .arg(&zstd_qcow2)
        .status()?;
    if !st.success() {
        bail!("qemu-img convert to a zstd qcow2 failed: {st}");
    }
    let out =
        |t: &str, j: &str, r: usize| -> PathBuf { results.join(format!("{t}-{j}-r{r}.json")) };
    let (plain, lm) = (uri(&sock, ""), uri(&sock, "bench"));
    for r in 1..=ROUNDS {
        eprintln!("bench-nbd: round {r} of {ROUNDS}");
        // Writers get fresh copies each round (a write job changes the image).
        std::fs::copy(&img, &raw)?;
        std::fs::copy(&zstd_qcow2, &qcow2)?;
        // One server at a time on the one socket path, each stopped before the next.
        for t in ["qemu-nbd", "qcow2", "nbdkit"] {
            let server = match t {
                "qemu-nbd" => qemu_nbd(&raw, "raw", &sock)?,
                "qcow2" => qemu_nbd(&qcow2, "qcow2", &sock)?,
                _ => nbdkit(&raw, &sock)?,
            };
            for (j, args) in JOBS {
                job(&server, &plain, j, args, &out(t, j, r))?;
            }
        }
        for (j, args) in JOBS {
            let s = livemount(&store, &ovl, &sock)?;
            job(&s, &lm, j, args, &out("cold", j, r))?;
        }
        let s = livemount(&store, &ovl, &sock)?;
        fio(
            &lm,
            "fill",
            "--rw=read --bs=1M --iodepth=4",
            &results.join(format!("fill-r{r}.json")),
        )?;
        for (j, args) in JOBS {
            job(&s, &lm, j, args, &out("warm", j, r))?;
        }
    }
    let mut rep = report(&results)?;
    // The NBD fuzz budget: at least 1M executions of each target per benchmark run.
    let mut fuzz = Table::new(
        "Fuzz targets, without a finding:",
        &["target", "executions", "exec/s", "s"],
    );
    for (target, runs) in FUZZ_RUNS {
        let f = crate::fuzz::run_target(target, *runs, None)?;
        if f.executions < *runs {
            bail!(
                "fuzz target {target} ran {} executions, fewer than {runs}",
                f.executions
            );
        }
        fuzz.row([
            format!("`{target}`"),
            f.executions.to_string(),
            f.per_sec.to_string(),
            format!("{:.0}", f.seconds),
        ]);
    }
    rep.tables.push(fuzz);
    rep.save()?;
    Ok(())
}

/// The tables from the fio JSON files in `results`: figures with ratios, then the
/// servers' CPU seconds per GiB moved.
fn report(results: &Path) -> Result<Report> {
    let file = |t: &str, j: &str, r: usize| results.join(format!("{t}-{j}-r{r}.json"));
    let series = |t: &str, j: &str, f: fn(&crate::bench_vm::Figures) -> f64| -> Vec<f64> {
        (1..=ROUNDS)
            .filter_map(|r| parse(&file(t, j, r)))
            .map(|x| f(&x))
            .collect()
    };
    let cell = |v: Vec<f64>| (!v.is_empty()).then(|| median(v));
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    };
    let mut rep = Report::new("bench-nbd", "cargo xtask bench-nbd");
    let mut figures = Table::new(
        format!("Medians of {ROUNDS} interleaved rounds, fio --ioengine=nbd over a Unix socket (fio JSON in results/bench-nbd/):"),
        &["job", "qemu-nbd raw", "qemu-nbd zstd qcow2", "nbdkit file", "livemount cold",
          "livemount warm", "warm / qemu-nbd raw", "warm / nbdkit", "cold / zstd qcow2"],
    );
    for (job, _) in JOBS {
        let seq = *job == "seq1m";
        let metric: fn(&crate::bench_vm::Figures) -> f64 =
            if seq { |f| f.mib_s } else { |f| f.iops };
        let unit = if seq { "MiB/s" } else { "IOPS" };
        let c: Vec<Option<f64>> = TARGETS
            .iter()
            .map(|t| cell(series(t, job, metric)))
            .collect();
        let fmt = |c: Option<f64>| {
            c.map(|v| format!("{v:.0} {unit}"))
                .unwrap_or_else(|| "n/a".into())
        };
        let p50 = if *job == "rr4k_qd1" {
            let p = |t: &str| median(series(t, job, |f| f.p50_us));
            format!(
                " (p50 µs: {})",
                TARGETS.map(|t| format!("{:.0}", p(t))).join(" / ")
            )
        } else {
            String::new()
        };
        let mut row = vec![format!("{job}{p50}")];
        row.extend(c.iter().map(|v| fmt(*v)));
        row.extend([ratio(c[4], c[0]), ratio(c[4], c[2]), ratio(c[3], c[1])]);
        figures.row(row);
    }
    rep.tables.push(figures);
    let mut cpu = Table::new(
        "Server CPU seconds per GiB moved (user + system, from /proc; lower is better):",
        &[
            "job",
            "qemu-nbd raw",
            "qemu-nbd zstd qcow2",
            "nbdkit file",
            "livemount cold",
            "livemount warm",
        ],
    );
    for (job, _) in JOBS {
        let per_gib = |t: &str| {
            let v: Vec<f64> = (1..=ROUNDS)
                .filter_map(|r| {
                    let f = file(t, job, r);
                    let cpu: f64 = std::fs::read_to_string(f.with_extension("cpu"))
                        .ok()?
                        .trim()
                        .parse()
                        .ok()?;
                    let v: serde_json::Value =
                        serde_json::from_str(&std::fs::read_to_string(&f).ok()?).ok()?;
                    let j = &v["jobs"][0];
                    let bytes = j["read"]["io_bytes"].as_f64().unwrap_or(0.0)
                        + j["write"]["io_bytes"].as_f64().unwrap_or(0.0);
                    (bytes > 0.0).then(|| cpu / (bytes / (1u64 << 30) as f64))
                })
                .collect();
            cell(v)
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "n/a".into())
        };
        let mut row = vec![job.to_string()];
        row.extend(TARGETS.map(per_gib));
        cpu.row(row);
    }
    rep.tables.push(cpu);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_medians_and_the_warm_ratio() {
        let d = tempfile::tempdir().unwrap();
        for (r, q, w) in [(1, 100.0, 50.0), (2, 300.0, 250.0), (3, 200.0, 100.0)] {
            for (t, iops) in [("qemu-nbd", q), ("warm", w)] {
                let v = serde_json::json!({"jobs": [{"read": {"iops": iops, "bw": iops * 4.0,
                    "clat_ns": {"percentile": {"50.000000": 1000.0}}}, "write": {"io_bytes": 0}}]});
                std::fs::write(
                    d.path().join(format!("{t}-rr4k_qd32-r{r}.json")),
                    v.to_string(),
                )
                .unwrap();
            }
        }
        let t = crate::report::render(&report(d.path()).unwrap());
        assert!(
            t.contains("| rr4k_qd32 | 200 IOPS | n/a | n/a | n/a | 100 IOPS | 0.50 | n/a | n/a |"),
            "{t}"
        );
        assert!(
            t.contains("| rr4k_qd32 | n/a | n/a | n/a | n/a | n/a |"),
            "{t}"
        );
    }
}
