//! `cargo xtask …`: the project's own commands for setup, demo, tests and benchmarks.
//!
//! Everything a fresh machine needs (Debian packages, the backports kernel for the
//! ublk VM tests, bpf-linker and rust-src for the eBPF build) is installed by
//! `cargo xtask setup`, which `demo`, `test` and the benchmarks call first.

mod bench_vm;
mod boot;
mod demo;
mod ebpf;
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
    /// fio in the VM: livemount cold/warm vs the loop device and rublk null.
    BenchVm,
    /// Build the release binary and run `livemount mount` with these arguments
    /// (e.g. `cargo xtask create-device web01 --store /srv/store --daemon`).
    CreateDevice {
        /// Arguments for `livemount mount`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        args: Vec<String>,
    },
    /// fio at max IOPS on a loop device with and without the eBPF profiler attached.
    BenchProfiler,
    /// Build the bootable Debian image and its initramfs (cached in .cache/boot).
    BootImage,
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
        Cmd::VmTest => {
            setup::run()?;
            vm::test()
        }
        Cmd::BenchProfiler => ebpf::bench(),
        Cmd::BootImage => {
            setup::run()?;
            boot::image_cmd()
        }
        Cmd::BenchBoot {
            rounds,
            only,
            keep,
            reuse,
            smoke,
        } => {
            setup::run()?;
            if smoke {
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
/// root), then the ublk tests inside the VM.
fn test() -> Result<()> {
    util::cargo(&["test", "--workspace", "--all-targets"])?;
    util::cargo(&["test", "--workspace", "--doc"])?;
    vm::test()?;
    Ok(())
}
