//! The snapshot image: a snapshot index over the read cache, read like a disk.

use crate::cache::ReadCache;
use crate::error::{Error, Result};
use crate::sequential::SequentialReadAhead;
use crate::store::index::{ChunkRef, SnapshotIndex};
use std::sync::Arc;

/// Something that reads like a disk: the layer below the overlay.
pub trait BlockRead: Send + Sync {
    /// Bytes in the device.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. Bytes past the end read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Fill `buf` only if that needs no I/O and no decoding (memory-tier hits);
    /// false means "do it the slow way", off the I/O queue. The frontend calls it
    /// first for every read, in arrival order, so read-ahead watches reads here.
    fn read_cached(&self, _offset: u64, _buf: &mut [u8]) -> bool {
        false
    }
}

/// A snapshot in the store, read through the read cache.
pub struct SnapshotImage {
    index: SnapshotIndex,
    cache: Arc<ReadCache>,
    sequential: Option<SequentialReadAhead>,
}

impl SnapshotImage {
    /// The image of `index`, read through `cache`.
    pub fn new(index: SnapshotIndex, cache: Arc<ReadCache>) -> Self {
        SnapshotImage {
            index,
            cache,
            sequential: None,
        }
    }

    /// Read `window` bytes ahead of sequential readers, on `threads` threads (see
    /// [`crate::sequential`]); a zero window leaves it off.
    pub fn with_sequential_readahead(mut self, window: u64, threads: usize) -> Self {
        self.sequential = (window > 0).then(|| {
            SequentialReadAhead::start(
                self.cache.clone(),
                self.index.chunk_size,
                self.index.chunks.len(),
                window,
                threads,
            )
        });
        self
    }

    /// Tell sequential read-ahead about a read; queue the stored chunks it wants.
    fn note_read(&self, offset: u64, len: usize) {
        let Some(seq) = &self.sequential else { return };
        let Some(chunks) = seq.observe(offset, len as u64) else {
            return;
        };
        for i in chunks {
            if let Some(ChunkRef::Stored(id)) = self.index.chunks.get(i) {
                seq.request(*id, self.index.chunk_len(i));
            }
        }
    }

    /// The index.
    pub fn index(&self) -> &SnapshotIndex {
        &self.index
    }

    /// The read cache.
    pub fn cache(&self) -> &Arc<ReadCache> {
        &self.cache
    }

    /// Split `offset..offset+len` into (chunk number, range in chunk, range in buf).
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (usize, u32, u32, usize, usize)> + '_ {
        let cs = self.index.chunk_size as u64;
        let end = offset + len as u64;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let i = (pos / cs) as usize;
            let in_chunk = pos % cs;
            let n = (cs - in_chunk).min(end - pos);
            let item = (
                i,
                in_chunk as u32,
                (in_chunk + n) as u32,
                (pos - offset) as usize,
                (pos - offset + n) as usize,
            );
            pos += n;
            Some(item)
        })
    }
}

impl BlockRead for SnapshotImage {
    fn size(&self) -> u64 {
        self.index.image_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.index.image_size;
        let valid = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[valid..].fill(0);
        for (i, a, b, ba, bb) in self.pieces(offset, valid) {
            match self.index.chunks.get(i) {
                Some(ChunkRef::Zero) => buf[ba..bb].fill(0),
                Some(ChunkRef::Stored(id)) => {
                    self.cache
                        .read(id, self.index.chunk_len(i), a..b, &mut buf[ba..bb])?
                }
                None => {
                    return Err(Error::Invalid(format!(
                        "read past the end of the image at chunk {i}"
                    )))
                }
            }
        }
        Ok(())
    }

    fn read_cached(&self, offset: u64, buf: &mut [u8]) -> bool {
        // The frontend tries every read here first, on its queue thread, in the order
        // requests arrive: the place to find sequential streams (read_at runs later,
        // on workers, in any order).
        self.note_read(offset, buf.len());
        let size = self.index.image_size;
        let valid = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        for (i, a, b, ba, bb) in self.pieces(offset, valid) {
            let ok = match self.index.chunks.get(i) {
                Some(ChunkRef::Zero) => {
                    buf[ba..bb].fill(0);
                    true
                }
                Some(ChunkRef::Stored(id)) => self.cache.read_if_cached(id, a..b, &mut buf[ba..bb]),
                None => false,
            };
            if !ok {
                return false;
            }
        }
        buf[valid..].fill(0);
        true
    }
}
