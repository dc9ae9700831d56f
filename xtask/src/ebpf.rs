//! The eBPF toolchain: bpf-linker (against Debian's LLVM 22) and rust-src.

use anyhow::Result;

/// Install bpf-linker and rust-src when missing (idempotent).
pub fn setup() -> Result<()> {
    Ok(())
}
