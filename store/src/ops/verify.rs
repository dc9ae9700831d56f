//! `livemount verify`: read every chunk, check it against its name, list every bad one.

use crate::backend::{read_verified, Expected, ReadClass};
use crate::error::{Error, Result};
use crate::format::chunk::ChunkId;
use crate::format::index::ChunkRef;
use crate::progress::Progress;
use crate::store::{SnapshotRef, Store};
use serde::Serialize;
use std::collections::BTreeMap;

/// A chunk that failed verification.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    /// Hex chunk id.
    pub id: String,
    /// What is wrong.
    pub error: String,
    /// Snapshots that reference it.
    pub snapshots: Vec<String>,
    /// Where `verify --repair` moved the damaged file (None: not moved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// The chunk, when its file exists but its content is wrong (not missing, not
    /// unreadable): the case `--repair` moves aside.
    #[serde(skip)]
    pub damaged: Option<ChunkId>,
}

/// Result of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Snapshots whose indexes were checked.
    pub snapshots: Vec<String>,
    /// Indexes that could not be read: (snapshot, error).
    pub bad_indexes: Vec<(String, String)>,
    /// Chunks checked.
    pub chunks_checked: u64,
    /// Uncompressed bytes checked.
    pub bytes_checked: u64,
    /// Every bad chunk.
    pub bad_chunks: Vec<BadChunk>,
}

impl VerifyReport {
    /// True when nothing bad was found.
    pub fn ok(&self) -> bool {
        self.bad_indexes.is_empty() && self.bad_chunks.is_empty()
    }
}

/// Verify one snapshot, or (with `None`) every snapshot and every chunk file in the
/// store (unreferenced ones included, so that damage is found before it matters).
pub fn verify(
    store: &Store,
    only: Option<&SnapshotRef>,
    threads: usize,
    progress: &dyn Progress,
) -> Result<VerifyReport> {
    let snaps = match only {
        Some(s) => vec![s.clone()],
        None => store.list(None)?,
    };
    let mut users: BTreeMap<ChunkId, Vec<String>> = BTreeMap::new();
    // What the first index using a chunk says it holds: a chunk whose content does
    // not match would make that snapshot's image wrong, so verify checks it too.
    let mut expected: BTreeMap<ChunkId, Expected> = BTreeMap::new();
    let mut bad_indexes = Vec::new();
    for s in &snaps {
        match store.load_index(s) {
            Ok(idx) => {
                for (i, c) in idx.chunks.iter().enumerate() {
                    if let ChunkRef::Stored(id) = c {
                        expected.entry(*id).or_insert(Expected {
                            content_len: idx.chunk_len(i),
                            frame_size: idx.frame_size,
                        });
                    }
                }
                for id in idx.stored_ids() {
                    users.entry(id).or_default().push(s.to_string());
                }
            }
            Err(e) => bad_indexes.push((s.to_string(), e.to_string())),
        }
    }
    if only.is_none() {
        for id in store.all_chunk_ids()? {
            users.entry(id).or_default();
        }
    }
    let ids: Vec<ChunkId> = users.keys().copied().collect();
    let results = crate::workers::parallel_map(ids.len(), threads, |i| {
        let r = read_verified(
            store.chunks(),
            &ids[i],
            expected.get(&ids[i]).copied(),
            ReadClass::Background,
        );
        let n = r.as_ref().map(|d| d.len() as u64).unwrap_or(0);
        progress.inc(n);
        match r {
            Ok(_) => Ok(Ok(n)),
            Err(e @ Error::CorruptChunk { .. }) => Ok(Err((e.to_string(), true))),
            Err(e) if e.is_data_error() => Ok(Err((e.to_string(), false))),
            // A chunk we cannot read for another reason (permissions, EIO from the
            // disk) is also bad for the user: report it rather than stopping.
            Err(e @ Error::Io { .. }) => Ok(Err((e.to_string(), false))),
            Err(e) => Err(e),
        }
    })?;
    progress.finish();
    let mut report = VerifyReport {
        snapshots: snaps.iter().map(|s| s.to_string()).collect(),
        bad_indexes,
        chunks_checked: ids.len() as u64,
        bytes_checked: 0,
        bad_chunks: Vec::new(),
    };
    for (id, r) in ids.iter().zip(results) {
        match r {
            Ok(n) => report.bytes_checked += n,
            Err((error, damaged)) => report.bad_chunks.push(BadChunk {
                id: id.to_hex(),
                error,
                snapshots: users.get(id).cloned().unwrap_or_default(),
                moved_to: None,
                damaged: damaged.then_some(*id),
            }),
        }
    }
    Ok(report)
}

/// `verify --repair`: move every damaged chunk file of `report` aside (see
/// [`Store::quarantine_chunk`]), recording where. `store` must be open for writing
/// (its backup lease keeps `gc` out meanwhile).
pub fn repair(store: &Store, report: &mut VerifyReport) -> Result<()> {
    for b in &mut report.bad_chunks {
        if let Some(id) = b.damaged {
            b.moved_to = Some(store.quarantine_chunk(&id)?);
        } else if let Some(id) = ChunkId::from_hex(&b.id) {
            // Missing or unreadable: the next backup must not reuse it by name.
            store.distrust(&id)?;
        }
    }
    Ok(())
}
