//! The zstd-aware read cache between the snapshot index and the chunk source.
//!
//! A read of bytes `a..b` of a chunk fetches and decodes only the frames covering
//! `a..b`; adjacent missing frames are fetched with one range read. Decoded frames
//! live in the [memory tier](memory); the compressed bytes fetched from the store are
//! kept in the optional [disk tier](disk). Everything read from the store or the disk
//! tier is verified against the chunk id before use: a chunk that fails is an error
//! naming it (EIO to the block layer), never wrong bytes. Concurrent misses on one
//! frame fetch it once: later readers wait for the first.

pub mod compressed;
pub mod disk;
pub mod flight;
pub mod memory;
pub mod readahead;
pub mod report;
#[cfg(test)]
pub(crate) mod test_utils;

use crate::error::{Error, Result};
use compressed::ChunkTier;
use disk::DiskTier;
use flight::{DemandGauge, ReleaseOnDrop, SingleFlight};
use hashbrown::HashMap;
use livemount_store::backend::{ChunkSource, ReadClass};
use livemount_store::format::chunk::{ChunkId, ChunkLayout};
use memory::{FrameBytes, TwoQueue};
use readahead::{Fetch, ReadAheadMode, ReadAheadPolicy};
pub use report::{CacheReport, CacheStats};
use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

type FrameKey = (ChunkId, u32);
/// The frame number under which a whole-chunk fetch is in flight.
const WHOLE: u32 = u32::MAX;

/// The read cache.
pub struct ReadCache {
    origin: Arc<dyn ChunkSource>,
    disk: Option<DiskTier>,
    mem: Mutex<TwoQueue<FrameKey, FrameBytes>>,
    mem_budget: u64,
    layouts: Mutex<HashMap<ChunkId, Arc<ChunkLayout>>>,
    /// Frames being fetched, and whole chunks (frame number `WHOLE`).
    flight: SingleFlight<FrameKey>,
    frame_size: u32,
    /// Demand fetches in progress: pre-staging yields to them.
    demand: DemandGauge,
    /// Frames brought in by pre-staging and not yet read (for "reads saved").
    prestaged: Mutex<HashSet<FrameKey>>,
    /// Chunk read-ahead: whole compressed chunk files fetched on a demand miss (one
    /// store request instead of one per run of frames), kept compressed and decoded
    /// lazily, frame by frame, as reads need them.
    compressed: Option<ChunkTier>,
    /// Whether a demand miss fetches the whole chunk or only its frames.
    readahead: ReadAheadPolicy,
    /// Counters.
    pub stats: CacheStats,
}

/// What one pre-staging step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetched {
    /// Frames fetched: compressed bytes read, decoded bytes staged.
    Fetched {
        /// Bytes read from the store or disk tier.
        stored: u64,
        /// Uncompressed bytes staged.
        raw: u64,
    },
    /// Everything was already cached.
    Present,
    /// The cache budget is reached: pre-staging stops here.
    BudgetReached,
}

impl ReadCache {
    /// A cache over `origin` holding `mem_budget` bytes of decoded frames, with an
    /// optional disk tier, for chunks with frames of `frame_size` bytes.
    pub fn new(
        origin: Arc<dyn ChunkSource>,
        mem_budget: u64,
        disk: Option<DiskTier>,
        frame_size: u32,
    ) -> Self {
        ReadCache {
            origin,
            disk,
            mem: Mutex::new(TwoQueue::new(mem_budget as usize)),
            mem_budget,
            layouts: Mutex::new(HashMap::new()),
            flight: SingleFlight::default(),
            frame_size,
            demand: DemandGauge::default(),
            prestaged: Mutex::new(HashSet::new()),
            compressed: None,
            readahead: ReadAheadPolicy::new(ReadAheadMode::Off),
            stats: CacheStats::default(),
        }
    }

    /// Enable chunk read-ahead in `mode` with `budget` bytes of compressed chunk files
    /// in memory (see [`readahead`] for how `auto` chooses).
    pub fn with_chunk_readahead(mut self, mode: ReadAheadMode, budget: u64) -> Self {
        let on = budget > 0 && mode != ReadAheadMode::Off;
        self.compressed = on.then(|| ChunkTier::new(budget));
        self.readahead = ReadAheadPolicy::new(if on { mode } else { ReadAheadMode::Off });
        self
    }

    fn compressed_get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.compressed.as_ref()?.get(id)
    }

    fn compressed_has(&self, id: &ChunkId) -> bool {
        self.compressed.as_ref().is_some_and(|c| c.contains(id))
    }

    /// Read-ahead: fetch chunk `id`'s whole file with one request (single flight)
    /// into the compressed tier (and the disk tier), counted as a demand fetch or not.
    /// `chunk_len` (from the index) bounds what is read: an oversized file is an
    /// error naming the chunk, not an allocation. The layout is verified before the
    /// bytes enter the compressed and disk tiers; frames are verified when decoded.
    fn fetch_whole_as(&self, id: &ChunkId, chunk_len: u32, demand: bool) -> Result<()> {
        let key = (*id, WHOLE);
        let (mine, wait) = self.flight.claim([key], |_| self.compressed_has(id));
        if let Some(w) = wait {
            w.wait();
            return Ok(());
        }
        if mine.is_empty() {
            return Ok(());
        }
        let _release = ReleaseOnDrop::new(&self.flight, mine);
        // The host's disk cache may hold the whole file (another mount, another
        // process, an earlier run fetched it): a hit costs no request. Its frames are
        // verified when decoded, like any read-ahead bytes; a file with holes fails
        // there and the frames are fetched again by range.
        let from_disk = || {
            let bytes = self.whole_from_disk(id, chunk_len)?;
            self.stats.disk_hits.fetch_add(1, Relaxed);
            if let Some(c) = &self.compressed {
                c.insert(*id, bytes);
            }
            Some(())
        };
        if from_disk().is_some() {
            return Ok(());
        }
        let limit = ChunkLayout::max_file_len(chunk_len, self.frame_size);
        // Another mount on the host may be fetching this chunk: wait for it.
        let _fill = self.lock_fill(id, 0..limit, demand);
        if _fill.is_some() && from_disk().is_some() {
            self.stats.fill_hits.fetch_add(1, Relaxed);
            return Ok(());
        }
        let _demand = demand.then(|| self.demand.enter());
        let started = Instant::now();
        let res = self
            .origin
            .read_all_as(id, limit, class_of(demand))
            .and_then(|bytes| {
                self.readahead.observe_whole_chunk(started.elapsed());
                self.stats.store_reads.fetch_add(1, Relaxed);
                self.stats
                    .store_bytes
                    .fetch_add(bytes.len() as u64, Relaxed);
                let layout = self
                    .checked_layout(id, chunk_len, &bytes)
                    .inspect_err(|_| {
                        self.stats.corrupt.fetch_add(1, Relaxed);
                    })?;
                if bytes.len() as u64 != layout.file_len() {
                    self.stats.corrupt.fetch_add(1, Relaxed);
                    return Err(Error::CorruptChunk {
                        id: id.to_hex(),
                        reason: format!(
                            "file is {} bytes, its seek table says {}",
                            bytes.len(),
                            layout.file_len()
                        ),
                    });
                }
                self.stats.readahead_chunks.fetch_add(1, Relaxed);
                if let Some(d) = &self.disk {
                    let _ = d.write(id, 0, &bytes);
                }
                if let Some(c) = &self.compressed {
                    c.insert(*id, bytes);
                }
                Ok(())
            });
        res
    }

    /// The disk tier's fill lock on `range` of chunk `id`'s file, waited for as
    /// long as [`disk::FILL_WAIT`]; counted when it had to wait.
    fn lock_fill(&self, id: &ChunkId, range: Range<u64>, demand: bool) -> Option<disk::FillLock> {
        let lock = self
            .disk
            .as_ref()?
            .lock_fill(id, range, demand, disk::FILL_WAIT);
        if lock.as_ref().is_some_and(|l| l.waited) {
            self.stats.fill_waits.fetch_add(1, Relaxed);
        }
        lock
    }

    /// Chunk `id`'s whole file from the disk tier, if its verified layout is there
    /// and says how long the file is.
    fn whole_from_disk(&self, id: &ChunkId, chunk_len: u32) -> Option<Vec<u8>> {
        let d = self.disk.as_ref()?;
        let prefix = ChunkLayout::prefix_len(chunk_len, self.frame_size);
        let head = d.read(id, 0, prefix)?;
        let layout = self.checked_layout(id, chunk_len, &head).ok()?;
        let len = usize::try_from(layout.file_len()).ok()?;
        let bytes = d.read(id, 0, len)?;
        if let Ok(mut m) = self.layouts.lock() {
            m.entry(*id).or_insert_with(|| Arc::new(layout));
        }
        Some(bytes)
    }

    /// Drop chunk read-ahead's compressed copy of a chunk once every frame of it is
    /// decoded in the memory tier: a sequential read would otherwise hold each chunk
    /// twice (compressed and decoded), and fresh memory costs page faults, which
    /// dominate cold reads under emulation (docs/performance.md). A frame evicted
    /// later is fetched again with one range read.
    fn release_compressed_if_decoded(&self, layout: &ChunkLayout) {
        let Some(c) = &self.compressed else { return };
        let all_decoded = match self.mem.lock() {
            Ok(m) => (0..layout.frames.len()).all(|i| m.contains(&(layout.id, i as u32))),
            Err(_) => false,
        };
        if all_decoded {
            c.remove(&layout.id);
        }
    }

    /// True when store requests, as measured, cost enough against decoding a chunk of
    /// `chunk_len` bytes that fetching ahead of a reader pays (see
    /// [`ReadAheadPolicy::store_latency_bound`]).
    pub fn store_latency_bound(&self, chunk_len: u32) -> bool {
        self.readahead.store_latency_bound(u64::from(chunk_len))
    }

    /// Demand fetches in flight now.
    pub fn demand_inflight(&self) -> usize {
        self.demand.current()
    }

    /// True if the VM fetched from the store (a demand miss) within `window`.
    pub fn demand_recent(&self, window: std::time::Duration) -> bool {
        self.demand.recent(window)
    }

    /// Wait until no demand fetch is in flight, at most `limit` (pre-staging yields
    /// to the VM's own reads this way); true if idle.
    pub fn wait_for_demand_idle(&self, limit: std::time::Duration) -> bool {
        self.demand.wait_idle(limit)
    }

    fn note_hit(&self, key: &FrameKey) {
        if let Ok(mut p) = self.prestaged.lock() {
            if !p.is_empty() && p.remove(key) {
                self.stats.prestage_saved.fetch_add(1, Relaxed);
            }
        }
    }

    /// Pre-stage frames `frames` of chunk `id`: fetch the missing ones with one range
    /// read per run, verify them, keep them in the disk tier and (with `to_memory`)
    /// decoded in the protected memory segment. Never evicts hot data: returns
    /// [`Prefetched::BudgetReached`] instead.
    pub fn prefetch(
        &self,
        id: &ChunkId,
        chunk_len: u32,
        frames: Range<usize>,
        to_memory: bool,
    ) -> Result<Prefetched> {
        let layout = self.layout(id, chunk_len)?;
        let frames = frames.start.min(layout.frames.len())..frames.end.min(layout.frames.len());
        let missing: Vec<usize> = match self.mem.lock() {
            Ok(m) => frames
                .clone()
                .filter(|&i| !m.contains(&(*id, i as u32)))
                .collect(),
            Err(_) => return Err(poisoned()),
        };
        if missing.is_empty() || (!to_memory && self.disk.is_none()) {
            return Ok(Prefetched::Present);
        }
        let (first, last) = (missing[0], missing[missing.len() - 1]);
        let run = first..last + 1;
        let raw: u64 = run.clone().map(|i| layout.frames[i].raw_len as u64).sum();
        let stored_range = layout.file_range(run.clone());
        let stored = stored_range.end - stored_range.start;
        if to_memory {
            let room = self.mem.lock().map(|m| m.protected_room()).unwrap_or(0) as u64;
            if raw > room {
                return Ok(Prefetched::BudgetReached);
            }
        } else if let Some(d) = &self.disk {
            if d.would_exceed(stored) {
                return Ok(Prefetched::BudgetReached);
            }
        }
        let decoded = self.fetch(id, stored_range, ReadClass::Background, |b| {
            layout.decode_frames(run.clone(), b)
        })?;
        if to_memory {
            let mut mem = self.mem.lock().map_err(|_| poisoned())?;
            let mut keys = self.prestaged.lock().map_err(|_| poisoned())?;
            for (i, f) in run.zip(decoded) {
                self.stats.decoded_bytes.fetch_add(f.len() as u64, Relaxed);
                let len = f.len();
                if !mem.insert_protected((*id, i as u32), Arc::new(f), len) {
                    return Ok(Prefetched::BudgetReached);
                }
                keys.insert((*id, i as u32));
            }
        }
        Ok(Prefetched::Fetched { stored, raw })
    }

    /// The disk tier, if any.
    pub fn disk(&self) -> Option<&DiskTier> {
        self.disk.as_ref()
    }

    /// Counters and sizes now.
    pub fn report(&self) -> CacheReport {
        let s = &self.stats;
        let (h, m) = (s.mem_hits.load(Relaxed), s.mem_misses.load(Relaxed));
        CacheReport {
            mem_hits: h,
            mem_misses: m,
            mem_hit_rate: if h + m == 0 {
                0.0
            } else {
                h as f64 / (h + m) as f64
            },
            disk_hits: s.disk_hits.load(Relaxed),
            fill_waits: s.fill_waits.load(Relaxed),
            fill_hits: s.fill_hits.load(Relaxed),
            store_reads: s.store_reads.load(Relaxed),
            store_bytes: s.store_bytes.load(Relaxed),
            decoded_bytes: s.decoded_bytes.load(Relaxed),
            corrupt_chunks: s.corrupt.load(Relaxed),
            prestage_saved_reads: s.prestage_saved.load(Relaxed),
            readahead_chunks: s.readahead_chunks.load(Relaxed),
            readahead_hits: s.readahead_hits.load(Relaxed),
            seq_readahead_chunks: s.seq_readahead_chunks.load(Relaxed),
            seq_readahead_frames: s.seq_readahead_frames.load(Relaxed),
            readahead: self.readahead.report(),
            mem_bytes: self.mem.lock().map(|m| m.bytes() as u64).unwrap_or(0),
            mem_budget: self.mem_budget,
            disk_bytes: self.disk.as_ref().map(|d| d.bytes()).unwrap_or(0),
            disk_budget: self.disk.as_ref().map(|d| d.budget()).unwrap_or(0),
        }
    }

    /// Fetch `range` of chunk `id`'s stored file: disk tier first (verified by
    /// `check`), then the store (verified by `check`, then copied to the disk tier).
    fn fetch<T>(
        &self,
        id: &ChunkId,
        range: Range<u64>,
        class: ReadClass,
        check: impl Fn(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let len = (range.end - range.start) as usize;
        if let Some(file) = self.compressed_get(id) {
            let slice = file.get(range.start as usize..range.end as usize);
            match slice.map(&check) {
                Some(Ok(v)) => {
                    self.stats.readahead_hits.fetch_add(1, Relaxed);
                    return Ok(v);
                }
                // Damaged or short: forget it; the exact range is fetched below and
                // verified again (a corrupt store chunk is then reported).
                _ => {
                    if let Some(c) = &self.compressed {
                        c.remove(id);
                    }
                }
            }
        }
        // A hole (never fetched) or damage: fetched again from the store below.
        let from_disk = || {
            let v = check(&self.disk.as_ref()?.read(id, range.start, len)?).ok()?;
            self.stats.disk_hits.fetch_add(1, Relaxed);
            Some(v)
        };
        if let Some(v) = from_disk() {
            return Ok(v);
        }
        // Another mount on the host may be fetching these bytes: wait for it (the
        // lock is held until they are in the disk tier, below), then look again
        // (it may also have finished between the first look and the lock).
        let fill = self.lock_fill(id, range.clone(), class == ReadClass::Demand);
        if fill.is_some() {
            if let Some(v) = from_disk() {
                self.stats.fill_hits.fetch_add(1, Relaxed);
                return Ok(v);
            }
        }
        self.stats.store_reads.fetch_add(1, Relaxed);
        let started = Instant::now();
        let bytes = self.origin.read_range_as(id, range.start, len, class)?;
        self.readahead.observe_range(len, started.elapsed());
        self.stats
            .store_bytes
            .fetch_add(bytes.len() as u64, Relaxed);
        let v = check(&bytes).inspect_err(|_| {
            self.stats.corrupt.fetch_add(1, Relaxed);
        })?;
        if let Some(d) = &self.disk {
            // The cache is an optimisation: a full cache disk must not fail the read.
            let _ = d.write(id, range.start, &bytes);
        }
        Ok(v)
    }

    /// The verified layout (header + seek table) of chunk `id`, `chunk_len` bytes long.
    pub fn layout(&self, id: &ChunkId, chunk_len: u32) -> Result<Arc<ChunkLayout>> {
        if let Some(l) = self.layouts.lock().ok().and_then(|m| m.get(id).cloned()) {
            return Ok(l);
        }
        let prefix = ChunkLayout::prefix_len(chunk_len, self.frame_size) as u64;
        let layout =
            // A layout is small and every later read of the chunk waits for it:
            // fetched as demand whoever asks.
            Arc::new(self.fetch(id, 0..prefix, ReadClass::Demand, |b| {
                self.checked_layout(id, chunk_len, b)
            })?);
        if let Ok(mut m) = self.layouts.lock() {
            m.insert(*id, layout.clone());
        }
        Ok(layout)
    }

    /// Parse and authenticate a chunk's layout from `bytes` (its file's start), and
    /// check it against what the index says: the content length and the frame size.
    /// A chunk whose name is right but whose frame size differs from the index's is
    /// refused, so a crafted index cannot make frame arithmetic run off the table.
    fn checked_layout(&self, id: &ChunkId, chunk_len: u32, bytes: &[u8]) -> Result<ChunkLayout> {
        let layout = ChunkLayout::parse(id, bytes)?;
        let reason = if layout.content_len != chunk_len {
            format!(
                "holds {} bytes, the index expects {chunk_len}",
                layout.content_len
            )
        } else if layout.frame_size != self.frame_size {
            format!(
                "has frames of {} bytes, the index expects {}",
                layout.frame_size, self.frame_size
            )
        } else {
            return Ok(layout);
        };
        Err(Error::CorruptChunk {
            id: id.to_hex(),
            reason,
        })
    }

    /// True if the layout and every frame of `range` are in memory (no counting).
    fn frames_cached(&self, id: &ChunkId, range: Range<u32>) -> bool {
        let Some(layout) = self.layouts.lock().ok().and_then(|m| m.get(id).cloned()) else {
            return false;
        };
        let Ok(mem) = self.mem.lock() else {
            return false;
        };
        layout
            .frames_for(range)
            .all(|i| mem.contains(&(*id, i as u32)))
    }

    fn mem_get(&self, key: &FrameKey) -> Option<FrameBytes> {
        let r = self.mem.lock().ok()?.get(key);
        if r.is_some() {
            self.stats.mem_hits.fetch_add(1, Relaxed);
            self.note_hit(key);
        }
        r
    }

    /// Fetch, verify, decode and cache frames `frames` of a chunk (one range read);
    /// `ahead`: for a reader that has not asked for them yet (read-ahead).
    fn load_frames(
        &self,
        layout: &ChunkLayout,
        frames: Range<usize>,
        ahead: bool,
    ) -> Result<Vec<FrameBytes>> {
        let file_range = layout.file_range(frames.clone());
        let decoded = self.fetch(&layout.id, file_range, class_of(!ahead), |b| {
            let started = Instant::now();
            let frames = layout.decode_frames(frames.clone(), b)?;
            let bytes = frames.iter().map(Vec::len).sum();
            self.readahead.observe_decode(bytes, started.elapsed());
            Ok(frames)
        })?;
        let mut out = Vec::with_capacity(decoded.len());
        // A poisoned tier is an error: "loaded nothing" would make the reader fetch
        // the same frames again forever.
        {
            let mut mem = self.mem.lock().map_err(|_| poisoned())?;
            for (i, f) in frames.zip(decoded) {
                self.stats.decoded_bytes.fetch_add(f.len() as u64, Relaxed);
                let len = f.len();
                let f = Arc::new(f);
                if ahead {
                    mem.insert_unread((layout.id, i as u32), f.clone(), len);
                } else {
                    mem.insert((layout.id, i as u32), f.clone(), len);
                }
                out.push(f);
            }
        }
        Ok(out)
    }

    /// Fetch frames `mine` (sorted, claimed in `inflight` by the caller) in runs of
    /// adjacent ones, one range read per run, hand each decoded frame to `got`, then
    /// release the claims and wake whoever waits for them, whatever the outcome.
    fn load_claimed(
        &self,
        layout: &ChunkLayout,
        mine: &[usize],
        ahead: bool,
        mut got: impl FnMut(usize, FrameBytes),
    ) -> Result<()> {
        let keys: Vec<FrameKey> = mine.iter().map(|&i| (layout.id, i as u32)).collect();
        let _release = ReleaseOnDrop::new(&self.flight, keys);
        let mut result = Ok(());
        let mut start = 0;
        while start < mine.len() {
            let mut end = start + 1;
            while end < mine.len() && mine[end] == mine[end - 1] + 1 {
                end += 1;
            }
            match self.load_frames(layout, mine[start]..mine[end - 1] + 1, ahead) {
                Ok(fs) => {
                    for (k, f) in (mine[start]..).zip(fs) {
                        got(k, f);
                    }
                }
                Err(e) => result = Err(e),
            }
            start = end;
        }
        result
    }

    /// Sequential read-ahead of chunk `id` (`chunk_len` bytes of content): bring every
    /// frame that is neither in memory nor being fetched into the memory tier, as a
    /// demand read would (probation segment: a long scan still cannot flush the hot
    /// set). Not counted as demand: pre-staging does not yield to it, and a demand
    /// read of a frame it is fetching waits for it instead of fetching it again.
    /// Returns the number of frames it decoded.
    pub fn read_ahead(&self, id: &ChunkId, chunk_len: u32) -> Result<usize> {
        if self.frames_cached(id, 0..chunk_len) {
            return Ok(0);
        }
        if self.compressed.is_some() {
            // One request for the chunk (header, seek table and frames); errors are
            // not final here either: the range reads below retry and report them.
            let _ = self.fetch_whole_as(id, chunk_len, false);
        }
        let layout = self.layout(id, chunk_len)?;
        let missing: Vec<usize> = {
            let mem = self.mem.lock().map_err(|_| poisoned())?;
            (0..layout.frames.len())
                .filter(|&i| !mem.contains(&(*id, i as u32)))
                .collect()
        };
        // Frames someone else is fetching are theirs: no waiting here.
        let (mine, _) = self
            .flight
            .claim(missing.into_iter().map(|i| (*id, i as u32)), |_| false);
        let mine: Vec<usize> = mine.into_iter().map(|(_, i)| i as usize).collect();
        self.load_claimed(&layout, &mine, true, |_, _| {})?;
        if !mine.is_empty() {
            self.release_compressed_if_decoded(&layout);
            self.stats.seq_readahead_chunks.fetch_add(1, Relaxed);
            self.stats
                .seq_readahead_frames
                .fetch_add(mine.len() as u64, Relaxed);
        }
        Ok(mine.len())
    }

    /// Copy bytes `range` of chunk `id` into `out` only if every frame is in the
    /// memory tier (no I/O, no decoding); false otherwise, with nothing counted.
    pub fn read_if_cached(&self, id: &ChunkId, range: Range<u32>, out: &mut [u8]) -> bool {
        let Some(layout) = self.layouts.lock().ok().and_then(|m| m.get(id).cloned()) else {
            return false;
        };
        let Ok(mut mem) = self.mem.lock() else {
            return false;
        };
        let frames = layout.frames_for(range.clone());
        let mut got = Vec::with_capacity(frames.len());
        for i in frames.clone() {
            match mem.get(&(*id, i as u32)) {
                Some(f) => got.push(f),
                None => return false,
            }
        }
        drop(mem);
        self.stats.mem_hits.fetch_add(got.len() as u64, Relaxed);
        for i in frames.clone() {
            self.note_hit(&(*id, i as u32));
        }
        copy_out(self.frame_size, frames.start, &got, range, out).is_ok()
    }

    /// Copy bytes `range` of chunk `id` (whose content is `chunk_len` bytes) into `out`.
    pub fn read(
        &self,
        id: &ChunkId,
        chunk_len: u32,
        range: Range<u32>,
        out: &mut [u8],
    ) -> Result<()> {
        let demand = !in_background();
        // Read-ahead: a demand miss in a chunk may bring the whole compressed chunk
        // (one request; the policy decides by measured request times); frames are
        // still decoded only when read. Errors here are not final: the exact-range
        // path below retries and reports them.
        if self.compressed.is_some()
            && !self.compressed_has(id)
            && !self.frames_cached(id, range.clone())
        {
            let layout_known = self.layouts.lock().is_ok_and(|m| m.contains_key(id));
            if self.readahead.choose(layout_known) == Fetch::WholeChunk {
                let _ = self.fetch_whole_as(id, chunk_len, demand);
            }
        }
        let layout = self.layout(id, chunk_len)?;
        let frames = layout.frames_for(range.clone());
        let mut have: HashMap<usize, FrameBytes> = HashMap::new();
        loop {
            let mut missing = Vec::new();
            for i in frames.clone() {
                if have.contains_key(&i) {
                    continue;
                }
                match self.mem_get(&(*id, i as u32)) {
                    Some(f) => {
                        have.insert(i, f);
                    }
                    None => missing.push(i),
                }
            }
            if missing.is_empty() {
                break;
            }
            self.stats
                .mem_misses
                .fetch_add(missing.len() as u64, Relaxed);
            // Claim the frames nobody is fetching; remember one we must wait for.
            let (mine, wait_for) = self
                .flight
                .claim(missing.iter().map(|&i| (*id, i as u32)), |_| false);
            let mine: Vec<usize> = mine.into_iter().map(|(_, i)| i as usize).collect();
            let result = {
                let _demand = demand.then(|| self.demand.enter());
                self.load_claimed(&layout, &mine, !demand, |k, f| {
                    have.insert(k, f);
                })
            };
            result?;
            if !mine.is_empty() {
                self.release_compressed_if_decoded(&layout);
            }
            if let Some(w) = wait_for {
                w.wait();
            }
        }
        let got = frames
            .clone()
            .map(|i| have.remove(&i).ok_or_else(poisoned))
            .collect::<Result<Vec<_>>>()?;
        copy_out(self.frame_size, frames.start, &got, range, out)
    }
}

/// Copy `range` of a chunk out of its decoded frames `frames` (starting at frame
/// number `first`) into `out`. Every index is checked: frames shorter than the frame
/// size or fewer than the range needs are an error, never a panic.
fn copy_out(
    frame_size: u32,
    first: usize,
    frames: &[FrameBytes],
    range: Range<u32>,
    out: &mut [u8],
) -> Result<()> {
    let short = || Error::Invalid(format!("read cache: frames do not cover bytes {range:?}"));
    if frame_size == 0 || out.len() < (range.end.saturating_sub(range.start)) as usize {
        return Err(short());
    }
    let mut pos = range.start;
    let mut written = 0usize;
    while pos < range.end {
        let f = ((pos / frame_size) as usize)
            .checked_sub(first)
            .and_then(|i| frames.get(i))
            .ok_or_else(short)?;
        let in_frame = (pos % frame_size) as usize;
        if in_frame >= f.len() {
            return Err(short());
        }
        let n = ((range.end - pos) as usize).min(f.len() - in_frame);
        out[written..written + n].copy_from_slice(&f[in_frame..in_frame + n]);
        written += n;
        pos += n as u32;
    }
    Ok(())
}

thread_local! {
    static BACKGROUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with every cache read it makes counted as background work, not as the
/// VM's demand: it does not hold the demand gauge (so pre-staging and migration do
/// not wait for each other), asks the store with background priority, and its frames
/// enter the memory tier's probation segment (a copy of the whole disk is a scan).
/// Used by a live migration's copier, which reads through the whole stack.
pub fn as_background<R>(f: impl FnOnce() -> R) -> R {
    let before = BACKGROUND.with(|b| b.replace(true));
    let r = f();
    BACKGROUND.with(|b| b.set(before));
    r
}

fn in_background() -> bool {
    BACKGROUND.with(|b| b.get())
}

/// The store's priority for a fetch: demand reads go first at back ends that queue
/// requests (S3); pre-staging and read-ahead wait behind them.
fn class_of(demand: bool) -> ReadClass {
    if demand {
        ReadClass::Demand
    } else {
        ReadClass::Background
    }
}

fn poisoned() -> Error {
    Error::Invalid("read cache: internal lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::test_utils::{self, mem_store};
    use super::*;
    use livemount_store::format::chunk;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;

    /// An in-memory store of one chunk that counts and slows down its reads.
    struct SlowSource {
        id: ChunkId,
        file: Vec<u8>,
        reads: AtomicU64,
    }

    impl ChunkSource for SlowSource {
        fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
            assert_eq!(*id, self.id);
            self.reads.fetch_add(1, Relaxed);
            std::thread::sleep(Duration::from_millis(30));
            let end = (offset as usize + len).min(self.file.len());
            Ok(self.file[offset as usize..end].to_vec())
        }
        fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>> {
            self.read_range(id, 0, limit as usize + 1)
        }
    }

    /// Records the priority class of every frame read it serves (layout reads of
    /// a header-sized prefix are left out: always demand).
    struct ClassSource {
        inner: Arc<SlowSource>,
        seen: std::sync::Mutex<Vec<ReadClass>>,
    }

    impl ChunkSource for ClassSource {
        fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
            self.read_range_as(id, offset, len, ReadClass::Demand)
        }
        fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>> {
            self.read_all_as(id, limit, ReadClass::Demand)
        }
        fn read_range_as(&self, id: &ChunkId, o: u64, len: usize, c: ReadClass) -> Result<Vec<u8>> {
            if o > 0 {
                self.seen.lock().unwrap().push(c);
            }
            self.inner.read_range(id, o, len)
        }
        fn read_all_as(&self, id: &ChunkId, limit: u64, c: ReadClass) -> Result<Vec<u8>> {
            self.seen.lock().unwrap().push(c);
            self.inner.read_all(id, limit)
        }
    }

    #[test]
    fn prestaging_and_read_ahead_ask_the_store_as_background_demand_reads_as_demand() {
        let (slow, data) = source();
        let id = slow.id;
        let src = Arc::new(ClassSource {
            inner: slow,
            seen: std::sync::Mutex::new(Vec::new()),
        });
        let take = || std::mem::take(&mut *src.seen.lock().unwrap());
        let cache = ReadCache::new(src.clone(), 8 << 20, None, 65536);
        let mut out = vec![0u8; 4096];
        cache
            .read(&id, data.len() as u32, 0..4096, &mut out)
            .unwrap();
        assert_eq!(take(), [ReadClass::Demand]);
        cache.prefetch(&id, data.len() as u32, 4..6, true).unwrap();
        assert_eq!(take(), [ReadClass::Background]);
        cache.read_ahead(&id, data.len() as u32).unwrap();
        let seen = take();
        assert!(
            !seen.is_empty() && seen.iter().all(|c| *c == ReadClass::Background),
            "{seen:?}"
        );
    }

    fn source() -> (Arc<SlowSource>, Vec<u8>) {
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i / 3 % 251) as u8).collect();
        let d = chunk::digest(&data, 65536);
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        let file = chunk::encode(&data, 65536, &d, &mut c).unwrap();
        (
            Arc::new(SlowSource {
                id: d.id,
                file,
                reads: AtomicU64::new(0),
            }),
            data,
        )
    }

    #[test]
    fn concurrent_misses_fetch_once() {
        let (src, data) = source();
        let cache = Arc::new(ReadCache::new(src.clone(), 8 << 20, None, 65536));
        let id = src.id;
        cache.layout(&id, 1 << 20).unwrap();
        let before = src.reads.load(Relaxed);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut out = vec![0u8; 4096];
                    cache.read(&id, 1 << 20, 70_000..74_096, &mut out).unwrap();
                    assert_eq!(out, data[70_000..74_096]);
                });
            }
        });
        assert_eq!(
            src.reads.load(Relaxed) - before,
            1,
            "four concurrent misses on one frame, one fetch"
        );
        // A read of two adjacent missing frames is one range read.
        let mut out = vec![0u8; 100_000];
        cache
            .read(&id, 1 << 20, 200_000..300_000, &mut out)
            .unwrap();
        assert_eq!(out, data[200_000..300_000]);
        assert_eq!(src.reads.load(Relaxed) - before, 2);
    }

    /// Two mounts (their own caches and disk-tier handles, as in two processes)
    /// over one host cache directory miss the same frame at once: one store fetch,
    /// the other waits for it and reads it from the disk tier.
    #[test]
    fn two_mounts_sharing_a_host_cache_fetch_a_chunk_once() {
        let (src, data) = source();
        let id = src.id;
        let dir = tempfile::tempdir().unwrap();
        let cache = |_| {
            let disk = DiskTier::open(dir.path(), 64 << 20).unwrap();
            ReadCache::new(src.clone(), 8 << 20, Some(disk), 65536)
        };
        let (a, b) = (cache(0), cache(1));
        a.layout(&id, 1 << 20).unwrap();
        b.layout(&id, 1 << 20).unwrap();
        let before = src.reads.load(Relaxed);
        assert_eq!(
            before, 1,
            "the second mount's layout came from the disk tier"
        );
        let go = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for c in [&a, &b] {
                let (go, data) = (&go, &data);
                s.spawn(move || {
                    go.wait();
                    let mut out = vec![0u8; 4096];
                    c.read(&id, 1 << 20, 70_000..74_096, &mut out).unwrap();
                    assert_eq!(out, data[70_000..74_096]);
                });
            }
        });
        assert_eq!(
            src.reads.load(Relaxed) - before,
            1,
            "one fetch for both mounts"
        );
    }

    /// Whole-chunk fetches share the same way: one request for the file.
    #[test]
    fn two_mounts_sharing_a_host_cache_fetch_a_whole_chunk_once() {
        let (src, data) = source();
        let id = src.id;
        let dir = tempfile::tempdir().unwrap();
        let cache = |_| {
            let disk = DiskTier::open(dir.path(), 64 << 20).unwrap();
            ReadCache::new(src.clone(), 8 << 20, Some(disk), 65536)
                .with_chunk_readahead(ReadAheadMode::Always, 4 << 20)
        };
        let (a, b) = (cache(0), cache(1));
        let go = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for c in [&a, &b] {
                let (go, data) = (&go, &data);
                s.spawn(move || {
                    go.wait();
                    let mut out = vec![0u8; 4096];
                    c.read(&id, 1 << 20, 500_000..504_096, &mut out).unwrap();
                    assert_eq!(out, data[500_000..504_096]);
                });
            }
        });
        assert_eq!(src.reads.load(Relaxed), 1, "one whole-chunk fetch for both");
    }

    #[test]
    fn a_fill_lock_excludes_overlapping_ranges_only_and_its_wait_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let tier = || DiskTier::open(dir.path(), 1 << 20).unwrap();
        let (a, b, c) = (tier(), tier(), tier());
        let (id, other_id) = (ChunkId([7; 32]), ChunkId([8; 32]));
        let held = a
            .lock_fill(&id, 0..100, true, Duration::ZERO)
            .expect("free");
        assert!(!held.waited);
        let t = Instant::now();
        let wait = Duration::from_millis(50);
        assert!(b.lock_fill(&id, 50..150, true, wait).is_none());
        assert!(t.elapsed() >= wait);
        // After a timed-out wait, that tier does not wait on the chunk again.
        let t = Instant::now();
        assert!(b
            .lock_fill(&id, 50..150, true, Duration::from_secs(10))
            .is_none());
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "waited again on a stuck fill"
        );
        let other = b
            .lock_fill(&id, 100..200, true, Duration::ZERO)
            .expect("disjoint");
        assert!(!other.waited);
        drop(other);
        // A background fill waits for a demand fill of its bytes; a demand fill
        // never waits for a background one.
        let held2 = a
            .lock_fill(&other_id, 0..100, true, Duration::ZERO)
            .expect("free");
        assert!(c
            .lock_fill(&other_id, 0..100, false, Duration::ZERO)
            .is_none());
        drop(held2);
        let bg = c
            .lock_fill(&other_id, 200..300, false, Duration::ZERO)
            .expect("free");
        let d = a
            .lock_fill(&other_id, 200..300, true, Duration::ZERO)
            .expect("demand first");
        drop((bg, d));
        // Released by the holder (or by its process's death): taken after a wait.
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                drop(held);
            });
            let l = c
                .lock_fill(&id, 0..100, true, Duration::from_secs(10))
                .expect("released");
            assert!(l.waited);
        });
    }

    #[test]
    fn disk_tier_survives_restart_and_is_verified() {
        let (src, data) = source();
        let dir = tempfile::tempdir().unwrap();
        let id = src.id;
        {
            let disk = DiskTier::open(dir.path(), 64 << 20).unwrap();
            let cache = ReadCache::new(src.clone(), 8 << 20, Some(disk), 65536);
            let mut out = vec![0u8; 4096];
            cache.read(&id, 1 << 20, 0..4096, &mut out).unwrap();
        }
        let reads = src.reads.load(Relaxed);
        // A new daemon: served from the disk tier, no store reads.
        let disk = DiskTier::open(dir.path(), 64 << 20).unwrap();
        assert!(disk.bytes() > 0);
        let cache = ReadCache::new(src.clone(), 8 << 20, Some(disk), 65536);
        let mut out = vec![0u8; 4096];
        cache.read(&id, 1 << 20, 0..4096, &mut out).unwrap();
        assert_eq!(out, data[..4096]);
        assert_eq!(src.reads.load(Relaxed), reads);
        assert_eq!(cache.report().disk_hits, 2);
        // Damage the cached copy of frame 0 (the cache file ends with it): the next
        // daemon detects it and refetches, never returning the damaged bytes.
        let path = dir.path().join(id.to_hex());
        let mut f = std::fs::read(&path).unwrap();
        let frame0 = ChunkLayout::parse(&id, &f).unwrap().frames[0];
        assert_eq!(
            f.len() as u64,
            frame0.file_offset + frame0.stored_len as u64
        );
        let at = f.len() - 10;
        f[at] ^= 0xff;
        std::fs::write(&path, &f).unwrap();
        let cache = ReadCache::new(
            src.clone(),
            8 << 20,
            Some(DiskTier::open(dir.path(), 64 << 20).unwrap()),
            65536,
        );
        let mut out = vec![0u8; 4096];
        cache.read(&id, 1 << 20, 0..4096, &mut out).unwrap();
        assert_eq!(out, data[..4096]);
        assert_eq!(
            src.reads.load(Relaxed),
            reads + 1,
            "the damaged frame was fetched again"
        );
        assert_eq!(
            cache.report().corrupt_chunks,
            0,
            "damage in the cache is not damage in the store"
        );
    }

    #[test]
    fn chunk_readahead_is_one_request_and_lazy_decoding() {
        let (src, data) = source();
        let id = src.id;
        let cache = ReadCache::new(src.clone(), 8 << 20, None, 65536)
            .with_chunk_readahead(ReadAheadMode::Always, 4 << 20);
        let mut out = vec![0u8; 4096];
        cache.read(&id, 1 << 20, 0..4096, &mut out).unwrap();
        assert_eq!(out, data[..4096]);
        assert_eq!(
            src.reads.load(Relaxed),
            1,
            "layout and frames from one whole-chunk read"
        );
        for at in [300_000u32, 700_000, 1_000_000] {
            cache.read(&id, 1 << 20, at..at + 4096, &mut out).unwrap();
            assert_eq!(out, data[at as usize..at as usize + 4096]);
        }
        assert_eq!(src.reads.load(Relaxed), 1);
        let r = cache.report();
        assert_eq!(
            r.decoded_bytes,
            4 * 65536,
            "only the frames read are decoded"
        );
        assert_eq!(r.readahead_chunks, 1);
        // Reading the rest decodes every frame: the compressed copy is released,
        // and the data still reads back from the memory tier without a store read.
        assert!(cache.compressed_has(&id));
        let mut all = vec![0u8; 1 << 20];
        cache.read(&id, 1 << 20, 0..1 << 20, &mut all).unwrap();
        assert_eq!(all, data);
        assert!(
            !cache.compressed_has(&id),
            "compressed copy kept after full decode"
        );
        assert!(cache.read_if_cached(&id, 0..1 << 20, &mut all));
        assert_eq!(src.reads.load(Relaxed), 1);
    }

    /// Cold 4 KiB reads, one per chunk, through `auto` read-ahead over `store`.
    fn cold_reads(store: Arc<dyn ChunkSource>, chunks: &[(ChunkId, Vec<u8>)]) -> CacheReport {
        let cache = ReadCache::new(store, 64 << 20, None, 65536)
            .with_chunk_readahead(ReadAheadMode::Auto, 16 << 20);
        let mut out = vec![0u8; 4096];
        for (n, (id, data)) in chunks.iter().enumerate() {
            let at = ((n as u32 * 200_000) % (1 << 20)) & !4095;
            cache.read(id, 1 << 20, at..at + 4096, &mut out).unwrap();
            assert_eq!(out, data[at as usize..at as usize + 4096]);
        }
        cache.report()
    }

    #[test]
    fn auto_readahead_fetches_whole_chunks_from_a_latency_bound_store() {
        let (mem, chunks) = mem_store(8);
        let remote = livemount_store::backend::throttle::ThrottledSource::new(
            mem,
            Duration::from_millis(5),
            None,
        );
        let r = cold_reads(Arc::new(remote), &chunks);
        // First miss: whole chunk (nothing measured); second: frames (to measure a
        // small request); then a whole chunk costs about one request: whole chunks.
        assert_eq!(r.readahead.frame_misses, 1, "{r:?}");
        assert_eq!(r.readahead.whole_chunk_misses, 7, "{r:?}");
        assert_eq!(r.readahead_chunks, 7);
    }

    #[test]
    fn auto_readahead_fetches_frames_from_a_bandwidth_bound_store() {
        let (mem, chunks) = mem_store(8);
        let whole: u64 = chunks.iter().map(|(id, _)| mem.0[id].len() as u64).sum();
        // 10 MB/s, no latency: a ~530 KB chunk costs ~50 ms, a frame ~3 ms.
        let slow = livemount_store::backend::throttle::ThrottledSource::new(
            mem,
            Duration::ZERO,
            Some(10_000_000),
        );
        let r = cold_reads(Arc::new(slow), &chunks);
        assert_eq!(r.readahead.whole_chunk_misses, 1, "{r:?}");
        assert_eq!(r.readahead.frame_misses, 7, "{r:?}");
        assert!(
            r.store_bytes < whole / 4,
            "fetched {} of {whole} bytes",
            r.store_bytes
        );
    }

    #[test]
    fn chunk_readahead_never_returns_damaged_bytes() {
        let (src, _) = source();
        let mut bad = SlowSource {
            id: src.id,
            file: src.file.clone(),
            reads: AtomicU64::new(0),
        };
        let at = bad.file.len() - 100;
        bad.file[at] ^= 1;
        let bad = Arc::new(bad);
        let cache = ReadCache::new(bad.clone(), 8 << 20, None, 65536)
            .with_chunk_readahead(ReadAheadMode::Always, 4 << 20);
        let mut out = vec![0u8; 4096];
        // Early frames are intact and read fine; the damaged last frame is an error
        // naming the chunk, after one retry of the exact range from the store.
        cache.read(&bad.id, 1 << 20, 0..4096, &mut out).unwrap();
        let e = cache
            .read(&bad.id, 1 << 20, (1 << 20) - 4096..1 << 20, &mut out)
            .unwrap_err();
        assert!(e.to_string().contains(&bad.id.to_hex()), "{e}");
        assert_eq!(cache.report().corrupt_chunks, 1);
    }

    #[test]
    fn a_chunk_with_another_frame_size_than_the_index_is_an_error_not_a_panic() {
        // A crafted store: the chunk is valid under its name but was written with
        // other frames than the index (and so the cache) says, 64 KiB. Frame
        // arithmetic on the index's size indexed past the frame list, or — a read
        // across two 128 KiB frames — copied the wrong frame's bytes.
        let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
        for chunk_frames in [16384u32, 131072] {
            let d = chunk::digest(&data, chunk_frames);
            let mut c = zstd::bulk::Compressor::new(1).unwrap();
            let file = chunk::encode(&data, chunk_frames, &d, &mut c).unwrap();
            let mut files = HashMap::new();
            files.insert(d.id, file);
            let src = Arc::new(test_utils::MemSource(files));
            for readahead in [ReadAheadMode::Off, ReadAheadMode::Always] {
                let cache = ReadCache::new(src.clone(), 8 << 20, None, 65536)
                    .with_chunk_readahead(readahead, 4 << 20);
                for range in [126_976..135_168u32, 100_000..300_000] {
                    let mut out = vec![0u8; (range.end - range.start) as usize];
                    let e = cache.read(&d.id, 1 << 20, range.clone(), &mut out);
                    let e = e.expect_err("wrong frames must never be read");
                    assert!(matches!(e, Error::CorruptChunk { .. }), "{e}");
                    assert!(e.to_string().contains(&d.id.to_hex()), "{e}");
                }
            }
        }
    }

    #[test]
    fn copy_out_checks_every_index() {
        let frames: Vec<FrameBytes> = vec![Arc::new(vec![1u8; 100]), Arc::new(vec![2u8; 50])];
        let mut out = vec![0u8; 150];
        copy_out(100, 0, &frames, 0..150, &mut out).unwrap();
        assert_eq!(out[99..101], [1, 2]);
        // Fewer frames than the range needs, a short frame, a short buffer, a frame
        // number below the first: errors.
        assert!(copy_out(100, 0, &frames, 0..250, &mut vec![0u8; 250]).is_err());
        assert!(copy_out(100, 0, &frames[1..], 0..100, &mut out).is_err());
        assert!(copy_out(100, 0, &frames, 0..150, &mut [0u8; 10]).is_err());
        assert!(copy_out(100, 1, &frames, 0..10, &mut out).is_err());
        assert!(copy_out(0, 0, &frames, 0..10, &mut out).is_err());
    }
}
