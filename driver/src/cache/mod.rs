//! The zstd-aware read cache between the snapshot index and the chunk source.
//!
//! A read of bytes `a..b` of a chunk fetches and decodes only the frames covering
//! `a..b`; adjacent missing frames are fetched with one range read. Decoded frames
//! live in the [memory tier](memory); the compressed bytes fetched from the store are
//! kept in the optional [disk tier](disk). Everything read from the store or the disk
//! tier is verified against the chunk id before use: a chunk that fails is an error
//! naming it (EIO to the block layer), never wrong bytes. Concurrent misses on one
//! frame fetch it once: later readers wait for the first.

pub mod disk;
pub mod memory;
pub mod readahead;
#[cfg(test)]
pub(crate) mod test_utils;

use crate::error::Result;
use crate::store::chunk::{ChunkId, ChunkLayout};
use crate::store::source::ChunkSource;
use disk::DiskTier;
use hashbrown::HashMap;
use memory::{FrameBytes, TwoQueue};
use readahead::{Fetch, ReadAheadMode, ReadAheadPolicy, ReadAheadReport};
use serde::Serialize;
use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// Counters of the read cache (all monotonic).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Frame lookups served from memory.
    pub mem_hits: AtomicU64,
    /// Frame lookups that missed memory.
    pub mem_misses: AtomicU64,
    /// Range reads served by the disk tier (verified).
    pub disk_hits: AtomicU64,
    /// Range reads that went to the chunk source.
    pub store_reads: AtomicU64,
    /// Compressed bytes read from the chunk source.
    pub store_bytes: AtomicU64,
    /// Bytes decoded (uncompressed output of frames).
    pub decoded_bytes: AtomicU64,
    /// Chunks that failed verification (from the store).
    pub corrupt: AtomicU64,
    /// Demand reads of frames that pre-staging had brought in.
    pub prestage_saved: AtomicU64,
    /// Whole chunks fetched by read-ahead.
    pub readahead_chunks: AtomicU64,
    /// Ranges served from read-ahead chunks (store requests saved).
    pub readahead_hits: AtomicU64,
    /// Chunks brought in by sequential read-ahead.
    pub seq_readahead_chunks: AtomicU64,
    /// Frames decoded by sequential read-ahead.
    pub seq_readahead_frames: AtomicU64,
}

/// A snapshot of [`CacheStats`] plus sizes, for `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct CacheReport {
    /// Memory-tier frame hits.
    pub mem_hits: u64,
    /// Memory-tier frame misses.
    pub mem_misses: u64,
    /// mem_hits / (hits + misses).
    pub mem_hit_rate: f64,
    /// Disk-tier hits.
    pub disk_hits: u64,
    /// Range reads from the store.
    pub store_reads: u64,
    /// Compressed bytes fetched from the store.
    pub store_bytes: u64,
    /// Bytes decoded.
    pub decoded_bytes: u64,
    /// Chunks that failed verification.
    pub corrupt_chunks: u64,
    /// Demand frame reads served from pre-staged frames.
    pub prestage_saved_reads: u64,
    /// Whole chunks fetched by read-ahead.
    pub readahead_chunks: u64,
    /// Ranges served from read-ahead chunks.
    pub readahead_hits: u64,
    /// Chunks brought in by sequential read-ahead (streams ahead of the reader).
    pub seq_readahead_chunks: u64,
    /// Frames decoded by sequential read-ahead.
    pub seq_readahead_frames: u64,
    /// The read-ahead policy's choices and the store request times it measured.
    pub readahead: ReadAheadReport,
    /// Bytes held by the memory tier.
    pub mem_bytes: u64,
    /// Memory budget.
    pub mem_budget: u64,
    /// Bytes held by the disk tier.
    pub disk_bytes: u64,
    /// Disk budget.
    pub disk_budget: u64,
}

type FrameKey = (ChunkId, u32);
type Waiter = Arc<(Mutex<bool>, Condvar)>;

/// The read cache.
pub struct ReadCache {
    origin: Arc<dyn ChunkSource>,
    disk: Option<DiskTier>,
    mem: Mutex<TwoQueue<FrameKey, FrameBytes>>,
    mem_budget: u64,
    layouts: Mutex<HashMap<ChunkId, Arc<ChunkLayout>>>,
    inflight: Mutex<HashMap<FrameKey, Waiter>>,
    frame_size: u32,
    /// Demand fetches in progress: pre-staging yields to them.
    demand_inflight: AtomicUsize,
    /// Frames brought in by pre-staging and not yet read (for "reads saved").
    prestaged: Mutex<HashSet<FrameKey>>,
    /// Chunk read-ahead: whole compressed chunk files fetched on a demand miss (one
    /// store request instead of one per run of frames), kept compressed and decoded
    /// lazily, frame by frame, as reads need them.
    compressed: Option<Mutex<TwoQueue<ChunkId, Arc<Vec<u8>>>>>,
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
            inflight: Mutex::new(HashMap::new()),
            frame_size,
            demand_inflight: AtomicUsize::new(0),
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
        self.compressed = on.then(|| Mutex::new(TwoQueue::new(budget as usize)));
        self.readahead = ReadAheadPolicy::new(if on { mode } else { ReadAheadMode::Off });
        self
    }

    fn compressed_get(&self, id: &ChunkId) -> Option<Arc<Vec<u8>>> {
        self.compressed.as_ref()?.lock().ok()?.get(id)
    }

    fn compressed_has(&self, id: &ChunkId) -> bool {
        self.compressed
            .as_ref()
            .and_then(|c| c.lock().ok().map(|c| c.contains(id)))
            .unwrap_or(false)
    }

    /// Read-ahead: fetch chunk `id`'s whole file with one request (single flight) into
    /// the compressed tier (and the disk tier). Bytes are verified later, range by
    /// range, when frames are decoded from them.
    fn fetch_whole(&self, id: &ChunkId) -> Result<()> {
        self.fetch_whole_as(id, true)
    }

    /// [`fetch_whole`](Self::fetch_whole), counted as a demand fetch or not.
    fn fetch_whole_as(&self, id: &ChunkId, demand: bool) -> Result<()> {
        let key = (*id, u32::MAX);
        let waiter = {
            let mut inflight = self.inflight.lock().map_err(|_| poisoned())?;
            if self.compressed_has(id) {
                return Ok(());
            }
            match inflight.get(&key) {
                Some(w) => Some(w.clone()),
                None => {
                    inflight.insert(key, Arc::new((Mutex::new(false), Condvar::new())));
                    None
                }
            }
        };
        if let Some(w) = waiter {
            let mut done = w.0.lock().map_err(|_| poisoned())?;
            while !*done {
                done = w.1.wait(done).map_err(|_| poisoned())?;
            }
            return Ok(());
        }
        if demand {
            self.demand_inflight.fetch_add(1, Relaxed);
        }
        let started = Instant::now();
        let res = self.origin.read_all(id).map(|bytes| {
            self.readahead.observe_whole_chunk(started.elapsed());
            self.stats.store_reads.fetch_add(1, Relaxed);
            self.stats
                .store_bytes
                .fetch_add(bytes.len() as u64, Relaxed);
            self.stats.readahead_chunks.fetch_add(1, Relaxed);
            if let Some(d) = &self.disk {
                let _ = d.write(id, 0, &bytes);
            }
            if let Some(c) = &self.compressed {
                if let Ok(mut c) = c.lock() {
                    let len = bytes.len();
                    c.insert(*id, Arc::new(bytes), len);
                }
            }
        });
        if demand {
            self.demand_inflight.fetch_sub(1, Relaxed);
        }
        if let Ok(mut inflight) = self.inflight.lock() {
            if let Some(w) = inflight.remove(&key) {
                if let Ok(mut done) = w.0.lock() {
                    *done = true;
                }
                w.1.notify_all();
            }
        }
        res
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
            if let Ok(mut c) = c.lock() {
                c.remove(&layout.id);
            }
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
        self.demand_inflight.load(Relaxed)
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
        let decoded = self.fetch(id, stored_range, |b| layout.decode_frames(run.clone(), b))?;
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
                        if let Ok(mut c) = c.lock() {
                            c.remove(id);
                        }
                    }
                }
            }
        }
        if let Some(d) = &self.disk {
            if let Some(bytes) = d.read(id, range.start, len) {
                if let Ok(v) = check(&bytes) {
                    self.stats.disk_hits.fetch_add(1, Relaxed);
                    return Ok(v);
                }
                // A hole (never fetched) or damage: fetch again from the store below.
            }
        }
        self.stats.store_reads.fetch_add(1, Relaxed);
        let started = Instant::now();
        let bytes = self.origin.read_range(id, range.start, len)?;
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
        let layout = Arc::new(self.fetch(id, 0..prefix, |b| ChunkLayout::parse(id, b))?);
        if layout.content_len != chunk_len {
            return Err(crate::error::Error::CorruptChunk {
                id: id.to_hex(),
                reason: format!(
                    "holds {} bytes, the index expects {chunk_len}",
                    layout.content_len
                ),
            });
        }
        if let Ok(mut m) = self.layouts.lock() {
            m.insert(*id, layout.clone());
        }
        Ok(layout)
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
        let decoded = self.fetch(&layout.id, file_range, |b| {
            let started = Instant::now();
            let frames = layout.decode_frames(frames.clone(), b)?;
            let bytes = frames.iter().map(Vec::len).sum();
            self.readahead.observe_decode(bytes, started.elapsed());
            Ok(frames)
        })?;
        let mut out = Vec::with_capacity(decoded.len());
        if let Ok(mut mem) = self.mem.lock() {
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
        if let Ok(mut inflight) = self.inflight.lock() {
            for &i in mine {
                if let Some(w) = inflight.remove(&(layout.id, i as u32)) {
                    if let Ok(mut done) = w.0.lock() {
                        *done = true;
                    }
                    w.1.notify_all();
                }
            }
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
            let _ = self.fetch_whole_as(id, false);
        }
        let layout = self.layout(id, chunk_len)?;
        let missing: Vec<usize> = {
            let mem = self.mem.lock().map_err(|_| poisoned())?;
            (0..layout.frames.len())
                .filter(|&i| !mem.contains(&(*id, i as u32)))
                .collect()
        };
        let mine: Vec<usize> = {
            let mut inflight = self.inflight.lock().map_err(|_| poisoned())?;
            missing
                .into_iter()
                .filter(|&i| {
                    let key = (*id, i as u32);
                    if inflight.contains_key(&key) {
                        return false;
                    }
                    inflight.insert(key, Arc::new((Mutex::new(false), Condvar::new())));
                    true
                })
                .collect()
        };
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
        copy_out(self.frame_size, frames.start, &got, range, out);
        true
    }

    /// Copy bytes `range` of chunk `id` (whose content is `chunk_len` bytes) into `out`.
    pub fn read(
        &self,
        id: &ChunkId,
        chunk_len: u32,
        range: Range<u32>,
        out: &mut [u8],
    ) -> Result<()> {
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
                let _ = self.fetch_whole(id);
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
            let mut mine = Vec::new();
            let mut wait_for = None;
            if let Ok(mut inflight) = self.inflight.lock() {
                for &i in &missing {
                    match inflight.get(&(*id, i as u32)) {
                        Some(w) => wait_for = Some(w.clone()),
                        None => {
                            inflight.insert(
                                (*id, i as u32),
                                Arc::new((Mutex::new(false), Condvar::new())),
                            );
                            mine.push(i);
                        }
                    }
                }
            }
            self.demand_inflight.fetch_add(1, Relaxed);
            let result = self.load_claimed(&layout, &mine, false, |k, f| {
                have.insert(k, f);
            });
            self.demand_inflight.fetch_sub(1, Relaxed);
            result?;
            if !mine.is_empty() {
                self.release_compressed_if_decoded(&layout);
            }
            if let Some(w) = wait_for {
                let mut done = w.0.lock().map_err(|_| poisoned())?;
                while !*done {
                    done = w.1.wait(done).map_err(|_| poisoned())?;
                }
            }
        }
        let got = frames
            .clone()
            .map(|i| have.remove(&i).ok_or_else(poisoned))
            .collect::<Result<Vec<_>>>()?;
        copy_out(self.frame_size, frames.start, &got, range, out);
        Ok(())
    }
}

/// Copy `range` of a chunk out of its decoded frames `frames` (starting at frame
/// number `first`).
fn copy_out(
    frame_size: u32,
    first: usize,
    frames: &[FrameBytes],
    range: Range<u32>,
    out: &mut [u8],
) {
    let mut pos = range.start;
    let mut written = 0usize;
    while pos < range.end {
        let f = &frames[(pos / frame_size) as usize - first];
        let in_frame = (pos % frame_size) as usize;
        let n = ((range.end - pos) as usize).min(f.len() - in_frame);
        crate::copy::copy_bytes(&mut out[written..written + n], &f[in_frame..in_frame + n]);
        written += n;
        pos += n as u32;
    }
}

fn poisoned() -> crate::error::Error {
    crate::error::Error::Invalid("read cache: internal lock poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::test_utils::mem_store;
    use super::*;
    use crate::store::chunk;
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
        fn read_all(&self, id: &ChunkId) -> Result<Vec<u8>> {
            self.read_range(id, 0, usize::MAX / 2)
        }
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
        let remote =
            crate::store::throttle::ThrottledSource::new(mem, Duration::from_millis(5), None);
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
        let slow =
            crate::store::throttle::ThrottledSource::new(mem, Duration::ZERO, Some(10_000_000));
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
}
