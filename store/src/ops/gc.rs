//! `livemount gc`: remove chunks no snapshot references, and stale temp files.
//!
//! Runs with the store's exclusive lock (no backup can be running, see the store
//! module docs), marks every chunk referenced by any index and sweeps the rest. If any
//! index cannot be read, nothing is removed: a damaged index must not cost the chunks
//! it still names.

use crate::error::{Error, IoContext, Result};
use crate::store::Store;
use serde::Serialize;
use std::collections::HashSet;
use std::fs;

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

/// Collect garbage in a store opened with [`Access::Exclusive`](crate::store::Access).
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
    for id in store.all_chunk_ids()? {
        if live.contains(&id) {
            report.chunks_kept += 1;
            continue;
        }
        let path = store.chunks().path(&id);
        let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        fs::remove_file(&path).at(&path)?;
        report.chunks_removed += 1;
        report.bytes_removed += len;
        touched.push(id);
    }
    store.sync_chunk_dirs(touched.iter())?;
    let tmp = store.tmp_dir();
    for e in fs::read_dir(&tmp).at(&tmp)? {
        let e = e.at(&tmp)?;
        fs::remove_file(e.path()).at(e.path())?;
        report.temp_files_removed += 1;
    }
    Ok(report)
}
