//! `livemount backup`: split an image into chunks, store the new ones, write an index.
//!
//! A reader thread reads the source sequentially (the fastest order for disks and
//! files); worker threads hash, skip zero and known chunks, and compress and store new
//! ones. The index is written last, after every chunk it names is durable.

use crate::error::{Error, IoContext, Result};
use crate::format::chunk::{self, ChunkId};
use crate::format::index::{ChunkList, ChunkRef, SnapshotIndex};
use crate::progress::Progress;
use crate::store::{SnapshotRef, Store, CHUNK_SIZE_RANGE, DEFAULT_CHUNK_SIZE};
use serde::Serialize;
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Instant;

/// zstd level of new chunks unless told otherwise.
pub const DEFAULT_LEVEL: i32 = 3;

/// What to back up and how.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Backup series (one VM disk).
    pub series: String,
    /// Chunk size; default: the series' previous chunk size, else [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: Option<u32>,
    /// zstd level.
    pub level: i32,
    /// Worker threads.
    pub threads: usize,
}

/// Figures of one backup.
#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    /// The new snapshot, `series@time`.
    pub snapshot: String,
    /// The snapshot it was incremental to, if any.
    pub previous: Option<String>,
    /// Bytes in the image.
    pub image_size: u64,
    /// Chunk size used.
    pub chunk_size: u32,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes in holes of a sparse source (SEEK_HOLE), stored as zero chunks without
    /// being read.
    #[serde(default)]
    pub bytes_holes: u64,
    /// Bytes of a changed-block incremental outside the changed ranges: taken from
    /// the previous snapshot without being read.
    #[serde(default)]
    pub bytes_unchanged: u64,
    /// Uncompressed bytes in chunks that were new to the store.
    pub bytes_new: u64,
    /// Uncompressed bytes in chunks already in the store (or earlier in this image).
    pub bytes_reused: u64,
    /// Bytes in all-zero chunks (not stored).
    pub bytes_zero: u64,
    /// Bytes written to the store (compressed chunk files).
    pub bytes_stored: u64,
    /// Chunks: new, reused, zero.
    pub chunks_new: u64,
    /// Chunks already present.
    pub chunks_reused: u64,
    /// All-zero chunks.
    pub chunks_zero: u64,
    /// bytes_new / bytes_stored.
    pub compression_ratio: f64,
    /// Non-zero bytes read / bytes_new (how much deduplication saved); absent when
    /// nothing was new (every chunk was already stored).
    pub dedup_ratio: Option<f64>,
    /// Wall time.
    pub seconds: f64,
    /// bytes_read / seconds, MiB/s.
    pub throughput_mib_s: f64,
}

enum Outcome {
    Zero,
    New { id: ChunkId, stored: u64 },
    Reused(ChunkId),
}

/// A backup's source: read in order, and able to tell holes (ranges that read as
/// zeros) without reading them.
pub trait SourceRead: Read {
    /// True if `start..end` (the next bytes to read) is known to be a hole; the
    /// reader is then advanced past it.
    fn skip_hole(&mut self, start: u64, end: u64) -> std::io::Result<bool> {
        let _ = (start, end);
        Ok(false)
    }

    /// If `start..end` (the next bytes: one whole chunk of this backup) is known to
    /// hold exactly the content of entry `c` of a snapshot already in the store (a
    /// commit: a chunk the overlay never wrote), that entry; it is then taken
    /// without reading (the caller skips the bytes).
    fn unchanged(&mut self, start: u64, end: u64) -> Option<ChunkRef> {
        let _ = (start, end);
        None
    }

    /// Advance past the next `n` bytes without using them.
    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        let done = std::io::copy(&mut Read::take(self, n), &mut std::io::sink())?;
        if done < n {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }
}

/// A source file or block device: holes come from `SEEK_DATA` where the file system
/// reports them (ext4, xfs, btrfs, tmpfs, zfs); elsewhere (block devices, file
/// systems without it) everything is data and is read.
pub struct FileSource {
    file: File,
    sparse: bool,
    /// Where the next read starts (reads are positioned: skipping costs nothing).
    pos: u64,
    /// Everything below this offset from `pos` on is known to be a hole (the last
    /// SEEK_DATA answer), so a long hole costs one system call, not one per chunk.
    hole_until: u64,
}

impl FileSource {
    /// `file`, read from its current position.
    pub fn new(mut file: File) -> Self {
        let sparse = file
            .metadata()
            .map(|m| m.file_type().is_file())
            .unwrap_or(false);
        // Data still in the page cache must be on disk before holes are asked for:
        // some file systems (OpenZFS 2.2.0/2.2.1, older ones with
        // zfs_dmu_offset_next_sync=0) report dirty, unsynced data as holes. A
        // source that cannot be synced is read in full.
        let sparse = sparse && file.sync_data().is_ok();
        let pos = file.stream_position().unwrap_or(0);
        FileSource {
            file,
            sparse,
            pos,
            hole_until: 0,
        }
    }
}

impl Read for FileSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl SourceRead for FileSource {
    fn skip_hole(&mut self, start: u64, end: u64) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        if !self.sparse {
            return Ok(false);
        }
        if start >= self.pos && end <= self.hole_until {
            self.pos = end;
            return Ok(true);
        }
        let Ok(at) = libc::off_t::try_from(start) else {
            return Ok(false);
        };
        // SAFETY: lseek on a descriptor owned by `self.file`; no memory is passed.
        // (Reads are positioned, so the offset lseek leaves behind is not used.)
        let data = unsafe { libc::lseek(self.file.as_raw_fd(), at, libc::SEEK_DATA) };
        let hole = if data >= 0 {
            self.hole_until = data as u64;
            data as u64 >= end
        } else {
            match std::io::Error::last_os_error().raw_os_error() {
                // No data at or after `start`: the rest of the file is a hole,
                // unless the file shrank under us (then the read below says so).
                Some(libc::ENXIO) => {
                    let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
                    self.hole_until = len;
                    len >= end
                }
                // Not supported here: read everything from now on.
                _ => {
                    self.sparse = false;
                    false
                }
            }
        };
        self.pos = if hole { end } else { start };
        Ok(hole)
    }

    fn skip(&mut self, n: u64) -> std::io::Result<()> {
        self.pos = self
            .pos
            .checked_add(n)
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        Ok(())
    }
}

/// Open a source image or block device and return it with its size.
pub fn open_source(path: &Path) -> Result<(File, u64)> {
    let meta = std::fs::metadata(path).at(path)?;
    let ft = meta.file_type();
    if ft.is_dir() {
        return Err(Error::Invalid(format!(
            "source {} is a directory, not a disk image",
            path.display()
        )));
    }
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(Error::Invalid(format!(
            "source {} is not a regular file or block device",
            path.display()
        )));
    }
    let mut f = File::open(path).at(path)?;
    let size = f.seek(SeekFrom::End(0)).at(path)?;
    f.seek(SeekFrom::Start(0)).at(path)?;
    Ok((f, size))
}

/// Check a user-given chunk size.
pub fn validate_chunk_size(size: u32, frame_size: u32) -> Result<()> {
    if !(CHUNK_SIZE_RANGE.0..=CHUNK_SIZE_RANGE.1).contains(&size)
        || !size.is_power_of_two()
        || size < frame_size
    {
        return Err(Error::Invalid(format!(
            "invalid chunk size {size}: use a power of two from {} KiB to {} MiB, at least the store's frame size ({} KiB)",
            CHUNK_SIZE_RANGE.0 / 1024,
            CHUNK_SIZE_RANGE.1 >> 20,
            frame_size / 1024
        )));
    }
    Ok(())
}

fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u8 → u128 reinterpretation of an initialized slice; align_to handles
    // the unaligned head and tail.
    let (head, mid, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Back up `source` into `store` as a new snapshot of `opts.series`.
pub fn backup(
    store: &Store,
    source: &Path,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    backup_changed(store, source, opts, None, progress)
}

/// [`backup`], reading only `changed` byte ranges of the source (sorted, merged:
/// [`changed`](crate::ops::changed)) and taking every other chunk from the
/// series' previous snapshot, which must exist with the same image and chunk size.
pub fn backup_changed(
    store: &Store,
    source: &Path,
    opts: &BackupOptions,
    changed: Option<&[std::ops::Range<u64>]>,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let (file, image_size) = open_source(source)?;
    let mut file = FileSource::new(file);
    let description = format!(
        "{} ({} bytes) on {}",
        std::fs::canonicalize(source)
            .unwrap_or_else(|_| source.to_path_buf())
            .display(),
        image_size,
        crate::store::hostname()
    );
    backup_from(
        store,
        &mut file,
        SourceInfo {
            size: image_size,
            path: source,
            description: &description,
        },
        opts,
        changed,
        progress,
    )
}

/// What a backup reads: its size, its name in errors, its description in the index.
#[derive(Debug, Clone, Copy)]
pub struct SourceInfo<'a> {
    /// Bytes in the image.
    pub size: u64,
    /// The file or device, for errors.
    pub path: &'a Path,
    /// What the index records as the snapshot's source.
    pub description: &'a str,
}

/// What a backup builds on: the series' latest snapshot, the chunks known to be in
/// the store, the chunk size, and (for a changed-block backup) the base index.
struct Prior {
    previous: Option<SnapshotRef>,
    known: HashSet<ChunkId>,
    chunk_size: u32,
    base: Option<SnapshotIndex>,
}

fn prior(
    store: &Store,
    opts: &BackupOptions,
    image_size: u64,
    changed: Option<&[std::ops::Range<u64>]>,
) -> Result<Prior> {
    let previous = store.list(Some(&opts.series))?.pop();
    // The previous index supplies the series' chunk size and, for a remote store,
    // the chunks known to be there (no per-chunk HEAD for an unchanged re-backup;
    // the backup lease keeps gc from removing them). A damaged one must not block
    // new backups (verify reports it).
    let prev_index = previous.as_ref().and_then(|p| store.load_index(p).ok());
    let known: HashSet<ChunkId> = match (&prev_index, store.local_root()) {
        // A local stat is cheap and also sees a chunk verify --repair moved aside.
        (_, Some(_)) | (None, _) => HashSet::new(),
        (Some(i), None) => {
            let bad = store.quarantined()?;
            i.stored_ids()
                .into_iter()
                .filter(|id| !bad.contains(id))
                .collect()
        }
    };
    let frame_size = store.config().frame_size;
    let chunk_size = opts
        .chunk_size
        .or(prev_index.as_ref().map(|i| i.chunk_size))
        .unwrap_or(DEFAULT_CHUNK_SIZE);
    validate_chunk_size(chunk_size, frame_size)?;
    // A changed-block incremental is only as right as the snapshot it builds on: a
    // missing, unreadable or differently shaped one is an error, never a silently
    // incomplete snapshot.
    let base = match changed {
        None => None,
        Some(_) => {
            let p = previous.as_ref().ok_or_else(|| {
                Error::Invalid(format!(
                    "a changed-block backup needs a previous snapshot of series {}: run a full backup first",
                    opts.series
                ))
            })?;
            let i = store.load_index(p).map_err(|e| {
                Error::Invalid(format!("cannot build on {p}: {e}; run a full backup"))
            })?;
            if i.image_size != image_size || i.chunk_size != chunk_size {
                return Err(Error::Invalid(format!(
                    "cannot build on {p}: it has {} bytes in chunks of {}, the source {image_size} in chunks of {chunk_size}; run a full backup",
                    i.image_size, i.chunk_size
                )));
            }
            Some(i)
        }
    };
    Ok(Prior {
        previous,
        known,
        chunk_size,
        base,
    })
}

/// Back up the `info.size` bytes read sequentially from `reader` as a new snapshot
/// (only the `changed` ranges, when given: [`backup_changed`]).
pub fn backup_from(
    store: &Store,
    reader: &mut dyn SourceRead,
    info: SourceInfo<'_>,
    opts: &BackupOptions,
    changed: Option<&[std::ops::Range<u64>]>,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    let (image_size, description) = (info.size, info.description);
    let start = Instant::now();
    crate::store::validate_series(&opts.series)?;
    let level = opts.level;
    if !(1..=22).contains(&level) {
        return Err(Error::Invalid(format!(
            "invalid zstd level {level}: use 1 to 22"
        )));
    }
    let prior = prior(store, opts, image_size, changed)?;
    let (chunk_size, frame_size) = (prior.chunk_size, store.config().frame_size);
    let count = SnapshotIndex::chunk_count(image_size, chunk_size) as usize;
    let threads = opts.threads.max(1);

    // Bounded queues keep memory at about 2 × threads chunks.
    let (work_tx, work_rx) = mpsc::sync_channel::<(usize, Vec<u8>)>(threads * 2);
    let work_rx = Mutex::new(work_rx);
    let (done_tx, done_rx) = mpsc::channel::<Result<(usize, Outcome, u64)>>();
    let mut tally = Tally {
        refs: Default::default(),
        report: BackupReport::empty(prior.previous.as_ref(), image_size, chunk_size),
        synced_ids: Vec::new(),
        first_err: None,
        progress,
    };
    let known = &prior.known;
    let encoder = |_| encode_worker(store, known, frame_size, level, &work_rx, &done_tx);
    // Reader: sequential reads, in this thread, beside the encoders. Results are
    // drained as they come so a worker error stops reading early; every chunk sent
    // gets exactly one result, which is how the reader knows it has them all.
    crate::workers::with_workers(threads, encoder, || {
        let (mut sent, mut received) = (0usize, 0usize);
        for i in 0..count {
            if tally.first_err.is_some() {
                break;
            }
            let start = i as u64 * chunk_size as u64;
            let len = (image_size - start).min(chunk_size as u64) as usize;
            match read_next(
                store,
                reader,
                &info,
                &prior,
                changed,
                i,
                start..start + len as u64,
            ) {
                Err(e) => tally.first_err = Some(e),
                Ok(Next::Known(outcome)) => {
                    tally.report.bytes_unchanged += len as u64;
                    tally.collect(Ok((i, outcome, len as u64)));
                }
                Ok(Next::Hole) => {
                    tally.report.bytes_holes += len as u64;
                    tally.collect(Ok((i, Outcome::Zero, len as u64)));
                }
                Ok(Next::Data(buf)) => {
                    tally.report.bytes_read += len as u64;
                    if work_tx.send((i, buf)).is_err() {
                        break;
                    }
                    sent += 1;
                }
            }
            while let Ok(r) = done_rx.try_recv() {
                received += 1;
                tally.collect(r);
            }
        }
        // The encoders end once the queue is drained and closed.
        drop(work_tx);
        while received < sent {
            let Ok(r) = done_rx.recv() else { break };
            received += 1;
            tally.collect(r);
        }
    });
    progress.finish();
    let Tally {
        refs,
        report,
        synced_ids,
        first_err,
        ..
    } = tally;
    if let Some(e) = first_err {
        return Err(e);
    }
    let mut chunks = ChunkList::new();
    for (i, id) in refs {
        chunks.push_run(ChunkRef::Zero, i - chunks.len());
        chunks.push(ChunkRef::Stored(id));
    }
    chunks.push_run(ChunkRef::Zero, count - chunks.len());
    let index = SnapshotIndex {
        image_size,
        chunk_size,
        frame_size,
        created: crate::store::now_secs(),
        source: description.to_string(),
        chunks,
    };
    commit(store, &opts.series, index, &synced_ids, report, start)
}

/// A backup's running results.
struct Tally<'p> {
    /// Stored chunks by position (the rest are zero): memory follows the data, not
    /// the image size.
    refs: std::collections::BTreeMap<usize, ChunkId>,
    report: BackupReport,
    /// Every chunk the index will name, new or reused: a reused chunk may have been
    /// renamed into place by a concurrent backup that has not synced its directory.
    synced_ids: Vec<ChunkId>,
    first_err: Option<Error>,
    progress: &'p dyn Progress,
}

impl Tally<'_> {
    /// Count one chunk's outcome (or keep the first error).
    fn collect(&mut self, r: Result<(usize, Outcome, u64)>) {
        let (i, outcome, len) = match r {
            Ok(x) => x,
            Err(e) => {
                self.first_err.get_or_insert(e);
                return;
            }
        };
        self.progress.inc(len);
        let report = &mut self.report;
        match outcome {
            Outcome::Zero => {
                report.chunks_zero += 1;
                report.bytes_zero += len;
            }
            Outcome::Reused(id) => {
                report.chunks_reused += 1;
                report.bytes_reused += len;
                self.refs.insert(i, id);
                self.synced_ids.push(id);
            }
            Outcome::New { id, stored } => {
                report.chunks_new += 1;
                report.bytes_new += len;
                report.bytes_stored += stored;
                self.refs.insert(i, id);
                self.synced_ids.push(id);
            }
        }
    }
}

/// The next chunk of the source, as the reader found it.
enum Next {
    /// Unchanged since a snapshot (not read; skipped).
    Known(Outcome),
    /// A hole of the source (not read).
    Hole,
    /// Read, for the encoders.
    Data(Vec<u8>),
}

/// Chunk `i` (`span` of the source), from the reader's position at its start.
fn read_next(
    store: &Store,
    file: &mut dyn SourceRead,
    info: &SourceInfo<'_>,
    prior: &Prior,
    changed: Option<&[std::ops::Range<u64>]>,
    i: usize,
    span: std::ops::Range<u64>,
) -> Result<Next> {
    let source = info.path;
    let len = span.end - span.start;
    let unchanged = match (changed, &prior.base) {
        (Some(ranges), Some(base)) if !crate::ops::changed::touches(ranges, &span) => {
            Some((base.chunks[i], "the previous snapshot"))
        }
        _ => file
            .unchanged(span.start, span.end)
            .map(|c| (c, "the base snapshot")),
    };
    if let Some((entry, whose)) = unchanged {
        let outcome = match entry {
            ChunkRef::Zero => Outcome::Zero,
            ChunkRef::Stored(id) => {
                // The chunk must still be there (verify --repair may have moved it
                // aside): a stat locally, the trusted set (or a HEAD) remotely.
                let present = match store.local_root() {
                    Some(_) => matches!(store.has_chunk(&id), Ok(true)),
                    None => prior.known.contains(&id) || matches!(store.has_chunk(&id), Ok(true)),
                };
                if !present {
                    return Err(Error::Invalid(format!(
                        "chunk {} of {whose} is missing: run a full backup",
                        id.to_hex()
                    )));
                }
                Outcome::Reused(id)
            }
        };
        file.skip(len).map_err(|e| Error::io(source, e))?;
        return Ok(Next::Known(outcome));
    }
    if file
        .skip_hole(span.start, span.end)
        .map_err(|e| Error::io(source, e))?
    {
        return Ok(Next::Hole);
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Invalid(format!(
                "source {} shrank while it was being read",
                source.display()
            ))
        } else {
            Error::io(source, e)
        }
    })?;
    Ok(Next::Data(buf))
}

/// Make every chunk `index` names durable (`synced`: new and reused alike), then
/// write the index, and complete `report` with the snapshot and the ratios.
fn commit(
    store: &Store,
    series: &str,
    mut index: SnapshotIndex,
    synced: &[ChunkId],
    mut report: BackupReport,
    start: Instant,
) -> Result<BackupReport> {
    store.sync_chunks(synced.iter())?;
    let snap: SnapshotRef = store.commit_index(series, &mut index)?;
    let secs = start.elapsed().as_secs_f64();
    report.snapshot = snap.to_string();
    report.seconds = secs;
    report.throughput_mib_s = report.bytes_read as f64 / 1048576.0 / secs.max(1e-9);
    report.compression_ratio = ratio(report.bytes_new, report.bytes_stored);
    report.dedup_ratio = (report.bytes_new > 0)
        .then(|| ratio(report.bytes_new + report.bytes_reused, report.bytes_new));
    Ok(report)
}

impl BackupReport {
    /// The figures of a backup that has not read anything yet.
    fn empty(previous: Option<&SnapshotRef>, image_size: u64, chunk_size: u32) -> BackupReport {
        BackupReport {
            snapshot: String::new(),
            previous: previous.map(|p| p.to_string()),
            image_size,
            chunk_size,
            bytes_read: 0,
            bytes_holes: 0,
            bytes_unchanged: 0,
            bytes_new: 0,
            bytes_reused: 0,
            bytes_zero: 0,
            bytes_stored: 0,
            chunks_new: 0,
            chunks_reused: 0,
            chunks_zero: 0,
            compression_ratio: 1.0,
            dedup_ratio: None,
            seconds: 0.0,
            throughput_mib_s: 0.0,
        }
    }
}

/// A backup worker: hash each chunk it is handed, keep what the store lacks (zstd,
/// written atomically), and report the outcome, until the queue closes.
fn encode_worker(
    store: &Store,
    known: &HashSet<ChunkId>,
    frame_size: u32,
    level: i32,
    work_rx: &Mutex<mpsc::Receiver<(usize, Vec<u8>)>>,
    done_tx: &mpsc::Sender<Result<(usize, Outcome, u64)>>,
) {
    let mut compressor = None;
    loop {
        // Nothing panics while holding the lock, so a poisoned one is still sound;
        // leaving here with chunks queued would leave the reader waiting for them.
        let item = work_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((i, buf)) = item else { return };
        let len = buf.len() as u64;
        let res = catch_unwind(AssertUnwindSafe(|| {
            encode_one(store, known, frame_size, level, &mut compressor, &buf)
        }))
        .unwrap_or_else(|p| {
            // The compressor may be mid-frame: the next chunk gets a new one.
            compressor = None;
            Err(Error::Invalid(format!(
                "backup worker panicked on chunk {i}: {}",
                crate::workers::panic_message(&*p)
            )))
        });
        if done_tx.send(res.map(|o| (i, o, len))).is_err() {
            return;
        }
    }
}

/// Hash one chunk; store it unless it is all zeros or already known.
fn encode_one(
    store: &Store,
    known: &HashSet<ChunkId>,
    frame_size: u32,
    level: i32,
    compressor: &mut Option<zstd::bulk::Compressor<'static>>,
    buf: &[u8],
) -> Result<Outcome> {
    if is_zero(buf) {
        return Ok(Outcome::Zero);
    }
    // The unit tests' stand-in for a bug in hashing or compression.
    #[cfg(test)]
    if buf.starts_with(tests::PANIC_MARK) {
        panic!("test: a chunk that makes the encoder panic");
    }
    let digest = chunk::digest(buf, frame_size);
    if known.contains(&digest.id) || store.has_chunk(&digest.id)? {
        return Ok(Outcome::Reused(digest.id));
    }
    let c = match compressor {
        Some(c) => c,
        None => compressor.insert(
            zstd::bulk::Compressor::new(level).map_err(|e| Error::Invalid(format!("zstd: {e}")))?,
        ),
    };
    let bytes = chunk::encode(buf, frame_size, &digest, c)
        .map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
    let stored = bytes.len() as u64;
    store.put_chunk(&digest.id, bytes)?;
    Ok(Outcome::New {
        id: digest.id,
        stored,
    })
}

/// a / b, or 1 when b is 0.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        1.0
    } else {
        a as f64 / b as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk starting with this makes `encode_one` panic (test builds only).
    pub(super) const PANIC_MARK: &[u8] = b"livemount-test: panic in the encoder";

    /// A bug that panics in an encoder fails the backup with an error naming the
    /// chunk: no hang (the reader counts one result per chunk sent), no snapshot.
    #[test]
    fn a_panicking_encoder_fails_the_backup_and_does_not_hang_it() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("s"), crate::store::Access::Write).unwrap();
        let src = d.path().join("img");
        let mut data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
        let at = 5 << 20;
        data[at..at + PANIC_MARK.len()].copy_from_slice(PANIC_MARK);
        std::fs::write(&src, &data).unwrap();
        let opts = BackupOptions {
            series: "vm".into(),
            chunk_size: Some(1 << 20),
            level: 1,
            threads: 2,
        };
        // On its own thread, so that a hang fails the test instead of stalling it.
        let (tx, rx) = std::sync::mpsc::channel();
        let (dir, p) = (d.path().join("s"), src.clone());
        std::thread::spawn(move || {
            let st = Store::open(dir, crate::store::Access::Write).unwrap();
            let _ = tx.send(backup(&st, &p, &opts, &crate::progress::NoProgress).map(|_| ()));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the backup returned");
        let e = r.expect_err("a backup with a panicking encoder succeeded");
        assert!(e.to_string().contains("panicked on chunk 5"), "{e}");
        assert!(
            store.list(Some("vm")).unwrap().is_empty(),
            "a snapshot was written"
        );
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4097];
        assert!(is_zero(&v));
        assert!(is_zero(&v[1..]));
        v[4096] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[3..]));
    }

    #[test]
    fn holes_of_a_sparse_source_are_never_read_and_the_index_equals_a_dense_read() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("s"), crate::store::Access::Write).unwrap();
        let src = d.path().join("sparse.img");
        let f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 253) as u8).collect();
        f.write_all_at(&data, 10 << 20).unwrap();
        f.write_all_at(b"tail data", (40 << 20) + 12345).unwrap();
        drop(f);
        let opts = |series: &str| BackupOptions {
            series: series.into(),
            chunk_size: Some(1 << 20),
            level: 1,
            threads: 2,
        };
        let r = backup(&store, &src, &opts("sparse"), &crate::progress::NoProgress).unwrap();
        // Only the two chunks holding data were read (the file system here reports
        // holes; a source without SEEK_DATA support reads everything instead).
        assert_eq!(r.bytes_read, 2 << 20, "{r:?}");
        assert_eq!(r.bytes_holes, 62 << 20);
        assert_eq!(r.chunks_new, 2);
        // A dense read of the same bytes gives the same index.
        struct Dense(File);
        impl Read for Dense {
            fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
                self.0.read(b)
            }
        }
        impl SourceRead for Dense {}
        let dense = backup_from(
            &store,
            &mut Dense(File::open(&src).unwrap()),
            SourceInfo {
                size: 64 << 20,
                path: &src,
                description: "dense",
            },
            &opts("dense"),
            None,
            &crate::progress::NoProgress,
        )
        .unwrap();
        assert_eq!(dense.bytes_read, 64 << 20);
        let idx = |r: &BackupReport| {
            store
                .load_index(&store.resolve(&r.snapshot).unwrap())
                .unwrap()
                .chunks
        };
        assert_eq!(idx(&r), idx(&dense));
    }

    #[test]
    fn chunk_size_rules() {
        assert!(validate_chunk_size(1 << 20, 65536).is_ok());
        assert!(validate_chunk_size(1000, 65536).is_err());
        assert!(validate_chunk_size(32768, 65536).is_err());
        assert!(validate_chunk_size(1 << 25, 65536).is_err());
    }

    #[test]
    fn the_index_is_written_only_after_every_chunk_it_names_is_durable() {
        use crate::fsutil::SYNCED_DIRS;
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("s"), crate::store::Access::Write).unwrap();
        let data: Vec<u8> = (0..2u32 << 20).map(|i| (i / 7 % 251) as u8).collect();
        let src = d.path().join("img");
        std::fs::write(&src, &data).unwrap();
        let opts = BackupOptions {
            series: "vm".into(),
            chunk_size: Some(1 << 20),
            level: 1,
            threads: 1,
        };
        backup(&store, &src, &opts, &crate::progress::NoProgress).unwrap();
        // A second backup of the same data into the same series reuses every chunk;
        // their prefix directories must still be synced by it (another backup may
        // have renamed them into place without syncing yet), and so must
        // `snapshots/` (the series directory may be another backup's, not yet durable).
        SYNCED_DIRS.with(|s| s.borrow_mut().clear());
        let r = backup(&store, &src, &opts, &crate::progress::NoProgress).unwrap();
        assert_eq!(r.chunks_reused, 2);
        let synced = SYNCED_DIRS.with(|s| s.borrow().clone());
        let index = store
            .load_index(&store.resolve(&r.snapshot).unwrap())
            .unwrap();
        for id in index.stored_ids() {
            let dir = store
                .local_root()
                .unwrap()
                .join(crate::backend::chunk_key(&id))
                .parent()
                .unwrap()
                .to_path_buf();
            assert!(
                synced.contains(&dir),
                "{} not synced: {synced:?}",
                dir.display()
            );
        }
        assert!(
            synced.contains(&store.local_root().unwrap().join("snapshots")),
            "{synced:?}"
        );
    }
}
