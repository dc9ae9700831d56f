//! Block-access profiles (format shared by `livemount-profiler` and the driver).
//!
//! A profile says which byte ranges of a VM's disk were read during a boot, when
//! each was first read (relative to the start of the recording) and how often.
//! `livemount-profiler` writes them; the driver reads them to pre-stage the
//! working set in access order. This module is the only definition of the format;
//! `docs/profile-format.md` documents it field by field.
//!
//! The encoding is JSON (serde). Readers check `format` and `version` *before*
//! decoding the rest, so a file from a future version is reported as such rather
//! than as a confusing parse error.
//!
//! ```
//! use livemount_store::format::profile::{Extent, Profile, Source};
//! let mut p = Profile::new(1 << 20, 4096, Source::default());
//! p.extents.push(Extent { offset: 8192, length: 4096, first_access_ns: 5, count: 1, runs: 1 });
//! p.extents.push(Extent { offset: 0, length: 4096, first_access_ns: 0, count: 2, runs: 1 });
//! p.validate().unwrap();
//! let order: Vec<u64> = p.extents_in_access_order().map(|e| e.offset).collect();
//! assert_eq!(order, [0, 8192]);
//! assert_eq!(p.working_set_bytes(), 8192);
//! ```

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Value of the `format` field: identifies a file as a livemount profile.
pub const FORMAT: &str = "livemount-profile";
/// The format version this code writes and the only one it reads.
pub const VERSION: u32 = 1;
/// Smallest allowed block granularity (one sector).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest allowed block granularity.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Default block granularity of recordings: the page size, which is also the
/// unit of the guest's and host's page caches.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Default coalescing window of [`ExtentBuilder`]: adjacent reads whose first
/// accesses follow each other within this many nanoseconds form one extent.
pub const DEFAULT_COALESCE_NS: u64 = 1_000_000;

/// Why a profile could not be read, written or combined.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The text is not valid JSON or does not have the profile's structure.
    #[error("malformed profile: {0}")]
    Malformed(String),
    /// The `format` field is missing or names something else.
    #[error("not a livemount profile (format is {0:?}, expected \"livemount-profile\")")]
    WrongFormat(String),
    /// The file was written by a different (probably newer) version of the format.
    #[error("unsupported profile version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version found in the file.
        found: u64,
        /// Version this code supports.
        supported: u32,
    },
    /// The file decodes but breaks an invariant (extent past the disk, overlap, …).
    #[error("invalid profile: {0}")]
    Invalid(String),
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, ProfileError>;

/// Where and how a profile was recorded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// Host name of the machine that recorded it.
    pub host: String,
    /// The traced path as given (disk, partition, loop/ublk device or image file).
    pub device: String,
    /// Kernel release (`uname -r`) of the recording host.
    pub kernel: String,
    /// What produced the events: `block_rq_issue`, `block_bio_queue`,
    /// `mm_filemap_get_pages`, or `merge`.
    #[serde(default)]
    pub tracer: String,
    /// Wall-clock start of the recording, seconds since the Unix epoch.
    #[serde(default)]
    pub started_unix: u64,
    /// Number of recordings this profile summarises (1 unless merged).
    #[serde(default = "one_u32")]
    pub runs: u32,
}

/// Statistics of the recording; they tell how much to trust it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Events the kernel program matched and delivered (device/inode filter passed).
    pub events_seen: u64,
    /// Events the kernel program matched but dropped because the ring buffer was full.
    /// Non-zero means the profile is incomplete.
    pub events_lost: u64,
    /// Delivered events that fell outside the traced disk (other partitions of
    /// the same disk, other files of the host file system).
    #[serde(default)]
    pub events_outside: u64,
    /// Length of the recording in nanoseconds.
    #[serde(default)]
    pub duration_ns: u64,
}

/// One byte range of the disk and how it was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// First byte, a multiple of the profile's `block_size`.
    pub offset: u64,
    /// Length in bytes, a multiple of `block_size` (except an extent ending at the
    /// end of a disk whose size is not a multiple of it).
    pub length: u64,
    /// When the range was first read, ns after the start of the recording (for a
    /// merged profile: the median over the runs that read it).
    pub first_access_ns: u64,
    /// How many read requests touched the range (summed over runs when merged).
    pub count: u64,
    /// How many recordings read the range (1 unless merged).
    #[serde(default = "one_u32")]
    pub runs: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

fn one_u32() -> u32 {
    1
}

/// A recorded (or merged) block-access profile of one disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`] for profiles this code writes.
    pub version: u32,
    /// Size of the VM's disk in bytes; every extent lies inside it.
    pub disk_size: u64,
    /// Granularity of the extents in bytes (power of two, 512 ..= 1 MiB).
    pub block_size: u32,
    /// Where the profile comes from.
    pub source: Source,
    /// Statistics of the recording.
    pub stats: Stats,
    /// The extents, in access order (first access time, then offset) when written
    /// by this code; [`Profile::load`] restores that order for any input.
    pub extents: Vec<Extent>,
}

impl Profile {
    /// An empty profile of a disk.
    pub fn new(disk_size: u64, block_size: u32, source: Source) -> Self {
        Profile {
            format: FORMAT.to_owned(),
            version: VERSION,
            disk_size,
            block_size,
            source,
            stats: Stats::default(),
            extents: Vec::new(),
        }
    }

    /// Read and validate a profile file.
    pub fn load(path: impl AsRef<Path>) -> Result<Profile> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Profile::from_json(&text)
    }

    /// Decode and validate a profile from JSON text; extents end up in access order.
    pub fn from_json(text: &str) -> Result<Profile> {
        // Look at format and version first: a future version may change anything else.
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| ProfileError::Malformed(e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| ProfileError::Malformed("top level is not a JSON object".into()))?;
        match obj.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) => return Err(ProfileError::WrongFormat(other.to_owned())),
            None => return Err(ProfileError::WrongFormat("<missing>".into())),
        }
        let version = obj
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ProfileError::Malformed("missing or non-integer \"version\"".into()))?;
        if version != u64::from(VERSION) {
            return Err(ProfileError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        let mut profile: Profile =
            serde_json::from_value(value).map_err(|e| ProfileError::Malformed(e.to_string()))?;
        profile.validate()?;
        profile.sort_access_order();
        Ok(profile)
    }

    /// Encode as pretty JSON (what [`Profile::save`] writes).
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// Check every invariant readers rely on: format and version, block size,
    /// extents inside the disk, aligned, non-empty, non-overlapping, counts ≥ 1.
    pub fn validate(&self) -> Result<()> {
        if self.format != FORMAT {
            return Err(ProfileError::WrongFormat(self.format.clone()));
        }
        if self.version != VERSION {
            return Err(ProfileError::UnsupportedVersion {
                found: self.version.into(),
                supported: VERSION,
            });
        }
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(invalid(format!(
                "block_size {bs} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            )));
        }
        if self.disk_size == 0 {
            return Err(invalid("disk_size is 0".into()));
        }
        let bs = u64::from(bs);
        let mut by_offset: Vec<&Extent> = self.extents.iter().collect();
        by_offset.sort_by_key(|e| e.offset);
        let mut prev_end = 0u64;
        for (i, e) in by_offset.iter().enumerate() {
            let at = format!("extent at offset {} (length {})", e.offset, e.length);
            if e.length == 0 {
                return Err(invalid(format!("{at} is empty")));
            }
            let end = e
                .offset
                .checked_add(e.length)
                .ok_or_else(|| invalid(format!("{at} overflows")))?;
            if end > self.disk_size {
                return Err(invalid(format!(
                    "{at} ends at {end}, past the disk size {}",
                    self.disk_size
                )));
            }
            if !e.offset.is_multiple_of(bs)
                || (!e.length.is_multiple_of(bs) && end != self.disk_size)
            {
                return Err(invalid(format!(
                    "{at} is not aligned to the block size {bs}"
                )));
            }
            if i > 0 && e.offset < prev_end {
                return Err(invalid(format!("{at} overlaps the previous extent")));
            }
            if e.count == 0 {
                return Err(invalid(format!("{at} has count 0")));
            }
            if e.runs == 0 || e.runs > self.source.runs.max(1) {
                return Err(invalid(format!(
                    "{at} has runs {} (profile has {} runs)",
                    e.runs, self.source.runs
                )));
            }
            prev_end = end;
        }
        Ok(())
    }

    /// Validate, then write atomically: a temporary file in the same directory,
    /// fsync, rename over `path`, fsync the directory. Readers never see a torn file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        self.validate()?;
        let path = path.as_ref();
        let io = |source| ProfileError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| invalid(format!("{} has no file name", path.display())))?;
        let mut sorted = self.clone();
        sorted.sort_access_order();
        let text = sorted.to_json();
        // A new temp file each time (O_EXCL: never an existing file, never through a
        // symlink planted under the name), then an atomic rename.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut attempt = 0;
        let (tmp, mut f) = loop {
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tmp_name.push(format!(".tmp.{}.{n}", std::process::id()));
            let tmp = dir.join(tmp_name);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
            {
                Ok(f) => break (tmp, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1
                }
                Err(e) => return Err(io(e)),
            }
        };
        let mut write = || -> std::io::Result<()> {
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // The rename is only durable once the directory is synced.
            std::fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
    }

    /// Put the extents in access order: first access time, then offset.
    pub fn sort_access_order(&mut self) {
        self.extents.sort_by_key(|e| (e.first_access_ns, e.offset));
    }

    /// The extents in the order the VM first read them (what pre-staging follows).
    pub fn extents_in_access_order(&self) -> impl Iterator<Item = &Extent> + '_ {
        let mut v: Vec<&Extent> = self.extents.iter().collect();
        v.sort_by_key(|e| (e.first_access_ns, e.offset));
        v.into_iter()
    }

    /// Bytes of the disk that were read at least once (extents never overlap).
    pub fn working_set_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }

    /// Time (ns after start) by which `fraction` (0.0 ..= 1.0) of the working set
    /// had been read for the first time; `None` for an empty profile.
    pub fn time_to_fraction(&self, fraction: f64) -> Option<u64> {
        let total = self.working_set_bytes();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * fraction.clamp(0.0, 1.0)).ceil() as u64;
        let mut sum = 0u64;
        let mut last = 0u64;
        for e in self.extents_in_access_order() {
            sum += e.length;
            last = e.first_access_ns;
            if sum >= target.max(1) {
                return Some(last);
            }
        }
        Some(last)
    }

    /// Combine several recordings of the same disk into one profile.
    ///
    /// Every block read by at least `opts.min_runs` runs is kept. Its first-access
    /// time is the median over the runs that read it (weighted by each input's
    /// `runs`, so merging merged profiles stays a median), which keeps one odd
    /// boot from reordering the rest; counts are summed. Inputs must agree on disk
    /// size and block size.
    pub fn merge(inputs: &[Profile], opts: &MergeOptions) -> Result<Profile> {
        let first = inputs
            .first()
            .ok_or_else(|| invalid("nothing to merge".into()))?;
        for (i, p) in inputs.iter().enumerate() {
            p.validate()?;
            if p.disk_size != first.disk_size || p.block_size != first.block_size {
                return Err(invalid(format!(
                    "input {} has disk size {} / block size {}, input 1 has {} / {}",
                    i + 1,
                    p.disk_size,
                    p.block_size,
                    first.disk_size,
                    first.block_size
                )));
            }
        }
        // Elementary segments between all extent boundaries of all inputs.
        let mut bounds: Vec<u64> = inputs
            .iter()
            .flat_map(|p| p.extents.iter().flat_map(|e| [e.offset, e.end()]))
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        let sorted: Vec<Vec<Extent>> = inputs
            .iter()
            .map(|p| {
                let mut v = p.extents.clone();
                v.sort_by_key(|e| e.offset);
                v
            })
            .collect();
        let mut cursor = vec![0usize; inputs.len()];
        let mut segments: Vec<Extent> = Vec::new();
        let mut times: Vec<(u64, u32)> = Vec::new();
        for w in bounds.windows(2) {
            let (a, b) = (w[0], w[1]);
            times.clear();
            let mut count = 0u64;
            for (run, exts) in sorted.iter().enumerate() {
                let c = &mut cursor[run];
                while *c < exts.len() && exts[*c].end() <= a {
                    *c += 1;
                }
                if let Some(e) = exts.get(*c) {
                    if e.offset <= a && e.end() >= b {
                        times.push((e.first_access_ns, e.runs));
                        count += e.count;
                    }
                }
            }
            let runs: u32 = times.iter().map(|t| t.1).sum();
            if runs == 0 || runs < opts.min_runs {
                continue;
            }
            times.sort_unstable();
            let t = weighted_median(&times);
            match segments.last_mut() {
                Some(l)
                    if l.end() == a
                        && l.first_access_ns == t
                        && l.count == count
                        && l.runs == runs =>
                {
                    l.length += b - a;
                }
                _ => segments.push(Extent {
                    offset: a,
                    length: b - a,
                    first_access_ns: t,
                    count,
                    runs,
                }),
            }
        }
        let (source, stats) = merged_provenance(inputs);
        let mut out = Profile::new(first.disk_size, first.block_size, source);
        out.stats = stats;
        out.extents = segments;
        out.sort_access_order();
        out.validate()?;
        Ok(out)
    }
}

/// The source and statistics of a merge of `inputs`: hosts, devices and kernels
/// joined, runs and events summed, the earliest start and the longest duration.
fn merged_provenance(inputs: &[Profile]) -> (Source, Stats) {
    let total_runs: u32 = inputs.iter().map(|p| p.source.runs.max(1)).sum();
    let join = |f: &dyn Fn(&Profile) -> &str| {
        let mut v: Vec<&str> = inputs.iter().map(f).filter(|s| !s.is_empty()).collect();
        v.sort_unstable();
        v.dedup();
        v.join(",")
    };
    let source = Source {
        host: join(&|p| p.source.host.as_str()),
        device: join(&|p| p.source.device.as_str()),
        kernel: join(&|p| p.source.kernel.as_str()),
        tracer: "merge".into(),
        started_unix: inputs
            .iter()
            .map(|p| p.source.started_unix)
            .min()
            .unwrap_or(0),
        runs: total_runs,
    };
    let stats = Stats {
        events_seen: inputs.iter().map(|p| p.stats.events_seen).sum(),
        events_lost: inputs.iter().map(|p| p.stats.events_lost).sum(),
        events_outside: inputs.iter().map(|p| p.stats.events_outside).sum(),
        duration_ns: inputs
            .iter()
            .map(|p| p.stats.duration_ns)
            .max()
            .unwrap_or(0),
    };
    (source, stats)
}

/// Options of [`Profile::merge`].
#[derive(Clone, Debug)]
pub struct MergeOptions {
    /// Keep only blocks read by at least this many runs (1 keeps the union).
    pub min_runs: u32,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { min_runs: 1 }
    }
}

/// Lower weighted median of sorted `(value, weight)` pairs.
fn weighted_median(sorted: &[(u64, u32)]) -> u64 {
    let total: u64 = sorted.iter().map(|t| u64::from(t.1)).sum();
    let half = total.div_ceil(2);
    let mut acc = 0u64;
    for &(v, w) in sorted {
        acc += u64::from(w);
        if acc >= half {
            return v;
        }
    }
    sorted.last().map(|t| t.0).unwrap_or(0)
}

fn invalid(msg: String) -> ProfileError {
    ProfileError::Invalid(msg)
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}+{} @{}ns x{}",
            self.offset, self.length, self.first_access_ns, self.count
        )
    }
}

/// Turns a stream of reads (byte ranges with timestamps) into profile extents.
///
/// Ranges are widened to whole blocks and clipped to the disk. The first read of
/// a block sets its first-access time; later reads only raise its count. When
/// finishing, adjacent pieces with the same count whose first accesses follow each
/// other within the coalescing window become one extent: a large read that the
/// block layer split into several requests, or a sequential scan, stays one extent.
#[derive(Clone, Debug)]
pub struct ExtentBuilder {
    disk_size: u64,
    block_size: u64,
    coalesce_ns: u64,
    /// Non-overlapping pieces keyed by start offset.
    pieces: BTreeMap<u64, Piece>,
    clipped: u64,
}

#[derive(Clone, Copy, Debug)]
struct Piece {
    end: u64,
    first_ns: u64,
    count: u64,
}

impl ExtentBuilder {
    /// A builder for a disk of `disk_size` bytes at `block_size` granularity.
    pub fn new(disk_size: u64, block_size: u32, coalesce_ns: u64) -> Self {
        ExtentBuilder {
            disk_size,
            block_size: u64::from(block_size.max(1)),
            coalesce_ns,
            pieces: BTreeMap::new(),
            clipped: 0,
        }
    }

    /// The granularity extents are widened to.
    pub fn block_size(&self) -> u32 {
        self.block_size as u32
    }

    /// Reads that fell (partly) beyond the end of the disk so far.
    pub fn clipped(&self) -> u64 {
        self.clipped
    }

    /// True when nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Record a read of `length` bytes at `offset`, `ts_ns` after the start.
    pub fn add(&mut self, offset: u64, length: u64, ts_ns: u64) {
        let bs = self.block_size;
        let a = offset - offset % bs;
        let end = offset.saturating_add(length);
        if end > self.disk_size {
            self.clipped += 1;
        }
        let b = end.div_ceil(bs).saturating_mul(bs).min(self.disk_size);
        if a >= b {
            return;
        }
        self.split_at(a);
        self.split_at(b);
        let mut cur = a;
        let inside: Vec<u64> = self.pieces.range(a..b).map(|(k, _)| *k).collect();
        for k in inside {
            if k > cur {
                self.pieces.insert(
                    cur,
                    Piece {
                        end: k,
                        first_ns: ts_ns,
                        count: 1,
                    },
                );
            }
            if let Some(p) = self.pieces.get_mut(&k) {
                p.count += 1;
                cur = p.end;
            }
        }
        if cur < b {
            self.pieces.insert(
                cur,
                Piece {
                    end: b,
                    first_ns: ts_ns,
                    count: 1,
                },
            );
        }
    }

    /// Split the piece straddling `x` (if any) into two at `x`.
    fn split_at(&mut self, x: u64) {
        let Some((_, piece)) = self.pieces.range_mut(..x).next_back() else {
            return;
        };
        if piece.end > x {
            let tail = Piece {
                end: piece.end,
                ..*piece
            };
            piece.end = x;
            self.pieces.insert(x, tail);
        }
    }

    /// Earliest first-access time recorded (the time base of [`ExtentBuilder::finish`]).
    pub fn first_ns(&self) -> Option<u64> {
        self.pieces.values().map(|p| p.first_ns).min()
    }

    /// The coalesced extents, in access order, with times made relative to the
    /// earliest read (so the first extent starts at 0 ns, whatever clock `add` got).
    pub fn finish(&self) -> Vec<Extent> {
        let base = self.first_ns().unwrap_or(0);
        let mut out: Vec<Extent> = Vec::new();
        let mut chain_last_ns = 0u64;
        for (&start, p) in &self.pieces {
            if let Some(l) = out.last_mut() {
                let follows =
                    p.first_ns >= chain_last_ns && p.first_ns - chain_last_ns <= self.coalesce_ns;
                if l.end() == start && l.count == p.count && follows {
                    l.length += p.end - start;
                    chain_last_ns = p.first_ns;
                    continue;
                }
            }
            chain_last_ns = p.first_ns;
            out.push(Extent {
                offset: start,
                length: p.end - start,
                first_access_ns: p.first_ns - base,
                count: p.count,
                runs: 1,
            });
        }
        out.sort_by_key(|e| (e.first_access_ns, e.offset));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, length: u64, t: u64, count: u64) -> Extent {
        Extent {
            offset,
            length,
            first_access_ns: t,
            count,
            runs: 1,
        }
    }

    fn profile(exts: &[Extent]) -> Profile {
        let mut p = Profile::new(
            1 << 20,
            4096,
            Source {
                runs: 1,
                ..Default::default()
            },
        );
        p.extents = exts.to_vec();
        p
    }

    #[test]
    fn builder_splits_counts_and_coalesces() {
        let mut b = ExtentBuilder::new(1 << 20, 4096, 1000);
        b.add(0, 8192, 10);
        b.add(8192, 8192, 500); // follows within the window: same extent
        b.add(4096, 4096, 10_000); // re-read: count 2 on [4096, 8192)
        b.add(100_000, 10, 20_000); // widened to a block
        b.add((1 << 20) - 4096, 8192, 30_000); // clipped at the end of the disk
        let e = b.finish();
        assert_eq!(
            e,
            vec![
                ext(0, 4096, 0, 1),
                ext(4096, 4096, 0, 2),
                ext(8192, 8192, 490, 1),
                ext(98304, 4096, 19_990, 1),
                ext((1 << 20) - 4096, 4096, 29_990, 1),
            ]
        );
        assert_eq!(b.clipped(), 1);
    }

    #[test]
    fn builder_does_not_chain_backwards_or_late_reads() {
        let mut b = ExtentBuilder::new(1 << 20, 4096, 1000);
        b.add(4096, 4096, 10);
        b.add(0, 4096, 20); // adjacent but earlier offset read later: separate
        b.add(8192, 4096, 5000); // adjacent but outside the window: separate
        assert_eq!(b.finish().len(), 3);
    }

    #[test]
    fn validate_rejects_bad_extents() {
        for (exts, what) in [
            (vec![ext(0, 0, 0, 1)], "empty"),
            (vec![ext((1 << 20) - 4096, 8192, 0, 1)], "past the disk"),
            (vec![ext(100, 4096, 0, 1)], "aligned"),
            (vec![ext(0, 8192, 0, 1), ext(4096, 4096, 1, 1)], "overlaps"),
            (vec![ext(0, 4096, 0, 0)], "count 0"),
        ] {
            let err = profile(&exts).validate().unwrap_err().to_string();
            assert!(err.contains(what), "{err} should mention {what}");
        }
    }

    #[test]
    fn versions_and_garbage_are_rejected() {
        let mut v: serde_json::Value = serde_json::from_str(&profile(&[]).to_json()).unwrap();
        v["version"] = 2.into();
        let e = Profile::from_json(&v.to_string()).unwrap_err();
        assert!(
            matches!(e, ProfileError::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );
        assert!(matches!(
            Profile::from_json("{"),
            Err(ProfileError::Malformed(_))
        ));
        assert!(matches!(
            Profile::from_json("{\"format\":\"x\"}"),
            Err(ProfileError::WrongFormat(_))
        ));
    }

    #[test]
    fn round_trip_and_order() {
        let p = profile(&[ext(8192, 4096, 5, 1), ext(0, 4096, 1, 3)]);
        let q = Profile::from_json(&p.to_json()).unwrap();
        assert_eq!(q.extents[0].offset, 0);
        assert_eq!(q.working_set_bytes(), 8192);
        assert_eq!(q.time_to_fraction(0.5), Some(1));
        assert_eq!(q.time_to_fraction(1.0), Some(5));
    }

    #[test]
    fn merge_takes_median_and_min_runs() {
        let a = profile(&[ext(0, 8192, 10, 1)]);
        let b = profile(&[ext(0, 4096, 20, 1), ext(65536, 4096, 1, 1)]);
        let c = profile(&[ext(0, 4096, 1000, 1)]);
        let m =
            Profile::merge(&[a.clone(), b.clone(), c.clone()], &MergeOptions::default()).unwrap();
        assert_eq!(m.source.runs, 3);
        let got: Vec<(u64, u64, u64, u32)> = m
            .extents
            .iter()
            .map(|e| (e.offset, e.length, e.first_access_ns, e.runs))
            .collect();
        assert_eq!(
            got,
            vec![(65536, 4096, 1, 1), (4096, 4096, 10, 1), (0, 4096, 20, 3)]
        );
        let m2 = Profile::merge(&[a, b, c], &MergeOptions { min_runs: 2 }).unwrap();
        assert_eq!(m2.extents.len(), 1);
        assert_eq!(m2.extents[0].offset, 0);
    }

    #[test]
    fn save_never_writes_through_a_planted_symlink() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        // The temp name an earlier version used, planted as a symlink.
        let planted = d.path().join(format!(".p.json.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let mut p = Profile::new(1 << 20, 4096, Source::default());
        p.extents.push(Extent {
            offset: 0,
            length: 4096,
            first_access_ns: 0,
            count: 1,
            runs: 1,
        });
        p.save(d.path().join("p.json")).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(
            Profile::load(d.path().join("p.json"))
                .unwrap()
                .extents
                .len(),
            1
        );
    }
}
