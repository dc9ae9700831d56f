//! Fuzzing with cargo-fuzz (libFuzzer; `-s none`: the machine's stable toolchain has
//! no sanitizer runtimes, so targets check what they can themselves and rely on
//! Rust's own bounds checks). Targets and committed corpora live in `fuzz/`.
//!
//! `cargo xtask fuzz` runs every target for `--runs` executions (default 1M, what the
//! project requires before a parser change lands); `cargo xtask test` runs each for a
//! few seconds over the committed corpus, so a regression on a known input fails CI.
//! New inputs go to a scratch corpus, never into the committed one.

use crate::util::{have, root, run};
use anyhow::{bail, Result};
use std::process::Command;

/// The cargo-fuzz release the project uses.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every fuzz target (`fuzz/fuzz_targets/NAME.rs`).
pub const TARGETS: &[&str] = &[
    "chunk_decode",
    "index_decode",
    "profile_plan",
    "text_inputs",
    "nbd_proto",
    "read_path",
    "overlay_header",
];

/// Install cargo-fuzz when missing (idempotent).
pub fn setup() -> Result<()> {
    if have("cargo-fuzz") {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// Run every target: `runs` executions, or (with `seconds`) for that long.
pub fn run_all(runs: u64, seconds: Option<u64>) -> Result<()> {
    setup()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut failed = Vec::new();
    for t in TARGETS {
        let scratch = tempfile::tempdir()?;
        let limit = match seconds {
            Some(s) => format!("-max_total_time={s}"),
            None => format!("-runs={runs}"),
        };
        let status = Command::new(&cargo)
            .current_dir(root())
            .args(["fuzz", "run", "-s", "none", "-O", t])
            .arg(scratch.path())
            .arg(root().join("fuzz/corpus").join(t))
            .args([
                "--",
                &limit,
                "-max_len=300000",
                "-rss_limit_mb=2048",
                "-timeout=10",
                "-print_final_stats=1",
            ])
            .status()?;
        eprintln!("fuzz: {t}: {status}");
        if !status.success() {
            failed.push(*t);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (crashing inputs in fuzz/artifacts/)",
            failed.join(", ")
        );
    }
    Ok(())
}
