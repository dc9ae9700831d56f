//! Byte copies on the read path (cache → request buffer).
//!
//! Every read the device serves is one copy out of a decoded frame into the ublk
//! request buffer, so this copy is the largest user-space cost of a warm read. On
//! x86-64 it is done with `rep movsq` (plus a short tail) instead of glibc's `memmove`:
//!
//! - on hardware, `rep movsq` runs in the fast-string microcode (ERMS/FSRM CPUs) and
//!   is as fast as `memmove` for the 4 KiB - 512 KiB copies we do (criterion
//!   `read_path/copy_*`);
//! - under emulation (qemu TCG, where the project's driver tests and `bench-vm` run)
//!   glibc's AVX `memmove` and `rep movsb` are emulated a vector or a byte at a time:
//!   measured in that VM, 4 KiB copies ran at ~380 MiB/s with `memmove` against
//!   ~2.9 GiB/s with `rep movsq` (docs/performance.md, "Copies under emulation").
//!
//! Other architectures use `copy_from_slice`.

/// Copy `src` into `dst` (same length).
///
/// # Panics
/// If the lengths differ, like `copy_from_slice`.
#[inline]
pub fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_bytes: length mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        let words = src.len() / 8;
        if words >= 8 {
            // SAFETY: `src` and `dst` are distinct live slices (one is borrowed
            // shared, the other exclusively) of at least `words * 8` bytes; `rep
            // movsq` reads rsi..rsi+8*rcx and writes rdi..rdi+8*rcx, forwards (the
            // direction flag is clear per the SysV ABI), and clobbers only rcx, rsi,
            // rdi, which are declared.
            unsafe {
                std::arch::asm!(
                    "rep movsq",
                    inout("rcx") words => _,
                    inout("rsi") src.as_ptr() => _,
                    inout("rdi") dst.as_mut_ptr() => _,
                    options(nostack, preserves_flags)
                );
            }
            let done = words * 8;
            dst[done..].copy_from_slice(&src[done..]);
            return;
        }
    }
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_length_and_alignment() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for len in [0, 1, 7, 8, 63, 64, 65, 511, 4096, 4099, 8191] {
            for off in [0, 1, 3, 8] {
                let mut dst = vec![0xAAu8; len + 16];
                copy_bytes(&mut dst[off..off + len], &src[off..off + len]);
                assert_eq!(
                    &dst[off..off + len],
                    &src[off..off + len],
                    "len {len} off {off}"
                );
                assert!(dst[..off].iter().all(|&b| b == 0xAA), "wrote before");
                assert!(dst[off + len..].iter().all(|&b| b == 0xAA), "wrote past");
            }
        }
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn length_mismatch_panics() {
        copy_bytes(&mut [0u8; 4], &[0u8; 5]);
    }
}
