//! Profiles: JSON → validate → merge with itself → a pre-staging plan over an index
//! of the profile's disk size.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemount_store::format::chunk::ChunkId;
use livemount_store::format::index::{ChunkRef, SnapshotIndex};
use livemount_store::format::profile::{MergeOptions, Profile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(p) = Profile::from_json(text) else {
        return;
    };
    let _ = p.validate();
    let _ = p.working_set_bytes();
    let _ = Profile::merge(&[p.clone(), p.clone()], &MergeOptions { min_runs: 2 });
    // A plan needs an index of the same disk: at most 64 chunks of 1 MiB.
    let size = p.disk_size.min(64 << 20);
    let chunks = SnapshotIndex::chunk_count(size, 1 << 20) as usize;
    let index = SnapshotIndex {
        image_size: size,
        chunk_size: 1 << 20,
        frame_size: 65536,
        created: 0,
        source: String::new(),
        chunks: (0..chunks)
            .map(|i| {
                if i % 3 == 0 {
                    ChunkRef::Zero
                } else {
                    ChunkRef::Stored(ChunkId([i as u8; 32]))
                }
            })
            .collect(),
    };
    let _ = livemount::block::prestage::plan(&index, &p);
});
