//! `livemount gc`: remove chunks no snapshot references, and stale temp files.
//!
//! Runs holding the gc lease (no backup can be running, see [`crate::lease`]), marks every chunk referenced by any index and sweeps the rest. If any
//! index cannot be read, nothing is removed: a damaged index must not cost the chunks
//! it still names.

use crate::error::{Error, Result};
use crate::store::Store;
use serde::Serialize;
use std::collections::HashSet;

/// Figures of one gc run.
#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    /// Snapshots found.
    pub snapshots: usize,
    /// Chunks still referenced.
    pub chunks_kept: u64,
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Bytes of chunk files removed.
    pub bytes_removed: u64,
    /// Temp files of killed writers removed.
    pub temp_files_removed: u64,
}

/// Collect garbage in a store opened with [`Access::Exclusive`](crate::store::Access)
/// (holding the gc lease).
pub fn gc(store: &Store) -> Result<GcReport> {
    let snaps = store.list(None)?;
    let mut live = HashSet::new();
    for s in &snaps {
        let idx = store.load_index(s).map_err(|e| {
            Error::Invalid(format!(
                "gc aborted, nothing removed: snapshot {s} is unreadable: {e}"
            ))
        })?;
        live.extend(idx.stored_ids());
    }
    let mut report = GcReport {
        snapshots: snaps.len(),
        chunks_kept: 0,
        chunks_removed: 0,
        bytes_removed: 0,
        temp_files_removed: 0,
    };
    let mut touched = Vec::new();
    for (id, meta) in store.all_chunks()? {
        if live.contains(&id) {
            report.chunks_kept += 1;
            continue;
        }
        store.delete_chunk(&id)?;
        report.chunks_removed += 1;
        report.bytes_removed += meta.size;
        touched.push(id);
    }
    store.sync_chunks(touched.iter())?;
    report.temp_files_removed = store.remove_temp_files()?;
    Ok(report)
}
