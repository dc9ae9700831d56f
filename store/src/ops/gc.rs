//! `livemount gc`: remove chunks no snapshot references, and stale temp files.
//!
//! Runs holding the gc lease (no backup can be running, see [`crate::lease`]), marks every chunk referenced by any index and sweeps the rest. If any
//! index cannot be read, nothing is removed: a damaged index must not cost the chunks
//! it still names.

use crate::error::{Error, Result};
use crate::store::Store;
use serde::Serialize;
use std::collections::HashSet;

/// Makes the progress of a phase: (what, total, unit).
pub type ProgressFactory<'a> =
    dyn Fn(&str, u64, &'static str) -> Box<dyn crate::progress::Progress> + 'a;

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
/// (holding the gc lease). `progress(what, total, unit)` makes the progress of each
/// phase (marking snapshots, sweeping chunks).
///
/// Memory: one entry per distinct live chunk (its 32-byte id in a hash set), whatever
/// the disks' sizes — each index is read, reduced to its ids and dropped (a thin
/// 4 TiB image's chunk list is a few runs) — plus the store's chunk listing.
pub fn gc(store: &Store, progress: &ProgressFactory) -> Result<GcReport> {
    let snaps = store.list(None)?;
    let mut live = HashSet::new();
    let marking = progress("gc: marking", snaps.len() as u64, "snapshots");
    for s in &snaps {
        let idx = store.load_index(s).map_err(|e| {
            Error::Invalid(format!(
                "gc aborted, nothing removed: snapshot {s} is unreadable: {e}"
            ))
        })?;
        live.extend(idx.stored_ids());
        marking.inc(1);
    }
    marking.finish();
    let mut report = GcReport {
        snapshots: snaps.len(),
        chunks_kept: 0,
        chunks_removed: 0,
        bytes_removed: 0,
        temp_files_removed: 0,
    };
    let mut touched = Vec::new();
    let chunks = store.all_chunks()?;
    let sweeping = progress("gc: sweeping", chunks.len() as u64, "chunks");
    for (id, meta) in chunks {
        sweeping.inc(1);
        if live.contains(&id) {
            report.chunks_kept += 1;
            continue;
        }
        store.delete_chunk(&id)?;
        report.chunks_removed += 1;
        report.bytes_removed += meta.size;
        touched.push(id);
    }
    sweeping.finish();
    store.sync_chunks(touched.iter())?;
    report.temp_files_removed = store.remove_temp_files()?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::backup::{backup, BackupOptions};
    use crate::progress::{NoProgress, Progress};
    use crate::store::Access;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    /// What the factory was asked for, and how far the phase got.
    type Phase = (String, u64, &'static str, Arc<AtomicU64>);

    struct Count(Arc<AtomicU64>);
    impl Progress for Count {
        fn inc(&self, n: u64) {
            self.0.fetch_add(n, Ordering::Relaxed);
        }
    }

    #[test]
    fn gc_reports_the_progress_of_both_phases() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("s"), Access::Write).unwrap();
        for (i, name) in ["a", "b"].iter().enumerate() {
            let src = d.path().join(name);
            std::fs::write(&src, vec![i as u8 + 1; 3 << 20]).unwrap();
            let opts = BackupOptions {
                series: name.to_string(),
                chunk_size: None,
                level: 1,
                threads: 1,
            };
            backup(&store, &src, &opts, &NoProgress).unwrap();
        }
        drop(store);
        let store = Store::open(d.path().join("s"), Access::Exclusive).unwrap();
        let phases: Arc<Mutex<Vec<Phase>>> = Default::default();
        let p = phases.clone();
        let r = gc(&store, &move |what, total, unit| {
            let n = Arc::new(AtomicU64::new(0));
            p.lock()
                .unwrap()
                .push((what.into(), total, unit, n.clone()));
            Box::new(Count(n))
        })
        .unwrap();
        let phases = phases.lock().unwrap();
        let seen: Vec<(String, u64, &str, u64)> = phases
            .iter()
            .map(|(w, t, u, n)| (w.clone(), *t, *u, n.load(Ordering::Relaxed)))
            .collect();
        let kept = r.chunks_kept;
        assert_eq!(
            seen,
            vec![
                ("gc: marking".to_string(), 2, "snapshots", 2),
                ("gc: sweeping".to_string(), kept, "chunks", kept),
            ]
        );
    }
}
