//! Integration tests for livemount live in `tests/tests/`; this library holds what
//! they share with the project's test driver (`cargo xtask test`).

pub mod garage;
pub mod httpfault;
pub mod logwrites;
pub mod netem;
pub mod rgw;
pub mod s3server;

use std::io::Write;

/// The environment variable naming the file where skipped tests are recorded.
pub const SKIP_LOG_ENV: &str = "LIVEMOUNT_SKIP_LOG";

/// Why a test could not run here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Needs the kernel's ublk driver: runs inside the VM (`cargo xtask vm-test`).
    Ublk,
    /// Needs root (loop devices, mounts, eBPF).
    Root,
    /// Needs something of the machine (tracefs, cgroup v2, loop devices).
    Machine,
}

impl Tier {
    /// The name in the skip log.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Ublk => "ublk",
            Tier::Root => "root",
            Tier::Machine => "machine",
        }
    }
}

/// Report that `test` is skipped: a `SKIP` line on stderr, and a line
/// `tier<TAB>test<TAB>why` in `$LIVEMOUNT_SKIP_LOG`, which `cargo xtask test` reads
/// to print every skip in its summary and to fail when a tier that can run on this
/// machine was skipped. A skip is never a silent pass.
pub fn skip(test: &str, tier: Tier, why: &str) {
    eprintln!("SKIP {test}: {why}");
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV) {
        let line = format!(
            "{}\t{test}\t{}\n",
            tier.name(),
            why.replace(['\t', '\n'], " ")
        );
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }
}
