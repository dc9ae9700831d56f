//! Byte copies on the read path (cache → request buffer).
//!
//! Every read the device serves is one copy out of a decoded frame into the ublk
//! request buffer, so this copy is the largest user-space cost of a warm read. Which
//! copy is fastest depends on the machine, by a lot, so it is measured once per
//! process ([`init`]) and the faster of two is used:
//!
//! - glibc's `memmove` (`copy_from_slice`): the fastest on hardware (criterion
//!   `copy/*` on the build host: 4 KiB in 150 ns against 255 ns for `rep movsq`);
//! - `rep movsq` (x86-64): under qemu's TCG emulator, where the project's driver tests
//!   and `bench-vm` run, glibc's AVX `memmove` is emulated a vector instruction at a
//!   time: 4 KiB copies ran at ~380 MiB/s against ~2.9 GiB/s with `rep movsq`, and
//!   the copy was 12.6 % of all CPU in the warm 4 KiB QD32 benchmark
//!   (docs/performance.md, "Copies under emulation").
//!
//! `rep movsq` is chosen only when it is at least 25 % faster, so a close call keeps
//! the standard library. Other architectures always use `copy_from_slice`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The copy [`copy_bytes`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `copy_from_slice` (glibc `memmove`).
    Memmove,
    /// `rep movsq` plus a short tail.
    RepMovsq,
}

impl Strategy {
    /// A name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Memmove => "memmove",
            Strategy::RepMovsq => "rep movsq",
        }
    }
}

static STRATEGY: OnceLock<(Strategy, f64)> = OnceLock::new();

/// Measure both copies (once per process, ~1 ms under emulation, microseconds on
/// hardware) and return the chosen one with its speed-up over `memmove` (copies per
/// unit of time, chosen / memmove). Mounts call it before serving so the first
/// request does not pay for it.
pub fn init() -> (Strategy, f64) {
    *STRATEGY.get_or_init(calibrate)
}

fn calibrate() -> (Strategy, f64) {
    if !cfg!(target_arch = "x86_64") {
        return (Strategy::Memmove, 1.0);
    }
    let src: Vec<u8> = (0..65536u32).map(|i| (i * 131) as u8).collect();
    let mut dst = vec![0u8; 65536];
    // Best of 5 rounds of 16 copies of 4 KiB (the size of most reads) at moving
    // offsets, after a warm-up round.
    let best = |f: &dyn Fn(&mut [u8], &[u8]), dst: &mut [u8]| -> Duration {
        let mut best = Duration::MAX;
        for round in 0..6 {
            let t = Instant::now();
            for i in 0..16 {
                let o = (i * 4096) % 61440;
                f(
                    &mut dst[o..o + 4096],
                    std::hint::black_box(&src[o..o + 4096]),
                );
            }
            std::hint::black_box(&mut *dst);
            if round > 0 {
                best = best.min(t.elapsed());
            }
        }
        best.max(Duration::from_nanos(1))
    };
    let std_t = best(&|d, s| d.copy_from_slice(s), &mut dst);
    let movsq_t = best(&|d, s| copy_movsq(d, s), &mut dst);
    let speedup = std_t.as_secs_f64() / movsq_t.as_secs_f64();
    if speedup >= 1.25 {
        (Strategy::RepMovsq, speedup)
    } else {
        (Strategy::Memmove, 1.0)
    }
}

/// Copy `src` into `dst` (same length) with the measured faster copy.
///
/// # Panics
/// If the lengths differ, like `copy_from_slice`.
#[inline]
pub fn copy_bytes(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_bytes: length mismatch");
    match init().0 {
        Strategy::RepMovsq if src.len() >= 64 => copy_movsq(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// Copy with a given strategy (benchmarks compare them).
pub fn copy_with(strategy: Strategy, dst: &mut [u8], src: &[u8]) {
    match strategy {
        Strategy::RepMovsq => copy_movsq(dst, src),
        Strategy::Memmove => dst.copy_from_slice(src),
    }
}

/// `rep movsq` for the whole words, `copy_from_slice` for the tail.
fn copy_movsq(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_bytes: length mismatch");
    #[cfg(target_arch = "x86_64")]
    {
        let words = src.len() / 8;
        // SAFETY: `src` and `dst` are distinct live slices (one borrowed shared, the
        // other exclusively) of at least `words * 8` bytes; `rep movsq` reads
        // rsi..rsi+8*rcx and writes rdi..rdi+8*rcx, forwards (the direction flag is
        // clear per the SysV ABI), and clobbers only rcx, rsi and rdi, as declared.
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
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_copies_copy_every_length_and_alignment() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for copy in [copy_movsq as fn(&mut [u8], &[u8]), copy_bytes] {
            for len in [0, 1, 7, 8, 63, 64, 65, 511, 4096, 4099, 8191] {
                for off in [0, 1, 3, 8] {
                    let mut dst = vec![0xAAu8; len + 16];
                    copy(&mut dst[off..off + len], &src[off..off + len]);
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
    }

    #[test]
    fn the_choice_is_made_once_and_memmove_unless_clearly_slower() {
        let (s, speedup) = init();
        assert_eq!(init(), (s, speedup));
        match s {
            Strategy::Memmove => assert_eq!(speedup, 1.0),
            Strategy::RepMovsq => assert!(speedup >= 1.25),
        }
    }

    #[test]
    #[should_panic(expected = "length mismatch")]
    fn length_mismatch_panics() {
        copy_bytes(&mut [0u8; 4], &[0u8; 5]);
    }
}
