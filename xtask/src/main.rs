//! `cargo xtask …`: the project's own commands for setup, demo, tests and benchmarks.
//!
//! Everything a fresh machine needs (Debian packages, the backports kernel for the
//! ublk VM tests, bpf-linker and rust-src for the eBPF build) is installed by
//! `cargo xtask setup`, which `demo`, `test` and the benchmarks call first.

mod bench_vm;
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
