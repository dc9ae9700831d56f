//! The eBPF toolchain (bpf-linker against Debian's LLVM 22, rust-src) and the
//! profiler benchmark (`cargo xtask bench-profiler`).

use crate::util::{have, root, run};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// bpf-linker version that builds against LLVM 22 (rustc 1.95 ships LLVM 22.1).
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's LLVM whose major matches rustc's; bpf-linker links against it.
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Offline fallback for rust-src when rustup cannot fetch the component.
const RUST_SRC_TARBALL: &str = "rust-src-1.95.0-library.tar.xz";
/// The rustc version the tarball matches; a different rustc needs its own sources.
const RUST_SRC_RUSTC: &str = "rustc 1.95.0 ";

/// Install bpf-linker and rust-src when missing (idempotent, seconds when present).
pub fn setup() -> Result<()> {
    // fio drives the profiler benchmark; sfdisk partitions the test images.
    crate::setup::apt_install(&[("fio", "fio"), ("sfdisk", "fdisk")])?;
    bpf_linker()?;
    rust_src()?;
    Ok(())
}

/// bpf-linker 0.13.0 built against LLVM 22; rebuilt only when missing or another version.
fn bpf_linker() -> Result<()> {
    if bpf_linker_version().as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    // The llvm-22 feature needs the LLVM 22 shared library and llvm-config.
    crate::setup::apt_install(&[("llvm-config-22", "llvm-22-dev")])?;
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!("{LLVM_PREFIX}/bin/llvm-config missing after installing llvm-22-dev");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Without LLVM_PREFIX the build finds /usr/bin/llvm-config (another LLVM) and
    // fails to link; the default feature (llvm-23) does not match rustc's LLVM.
    run(Command::new(cargo)
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))?;
    match bpf_linker_version() {
        Some(v) if v == BPF_LINKER_VERSION => Ok(()),
        other => {
            bail!("bpf-linker {BPF_LINKER_VERSION} not on PATH after install (found {other:?})")
        }
    }
}

/// The version `bpf-linker --version` reports, if it runs at all.
fn bpf_linker_version() -> Option<String> {
    if !have("bpf-linker") {
        // cargo installs into ~/.cargo/bin, which is normally on PATH; check it too.
        let home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
        if !home.join("bin/bpf-linker").is_file() {
            return None;
        }
    }
    let out = Command::new("bpf-linker").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "bpf-linker 0.13.0"
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// rust-src for the stable toolchain: `-Z build-std=core` compiles `core` for bpfel.
fn rust_src() -> Result<()> {
    let sysroot = rustc_output(&["--print", "sysroot"])?;
    let src = PathBuf::from(sysroot.trim()).join("lib/rustlib/src/rust");
    if src.join("library/core/Cargo.toml").is_file() {
        return Ok(());
    }
    let added = Command::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "stable"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if added && src.join("library/core/Cargo.toml").is_file() {
        return Ok(());
    }
    let version = rustc_output(&["--version"])?;
    if !version.starts_with(RUST_SRC_RUSTC) {
        bail!("rust-src missing and rustup failed; the offline tarball is for {RUST_SRC_RUSTC}but rustc is {}", version.trim());
    }
    let tarball = root()
        .join("..")
        .join("shared/toolchain")
        .join(RUST_SRC_TARBALL);
    if !tarball.is_file() {
        bail!(
            "rust-src missing, rustup failed and {} does not exist",
            tarball.display()
        );
    }
    std::fs::create_dir_all(&src).with_context(|| format!("cannot create {}", src.display()))?;
    run(Command::new("tar")
        .arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&src))?;
    if !src.join("library/core/Cargo.toml").is_file() {
        bail!(
            "{} did not unpack to {}/library",
            tarball.display(),
            src.display()
        );
    }
    Ok(())
}

/// Trimmed stdout of `rustc ARGS`.
fn rustc_output(args: &[&str]) -> Result<String> {
    let out = Command::new("rustc")
        .args(args)
        .output()
        .context("cannot run rustc")?;
    if !out.status.success() {
        bail!("rustc {args:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Seconds of fio per phase.
const BENCH_PHASE_SECS: u32 = 10;
/// Baseline/traced pairs; alternating cancels slow drift of the host.
const BENCH_ROUNDS: usize = 3;

/// `cargo xtask bench-profiler`: fio 4 KiB random O_DIRECT reads at the highest
/// IOPS a loop device reaches here, alternating phases without and with
/// `livemount-profiler record` attached (default settings), in one run. Prints
/// IOPS of both, the overhead, and events seen / lost per traced phase.
pub fn bench() -> Result<()> {
    setup()?;
    if !crate::util::is_root() {
        bail!("bench-profiler needs root (loop devices, eBPF)");
    }
    crate::util::build_release_tools()?;
    let bin = root().join("target/release/livemount-profiler");
    let dir = crate::util::cache_dir().join("bench-profiler");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A sparse backing file: reads of holes cost the loop driver no host I/O,
    // so fio measures the block layer + loop path at its fastest.
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(4 << 30))
        .with_context(|| format!("creating {}", img.display()))?;
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
        .context("cannot run losetup")?;
    if !out.status.success() {
        bail!(
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let result = bench_on(&bin, &dev, &dir);
    let _ = Command::new("losetup").args(["-d", &dev]).status();
    result
}

struct Phase {
    traced: bool,
    iops: f64,
    ios: u64,
    seen: u64,
    lost: u64,
}

fn bench_on(bin: &Path, dev: &str, dir: &Path) -> Result<()> {
    let mut phases = Vec::new();
    // Warm-up (not counted): page tables, CPU frequency, loop worker threads.
    fio(dev, 3)?;
    for round in 0..BENCH_ROUNDS {
        for traced in [false, true] {
            let phase = if traced {
                traced_phase(bin, dev, dir)?
            } else {
                let (iops, ios) = fio(dev, BENCH_PHASE_SECS)?;
                Phase {
                    traced,
                    iops,
                    ios,
                    seen: 0,
                    lost: 0,
                }
            };
            eprintln!(
                "round {} {:>8}: {:>9.0} IOPS, {} reads{}",
                round + 1,
                if traced { "traced" } else { "baseline" },
                phase.iops,
                phase.ios,
                if traced {
                    format!(", profiler saw {} events, lost {}", phase.seen, phase.lost)
                } else {
                    String::new()
                }
            );
            phases.push(phase);
        }
    }
    let mean = |t: bool| {
        let v: Vec<f64> = phases
            .iter()
            .filter(|p| p.traced == t)
            .map(|p| p.iops)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (base, traced) = (mean(false), mean(true));
    let lost: u64 = phases.iter().map(|p| p.lost).sum();
    let seen: u64 = phases.iter().map(|p| p.seen).sum();
    let ios: u64 = phases.iter().filter(|p| p.traced).map(|p| p.ios).sum();
    let mut rep = crate::report::Report::new("bench-profiler", "sudo cargo xtask bench-profiler");
    let mut t = crate::report::Table::new(
        format!("fio randread 4 KiB, io_uring, iodepth 32, 2 jobs on {dev}, {BENCH_PHASE_SECS} s × {BENCH_ROUNDS} rounds, alternating:"),
        &["baseline IOPS (mean)", "traced IOPS (mean)", "overhead", "reads issued (traced)", "events seen / lost"],
    );
    t.row([
        format!("{base:.0}"),
        format!("{traced:.0}"),
        format!("{:.2}%", (base - traced) / base * 100.0),
        ios.to_string(),
        format!("{seen} / {lost}"),
    ]);
    rep.tables.push(t);
    rep.save()?;
    Ok(())
}

fn traced_phase(bin: &Path, dev: &str, dir: &Path) -> Result<Phase> {
    use std::io::{BufRead, BufReader};
    let out = dir.join("bench.json");
    let mut child = Command::new(bin)
        .args(["record", "--disk", dev, "--out"])
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut reader = BufReader::new(child.stderr.take().context("no stderr")?);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            let _ = child.wait();
            bail!("profiler exited before attaching");
        }
        if line.starts_with("recording ") {
            break;
        }
    }
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
        rest
    });
    let fio_result = fio(dev, BENCH_PHASE_SECS);
    // SIGINT: the profiler drains its ring buffer and writes the profile.
    run(Command::new("kill").args(["-INT", &child.id().to_string()]))?;
    let status = child.wait()?;
    let log = drain.join().unwrap_or_default();
    if !status.success() {
        bail!("profiler failed: {}", log.trim());
    }
    let (iops, ios) = fio_result?;
    let text =
        std::fs::read_to_string(&out).with_context(|| format!("reading {}", out.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("profile is not JSON")?;
    Ok(Phase {
        traced: true,
        iops,
        ios,
        seen: v["stats"]["events_seen"].as_u64().unwrap_or(0),
        lost: v["stats"]["events_lost"].as_u64().unwrap_or(0),
    })
}

/// Run fio for `secs`; (IOPS, completed reads).
fn fio(dev: &str, secs: u32) -> Result<(f64, u64)> {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            &format!("--filename={dev}"),
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=io_uring",
            "--iodepth=32",
            "--numjobs=2",
            "--group_reporting",
            "--time_based",
            &format!("--runtime={secs}"),
            "--output-format=json",
        ])
        .output()
        .context("cannot run fio")?;
    if !out.status.success() {
        bail!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("fio printed no JSON")?;
    let read = &v["jobs"][0]["read"];
    Ok((
        read["iops"].as_f64().unwrap_or(0.0),
        read["total_ios"].as_u64().unwrap_or(0),
    ))
}
