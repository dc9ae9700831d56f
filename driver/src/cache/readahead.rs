//! Chunk read-ahead policy: on a demand miss, fetch the whole chunk file or only the
//! frames the read needs, chosen by what store requests cost here.
//!
//! Whole-chunk read-ahead turns the many small misses of a boot into one request per
//! chunk. That is right when every request pays a long fixed latency (an object store,
//! a WAN link: 72 instead of 414 store requests in the 20 ms boot benchmark). On a store
//! where requests are cheap and bytes are not (a local disk or tmpfs, and fresh memory
//! that costs page faults under emulation) it makes a cold 4 KiB read wait for a
//! ~400 KB chunk instead of a ~25 KB frame (docs/performance.md, Live mount).
//!
//! The policy measures both kinds of store request as the cache makes them: whole-chunk
//! reads, and small range reads (a chunk's header and seek table, or a few frames,
//! both ≤ [`SMALL_REQUEST`]). Each kind's time is an exponentially weighted mean, so the
//! choice follows a store whose speed changes. A miss in a chunk costs, fetching
//! frames only, one small request, or two when the chunk's layout is not known yet. A
//! miss fetches the whole chunk when that costs at most [`WHOLE_CHUNK_FACTOR`] times as
//! much: the boot benchmark's working set read each touched chunk in ~6 separate
//! requests without read-ahead (414 requests for 72 chunks), so one whole-chunk fetch
//! pays off well before it costs 3 frame misses.
//!
//! A kind never measured is tried first (whole chunks first: the right default for a
//! remote store, and what the driver did before it measured), and a kind not chosen
//! for [`STALE_AFTER`] misses is tried once, so a store that got slower or faster is
//! noticed.

use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::Duration;

/// Range reads up to this size count as "small" requests (a seek table, a few frames).
pub const SMALL_REQUEST: usize = 128 << 10;
/// Fetch the whole chunk when it costs at most this many times a frames-only miss.
pub const WHOLE_CHUNK_FACTOR: f64 = 3.0;
/// Try the kind of fetch not chosen once after this many misses.
pub const STALE_AFTER: u32 = 64;
/// Sequential read-ahead runs while a store request costs at least this share of a
/// chunk's verify + decode. Measured: a local store costs 0.04 of it natively and
/// 0.01-0.03 in the loaded bench VM (decode 50-80 ms/MiB on the wall clock there,
/// small store reads 0.5-1.5 ms), where read-ahead must stay off; a store 20 ms away
/// costs 0.25-0.4 in that VM (at the edge: boots there neither gained nor lost) and
/// ~15 natively, where it pays.
pub const LATENCY_BOUND_SHARE: f64 = 0.25;
/// Weight of a new measurement in the moving means.
const EWMA_WEIGHT: f64 = 0.25;

/// What the operator asked for (`mount --readahead`); by name in status files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReadAheadMode {
    /// Choose per miss by measured store request times (default).
    #[default]
    Auto,
    /// Always fetch the whole chunk on a miss.
    Always,
    /// Never: fetch only the frames a read needs.
    Off,
}

/// What a miss fetches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// The whole chunk file, kept compressed and decoded frame by frame.
    WholeChunk,
    /// Only the frames the read needs.
    Frames,
}

/// The policy's view, for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ReadAheadReport {
    /// The configured mode.
    pub mode: String,
    /// Mean time of a whole-chunk store read, milliseconds (none yet: `None`).
    pub whole_chunk_ms: Option<f64>,
    /// Mean time of a small store range read, milliseconds.
    pub small_request_ms: Option<f64>,
    /// Misses that fetched the whole chunk.
    pub whole_chunk_misses: u64,
    /// Misses that fetched only the frames needed.
    pub frame_misses: u64,
    /// Mean time to verify and decode 1 MiB of frames, milliseconds (wall clock).
    pub decode_ms_per_mib: Option<f64>,
    /// Whether sequential read-ahead would run now (the store is latency-bound for
    /// 1 MiB chunks, as measured).
    pub store_latency_bound: bool,
}

#[derive(Debug, Default)]
struct Measured {
    /// Moving mean, seconds, and misses since this kind was last chosen.
    mean: Option<f64>,
    idle: u32,
}

impl Measured {
    fn observe(&mut self, secs: f64) {
        self.mean = Some(match self.mean {
            Some(m) => m + EWMA_WEIGHT * (secs - m),
            None => secs,
        });
    }
}

#[derive(Debug, Default)]
struct State {
    whole: Measured,
    small: Measured,
    /// Verifying and decoding frames, seconds per decoded byte.
    decode: Measured,
    whole_misses: u64,
    frame_misses: u64,
}

/// The read-ahead policy of one read cache (shared by its worker threads).
#[derive(Debug)]
pub struct ReadAheadPolicy {
    mode: ReadAheadMode,
    state: Mutex<State>,
}

impl ReadAheadPolicy {
    /// A policy in `mode`, with nothing measured.
    pub fn new(mode: ReadAheadMode) -> Self {
        ReadAheadPolicy {
            mode,
            state: Mutex::new(State::default()),
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> ReadAheadMode {
        self.mode
    }

    /// Record a whole-chunk store read that took `took`.
    pub fn observe_whole_chunk(&self, took: Duration) {
        if let Ok(mut s) = self.state.lock() {
            s.whole.observe(took.as_secs_f64());
        }
    }

    /// Record a store range read of `bytes` that took `took` (only small ones count).
    pub fn observe_range(&self, bytes: usize, took: Duration) {
        if bytes <= SMALL_REQUEST {
            if let Ok(mut s) = self.state.lock() {
                s.small.observe(took.as_secs_f64());
            }
        }
    }

    /// Record verifying and decoding `bytes` of frames that took `took`.
    pub fn observe_decode(&self, bytes: usize, took: Duration) {
        if bytes > 0 {
            if let Ok(mut s) = self.state.lock() {
                s.decode.observe(took.as_secs_f64() / bytes as f64);
            }
        }
    }

    /// True when a store request costs at least [`LATENCY_BOUND_SHARE`] of what
    /// verifying and decoding a chunk of `chunk_bytes` costs, as measured: a reader
    /// then spends a good part of its time waiting for the store, and fetching ahead
    /// overlaps that wait with its work. Below that the work is CPU, which fetching
    /// ahead only moves to other threads (measured under emulation, with two vCPUs: a
    /// local store's cold sequential read got slower; docs/performance.md). Decoding
    /// is timed on the wall clock, so a CPU-starved machine measures it slower and
    /// reads ahead less, which is what it should do. False until both are measured.
    pub fn store_latency_bound(&self, chunk_bytes: u64) -> bool {
        self.state
            .lock()
            .is_ok_and(|s| s.latency_bound(chunk_bytes))
    }

    /// What a demand miss in a chunk fetches; `layout_known`: the chunk's seek table is
    /// already cached (a frames-only miss is then one request, not two).
    pub fn choose(&self, layout_known: bool) -> Fetch {
        let choice = match self.mode {
            ReadAheadMode::Always => Fetch::WholeChunk,
            ReadAheadMode::Off => Fetch::Frames,
            ReadAheadMode::Auto => return self.choose_measured(layout_known),
        };
        if let Ok(mut s) = self.state.lock() {
            s.count(choice);
        }
        choice
    }

    fn choose_measured(&self, layout_known: bool) -> Fetch {
        let Ok(mut s) = self.state.lock() else {
            return Fetch::WholeChunk;
        };
        let choice = match (s.whole.mean, s.small.mean) {
            (None, _) => Fetch::WholeChunk,
            (Some(_), None) => Fetch::Frames,
            _ if s.whole.idle >= STALE_AFTER => Fetch::WholeChunk,
            _ if s.small.idle >= STALE_AFTER => Fetch::Frames,
            (Some(whole), Some(small)) => {
                let requests = if layout_known { 1.0 } else { 2.0 };
                if whole <= WHOLE_CHUNK_FACTOR * requests * small {
                    Fetch::WholeChunk
                } else {
                    Fetch::Frames
                }
            }
        };
        s.count(choice);
        choice
    }

    /// Counters and measurements now.
    pub fn report(&self) -> ReadAheadReport {
        let mode = match self.mode {
            ReadAheadMode::Auto => "auto",
            ReadAheadMode::Always => "always",
            ReadAheadMode::Off => "off",
        };
        let s = self.state.lock().ok();
        let ms = |m: Option<f64>| m.map(|v| (v * 1e6).round() / 1e3);
        ReadAheadReport {
            mode: mode.into(),
            whole_chunk_ms: s.as_ref().and_then(|s| ms(s.whole.mean)),
            small_request_ms: s.as_ref().and_then(|s| ms(s.small.mean)),
            whole_chunk_misses: s.as_ref().map(|s| s.whole_misses).unwrap_or(0),
            frame_misses: s.as_ref().map(|s| s.frame_misses).unwrap_or(0),
            decode_ms_per_mib: s
                .as_ref()
                .and_then(|s| s.decode.mean)
                .map(|v| (v * 1048576.0 * 1e6).round() / 1e3),
            store_latency_bound: s.as_ref().is_some_and(|s| s.latency_bound(1 << 20)),
        }
    }
}

impl State {
    /// See [`ReadAheadPolicy::store_latency_bound`].
    fn latency_bound(&self, chunk_bytes: u64) -> bool {
        let request = match (self.small.mean, self.whole.mean) {
            (Some(small), _) => small,
            (None, Some(whole)) => whole,
            (None, None) => return false,
        };
        self.decode
            .mean
            .is_some_and(|per_byte| request >= LATENCY_BOUND_SHARE * per_byte * chunk_bytes as f64)
    }

    fn count(&mut self, choice: Fetch) {
        match choice {
            Fetch::WholeChunk => {
                self.whole_misses += 1;
                self.whole.idle = 0;
                self.small.idle = self.small.idle.saturating_add(1);
            }
            Fetch::Frames => {
                self.frame_misses += 1;
                self.small.idle = 0;
                self.whole.idle = self.whole.idle.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    #[test]
    fn latency_bound_means_requests_cost_a_quarter_of_a_chunk_decode() {
        let p = ReadAheadPolicy::new(ReadAheadMode::Auto);
        assert!(!p.store_latency_bound(1 << 20), "nothing measured");
        // 1 MiB decodes in 16 ms (emulated CPU); tmpfs requests take 0.5 ms.
        p.observe_decode(1 << 20, ms(16.0));
        p.observe_range(30_000, ms(0.5));
        assert!(!p.store_latency_bound(1 << 20));
        // The same VM loaded: 1 MiB in 40 ms; a store 20 ms away.
        let vm = ReadAheadPolicy::new(ReadAheadMode::Auto);
        vm.observe_decode(1 << 20, ms(40.0));
        vm.observe_range(30_000, ms(20.0));
        assert!(vm.store_latency_bound(1 << 20));
        // Natively: 1 MiB in 1.3 ms, a local disk at 0.05 ms.
        let local = ReadAheadPolicy::new(ReadAheadMode::Auto);
        local.observe_decode(1 << 20, ms(1.3));
        local.observe_range(30_000, ms(0.05));
        assert!(!local.store_latency_bound(1 << 20));
        // Natively: 1 MiB in 1.3 ms, a store 5 ms away.
        let remote = ReadAheadPolicy::new(ReadAheadMode::Auto);
        remote.observe_decode(1 << 20, ms(1.3));
        remote.observe_whole_chunk(ms(6.0));
        assert!(remote.store_latency_bound(1 << 20), "whole-chunk time only");
        remote.observe_range(30_000, ms(5.0));
        assert!(remote.store_latency_bound(1 << 20));
    }

    #[test]
    fn tries_each_kind_then_follows_the_measurements() {
        let p = ReadAheadPolicy::new(ReadAheadMode::Auto);
        assert_eq!(p.choose(false), Fetch::WholeChunk, "nothing measured");
        p.observe_whole_chunk(ms(24.0));
        assert_eq!(
            p.choose(false),
            Fetch::Frames,
            "small requests not measured"
        );
        p.observe_range(900, ms(20.0));
        p.observe_range(30_000, ms(20.3));
        // A remote store: latency dominates, a whole chunk costs about one request.
        assert_eq!(p.choose(false), Fetch::WholeChunk);
        assert_eq!(p.choose(true), Fetch::WholeChunk);

        let local = ReadAheadPolicy::new(ReadAheadMode::Auto);
        local.observe_whole_chunk(ms(2.5));
        local.observe_range(900, ms(0.05));
        local.observe_range(30_000, ms(0.12));
        // A local store: bytes dominate, a whole chunk costs ~30 small requests.
        assert_eq!(local.choose(false), Fetch::Frames);
        assert_eq!(local.choose(true), Fetch::Frames);
        // The boundary: whole ≤ 3 × the requests of a frames-only miss.
        let edge = ReadAheadPolicy::new(ReadAheadMode::Auto);
        edge.observe_whole_chunk(ms(5.0));
        edge.observe_range(1000, ms(1.0));
        assert_eq!(edge.choose(false), Fetch::WholeChunk, "5 ≤ 3 × 2 × 1");
        assert_eq!(edge.choose(true), Fetch::Frames, "5 > 3 × 1 × 1");
        let r = edge.report();
        assert_eq!((r.whole_chunk_misses, r.frame_misses), (1, 1));
        assert_eq!(r.whole_chunk_ms, Some(5.0));
        assert_eq!(r.small_request_ms, Some(1.0));
    }

    #[test]
    fn large_range_reads_are_not_small_requests() {
        let p = ReadAheadPolicy::new(ReadAheadMode::Auto);
        p.observe_range(SMALL_REQUEST + 1, ms(9.0));
        assert_eq!(p.report().small_request_ms, None);
    }

    #[test]
    fn follows_a_store_that_changes_and_retries_the_unchosen_kind() {
        let p = ReadAheadPolicy::new(ReadAheadMode::Auto);
        p.observe_whole_chunk(ms(2.5));
        p.observe_range(1000, ms(0.05));
        let mut whole_at = None;
        for i in 0..STALE_AFTER + 1 {
            if p.choose(true) == Fetch::WholeChunk {
                whole_at = Some(i);
                break;
            }
            p.observe_range(1000, ms(0.05));
        }
        assert_eq!(
            whole_at,
            Some(STALE_AFTER),
            "whole chunks tried again once after {STALE_AFTER} frame misses"
        );
        // The store became remote-like: requests now cost 20 ms each; the moving
        // means follow within a few requests and whole chunks win again.
        for _ in 0..12 {
            p.observe_range(1000, ms(20.0));
            p.observe_whole_chunk(ms(22.0));
        }
        assert_eq!(p.choose(false), Fetch::WholeChunk);
    }

    #[test]
    fn fixed_modes_ignore_measurements() {
        for (mode, want) in [
            (ReadAheadMode::Always, Fetch::WholeChunk),
            (ReadAheadMode::Off, Fetch::Frames),
        ] {
            let p = ReadAheadPolicy::new(mode);
            p.observe_whole_chunk(ms(100.0));
            p.observe_range(1000, ms(0.01));
            assert_eq!(p.choose(false), want);
        }
    }

    #[test]
    fn modes_parse_from_names_only() {
        let m: ReadAheadMode = serde_json::from_str("\"off\"").unwrap();
        assert_eq!(m, ReadAheadMode::Off);
        assert!(serde_json::from_str::<ReadAheadMode>("true").is_err());
        let e = serde_json::from_str::<ReadAheadMode>("\"sometimes\"").unwrap_err();
        assert!(e.to_string().contains("sometimes"), "{e}");
        assert_eq!(
            serde_json::to_string(&ReadAheadMode::Always).unwrap(),
            "\"always\""
        );
    }
}
