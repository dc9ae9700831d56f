//! Replaying a dm-log-writes log: the power-cut tests' view of what a disk held at
//! each FLUSH.
//!
//! The kernel's `log-writes` target (drivers/md/dm-log-writes.c) appends every write
//! to a log device once it is durable, in the order it became durable, plus an entry
//! for each FLUSH/FUA and for each `dmsetup message DEV 0 mark NAME`. Layout (all
//! little-endian, in units of the log's sector size):
//!
//! - sector 0: the super block: magic `0x6a736677736872`, version 1, the number of
//!   entries, the sector size;
//! - from sector 1, one entry after the other: a header sector (the device sector
//!   written, how many sectors, flags: 1 FLUSH, 2 FUA, 4 DISCARD, 8 MARK, 16
//!   METADATA; the length of the mark's name, which follows the 32-byte header in the
//!   same sector), then, unless it is a discard, the written sectors.
//!
//! [`Log::replay`] applies the entries in order to a replay file and stops at each
//! point where a power cut may leave the disk — after every FLUSH, FUA and mark — so
//! that the caller can check that state. Entries are untrusted input like any other
//! file: a malformed log is an error naming the entry, not a panic.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

const MAGIC: u64 = 0x006a_7366_7773_6872;
const VERSION: u64 = 1;
/// Entry flags.
pub const FLUSH: u64 = 1;
pub const FUA: u64 = 2;
pub const DISCARD: u64 = 4;
pub const MARK: u64 = 8;

/// One log entry's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its index in the log.
    pub index: u64,
    /// Device sector written or discarded.
    pub sector: u64,
    /// Sectors written or discarded.
    pub sectors: u64,
    /// FLUSH | FUA | DISCARD | MARK | METADATA.
    pub flags: u64,
    /// The mark's name (MARK entries).
    pub mark: Option<String>,
}

impl Entry {
    /// A point where the disk's state is one a power cut can leave.
    pub fn is_barrier(&self) -> bool {
        self.flags & (FLUSH | FUA | MARK) != 0
    }
}

/// An open log.
pub struct Log {
    file: File,
    sector_size: u64,
    entries: u64,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

impl Log {
    /// Open a log device or file and check its super block.
    pub fn open(path: &std::path::Path) -> io::Result<Log> {
        let mut file = File::open(path)?;
        let mut sb = [0u8; 28];
        file.read_exact(&mut sb)?;
        if le64(&sb, 0) != MAGIC {
            return Err(bad(format!("{}: not a dm-log-writes log", path.display())));
        }
        if le64(&sb, 8) != VERSION {
            return Err(bad(format!(
                "{}: log version {}, expected {VERSION}",
                path.display(),
                le64(&sb, 8)
            )));
        }
        let sector_size = u64::from(u32::from_le_bytes([sb[24], sb[25], sb[26], sb[27]]));
        if !(512..=65536).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(bad(format!(
                "{}: log sector size {sector_size}",
                path.display()
            )));
        }
        Ok(Log {
            file,
            sector_size,
            entries: le64(&sb, 16),
        })
    }

    /// Entries in the log.
    pub fn len(&self) -> u64 {
        self.entries
    }

    /// True if the log holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// The barriers of the log, in order (headers only, nothing applied).
    pub fn barriers(&mut self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.walk(None, |e, _| {
            out.push(e.clone());
            Ok(true)
        })?;
        Ok(out)
    }

    /// Replay every entry onto `target` in order; after each barrier (FLUSH, FUA,
    /// mark) call `at(entry, target)`, which returns false to stop early. Discards
    /// are replayed as zeros. Returns the number of barriers visited.
    pub fn replay(
        &mut self,
        target: &File,
        mut at: impl FnMut(&Entry, &File) -> io::Result<bool>,
    ) -> io::Result<u64> {
        self.walk(Some(target), |e, t| at(e, t.expect("a target")))
    }

    /// Walk the entries, applying them to `target` when there is one.
    fn walk(
        &mut self,
        target: Option<&File>,
        mut at: impl FnMut(&Entry, Option<&File>) -> io::Result<bool>,
    ) -> io::Result<u64> {
        let ss = self.sector_size;
        let log_len = self.file.metadata()?.len();
        // A replay never grows its target: entries past the device's end are bad.
        let limit = match target {
            Some(t) => t.metadata()?.len(),
            None => u64::MAX,
        };
        let mut pos = ss;
        let mut header = vec![0u8; ss as usize];
        let mut barriers = 0;
        for index in 0..self.entries {
            self.file.seek(SeekFrom::Start(pos))?;
            self.file
                .read_exact(&mut header)
                .map_err(|e| bad(format!("log entry {index} at sector {}: {e}", pos / ss)))?;
            let (sector, sectors, flags, data_len) = (
                le64(&header, 0),
                le64(&header, 8),
                le64(&header, 16),
                le64(&header, 24),
            );
            pos += ss;
            let bytes = sectors
                .checked_mul(ss)
                .filter(|b| *b <= 1 << 30)
                .ok_or_else(|| bad(format!("log entry {index}: {sectors} sectors")))?;
            let offset = sector
                .checked_mul(ss)
                .filter(|o| o.checked_add(bytes).is_some_and(|end| end <= limit))
                .ok_or_else(|| {
                    bad(format!(
                        "log entry {index}: sectors {sector}+{sectors} past the device"
                    ))
                })?;
            let mark = if flags & MARK != 0 {
                let n = usize::try_from(data_len)
                    .ok()
                    .filter(|n| *n <= ss as usize - 32)
                    .ok_or_else(|| bad(format!("log entry {index}: mark of {data_len} bytes")))?;
                Some(
                    String::from_utf8_lossy(&header[32..32 + n])
                        .trim_end_matches('\0')
                        .to_string(),
                )
            } else {
                None
            };
            if flags & DISCARD != 0 {
                if let Some(target) = target {
                    let zeros = vec![0u8; bytes.min(1 << 20) as usize];
                    let mut done = 0;
                    while done < bytes {
                        let n = (bytes - done).min(zeros.len() as u64) as usize;
                        target.write_all_at(&zeros[..n], offset + done)?;
                        done += n as u64;
                    }
                }
            } else if bytes > 0 {
                if pos + bytes > log_len {
                    return Err(bad(format!(
                        "log entry {index}: {bytes} bytes of data past the log's end"
                    )));
                }
                if let Some(target) = target {
                    let mut data = vec![0u8; bytes as usize];
                    self.file.seek(SeekFrom::Start(pos))?;
                    self.file.read_exact(&mut data)?;
                    target.write_all_at(&data, offset)?;
                }
                pos += bytes;
            }
            let e = Entry {
                index,
                sector,
                sectors,
                flags,
                mark,
            };
            if e.is_barrier() {
                barriers += 1;
                if !at(&e, target)? {
                    break;
                }
            }
        }
        Ok(barriers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A log as the kernel writes it, built by hand: super block, entries.
    struct Builder {
        ss: usize,
        body: Vec<u8>,
        n: u64,
    }

    impl Builder {
        fn entry(&mut self, sector: u64, data: &[u8], flags: u64, mark: &str) {
            let mut h = vec![0u8; self.ss];
            h[0..8].copy_from_slice(&sector.to_le_bytes());
            h[8..16].copy_from_slice(&((data.len() / self.ss) as u64).to_le_bytes());
            h[16..24].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(mark.len() as u64).to_le_bytes());
            h[32..32 + mark.len()].copy_from_slice(mark.as_bytes());
            self.body.extend(h);
            self.body.extend(data);
            self.n += 1;
        }
        fn file(&self) -> tempfile::NamedTempFile {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            let mut sb = vec![0u8; self.ss];
            sb[0..8].copy_from_slice(&MAGIC.to_le_bytes());
            sb[8..16].copy_from_slice(&VERSION.to_le_bytes());
            sb[16..24].copy_from_slice(&self.n.to_le_bytes());
            sb[24..28].copy_from_slice(&(self.ss as u32).to_le_bytes());
            f.write_all(&sb).unwrap();
            f.write_all(&self.body).unwrap();
            f
        }
    }

    #[test]
    fn replays_writes_and_stops_at_each_barrier_with_the_state_so_far() {
        let mut b = Builder {
            ss: 512,
            body: Vec::new(),
            n: 0,
        };
        b.entry(2, &[1u8; 1024], 0, "");
        b.entry(0, &[], FLUSH, "");
        b.entry(0, &[2u8; 512], FUA, "");
        b.entry(0, &[], MARK, "after-two");
        b.entry(2, &[], DISCARD, "");
        b.entry(4, &[3u8; 512], 0, "");
        let log = b.file();
        // The discard's length is in the header even without data.
        let mut raw = std::fs::read(log.path()).unwrap();
        let fifth = 512 + 512 + 1024 + 512 + 512 + 512 + 512;
        raw[fifth + 8..fifth + 16].copy_from_slice(&2u64.to_le_bytes());
        std::fs::write(log.path(), &raw).unwrap();

        let target = tempfile::tempfile().unwrap();
        target.set_len(4096).unwrap();
        let mut seen = Vec::new();
        let n = Log::open(log.path())
            .unwrap()
            .replay(&target, |e, t| {
                let mut s = vec![0u8; 4096];
                t.read_exact_at(&mut s, 0).unwrap();
                seen.push((e.flags, e.mark.clone(), s[0], s[1024], s[2048]));
                Ok(true)
            })
            .unwrap();
        assert_eq!(n, 3);
        let heads = Log::open(log.path()).unwrap().barriers().unwrap();
        assert_eq!(
            heads.iter().map(|e| (e.index, e.flags)).collect::<Vec<_>>(),
            [(1, FLUSH), (2, FUA), (3, MARK)]
        );
        assert_eq!(
            seen,
            [
                (FLUSH, None, 0, 1, 0),
                (FUA, None, 2, 1, 0),
                (MARK, Some("after-two".into()), 2, 1, 0),
            ]
        );
        // The writes after the last barrier are applied too.
        let mut s = vec![0u8; 4096];
        target.read_exact_at(&mut s, 0).unwrap();
        assert_eq!((s[1024], s[2048]), (0, 3));
    }

    #[test]
    fn malformed_logs_are_errors() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), [0u8; 512]).unwrap();
        assert!(Log::open(f.path()).is_err());
        let mut b = Builder {
            ss: 512,
            body: Vec::new(),
            n: 0,
        };
        b.entry(0, &[1u8; 512], 0, "");
        let log = b.file();
        let mut raw = std::fs::read(log.path()).unwrap();
        // Claims more data than the log holds.
        raw[512 + 8..512 + 16].copy_from_slice(&1000u64.to_le_bytes());
        std::fs::write(log.path(), &raw).unwrap();
        let t = tempfile::tempfile().unwrap();
        t.set_len(1 << 20).unwrap();
        let e = Log::open(log.path())
            .unwrap()
            .replay(&t, |_, _| Ok(true))
            .unwrap_err();
        assert!(e.to_string().contains("entry 0"), "{e}");
        // A write past the device's end.
        let mut b = Builder {
            ss: 512,
            body: Vec::new(),
            n: 0,
        };
        b.entry(4096, &[1u8; 512], 0, "");
        let log = b.file();
        let small = tempfile::tempfile().unwrap();
        small.set_len(4096).unwrap();
        let e = Log::open(log.path())
            .unwrap()
            .replay(&small, |_, _| Ok(true))
            .unwrap_err();
        assert!(e.to_string().contains("past the device"), "{e}");
        assert_eq!(small.metadata().unwrap().len(), 4096);
    }
}
