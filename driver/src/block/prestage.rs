//! Pre-staging: bring the frames a profile says a VM reads first into the read cache,
//! before the VM starts, then keep fetching ahead of it in profile order.
//!
//! A profile's extents (disk offsets, in first-access order) map to frames of chunks
//! through the snapshot index. The plan is one step per chunk and contiguous run of
//! needed frames, ordered by first access; zero chunks are skipped (they read as zeros
//! without the store). Steps run on a few threads (remote storage hides latency with
//! parallel requests), yield to demand reads (a step does not start while a demand
//! fetch is in flight), and stop at the cache budget instead of evicting the hot set.

use crate::cache::{Prefetched, ReadCache};
use crate::error::{Error, Result};
use livemount_store::format::index::{ChunkRef, SnapshotIndex};
use livemount_store::format::profile::Profile;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How much of a profile to stage before the device is reported ready.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PrestageWindow {
    /// Nothing before ready (still prefetches in the background).
    None,
    /// Everything the profile reads within the first this many seconds.
    Seconds(f64),
    /// The whole profile.
    All,
}

impl std::str::FromStr for PrestageWindow {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(PrestageWindow::None),
            "all" => Ok(PrestageWindow::All),
            _ => s
                .trim_end_matches('s')
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .map(PrestageWindow::Seconds)
                .ok_or_else(|| format!("invalid --prestage {s:?}: use SECONDS, all or none")),
        }
    }
}

/// One step: frames `frames` of chunk `chunk`.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Chunk number in the index.
    pub chunk: usize,
    /// Frames in the chunk.
    pub frames: std::ops::Range<usize>,
    /// First access of any of its bytes, ns after the start of the recording.
    pub first_access_ns: u64,
}

/// Build the plan for `profile` over `index`. A profile of a disk of another size is
/// refused: it was recorded on a different disk.
pub fn plan(index: &SnapshotIndex, profile: &Profile) -> Result<Vec<Step>> {
    if profile.disk_size != index.image_size {
        return Err(Error::Invalid(format!(
            "profile is for a disk of {} bytes, the snapshot has {} bytes: it belongs to another disk",
            profile.disk_size, index.image_size
        )));
    }
    let cs = index.chunk_size as u64;
    let fs = index.frame_size as u64;
    // For each chunk: first access and the set of frames needed, in first-access order.
    let mut order: Vec<usize> = Vec::new();
    let mut per_chunk: std::collections::HashMap<usize, (u64, std::collections::BTreeSet<usize>)> =
        Default::default();
    for e in profile.extents_in_access_order() {
        let end = e.end().min(index.image_size);
        let mut pos = e.offset;
        while pos < end {
            let c = (pos / cs) as usize;
            let in_chunk = pos % cs;
            let n = (cs - in_chunk).min(end - pos);
            if matches!(index.chunks.get(c), Some(ChunkRef::Stored(_))) {
                let entry = per_chunk.entry(c).or_insert_with(|| {
                    order.push(c);
                    (e.first_access_ns, Default::default())
                });
                for f in (in_chunk / fs)..=((in_chunk + n - 1) / fs) {
                    entry.1.insert(f as usize);
                }
            }
            pos += n;
        }
    }
    let mut steps = Vec::new();
    for c in order {
        let Some((t, frames)) = per_chunk.remove(&c) else {
            continue;
        };
        // Runs of frames; gaps of up to two frames are fetched too (fewer requests
        // to a remote store for little extra data).
        let mut it = frames.into_iter();
        let Some(mut start) = it.next() else { continue };
        let mut last = start;
        for f in it {
            if f > last + 3 {
                steps.push(Step {
                    chunk: c,
                    frames: start..last + 1,
                    first_access_ns: t,
                });
                start = f;
            }
            last = f;
        }
        steps.push(Step {
            chunk: c,
            frames: start..last + 1,
            first_access_ns: t,
        });
    }
    Ok(steps)
}

/// Live figures of a pre-staging run.
#[derive(Debug, Default)]
pub struct PrestageProgress {
    /// Steps in the plan.
    pub steps_total: AtomicU64,
    /// Steps done.
    pub steps_done: AtomicU64,
    /// Uncompressed bytes the plan covers.
    pub planned_bytes: AtomicU64,
    /// Uncompressed bytes staged (fetched now or already cached).
    pub staged_bytes: AtomicU64,
    /// Bytes read from the store or disk tier by pre-staging.
    pub fetched_bytes: AtomicU64,
    /// Set when the budget stopped it.
    pub budget_reached: AtomicBool,
    /// Set when it finished (or stopped).
    pub finished: AtomicBool,
    /// Errors (a bad chunk is skipped; the demand read will report it).
    pub errors: AtomicU64,
    /// Milliseconds spent before the device was ready.
    pub ready_ms: AtomicU64,
}

/// Serializable view for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct PrestageReport {
    /// Steps done / total.
    pub steps_done: u64,
    /// Steps in the plan.
    pub steps_total: u64,
    /// Planned uncompressed bytes.
    pub planned_bytes: u64,
    /// Staged uncompressed bytes.
    pub staged_bytes: u64,
    /// staged / planned.
    pub share: f64,
    /// Bytes read by pre-staging.
    pub fetched_bytes: u64,
    /// Stopped at the budget.
    pub budget_reached: bool,
    /// Done.
    pub finished: bool,
    /// Chunks that failed.
    pub errors: u64,
    /// Time spent before ready, ms.
    pub ready_ms: u64,
}

impl PrestageProgress {
    /// Current values.
    pub fn report(&self) -> PrestageReport {
        let planned = self.planned_bytes.load(Relaxed);
        let staged = self.staged_bytes.load(Relaxed);
        PrestageReport {
            steps_done: self.steps_done.load(Relaxed),
            steps_total: self.steps_total.load(Relaxed),
            planned_bytes: planned,
            staged_bytes: staged,
            share: if planned == 0 {
                0.0
            } else {
                staged as f64 / planned as f64
            },
            fetched_bytes: self.fetched_bytes.load(Relaxed),
            budget_reached: self.budget_reached.load(Relaxed),
            finished: self.finished.load(Relaxed),
            errors: self.errors.load(Relaxed),
            ready_ms: self.ready_ms.load(Relaxed),
        }
    }
}

/// Longest a background pre-staging step waits for demand fetches to finish.
const DEMAND_YIELD_LIMIT: Duration = Duration::from_millis(500);

/// A pre-staging run over one snapshot.
pub struct Prestager {
    index: Arc<SnapshotIndex>,
    cache: Arc<ReadCache>,
    steps: Arc<Vec<Step>>,
    next: Arc<AtomicUsize>,
    to_memory: bool,
    threads: usize,
    /// Progress, shared with `status`.
    pub progress: Arc<PrestageProgress>,
}

impl Prestager {
    /// The chunks of the plan, each once, in the profile's first-access order.
    pub fn chunk_order(&self) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        self.steps
            .iter()
            .filter(|s| seen.insert(s.chunk))
            .map(|s| s.chunk as u64)
            .collect()
    }

    /// Plan `profile` over `index`; stage into memory too when `to_memory`.
    pub fn new(
        index: Arc<SnapshotIndex>,
        cache: Arc<ReadCache>,
        profile: &Profile,
        to_memory: bool,
        threads: usize,
    ) -> Result<Prestager> {
        let steps = plan(&index, profile)?;
        let progress = Arc::new(PrestageProgress::default());
        progress.steps_total.store(steps.len() as u64, Relaxed);
        let fs = index.frame_size as u64;
        let planned: u64 = steps
            .iter()
            .map(|s| (s.frames.end - s.frames.start) as u64 * fs)
            .sum();
        progress.planned_bytes.store(planned, Relaxed);
        Ok(Prestager {
            index,
            cache,
            steps: Arc::new(steps),
            next: Arc::new(AtomicUsize::new(0)),
            to_memory,
            threads: threads.max(1),
            progress,
        })
    }

    fn run_steps(&self, until_ns: Option<u64>, yield_to_demand: bool) {
        let each = |_| loop {
            if self.progress.budget_reached.load(Relaxed) {
                return;
            }
            // Peek before claiming, so a step past the window stays for later.
            let i = self.next.load(Relaxed);
            let Some(step) = self.steps.get(i) else {
                return;
            };
            if until_ns.is_some_and(|u| step.first_access_ns > u) {
                return;
            }
            if self
                .next
                .compare_exchange(i, i + 1, Relaxed, Relaxed)
                .is_err()
            {
                continue;
            }
            if yield_to_demand {
                // Demand reads first: wait (bounded, so pre-staging still
                // progresses under a steady demand load) until none is fetching.
                self.cache.wait_for_demand_idle(DEMAND_YIELD_LIMIT);
            }
            self.run_step(step);
        };
        livemount_store::workers::with_workers(self.threads, each, || ());
    }

    fn run_step(&self, step: &Step) {
        let p = &self.progress;
        let Some(ChunkRef::Stored(id)) = self.index.chunks.get(step.chunk) else {
            return;
        };
        let len = self.index.chunk_len(step.chunk);
        let raw = (step.frames.end - step.frames.start) as u64 * self.index.frame_size as u64;
        match self
            .cache
            .prefetch(id, len, step.frames.clone(), self.to_memory)
        {
            Ok(Prefetched::Fetched { stored, .. }) => {
                p.fetched_bytes.fetch_add(stored, Relaxed);
                p.staged_bytes.fetch_add(raw, Relaxed);
            }
            Ok(Prefetched::Present) => {
                p.staged_bytes.fetch_add(raw, Relaxed);
            }
            Ok(Prefetched::BudgetReached) => {
                p.budget_reached.store(true, Relaxed);
            }
            Err(e) => {
                // Not fatal: the demand read of these bytes will fail with the chunk's
                // name, and the log says so now.
                p.errors.fetch_add(1, Relaxed);
                eprintln!("livemount: pre-staging: {e}");
            }
        }
        p.steps_done.fetch_add(1, Relaxed);
    }

    /// Stage the window before the device is ready (blocking).
    pub fn stage_before_ready(&self, window: PrestageWindow) {
        let start = Instant::now();
        match window {
            PrestageWindow::None => {}
            PrestageWindow::All => self.run_steps(None, false),
            PrestageWindow::Seconds(s) => self.run_steps(Some((s * 1e9) as u64), false),
        }
        self.progress
            .ready_ms
            .store(start.elapsed().as_millis() as u64, Relaxed);
    }

    /// Continue with the rest of the plan (blocking; run it on its own thread).
    pub fn continue_in_background(&self) {
        self.run_steps(None, true);
        self.progress.finished.store(true, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemount_store::format::chunk::ChunkId;
    use livemount_store::format::profile::{Extent, Source};

    fn index() -> SnapshotIndex {
        SnapshotIndex {
            image_size: 4 << 20,
            chunk_size: 1 << 20,
            frame_size: 65536,
            created: 0,
            source: String::new(),
            chunks: vec![
                ChunkRef::Stored(ChunkId([1; 32])),
                ChunkRef::Zero,
                ChunkRef::Stored(ChunkId([2; 32])),
                ChunkRef::Stored(ChunkId([3; 32])),
            ]
            .into(),
        }
    }

    fn profile(size: u64, extents: &[(u64, u64, u64)]) -> Profile {
        let mut p = Profile::new(size, 4096, Source::default());
        p.extents = extents
            .iter()
            .map(|&(offset, length, t)| Extent {
                offset,
                length,
                first_access_ns: t,
                count: 1,
                runs: 1,
            })
            .collect();
        p.sort_access_order();
        p
    }

    #[test]
    fn plan_follows_access_order_and_skips_zero_chunks() {
        let p = profile(
            4 << 20,
            &[
                ((2 << 20) + 4096, 4096, 5),       // chunk 2 frame 0, first
                (1 << 20, 65536, 10),              // zero chunk: skipped
                (0, 200_000, 20),                  // chunk 0 frames 0..4
                ((2 << 20) + 10 * 65536, 100, 30), // chunk 2 frame 10: far from frame 0 → own step
            ],
        );
        let steps = plan(&index(), &p).unwrap();
        assert_eq!(
            steps,
            vec![
                Step {
                    chunk: 2,
                    frames: 0..1,
                    first_access_ns: 5
                },
                Step {
                    chunk: 2,
                    frames: 10..11,
                    first_access_ns: 5
                },
                Step {
                    chunk: 0,
                    frames: 0..4,
                    first_access_ns: 20
                },
            ]
        );
    }

    #[test]
    fn profile_of_another_disk_is_refused() {
        let e = plan(&index(), &profile(8 << 20, &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("another disk"), "{e}");
    }

    #[test]
    fn window_parsing() {
        assert_eq!("all".parse::<PrestageWindow>(), Ok(PrestageWindow::All));
        assert_eq!(
            "2.5".parse::<PrestageWindow>(),
            Ok(PrestageWindow::Seconds(2.5))
        );
        assert_eq!(
            "3s".parse::<PrestageWindow>(),
            Ok(PrestageWindow::Seconds(3.0))
        );
        assert!("-1".parse::<PrestageWindow>().is_err());
    }
}
