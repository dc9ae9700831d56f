//! The snapshot image: a snapshot index over the read cache, read like a disk.
//!
//! The bottom layer of the block stack: it maps a device range to chunk ranges
//! through the index and asks the read cache for them; all-zero chunks cost
//! nothing. It is read-only ([`BlockDevice`]'s default write methods refuse); its
//! size is the image's rounded up to whole sectors, and the tail reads as zeros.

use super::sequential::SequentialReadAhead;
use super::{BlockDevice, Extents};
use crate::cache::ReadCache;
use crate::error::{Error, Result};
use livemount_store::format::index::{ChunkRef, SnapshotIndex};
use std::sync::Arc;

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
    /// [`crate::block::sequential`]); a zero window leaves it off.
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

    /// Chunks sequential read-ahead has queued (0 when it is off).
    pub fn sequential_requested(&self) -> u64 {
        self.sequential.as_ref().map_or(0, |s| s.requested())
    }

    /// The index.
    pub fn index(&self) -> &SnapshotIndex {
        &self.index
    }

    /// The read cache.
    pub fn cache(&self) -> &Arc<ReadCache> {
        &self.cache
    }

    /// Memory the in-memory index takes (its chunk list).
    pub fn index_bytes(&self) -> u64 {
        self.index.chunks.heap_bytes() as u64
    }

    /// Bytes in the snapshot's image.
    pub fn image_size(&self) -> u64 {
        self.index.image_size
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

impl BlockDevice for SnapshotImage {
    fn size(&self) -> u64 {
        super::device_size(self.index.image_size)
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

    fn known_zero(&self, offset: u64, len: u64) -> bool {
        let size = self.index.image_size;
        let valid = size.saturating_sub(offset).min(len) as usize;
        self.pieces(offset, valid)
            .all(|(i, ..)| matches!(self.index.chunks.get(i), Some(ChunkRef::Zero)))
    }

    /// Zero chunks (and the padding past the image's end) are zeros; stored chunks
    /// may be data. Nothing is read.
    fn extents(&self, offset: u64, len: u64, out: &mut Extents) -> Result<()> {
        let size = self.index.image_size;
        let valid = size.saturating_sub(offset).min(len);
        for (i, a, b, ..) in self.pieces(offset, valid as usize) {
            let zero = matches!(self.index.chunks.get(i), Some(ChunkRef::Zero));
            out.push((b - a) as u64, zero);
            if out.stopped() {
                return Ok(());
            }
        }
        out.push(len - valid, true);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::test_utils::{mem_store, MemSource};
    use livemount_store::format::index::ChunkRef;

    /// An image of chunk 0, a zero chunk, chunk 1 and a 1000-byte tail of chunk 0,
    /// over an in-memory store; and the bytes it must read as.
    fn image() -> (SnapshotImage, Arc<ReadCache>, Vec<u8>) {
        let (store, chunks): (Arc<MemSource>, _) = mem_store(2);
        let cache = Arc::new(ReadCache::new(store, 64 << 20, None, 65536));
        let cs = 1u64 << 20;
        let index = SnapshotIndex {
            image_size: 3 * cs + 1000,
            chunk_size: cs as u32,
            frame_size: 65536,
            created: 0,
            source: String::new(),
            chunks: vec![
                ChunkRef::Stored(chunks[0].0),
                ChunkRef::Zero,
                ChunkRef::Stored(chunks[1].0),
                ChunkRef::Stored(chunks[0].0),
            ]
            .into(),
        };
        let mut want = chunks[0].1.clone();
        want.extend(std::iter::repeat_n(0u8, cs as usize));
        want.extend_from_slice(&chunks[1].1);
        want.extend_from_slice(&chunks[0].1[..1000]);
        (SnapshotImage::new(index, cache.clone()), cache, want)
    }

    #[test]
    fn only_zero_chunks_are_known_zero() {
        let (img, _, _) = image();
        let cs = 1u64 << 20;
        assert!(img.known_zero(cs, cs), "the zero chunk");
        assert!(img.known_zero(cs + 4096, 8192));
        assert!(!img.known_zero(cs - 512, 1024), "spans stored chunk 0");
        assert!(!img.known_zero(2 * cs, 512), "a stored chunk");
    }

    #[test]
    fn extents_follow_the_chunks_and_stop_when_full() {
        use crate::block::Extent;
        let (img, cache, _) = image();
        let cs = 1u64 << 20;
        let ext = |offset, len, max| {
            let mut e = Extents::new(max);
            img.extents(offset, len, &mut e).unwrap();
            e.into_vec()
        };
        let (d, z) = (
            |len| Extent { len, zero: false },
            |len| Extent { len, zero: true },
        );
        // Data, the zero chunk, data (chunks 2 and 3 merged), the padding past the end.
        let size = img.size();
        let tail = size - (3 * cs + 1000);
        assert_eq!(ext(0, size, 16), vec![d(cs), z(cs), d(cs + 1000), z(tail)]);
        // A range inside one chunk; one straddling data and zeros.
        assert_eq!(ext(cs + 4096, 8192, 16), vec![z(8192)]);
        assert_eq!(ext(cs - 512, 1024, 16), vec![d(512), z(512)]);
        // Full after two extents: a prefix, consecutive from the offset.
        let mut e = Extents::new(2);
        img.extents(0, size, &mut e).unwrap();
        assert!(e.stopped());
        assert_eq!(e.into_vec(), vec![d(cs), z(cs)]);
        // Nothing was read to answer.
        assert_eq!(cache.report().mem_misses, 0);
    }

    #[test]
    fn reads_across_chunks_zero_chunks_and_the_tail() {
        let (img, _, want) = image();
        assert_eq!(img.size(), super::super::device_size(want.len() as u64));
        assert_eq!(img.image_size(), want.len() as u64);
        // A read spanning chunk 0's end, the zero chunk and chunk 2's start.
        let at = (1 << 20) - 4096;
        let mut buf = vec![0xffu8; (1 << 20) + 8192];
        img.read_at(at, &mut buf).unwrap();
        assert_eq!(buf, want[at as usize..at as usize + buf.len()]);
        // The last sector: 1000 bytes of data, then zeros to the sector's end.
        let last = img.size() - 512;
        let mut tail = vec![0xffu8; 512];
        img.read_at(last, &mut tail).unwrap();
        let valid = (want.len() as u64 - last) as usize;
        assert_eq!(tail[..valid], want[last as usize..]);
        assert!(tail[valid..].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_fast_path_hits_only_what_is_in_memory() {
        let (img, cache, want) = image();
        let mut buf = vec![0u8; 4096];
        // The zero chunk needs no cache at all.
        assert!(img.read_cached(1 << 20, &mut buf));
        assert!(buf.iter().all(|&b| b == 0));
        // A cold stored chunk misses, and stays a miss until a slow read fills it.
        assert!(!img.read_cached(8192, &mut buf));
        let misses = cache.report().mem_misses;
        img.read_at(8192, &mut buf).unwrap();
        assert!(cache.report().mem_misses > misses);
        buf.fill(0);
        assert!(img.read_cached(8192, &mut buf));
        assert_eq!(buf, want[8192..8192 + 4096]);
    }

    #[test]
    fn it_refuses_writes() {
        let (img, _, _) = image();
        assert!(img.read_only());
        assert_eq!(img.write_at(0, &[0; 512]).unwrap_err().errno(), libc::EROFS);
        assert_eq!(img.discard(0, 512).unwrap_err().errno(), libc::EROFS);
    }
}
