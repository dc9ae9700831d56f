//! `cargo xtask setup`: install what is missing, idempotently, in seconds when
//! everything is already there.

use crate::util::{have, is_root};
use anyhow::{bail, Result};
use std::process::Command;

/// Debian packages the host build, tests and demo need (binary they provide, package).
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("zstd", "zstd"),
    ("debootstrap", "debootstrap"),
    // Real NBD clients for the NBD frontend's tests (qemu-img and qemu-io come with
    // qemu-utils, which the machine has from backports: never replaced here).
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("qemu-io", "qemu-utils"),
    // The kernel's NBD client, for the VM test of `serve` (the guest runs the host's
    // root file system) and for operators' docs.
    ("nbd-client", "nbd-client"),
    // A peer server in `cargo xtask bench-nbd`.
    ("nbdkit", "nbdkit"),
    // Certificates for the NBD frontend's TLS tests (and the operator docs' recipe).
    ("openssl", "openssl"),
    // The VM's power-cut tests: dm-log-writes devices, and btrfs, whose fsync does
    // not commit other directories' entries the way ext4's journal does.
    ("dmsetup", "dmsetup"),
    ("mkfs.btrfs", "btrfs-progs"),
    // The second S3 engine of the tests: Ceph's radosgw on a one-OSD memstore
    // cluster (tests/src/rgw.rs); curl creates its buckets.
    ("ceph-mon", "ceph-mon"),
    ("ceph-osd", "ceph-osd"),
    ("monmaptool", "ceph-base"),
    ("radosgw", "radosgw"),
    ("radosgw-admin", "ceph-common"),
    ("curl", "curl"),
];

/// Install every Debian package in `pkgs` whose probe binary is missing.
pub fn apt_install(pkgs: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = pkgs
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages; run as root: apt-get install -y {}",
            missing.join(" ")
        );
    }
    crate::util::run(Command::new("apt-get").args(["update", "-q"]))?;
    crate::util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// Entry point of `cargo xtask setup`: host packages, then the VM test kit, the
/// eBPF toolchain, cargo-fuzz and the S3 test server.
pub fn run() -> Result<()> {
    apt_install(HOST_PACKAGES)?;
    crate::vm::setup()?;
    crate::ebpf::setup()?;
    crate::fuzz::setup()?;
    crate::garage::setup()?;
    Ok(())
}
