//! Small process helpers shared by the xtask commands.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// Single-quote `s` for sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The workspace root (the parent of `xtask/`).
pub fn root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

/// Cache directory for downloaded kernels, built images and other artefacts that
/// are expensive to make and safe to keep between runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("LIVEMOUNT_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache"))
}

/// Run a command, echoing it, and fail naming it if it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}

/// Run cargo from the workspace root with the given arguments.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args).current_dir(root()))
}

/// The release binaries the demo and the benchmarks run: `livemount` with the
/// `test-hooks` feature (its remote-store model, `--store-latency`) and the
/// profiler, in one cargo call so that `demo` (which ends with a boot benchmark)
/// builds once. Operators' builds (`create-device`) leave the feature off.
pub fn build_release_tools() -> Result<()> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "livemount",
        "-p",
        "livemount-profiler",
        "--features",
        "livemount/test-hooks",
    ])
}

/// True when running as root (uid 0).
pub fn is_root() -> bool {
    // Reading /proc avoids a libc dependency for one call.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// True when `prog` is found on PATH.
pub fn have(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// The short hash of HEAD (for result tables), "unknown" outside git.
pub fn git_head() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Run the livemount binary `bin` with `args`: its stdout, or an error with its
/// stderr.
pub fn run_livemount(bin: &std::path::Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running livemount {}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "livemount {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
