//! `cargo xtask …`: the project's own commands for setup, demo, tests and benchmarks.
//!
//! Everything a fresh machine needs (Debian packages, the backports kernel for the
//! ublk VM tests, bpf-linker and rust-src for the eBPF build) is installed by
//! `cargo xtask setup`, which `demo`, `test` and the benchmarks call first.

mod bench_nbd;
mod bench_scale;
mod bench_vm;
mod boot;
mod demo;
mod ebpf;
mod fuzz;
mod garage;
mod report;
mod setup;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "livemount project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every package, kernel and tool the project needs (idempotent).
    Setup,
    /// Build a real disk image, back it up twice, verify and restore it, print the figures.
    Demo,
    /// Run every test the project has (what CI runs).
    Test,
    /// Run the ublk tests inside a qemu VM with the backports kernel.
    VmTest,
    /// Run every fuzz target (cargo-fuzz) for --runs executions.
    Fuzz {
        /// Executions per target.
        #[arg(long, default_value_t = 1_000_000)]
        runs: u64,
        /// Only this target (repeatable; default: all).
        #[arg(long = "target", value_name = "NAME")]
        targets: Vec<String>,
    },
    /// fio in the VM: livemount cold/warm vs the loop device and rublk null.
    BenchVm,
    /// fio's nbd engine on the host: `livemount serve` cold/warm vs qemu-nbd.
    BenchNbd,
    /// The store on Garage (loopback, and 20 ms RTT through the delay proxy) vs a
    /// local directory: backup, re-backup, restore.
    BenchS3,
    /// Mass recovery: 8 clones of a template on a 3-node Garage cluster at 20 ms
    /// RTT, mounted together sharing one host cache, each replaying a boot-like
    /// trace, against one alone (results/bench-mass.{json,md}).
    BenchMass,
    /// A 4 TiB thin disk on the host: backup, changed-block incremental, serve's
    /// ready time and memory, restore (vs 2 GiB references, same run).
    BenchScale,
    /// Build the release binary and run `livemount mount` with these arguments
    /// (e.g. `cargo xtask create-device web01 --store /srv/store --daemon`).
    CreateDevice {
        /// Arguments for `livemount mount`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// fio at max IOPS on a loop device with and without the eBPF profiler attached.
    BenchProfiler,
    /// Print a saved benchmark report (results/NAME.json) as markdown tables.
    Render {
        /// The report's JSON file.
        file: std::path::PathBuf,
    },
    /// Build the bootable Debian image and its initramfs (cached in .cache/boot).
    BootImage,
    /// qemu on the host boots the Debian image twice from a `livemount serve` NBD
    /// export (a write in the first boot, seen by the second after a server
    /// restart); timings against the raw file in results/boot-nbd.md. Part of `test`.
    BootNbd,
    /// Boot the Debian image over NBD from a snapshot in Garage behind a 20 ms RTT
    /// link (LIVEMOUNT_BOOT_S3_RTT_MS), cold and pre-staged, against the raw file
    /// (results/boot-s3.md). A benchmark.
    BootS3,
    /// Boot a real Debian from a local disk, a cold and a pre-staged live mount
    /// (inside the ublk VM) and print the timings (results/bench-boot.md).
    BenchBoot {
        /// Rounds over all cases (the table shows medians).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Only these cases, comma-separated (L, Lv, C20, C20nr, C20ns, P20, M20, R20, P20all, P20n, C0, P0).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Keep every boot's console log and figures in .cache/boot/work/runs.
        #[arg(long)]
        keep: bool,
        /// Reuse the previous run's host profiles and store (same image).
        #[arg(long)]
        reuse: bool,
        /// Instead, the hypervisor smoke test: qemu inside the test VM boots the
        /// image from the live mount as a raw virtio disk.
        #[arg(long)]
        smoke: bool,
        /// Instead, the migration smoke test: boot from the live mount while
        /// `livemount migrate` copies it, then boot from the migrated raw file.
        #[arg(long)]
        smoke_migrate: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup::run(),
        Cmd::Demo => {
            setup::run()?;
            demo::run()
        }
        Cmd::Test => {
            setup::run()?;
            test()
        }
        Cmd::CreateDevice { args } => {
            util::cargo(&["build", "--release", "-p", "livemount"])?;
            let bin = util::root().join("target/release/livemount");
            let status = std::process::Command::new(bin)
                .arg("mount")
                .args(&args)
                .status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::BenchVm => {
            setup::run()?;
            bench_vm::run()
        }
        Cmd::BenchNbd => {
            setup::run()?;
            bench_nbd::run()
        }
        Cmd::BenchS3 => {
            setup::run()?;
            report::run_bench("s3")
        }
        Cmd::BenchMass => {
            setup::run()?;
            report::run_bench("mass")
        }
        Cmd::BenchScale => {
            setup::run()?;
            bench_scale::run()
        }
        Cmd::VmTest => {
            setup::run()?;
            vm::test()
        }
        Cmd::Fuzz { runs, targets } if targets.is_empty() => fuzz::run_all(runs, None),
        Cmd::Fuzz { runs, targets } => {
            for t in &targets {
                if !fuzz::TARGETS.contains(&t.as_str()) {
                    anyhow::bail!(
                        "no fuzz target {t:?} (targets: {})",
                        fuzz::TARGETS.join(", ")
                    );
                }
                let s = fuzz::run_target(t, runs, None)?;
                println!(
                    "fuzz {t}: {} executions, {} exec/s",
                    s.executions, s.per_sec
                );
            }
            Ok(())
        }
        Cmd::BenchProfiler => ebpf::bench(),
        Cmd::Render { file } => report::render_file(&file),
        Cmd::BootImage => {
            setup::run()?;
            boot::image_cmd()
        }
        Cmd::BootNbd => {
            setup::run()?;
            boot::nbd()
        }
        Cmd::BootS3 => {
            setup::run()?;
            boot::s3()
        }
        Cmd::BenchBoot {
            rounds,
            only,
            keep,
            reuse,
            smoke,
            smoke_migrate,
        } => {
            setup::run()?;
            if smoke_migrate {
                boot::smoke_migrate()
            } else if smoke {
                boot::smoke()
            } else {
                boot::bench(&boot::Options {
                    rounds,
                    only,
                    keep,
                    reuse,
                })
            }
        }
    }
}

/// Every test: the workspace's unit and integration tests (root-only tests run when
/// root), then the ublk tests inside the VM. Skips are collected (see
/// `livemount_tests::skip`), printed with their reasons, and fail the run unless the
/// VM ran every test that skipped on the host for want of ublk.
fn test() -> Result<()> {
    let log = util::root().join("target/test-skips.tsv");
    let _ = std::fs::remove_file(&log);
    // Read by the test processes cargo starts (the skip log is theirs to append to).
    std::env::set_var("LIVEMOUNT_SKIP_LOG", &log);
    // The first run is Garage's, whatever the caller's shell says.
    std::env::remove_var("LIVEMOUNT_S3_ENGINE");
    util::cargo(&["test", "--workspace", "--all-targets"])?;
    util::cargo(&["test", "--workspace", "--doc"])?;
    // The S3 tests again, against the second engine (Ceph's radosgw). The cluster
    // test is Garage's own (three Garage nodes) and ran above.
    std::env::set_var("LIVEMOUNT_S3_ENGINE", "rgw");
    let rgw = util::cargo(&[
        "test",
        "--workspace",
        "--test",
        "s3",
        "--",
        "--skip",
        "a_three_node_cluster_keeps_serving_with_a_node_down",
    ]);
    std::env::remove_var("LIVEMOUNT_S3_ENGINE");
    rgw?;
    // A short fuzz run over the committed corpora: known inputs stay handled.
    fuzz::run_all(0, Some(5))?;
    // A real OS over the NBD frontend: root and qemu on the host, no VM.
    let boot_nbd = if util::is_root() {
        boot::nbd()
    } else {
        skip_log(&log, "root", "boot-nbd", "not root (debootstrap, mkfs)");
        Ok(())
    };
    let skips = std::fs::read_to_string(&log).unwrap_or_default();
    std::env::remove_var("LIVEMOUNT_SKIP_LOG");
    let vm = vm::test();
    let verdict = skip_verdict(&skips, vm.is_ok());
    print!("{}", verdict.summary);
    boot_nbd?;
    vm?;
    if let Some(e) = verdict.failure {
        anyhow::bail!("{e}");
    }
    Ok(())
}

/// Append a skip (`tier<TAB>test<TAB>why`) to the run's skip log.
fn skip_log(log: &std::path::Path, tier: &str, test: &str, why: &str) {
    use std::io::Write as _;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{tier}\t{test}\t{why}");
    }
}

/// What the host's skip log means for the run.
struct SkipVerdict {
    /// Every skip with its reason, for the summary.
    summary: String,
    /// Why the run must fail, if it must.
    failure: Option<String>,
}

/// Judge the skip log (`tier<TAB>test<TAB>why` lines): tests that need ublk are
/// covered when the VM tier ran; any other skip means a tier that can run on this
/// machine did not (not root, a missing tracefs or cgroup v2, …).
fn skip_verdict(log: &str, vm_ran: bool) -> SkipVerdict {
    let mut summary = String::new();
    let mut uncovered = Vec::new();
    let skips: Vec<(&str, &str, &str)> = log
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, '\t');
            Some((p.next()?, p.next()?, p.next().unwrap_or("")))
        })
        .collect();
    if !skips.is_empty() {
        summary.push_str(&format!(
            "test: {} test(s) skipped on the host:\n",
            skips.len()
        ));
    }
    for (tier, test, why) in &skips {
        let covered = *tier == "ublk" && vm_ran;
        summary.push_str(&format!(
            "  SKIP [{tier}] {test}: {why}{}\n",
            if covered { " — ran in the VM" } else { "" }
        ));
        if !covered {
            uncovered.push(format!("{test} ({tier})"));
        }
    }
    let failure = (!uncovered.is_empty()).then(|| {
        format!(
            "{} test(s) were skipped and ran nowhere: {} (run as root on a machine with the VM kit; a skip is not a pass)",
            uncovered.len(),
            uncovered.join(", ")
        )
    });
    SkipVerdict { summary, failure }
}

#[cfg(test)]
mod tests {
    use super::skip_verdict;

    /// The shipped units parse (systemd-analyze is on every Debian machine; the
    /// only complaint allowed is that the binaries are not installed here).
    #[test]
    fn systemd_units_verify() {
        for unit in [
            "livemount-serve.service",
            "livemount-profiler-watch.service",
        ] {
            let path = crate::util::root().join("dist/systemd").join(unit);
            let out = std::process::Command::new("systemd-analyze")
                .arg("verify")
                .arg(&path)
                .output()
                .expect("systemd-analyze");
            let text = String::from_utf8_lossy(&out.stderr).to_string()
                + &String::from_utf8_lossy(&out.stdout);
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                assert!(line.contains("is not executable"), "{unit}: {line}");
            }
        }
    }

    #[test]
    fn skips_fail_the_run_unless_the_vm_covered_them() {
        let log = "ublk\tublk_discard\tneeds ublk\nublk\tublk_read_only\tneeds ublk\n";
        let v = skip_verdict(log, true);
        assert!(v.failure.is_none());
        assert!(v
            .summary
            .contains("SKIP [ublk] ublk_discard: needs ublk — ran in the VM"));
        let v = skip_verdict(log, false);
        assert!(v.failure.unwrap().contains("ublk_discard (ublk)"));
        let v = skip_verdict("root\trestore_to_block_devices\tneeds root\n", true);
        assert!(v
            .failure
            .unwrap()
            .contains("restore_to_block_devices (root)"));
        let v = skip_verdict("", true);
        assert!(v.failure.is_none() && v.summary.is_empty());
    }
}
