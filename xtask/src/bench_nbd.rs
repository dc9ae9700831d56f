//! `cargo xtask bench-nbd`: the NBD frontend natively on the host, with fio's nbd
//! engine, against `qemu-nbd` serving the same raw image in the same run.
//!
//! Targets, on the 512 MiB image of `bench-vm` (and its store): `qemu-nbd
//! --read-only` over the raw file (the reference; page-cache warm after its first
//! round), `livemount serve --read-only` cold (a fresh server per job: empty read
//! cache, store files in the host page cache, i.e. a local store) and warm (after one
//! full read). Jobs: 4 KiB random read at QD1 and QD32, 1 MiB sequential read.
//! [`ROUNDS`] interleaved rounds; each fio run's JSON goes to `results/bench-nbd/`,
//! and the table (medians, ratios to the reference) to `results/bench-nbd.md`.

use crate::bench_vm::{image, median, parse};
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
];
const ROUNDS: usize = 3;
const TARGETS: [&str; 3] = ["qemu-nbd", "cold", "warm"];

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

fn qemu_nbd(img: &Path, sock: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(sock);
    let c = Command::new("qemu-nbd")
        .args(["--read-only", "--format=raw", "--persistent", "--shared=8"])
        .arg(format!("--socket={}", sock.display()))
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .context("starting qemu-nbd")?;
    wait_for(sock)?;
    Ok(Server(c))
}

fn livemount(store: &Path, sock: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(sock);
    let c = Command::new(root().join("target/release/livemount"))
        .args(["serve", "--store"])
        .arg(store)
        .args([
            "--export",
            "bench",
            "--read-only",
            "--cache-mem",
            "1G",
            "--socket",
        ])
        .arg(sock)
        .stdout(Stdio::null())
        .spawn()
        .context("starting livemount serve")?;
    wait_for(sock)?;
    Ok(Server(c))
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

/// Run the benchmark.
pub fn run() -> Result<()> {
    crate::util::build_release_tools()?;
    let (img, store) = image()?;
    let results = root().join("results/bench-nbd");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    let sockets = tempfile::tempdir()?;
    let (ref_sock, lm_sock) = (
        sockets.path().join("ref.sock"),
        sockets.path().join("lm.sock"),
    );
    let out =
        |t: &str, j: &str, r: usize| -> PathBuf { results.join(format!("{t}-{j}-r{r}.json")) };
    for r in 1..=ROUNDS {
        eprintln!("bench-nbd: round {r} of {ROUNDS}");
        {
            let _q = qemu_nbd(&img, &ref_sock)?;
            for (job, args) in JOBS {
                fio(&uri(&ref_sock, ""), job, args, &out("qemu-nbd", job, r))?;
            }
        }
        for (job, args) in JOBS {
            let _s = livemount(&store, &lm_sock)?;
            fio(&uri(&lm_sock, "bench"), job, args, &out("cold", job, r))?;
        }
        let _s = livemount(&store, &lm_sock)?;
        fio(
            &uri(&lm_sock, "bench"),
            "fill",
            "--rw=read --bs=1M --iodepth=4",
            &results.join(format!("fill-r{r}.json")),
        )?;
        for (job, args) in JOBS {
            fio(&uri(&lm_sock, "bench"), job, args, &out("warm", job, r))?;
        }
    }
    let table = report(&results)?;
    println!("\n{table}");
    std::fs::write(root().join("results/bench-nbd.md"), &table)?;
    eprintln!(
        "bench-nbd: table written to results/bench-nbd.md; fio JSON in {}",
        results.display()
    );
    Ok(())
}

/// The table from the fio JSON files in `results`.
fn report(results: &Path) -> Result<String> {
    let series = |t: &str, j: &str, f: fn(&crate::bench_vm::Figures) -> f64| -> Vec<f64> {
        (1..=ROUNDS)
            .filter_map(|r| parse(&results.join(format!("{t}-{j}-r{r}.json"))))
            .map(|x| f(&x))
            .collect()
    };
    let mut out = format!(
        "Medians of {ROUNDS} interleaved rounds, fio --ioengine=nbd over a Unix socket (JSON in results/bench-nbd/).\n\n\
         | job | qemu-nbd (raw file) | livemount cold | livemount warm | warm / qemu-nbd |\n|---|---:|---:|---:|---:|\n"
    );
    for (job, _) in JOBS {
        let metric: fn(&crate::bench_vm::Figures) -> f64 = if *job == "seq1m" {
            |f| f.mib_s
        } else {
            |f| f.iops
        };
        let unit = if *job == "seq1m" { "MiB/s" } else { "IOPS" };
        let cells: Vec<Option<f64>> = TARGETS
            .iter()
            .map(|t| {
                let v = series(t, job, metric);
                (!v.is_empty()).then(|| median(v))
            })
            .collect();
        let fmt = |c: Option<f64>| {
            c.map(|v| format!("{v:.0} {unit}"))
                .unwrap_or_else(|| "n/a".into())
        };
        let ratio = match (cells[2], cells[0]) {
            (Some(w), Some(q)) if q > 0.0 => format!("{:.2}", w / q),
            _ => "n/a".into(),
        };
        let p50 = if *job == "rr4k_qd1" {
            let p = |t: &str| median(series(t, job, |f| f.p50_us));
            format!(
                " (p50 {:.0} / {:.0} / {:.0} µs)",
                p("qemu-nbd"),
                p("cold"),
                p("warm")
            )
        } else {
            String::new()
        };
        out.push_str(&format!(
            "| {job}{p50} | {} | {} | {} | {ratio} |\n",
            fmt(cells[0]),
            fmt(cells[1]),
            fmt(cells[2])
        ));
    }
    Ok(out)
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
        let t = report(d.path()).unwrap();
        assert!(
            t.contains("| rr4k_qd32 | 200 IOPS | n/a | 100 IOPS | 0.50 |"),
            "{t}"
        );
    }
}
