//! Structure-aware: a crafted chunk file under a crafted index position, read
//! through the real read cache and snapshot image, the way a live mount reads.
//! The first bytes choose the index's frame size and chunk length and the reads;
//! the rest is the chunk file. Errors are fine; panics, hangs and wrong lengths
//! are not.
#![no_main]
use libfuzzer_sys::fuzz_target;
use livemount::block::image::SnapshotImage;
use livemount::block::BlockDevice;
use livemount::cache::readahead::ReadAheadMode;
use livemount::cache::ReadCache;
use livemount_store::backend::ChunkSource;
use livemount_store::format::chunk::ChunkId;
use livemount_store::format::index::{ChunkRef, SnapshotIndex};
use livemount_store::Result;
use std::sync::Arc;

struct One(Vec<u8>);

impl ChunkSource for One {
    fn read_range(&self, _: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
        let start = (offset as usize).min(self.0.len());
        let end = start.saturating_add(len).min(self.0.len());
        Ok(self.0[start..end].to_vec())
    }
    fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>> {
        if self.0.len() as u64 > limit {
            return Err(livemount_store::Error::CorruptChunk {
                id: id.to_hex(),
                reason: "too large".into(),
            });
        }
        Ok(self.0.clone())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let frame_size = [4096u32, 16384, 65536, 131072][(data[0] & 3) as usize];
    let chunk_len = (u32::from_le_bytes([data[1], data[2], data[3], 0]) % (1 << 20)).max(1);
    let readahead = if data[4] & 1 == 0 {
        ReadAheadMode::Off
    } else {
        ReadAheadMode::Always
    };
    let file = data[8..].to_vec();
    let mut id = [0u8; 32];
    if let Some(h) = file.get(24..56) {
        id.copy_from_slice(h);
    }
    let index = SnapshotIndex {
        image_size: chunk_len as u64,
        chunk_size: 1 << 20,
        frame_size,
        created: 0,
        source: String::new(),
        chunks: vec![ChunkRef::Stored(ChunkId(id))].into(),
    };
    let cache = Arc::new(
        ReadCache::new(Arc::new(One(file)), 4 << 20, None, frame_size)
            .with_chunk_readahead(readahead, 2 << 20),
    );
    let image = SnapshotImage::new(index, cache);
    let size = image.size();
    for (k, len) in [(data[5], 4096usize), (data[6], 512), (data[7], 65536)] {
        let off = (k as u64 * 4096) % size.max(1) / 512 * 512;
        let len = len.min((size - off) as usize);
        let mut buf = vec![0u8; len];
        if !image.read_cached(off, &mut buf) {
            let _ = image.read_at(off, &mut buf);
        }
        assert_eq!(buf.len(), len);
    }
});
