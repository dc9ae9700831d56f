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
