//! Test helpers shared by the cache's tests and the layers above it: an in-memory
//! chunk store with real encoded chunks.

use crate::error::Result;
use hashbrown::HashMap;
use livemount_store::backend::ChunkSource;
use livemount_store::format::chunk::{self, ChunkId};
use std::sync::Arc;

/// An in-memory store of encoded chunk files, by id.
pub struct MemSource(pub HashMap<ChunkId, Vec<u8>>);

impl ChunkSource for MemSource {
    fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = &self.0[id];
        let end = (offset as usize).saturating_add(len).min(f.len());
        Ok(f[offset as usize..end].to_vec())
    }
    fn read_all(&self, id: &ChunkId, _limit: u64) -> Result<Vec<u8>> {
        Ok(self.0[id].clone())
    }
}

/// `chunks` chunks of 1 MiB in 64 KiB frames (half random, half zero bytes per
/// frame), encoded; returns the store and each chunk's id and content.
pub fn mem_store(chunks: usize) -> (Arc<MemSource>, Vec<(ChunkId, Vec<u8>)>) {
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut files = HashMap::new();
    let mut contents = Vec::new();
    for _ in 0..chunks {
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 65536 < 32768 {
                    x as u8
                } else {
                    0
                }
            })
            .collect();
        let d = chunk::digest(&data, 65536);
        files.insert(d.id, chunk::encode(&data, 65536, &d, &mut c).unwrap());
        contents.push((d.id, data));
    }
    (Arc::new(MemSource(files)), contents)
}
