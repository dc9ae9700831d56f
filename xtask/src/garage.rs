//! The S3 server the store's object-store tests run against: Garage (a distributed
//! S3-compatible store written in Rust, AGPL), built from the crate registry as a
//! separate test-server binary (never linked) into `.cache/tools/garage`.
//!
//! Measured here: the build takes ~20 min on 2 cores (nice'd, beside other work),
//! once per machine; afterwards setup finds the binary and returns at once. A
//! single node on loopback with sqlite metadata starts in well under a second,
//! which is why the tests start one per test (tests/tests/common/garage.rs).

use crate::util::{cache_dir, run};
use anyhow::Result;
use std::path::PathBuf;
use std::process::Command;

/// The Garage release the tests use.
const GARAGE_VERSION: &str = "2.5.0";

/// Where `setup` installs it (the tests look there too).
pub fn bin() -> PathBuf {
    cache_dir().join("tools/garage/bin/garage")
}

/// Build and install Garage when missing (idempotent).
pub fn setup() -> Result<()> {
    if bin().is_file() {
        return Ok(());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("building Garage {GARAGE_VERSION} (the S3 test server; ~20 min once per machine)");
    run(Command::new(cargo)
        .args([
            "install",
            "garage",
            "--locked",
            "--version",
            GARAGE_VERSION,
            "--root",
        ])
        .arg(cache_dir().join("tools/garage")))
}
