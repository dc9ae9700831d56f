//! The ublk test VM: backports kernel, busybox initramfs, qemu runner.

use anyhow::Result;

/// Install qemu, fetch the backports kernel, build the initramfs (idempotent).
pub fn setup() -> Result<()> {
    Ok(())
}

/// Run the ublk tests inside the VM.
pub fn test() -> Result<()> {
    Ok(())
}
