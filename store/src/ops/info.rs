//! `livemount list` and `livemount info`: what a store and a snapshot hold.

use crate::error::Result;
use crate::format::index::ChunkRef;
use crate::ops::backup::ratio;
use crate::store::{format_utc, SnapshotRef, Store};
use serde::Serialize;
use std::collections::HashSet;

/// Sizes and ratios of one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// `series@time`.
    pub snapshot: String,
    /// Creation time (UTC).
    pub created: String,
    /// What was backed up.
    pub source: String,
    /// Bytes in the image.
    pub image_size: u64,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// Bytes per frame.
    pub frame_size: u32,
    /// Chunk positions.
    pub chunks_total: u64,
    /// Positions that are all zeros.
    pub chunks_zero: u64,
    /// Distinct stored chunks.
    pub chunks_unique: u64,
    /// Uncompressed bytes of the distinct stored chunks.
    pub data_bytes: u64,
    /// Bytes the distinct chunk files take in the store.
    pub stored_bytes: u64,
    /// Chunk files missing from the store (run `verify` for content checks).
    pub chunks_missing: u64,
    /// data_bytes / stored_bytes.
    pub compression_ratio: f64,
    /// Non-zero image bytes / data_bytes (repeated chunks within the image).
    pub dedup_ratio: f64,
}

/// Compute [`SnapshotInfo`] for `snap`.
pub fn info(store: &Store, snap: &SnapshotRef) -> Result<SnapshotInfo> {
    let idx = store.load_index(snap)?;
    let mut seen = HashSet::new();
    let (mut zero, mut nonzero_bytes, mut data, mut stored, mut missing) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for (i, c) in idx.chunks.iter().enumerate() {
        let len = idx.chunk_len(i) as u64;
        match c {
            ChunkRef::Zero => zero += 1,
            ChunkRef::Stored(id) => {
                nonzero_bytes += len;
                if seen.insert(*id) {
                    data += len;
                    match store.chunk_size(id)? {
                        Some(n) => stored += n,
                        None => missing += 1,
                    }
                }
            }
        }
    }
    Ok(SnapshotInfo {
        snapshot: snap.to_string(),
        created: format_utc(idx.created),
        source: idx.source.clone(),
        image_size: idx.image_size,
        chunk_size: idx.chunk_size,
        frame_size: idx.frame_size,
        chunks_total: idx.chunks.len() as u64,
        chunks_zero: zero,
        chunks_unique: seen.len() as u64,
        data_bytes: data,
        stored_bytes: stored,
        chunks_missing: missing,
        compression_ratio: ratio(data, stored),
        dedup_ratio: ratio(nonzero_bytes, data),
    })
}
