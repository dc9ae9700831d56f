//! `cargo xtask bench-vm`: fio inside the ublk test VM, every target in one run.
//!
//! Targets on the same 512 MiB image (the first half of the demo's ext4 disk made
//! from /usr/share), all on guest tmpfs: the kernel loop device over the raw image,
//! `rublk add null`, livemount cold (a fresh mount per job, empty caches) and warm
//! (after one full read, data in the memory tier). Jobs: 4 KiB random read at QD1 and
//! QD32, 1 MiB sequential read, 4 KiB random write at QD32 (io_uring, O_DIRECT).
//! Plus `zstd -d -T1` of the same image, the reference for cold sequential reads.
//! Only ratios inside one run mean anything under TCG, and even inside one run a
//! single fio job swings by tens of percent, so every target runs [`ROUNDS`] times,
//! interleaved, and the table shows medians (with the per-round ratio ranges). Writes
//! the table to `results/bench-vm.md`.

use crate::report::{Report, Table};
use crate::util::{cache_dir, root, run as sh};
use anyhow::{bail, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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

/// Rounds of every (target, job) pair; the table reports medians.
const ROUNDS: usize = 3;

/// rublk, installed into the cache with cargo (once).
fn rublk() -> Result<PathBuf> {
    let rootdir = cache_dir().join("tools");
    let bin = rootdir.join("bin/rublk");
    if !bin.exists() {
        eprintln!(
            "bench-vm: installing rublk (the reference ublk null target) into {}",
            rootdir.display()
        );
        sh(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["install", "rublk", "--locked", "--root"])
                .arg(&rootdir),
        )?;
    }
    Ok(bin)
}

/// The benchmark image (512 MiB of the demo's ext4 disk) and its store, built once.
pub(crate) fn image() -> Result<(PathBuf, PathBuf)> {
    let dir = cache_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let img = dir.join("image.img");
    let store = dir.join("store");
    if !img.exists() {
        let base = crate::demo::base_image(&cache_dir().join("demo"))?;
        let tmp = dir.join("image.tmp");
        sh(Command::new("dd")
            .arg(format!("if={}", base.display()))
            .arg(format!("of={}", tmp.display()))
            .args(["bs=1M", "count=512", "conv=sparse", "status=none"]))?;
        std::fs::rename(&tmp, &img)?;
        let _ = std::fs::remove_dir_all(&store);
    }
    if !store.exists() {
        sh(Command::new(root().join("target/release/livemount"))
            .arg("backup")
            .arg(&img)
            .arg("--store")
            .arg(&store)
            .args(["--name", "bench", "-q"]))?;
    }
    Ok((img, store))
}

fn script(img: &Path, store: &Path, rublk: &Path) -> String {
    let lm = root().join("target/release/livemount");
    let mut s = format!(
        r#"set -u
LM={lm}
cp --sparse=always {img} /tmp/image.img
cp -a {store} /tmp/store
FIO="fio --ioengine=io_uring --direct=1 --numjobs=1 --group_reporting --size=512M --output-format=json"
run_job() {{ # target job args dev round
  $FIO --name=$2 $3 --filename=$4 --output=/results/$1-$2-r$5.json >/dev/null 2>/tmp/fio.err || {{ echo "fio $1 $2 failed: $(tail -1 /tmp/fio.err)"; }}
}}
mount_lm() {{
  rm -f /tmp/ov.img
  $LM mount --store /tmp/store bench --overlay /tmp/ov.img --cache-mem 1G --queues 1 --depth 128 --daemon --log /tmp/lm.log > /tmp/lm.out || {{ cat /tmp/lm.log; exit 1; }}
  awk '/^device/{{print $2}}' /tmp/lm.out
}}
# zstd reference: single-threaded decode of the same image, once per round
zstd -q -3 -T1 -f /tmp/image.img -o /tmp/image.zst
"#,
        lm = lm.display(),
        img = img.display(),
        store = store.display(),
    );
    for r in 1..=ROUNDS {
        s.push_str(&format!(
            "t0=$(date +%s.%N); zstd -q -d -T1 -c /tmp/image.zst > /dev/null; t1=$(date +%s.%N)\necho \"$t0 $t1\" > /results/zstd-r{r}.txt\n"
        ));
        // loop device
        s.push_str("L=$(losetup -f --show /tmp/image.img)\n");
        for (job, args) in JOBS {
            s.push_str(&format!("run_job loop {job} '{args}' \"$L\" {r}\n"));
        }
        s.push_str("losetup -d $L\n");
        // rublk null
        s.push_str(&format!(
            "{b} add null --quiet >/tmp/rublk.out 2>&1 || cat /tmp/rublk.out\nsleep 1\nN=$(ls /dev/ublkb* | head -1)\n",
            b = rublk.display()
        ));
        for (job, args) in JOBS {
            s.push_str(&format!("run_job null {job} '{args}' \"$N\" {r}\n"));
        }
        s.push_str(&format!(
            "{b} del -a >/dev/null 2>&1\nsleep 1\n",
            b = rublk.display()
        ));
        // livemount cold: a fresh mount per job
        for (job, args) in JOBS {
            s.push_str(&format!("D=$(mount_lm)\nrun_job cold {job} '{args}' \"$D\" {r}\n$LM status --json > /results/cold-{job}-r{r}-status.json\n$LM unmount $D >/dev/null\n"));
        }
        // livemount warm: one full read first
        s.push_str("D=$(mount_lm)\ndd if=$D of=/dev/null bs=1M iflag=direct status=none\n");
        for (job, args) in JOBS {
            s.push_str(&format!("run_job warm {job} '{args}' \"$D\" {r}\n"));
        }
        s.push_str(&format!(
            "$LM status --json > /results/warm-r{r}-status.json\n$LM unmount $D >/dev/null\n"
        ));
    }
    s.push_str("rm -f /tmp/image.zst\n");
    s
}

/// The median (0 for none).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// What one fio job measured.
pub(crate) struct Figures {
    pub iops: f64,
    pub p50_us: f64,
    pub mib_s: f64,
}

/// The figures of one fio JSON output.
pub(crate) fn parse(path: &Path) -> Option<Figures> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    let job = &v["jobs"][0];
    let side = if job["write"]["io_bytes"].as_f64().unwrap_or(0.0) > 0.0 {
        &job["write"]
    } else {
        &job["read"]
    };
    Some(Figures {
        iops: side["iops"].as_f64()?,
        p50_us: side["clat_ns"]["percentile"]["50.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
        mib_s: side["bw"].as_f64()? / 1024.0,
    })
}

/// Run the benchmark.
pub fn run() -> Result<()> {
    crate::util::build_release_tools()?;
    let rublk = rublk()?;
    let (img, store) = image()?;
    let results = root().join("results/bench-vm");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)?;
    let opts = crate::vm::VmOptions {
        memory_mb: 3072,
        timeout: std::time::Duration::from_secs(3600),
        results: Some((results.clone(), "/results".into())),
        modprobe: vec!["ublk_drv".into(), "loop".into()],
        ..crate::vm::VmOptions::default()
    };
    let r = crate::vm::run_in_vm(&script(&img, &store, &rublk), &opts)?;
    if !r.success() {
        bail!("bench-vm: the VM script failed (exit {})", r.exit_code);
    }
    report(&results)?.save()?;
    Ok(())
}

/// The tables (figures and targets) from the per-round result files in `results`.
fn report(results: &Path) -> Result<Report> {
    // Per (target, job): the figures of each round (None where a round failed), so
    // that per-round ratios pair the same round.
    let mut rounds: BTreeMap<(&str, &str), Vec<Option<Figures>>> = BTreeMap::new();
    for target in ["loop", "null", "cold", "warm"] {
        for (job, _) in JOBS {
            let v: Vec<Option<Figures>> = (1..=ROUNDS)
                .map(|r| parse(&results.join(format!("{target}-{job}-r{r}.json"))))
                .collect();
            rounds.insert((target, job), v);
        }
    }
    let zstd: Vec<Option<f64>> = (1..=ROUNDS)
        .map(|r| {
            let t: Vec<f64> = std::fs::read_to_string(results.join(format!("zstd-r{r}.txt")))
                .ok()?
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            (t.len() == 2 && t[1] > t[0]).then(|| 512.0 / (t[1] - t[0]))
        })
        .collect();
    if zstd.iter().all(Option::is_none) {
        bail!("bench-vm: the zstd reference is missing");
    }
    // One metric of (target, job) per round; "zstd" is the reference's MiB/s.
    let series = |t: &str, j: &str, f: fn(&Figures) -> f64| -> Vec<Option<f64>> {
        if t == "zstd" {
            return zstd.clone();
        }
        rounds
            .get(&(t, j))
            .map(|v| v.iter().map(|x| x.as_ref().map(f)).collect())
            .unwrap_or_default()
    };
    let med = |v: &[Option<f64>]| median(v.iter().flatten().copied().collect());
    let mut rep = Report::new("bench-vm", "cargo xtask bench-vm");
    let mut figures = Table::new(
        format!(
            "Medians of {ROUNDS} interleaved rounds (per-round fio JSON in results/bench-vm/):"
        ),
        &[
            "job",
            "loop",
            "rublk null",
            "livemount cold",
            "livemount warm",
        ],
    );
    for (job, _) in JOBS {
        let cell = |t: &str| {
            let iops = series(t, job, |f| f.iops);
            if iops.iter().all(Option::is_none) {
                return "n/a".to_string();
            }
            match *job {
                "seq1m" => format!("{:.0} MiB/s", med(&series(t, job, |f| f.mib_s))),
                "rr4k_qd1" => format!(
                    "{:.0} IOPS, p50 {:.0} µs",
                    med(&iops),
                    med(&series(t, job, |f| f.p50_us))
                ),
                _ => format!("{:.0} IOPS", med(&iops)),
            }
        };
        figures.row([
            job.to_string(),
            cell("loop"),
            cell("null"),
            cell("cold"),
            cell("warm"),
        ]);
    }
    figures.row([
        "zstd -d -T1 (same image)".to_string(),
        format!("{:.0} MiB/s", med(&zstd)),
    ]);
    rep.tables.push(figures);
    // The targets: (row, goal, measured (target, job), reference (target, job), metric).
    type Metric = fn(&Figures) -> f64;
    type Series<'a> = (&'a str, &'a str);
    let targets: [(&str, &str, Series, Series, Metric); 4] = [
        (
            "warm 4 KiB QD32 IOPS / loop",
            "≥ 0.90",
            ("warm", "rr4k_qd32"),
            ("loop", "rr4k_qd32"),
            |f| f.iops,
        ),
        (
            "warm 4 KiB QD32 IOPS / rublk null (for scale)",
            "",
            ("warm", "rr4k_qd32"),
            ("null", "rr4k_qd32"),
            |f| f.iops,
        ),
        (
            "warm QD1 p50 latency / rublk null's",
            "≤ 1.20",
            ("warm", "rr4k_qd1"),
            ("null", "rr4k_qd1"),
            |f| f.p50_us,
        ),
        (
            "cold 1 MiB sequential / zstd -d -T1",
            "≥ 0.80",
            ("cold", "seq1m"),
            ("zstd", ""),
            |f| f.mib_s,
        ),
    ];
    let mut goals = Table::new("Targets:", &["target", "measured", "goal"]);
    for (row, goal, (t, j), (rt, rj), f) in targets {
        let (a, b) = (series(t, j, f), series(rt, rj, f));
        // The ratio of the medians, and the range of the ratios of rounds where both ran.
        let per: Vec<f64> = a
            .iter()
            .zip(&b)
            .filter_map(|(x, y)| Some(x.as_ref()? / y.filter(|&y| y > 0.0)?))
            .collect();
        let cell = if per.is_empty() {
            "n/a".to_string()
        } else {
            let lo = per.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = per.iter().copied().fold(0.0, f64::max);
            format!("{:.2} (rounds {lo:.2}-{hi:.2})", med(&a) / med(&b))
        };
        goals.row([row.to_string(), cell, goal.to_string()]);
    }
    rep.tables.push(goals);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fio(dir: &Path, name: &str, iops: f64, p50_ns: f64) {
        let v = serde_json::json!({"jobs": [{"read": {"iops": iops, "bw": iops * 4.0,
            "clat_ns": {"percentile": {"50.000000": p50_ns}}}, "write": {"io_bytes": 0}}]});
        std::fs::write(dir.join(name), v.to_string()).unwrap();
    }

    /// Medians per target, and per-round ratios only from rounds where both sides ran.
    #[test]
    fn medians_and_rounds_pair_up() {
        let d = tempfile::tempdir().unwrap();
        for (r, loop_iops, warm_iops) in [(1, 100.0, 90.0), (2, 200.0, 100.0), (3, 300.0, 240.0)] {
            fio(
                d.path(),
                &format!("loop-rr4k_qd32-r{r}.json"),
                loop_iops,
                1000.0,
            );
            if r != 2 {
                fio(
                    d.path(),
                    &format!("warm-rr4k_qd32-r{r}.json"),
                    warm_iops,
                    1000.0,
                );
            }
            std::fs::write(d.path().join(format!("zstd-r{r}.txt")), "10 12").unwrap();
        }
        let t = crate::report::render(&report(d.path()).unwrap());
        assert!(
            t.contains("| rr4k_qd32 | 200 IOPS | n/a | n/a | 165 IOPS |\n"),
            "{t}"
        );
        assert!(
            t.contains("| zstd -d -T1 (same image) | 256 MiB/s |  |  |  |\n"),
            "{t}"
        );
        // 165 / 200, rounds 1 (0.90) and 3 (0.80); round 2 has no warm figure.
        assert!(
            t.contains("| warm 4 KiB QD32 IOPS / loop | 0.82 (rounds 0.80-0.90) | ≥ 0.90 |"),
            "{t}"
        );
        assert!(
            t.contains("| cold 1 MiB sequential / zstd -d -T1 | n/a | ≥ 0.80 |"),
            "{t}"
        );
    }
}
