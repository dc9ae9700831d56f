//! Builds the eBPF crate (`../ebpf`) for bpfel-unknown-none with aya-build, so a
//! normal `cargo build` produces the object the profiler embeds.
//!
//! The eBPF crate is its own workspace (excluded from ours), so cargo is run from
//! its directory. It is built with the stable toolchain plus `RUSTC_BOOTSTRAP=1`
//! (set here, so only the inner build sees it) because `-Z build-std=core` is
//! needed and a fresh machine has no nightly with rust-src; `cargo xtask setup`
//! installs rust-src and bpf-linker.

use anyhow::{Context, Result};
use std::path::PathBuf;

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?,
    );
    let ebpf_dir = manifest_dir
        .parent()
        .context("profiler crate has no parent directory")?
        .join("ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    let abi_dir = ebpf_dir.with_file_name("ebpf-abi");
    println!("cargo:rerun-if-changed={}", abi_dir.join("src").display());
    // aya-build runs `cargo build --package livemount-ebpf` in our working directory;
    // from ebpf/ cargo finds the eBPF crate's own workspace.
    std::env::set_current_dir(&ebpf_dir)
        .with_context(|| format!("cannot enter {}", ebpf_dir.display()))?;
    // Only this process and its children (the inner eBPF cargo) see it.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    let root = ebpf_dir.to_str().context("non-UTF-8 path to ebpf/")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "livemount-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
    .context("building the eBPF programs (run `cargo xtask setup` for bpf-linker and rust-src)")
}
