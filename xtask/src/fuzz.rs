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
use std::process::{Command, Stdio};

/// The cargo-fuzz release the project uses.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every fuzz target (`fuzz/fuzz_targets/NAME.rs`).
pub const TARGETS: &[&str] = &[
    "chunk_decode",
    "index_decode",
    "profile_plan",
    "text_inputs",
    "nbd_proto",
    "nbd_session",
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

/// libFuzzer's final statistics of one run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    /// `stat::number_of_executed_units`.
    pub executions: u64,
    /// `stat::average_exec_per_sec`.
    pub per_sec: u64,
    /// Wall-clock seconds of the run (including the build, when cargo rebuilt).
    pub seconds: f64,
}

/// Run one target for `runs` executions, or (with `seconds`) for that long, over
/// its committed corpus (new inputs into a scratch directory).
pub fn run_target(target: &str, runs: u64, seconds: Option<u64>) -> Result<Stats> {
    setup()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let scratch = tempfile::tempdir()?;
    let limit = match seconds {
        Some(s) => format!("-max_total_time={s}"),
        None => format!("-runs={runs}"),
    };
    let t0 = std::time::Instant::now();
    let out = Command::new(&cargo)
        .current_dir(root())
        .args(["fuzz", "run", "-s", "none", "-O", target])
        .arg(scratch.path())
        .arg(root().join("fuzz/corpus").join(target))
        .args([
            "--",
            &limit,
            "-max_len=300000",
            "-rss_limit_mb=2048",
            "-timeout=10",
            "-print_final_stats=1",
        ])
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    // libFuzzer's progress goes to stderr: the tail (verdict and stats) of a passing
    // run, everything of a failing one (the panic, the reproduction command).
    let lines: Vec<&str> = err.lines().collect();
    let from = if out.status.success() {
        lines.len().saturating_sub(12)
    } else {
        0
    };
    for l in &lines[from..] {
        eprintln!("  {l}");
    }
    eprintln!("fuzz: {target}: {}", out.status);
    if !out.status.success() {
        // libFuzzer names what it found in a line starting "artifact_prefix" /
        // "Test unit written to"; without one the target did not build or start.
        if err.contains("Test unit written to") {
            bail!("fuzz target {target} found a failing input (in fuzz/artifacts/{target}/)");
        }
        bail!("fuzz target {target} did not build or run (its output is above)");
    }
    let stat = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|r| r.trim_start_matches(':').trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Stats {
        executions: stat("stat::number_of_executed_units"),
        per_sec: stat("stat::average_exec_per_sec"),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Run every target: `runs` executions, or (with `seconds`) for that long.
pub fn run_all(runs: u64, seconds: Option<u64>) -> Result<()> {
    let mut failed = Vec::new();
    for t in TARGETS {
        if let Err(e) = run_target(t, runs, seconds) {
            failed.push(e.to_string());
        }
    }
    if !failed.is_empty() {
        bail!("fuzzing failed: {}", failed.join("; "));
    }
    Ok(())
}
