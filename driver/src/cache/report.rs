//! The read cache's counters ([`CacheStats`]) and their typed snapshot for
//! `status` ([`CacheReport`]).

use super::readahead::ReadAheadReport;
use serde::{Deserialize, Serialize};
use std::sync::atomic::AtomicU64;

/// Counters of the read cache (all monotonic).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Frame lookups served from memory.
    pub mem_hits: AtomicU64,
    /// Frame lookups that missed memory.
    pub mem_misses: AtomicU64,
    /// Range reads served by the disk tier (verified).
    pub disk_hits: AtomicU64,
    /// Fetches that waited for another fill of the same bytes.
    pub fill_waits: AtomicU64,
    /// Fetches served from the disk tier once another fill of them ended.
    pub fill_hits: AtomicU64,
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

/// A snapshot of [`CacheStats`] plus sizes, for `status`. Fields missing from a
/// status file (written by a daemon of an older version, still running) read as 0.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CacheReport {
    /// Memory-tier frame hits.
    pub mem_hits: u64,
    /// Memory-tier frame misses.
    pub mem_misses: u64,
    /// mem_hits / (hits + misses).
    pub mem_hit_rate: f64,
    /// Disk-tier hits.
    pub disk_hits: u64,
    /// Fetches that waited for another fill of the same bytes (another mount on
    /// the host, or a whole-chunk fetch of this one).
    pub fill_waits: u64,
    /// Fetches served from the disk tier once another fill of them ended: store
    /// requests the shared host cache saved.
    pub fill_hits: u64,
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
