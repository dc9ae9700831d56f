//! Booting a real OS from a live-mounted backup (`cargo xtask boot-image`,
//! `cargo xtask bench-boot`). See docs/boot.md.
//!
//! - [`image`]: a Debian bookworm minbase root (debootstrap) in a 1 GiB ext4 image
//!   with a marker unit after multi-user.target, and a busybox initramfs that mounts
//!   a root device and switch_roots into its systemd; both cached in `.cache/boot/`.
//! - [`qemu`]: one qemu TCG boot with the console captured and a time limit.
//! - [`bench`]: profiles recorded on the host, backup, then timed boots inside the
//!   ublk test VM from a local disk, a cold and a pre-staged live mount; the
//!   nested-qemu smoke test.
//! - [`nbd`]: qemu on the host boots the image from a `livemount serve` export
//!   (across a restart, during a migration) and from the migrated file.
//! - [`s3`]: the same from a snapshot in an object store at a real RTT, cold and
//!   pre-staged (a benchmark).

mod bench;
mod image;
mod nbd;
mod qemu;
mod s3;

pub use bench::{bench, smoke, smoke_migrate, Options};
pub use nbd::run as nbd;
pub use s3::run as s3;

/// `cargo xtask boot-image`: build (or check) the image and the boot initramfs.
pub fn image_cmd() -> anyhow::Result<()> {
    let img = image::ensure_image()?;
    let initrd = image::ensure_initramfs()?;
    println!(
        "boot image {} (key {}, kernel {})\ninitramfs {}",
        img.path.display(),
        img.key,
        img.kver,
        initrd.display()
    );
    Ok(())
}
