//! Changed-block incrementals: which byte ranges of a source changed since the
//! series' previous snapshot, from a ranges file or from a qemu dirty bitmap.
//!
//! # Ranges file
//! One range per line, `OFFSET LENGTH` in bytes (decimal, or hex with `0x`), in
//! increasing order, not overlapping, inside the image; blank lines and lines
//! starting with `#` are ignored. Adjacent ranges are merged. Example:
//! ```text
//! # changed since web01@2026-11-30T02:00:00Z
//! 0 65536
//! 1048576 4096
//! ```
//!
//! # Dirty bitmaps
//! `nbd://HOST:PORT/EXPORT#BITMAP` or `nbd+unix:///EXPORT?socket=PATH#BITMAP`: the
//! export's `qemu:dirty-bitmap:BITMAP` meta context (qemu-nbd `--bitmap`,
//! qemu-storage-daemon, a running qemu's NBD server), read with libnbd's `nbdinfo
//! --map` (block status). The export must be exactly the image's size.

use crate::error::{Error, Result};
use std::ops::Range;
use std::path::Path;
use std::process::{Command, Stdio};

fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Check `ranges` (in order, not overlapping, inside `image_size`) and merge
/// adjacent ones; `what(i)` names range `i` in errors.
fn checked(
    ranges: Vec<Range<u64>>,
    image_size: u64,
    what: impl Fn(usize) -> String,
) -> Result<Vec<Range<u64>>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for (i, r) in ranges.into_iter().enumerate() {
        if r.end > image_size {
            return Err(Error::Invalid(format!(
                "{}: range {}..{} ends past the image's {image_size} bytes",
                what(i),
                r.start,
                r.end
            )));
        }
        if r.start == r.end {
            continue;
        }
        match out.last_mut() {
            Some(last) if r.start < last.end => {
                return Err(Error::Invalid(format!(
                    "{}: range {}..{} is out of order or overlaps the one before ({}..{})",
                    what(i),
                    r.start,
                    r.end,
                    last.start,
                    last.end
                )))
            }
            Some(last) if r.start == last.end => last.end = r.end,
            _ => out.push(r),
        }
    }
    Ok(out)
}

/// Parse a ranges file (module docs) for an image of `image_size` bytes.
pub fn parse_ranges(text: &str, image_size: u64, file: &Path) -> Result<Vec<Range<u64>>> {
    let mut ranges = Vec::new();
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split_whitespace();
        let (Some(off), Some(len), None) = (f.next(), f.next(), f.next()) else {
            return Err(Error::Invalid(format!(
                "{}:{}: expected `OFFSET LENGTH`, got {line:?}",
                file.display(),
                n + 1
            )));
        };
        let (Some(off), Some(len)) = (number(off), number(len)) else {
            return Err(Error::Invalid(format!(
                "{}:{}: not a number in {line:?}",
                file.display(),
                n + 1
            )));
        };
        let end = off.checked_add(len).ok_or_else(|| {
            Error::Invalid(format!("{}:{}: range overflows", file.display(), n + 1))
        })?;
        ranges.push(off..end);
        lines.push(n + 1);
    }
    checked(ranges, image_size, |i| {
        format!("{}:{}", file.display(), lines[i])
    })
}

/// Dirty ranges of the `qemu:dirty-bitmap:BITMAP` context of `spec`
/// (`URI#BITMAP`), which must describe an export of `image_size` bytes.
pub fn from_dirty_bitmap(spec: &str, image_size: u64) -> Result<Vec<Range<u64>>> {
    let (uri, bitmap) = spec.rsplit_once('#').ok_or_else(|| {
        Error::Invalid(format!(
            "--changed-from {spec:?}: expected nbd://HOST:PORT/EXPORT#BITMAP or nbd+unix:///EXPORT?socket=PATH#BITMAP"
        ))
    })?;
    if !uri.starts_with("nbd") || bitmap.is_empty() {
        return Err(Error::Invalid(format!(
            "--changed-from {spec:?}: expected an nbd URI and #BITMAP"
        )));
    }
    let run = |args: &[&str]| -> Result<String> {
        // Bounded: a hung NBD server must not hang the backup.
        let out = Command::new("timeout")
            .args(["--kill-after=5", "120", "nbdinfo"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                Error::Invalid(format!(
                    "--changed-from needs nbdinfo (Debian: libnbd-bin): {e}"
                ))
            })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(Error::Invalid(format!(
                "--changed-from {uri}: {}",
                err.lines().last().unwrap_or("nbdinfo failed").trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let size: u64 = run(&["--size", uri])?
        .trim()
        .parse()
        .map_err(|_| Error::Invalid(format!("--changed-from {uri}: nbdinfo printed no size")))?;
    if size != image_size {
        return Err(Error::Invalid(format!(
            "--changed-from {uri}: the export has {size} bytes, the source {image_size}: not a bitmap of this disk"
        )));
    }
    let map = run(&[&format!("--map=qemu:dirty-bitmap:{bitmap}"), uri])?;
    let mut ranges = Vec::new();
    for line in map.lines() {
        let mut f = line.split_whitespace();
        let (Some(off), Some(len), Some(kind)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Some(off), Some(len), Some(kind)) = (number(off), number(len), number(kind)) else {
            return Err(Error::Invalid(format!(
                "--changed-from {uri}: unexpected nbdinfo output {line:?}"
            )));
        };
        // NBD_STATE_DIRTY = 1 in the qemu:dirty-bitmap context.
        if kind & 1 == 1 {
            ranges.push(off..off.saturating_add(len));
        }
    }
    checked(ranges, image_size, |_| format!("--changed-from {uri}"))
}

/// True if any of the sorted `ranges` intersects `r`.
pub fn touches(ranges: &[Range<u64>], r: &Range<u64>) -> bool {
    let i = ranges.partition_point(|x| x.end <= r.start);
    ranges.get(i).is_some_and(|x| x.start < r.end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_files_are_checked_and_merged() {
        let f = Path::new("r.txt");
        let r = parse_ranges("# c\n0 4096\n4096 0x1000\n\n65536 1\n", 1 << 20, f).unwrap();
        assert_eq!(r, vec![0..8192, 65536..65537]);
        for (text, needle) in [
            ("0 4096\n0 10\n", "r.txt:2: range 0..10 is out of order"),
            ("100 10\n50 10\n", "out of order"),
            ("0 2000000\n", "ends past the image"),
            ("0\n", "expected `OFFSET LENGTH`"),
            ("x 1\n", "not a number"),
            ("18446744073709551615 2\n", "overflows"),
        ] {
            let e = parse_ranges(text, 1 << 20, f).unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn touching_ranges() {
        let r = vec![10..20, 40..50];
        assert!(touches(&r, &(0..11)));
        assert!(!touches(&r, &(20..40)));
        assert!(touches(&r, &(49..100)));
        assert!(!touches(&r, &(50..100)));
    }
}
