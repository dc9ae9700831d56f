//! Snapshot indexes: the ordered list of chunks that make up one disk image.
//!
//! # On-disk format (version 1, little-endian; see docs/format.md)
//!
//! ```text
//! IndexHeader (64 bytes)
//!   0  magic        [u8; 8]  b"LMINDEX\x01"
//!   8  version      u32      1
//!  12  source_len   u32      bytes of the UTF-8 source description that follows the header
//!  16  image_size   u64      bytes in the image
//!  24  chunk_size   u32      bytes per chunk (the last chunk may be shorter)
//!  28  frame_size   u32      bytes per compressed frame inside a chunk
//!  32  created      i64      creation time, seconds since the Unix epoch (UTC)
//!  40  chunk_count  u64      ceil(image_size / chunk_size)
//!  48  reserved     [u8; 16] zero
//! source description   source_len bytes
//! entries              chunk_count × 32 bytes: a chunk id, or 32 zero bytes for a zero chunk
//! checksum             BLAKE3 of everything above (32 bytes)
//! ```
//! The trailing checksum catches truncation and bit flips anywhere in the file.

use super::chunk::ChunkId;
use crate::error::{Error, Result};
use std::path::Path;

/// Magic bytes of an index file.
pub const INDEX_MAGIC: [u8; 8] = *b"LMINDEX\x01";
/// Index format version this build writes and reads.
pub const INDEX_VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
/// Entry value of a chunk that is all zeros (never stored).
pub const ZERO_ENTRY: [u8; 32] = [0; 32];
/// Upper bound on the source description, so a corrupt length cannot make us allocate.
const MAX_SOURCE_LEN: usize = 64 * 1024;
/// Chunk sizes an index may declare.
pub const CHUNK_SIZE_RANGE: (u32, u32) = (64 * 1024, super::chunk::MAX_CONTENT_LEN);
/// Largest image an index may describe (64 TiB): every size derived from it (the
/// overlay's map, the device) stays bounded.
pub const MAX_IMAGE_SIZE: u64 = 64 << 40;

/// One chunk position of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zeros, not stored.
    Zero,
    /// A stored chunk.
    Stored(ChunkId),
}

/// A parsed snapshot index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotIndex {
    /// Bytes in the image.
    pub image_size: u64,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// Bytes per frame inside a chunk.
    pub frame_size: u32,
    /// Creation time, seconds since the epoch.
    pub created: i64,
    /// What was backed up (path, size, host).
    pub source: String,
    /// The chunks in order.
    pub chunks: ChunkList,
}

/// The chunks of an image in order, kept as runs of equal entries.
///
/// A thin disk is mostly zero chunks: a 4 TiB image at 1 MiB chunks has 4 M
/// positions, and a `Vec<ChunkRef>` of them costs 132 MiB of memory before one byte
/// is read, in every mount, backup and gc. Runs make the cost follow the data: one
/// run (36 bytes) per stretch of equal entries — a zero stretch of any length, or a
/// stored chunk. Lookup is a binary search over the runs.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChunkList {
    /// Positions.
    len: u32,
    /// First position of each run, ascending; run `r` ends where run `r + 1` starts.
    starts: Vec<u32>,
    /// The entry of each run.
    refs: Vec<ChunkRef>,
}

/// Largest number of positions a [`ChunkList`] holds (64 TiB at 64 KiB chunks).
pub const MAX_CHUNKS: u64 = MAX_IMAGE_SIZE / CHUNK_SIZE_RANGE.0 as u64;

impl ChunkList {
    /// An empty list.
    pub fn new() -> ChunkList {
        ChunkList::default()
    }

    /// `len` zero chunks.
    pub fn zeros(len: usize) -> ChunkList {
        let mut l = ChunkList::new();
        l.push_run(ChunkRef::Zero, len);
        l
    }

    /// Append `n` copies of `c`.
    pub fn push_run(&mut self, c: ChunkRef, n: usize) {
        if n == 0 {
            return;
        }
        if self.refs.last() != Some(&c) {
            self.starts.push(self.len);
            self.refs.push(c);
        }
        // Callers are bounded by MAX_CHUNKS (decode checks the count first).
        self.len = self
            .len
            .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// Append one entry.
    pub fn push(&mut self, c: ChunkRef) {
        self.push_run(c, 1);
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// True if there are no positions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entry at position `i`.
    pub fn get(&self, i: usize) -> Option<&ChunkRef> {
        if i >= self.len() {
            return None;
        }
        let r = self.starts.partition_point(|&s| s as usize <= i) - 1;
        self.refs.get(r)
    }

    /// The entries, one per position.
    pub fn iter(&self) -> ChunkIter<'_> {
        ChunkIter {
            list: self,
            pos: 0,
            run: 0,
        }
    }

    /// The runs: (first position, positions, entry).
    pub fn runs(&self) -> impl Iterator<Item = (usize, usize, &ChunkRef)> + '_ {
        (0..self.refs.len()).map(move |r| {
            let start = self.starts[r] as usize;
            let end = self.starts.get(r + 1).map_or(self.len(), |&s| s as usize);
            (start, end - start, &self.refs[r])
        })
    }

    /// Bytes of memory the list holds.
    pub fn heap_bytes(&self) -> usize {
        self.starts.capacity() * 4 + self.refs.capacity() * std::mem::size_of::<ChunkRef>()
    }
}

impl std::fmt::Debug for ChunkList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.runs()).finish()
    }
}

impl std::ops::Index<usize> for ChunkList {
    type Output = ChunkRef;
    fn index(&self, i: usize) -> &ChunkRef {
        match self.get(i) {
            Some(c) => c,
            None => panic!("chunk position {i} out of range ({})", self.len),
        }
    }
}

impl FromIterator<ChunkRef> for ChunkList {
    fn from_iter<T: IntoIterator<Item = ChunkRef>>(iter: T) -> ChunkList {
        let mut l = ChunkList::new();
        for c in iter {
            l.push(c);
        }
        l
    }
}

impl From<Vec<ChunkRef>> for ChunkList {
    fn from(v: Vec<ChunkRef>) -> ChunkList {
        v.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a ChunkList {
    type Item = &'a ChunkRef;
    type IntoIter = ChunkIter<'a>;
    fn into_iter(self) -> ChunkIter<'a> {
        self.iter()
    }
}

/// Iterator over a [`ChunkList`]'s positions.
pub struct ChunkIter<'a> {
    list: &'a ChunkList,
    pos: usize,
    run: usize,
}

impl<'a> Iterator for ChunkIter<'a> {
    type Item = &'a ChunkRef;
    fn next(&mut self) -> Option<&'a ChunkRef> {
        if self.pos >= self.list.len() {
            return None;
        }
        while self
            .list
            .starts
            .get(self.run + 1)
            .is_some_and(|&s| s as usize <= self.pos)
        {
            self.run += 1;
        }
        self.pos += 1;
        self.list.refs.get(self.run)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.list.len() - self.pos;
        (n, Some(n))
    }
}

impl ExactSizeIterator for ChunkIter<'_> {}

impl SnapshotIndex {
    /// Number of chunks an image of `image_size` bytes needs.
    pub fn chunk_count(image_size: u64, chunk_size: u32) -> u64 {
        image_size.div_ceil(chunk_size as u64)
    }

    /// Uncompressed length of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: usize) -> u32 {
        let start = i as u64 * self.chunk_size as u64;
        (self.image_size - start).min(self.chunk_size as u64) as u32
    }

    /// Serialize to the on-disk form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(HEADER_LEN + self.source.len() + self.chunks.len() * 32 + 32);
        out.extend_from_slice(&INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.source.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.frame_size.to_le_bytes());
        out.extend_from_slice(&self.created.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(self.source.as_bytes());
        for c in &self.chunks {
            match c {
                ChunkRef::Zero => out.extend_from_slice(&ZERO_ENTRY),
                ChunkRef::Stored(id) => out.extend_from_slice(&id.0),
            }
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parse and check an index read from `path` (named in errors).
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotIndex> {
        let bad = |reason: String| Error::CorruptIndex {
            path: path.to_path_buf(),
            reason,
        };
        if bytes.len() < HEADER_LEN + 32 {
            return Err(bad(format!("truncated ({} bytes)", bytes.len())));
        }
        if bytes[..8] != INDEX_MAGIC {
            return Err(bad("not a livemount snapshot index (bad magic)".into()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != INDEX_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                what: "snapshot index",
                found: version,
                supported: INDEX_VERSION,
            });
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(bad("checksum mismatch (truncated or damaged)".into()));
        }
        // Reserved for later versions: a writer of this version leaves them zero, so
        // anything else is damage or a format this build does not know.
        if bytes[48..64].iter().any(|&b| b != 0) {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        let source_len = u32_at(12) as usize;
        let image_size = u64_at(16);
        let chunk_size = u32_at(24);
        let frame_size = u32_at(28);
        let created = u64_at(32) as i64;
        let chunk_count = u64_at(40);
        if !(CHUNK_SIZE_RANGE.0..=CHUNK_SIZE_RANGE.1).contains(&chunk_size)
            || !(super::chunk::MIN_FRAME_SIZE..=chunk_size).contains(&frame_size)
        {
            return Err(bad(format!(
                "chunk size {chunk_size} or frame size {frame_size} out of range"
            )));
        }
        if source_len > MAX_SOURCE_LEN || image_size > MAX_IMAGE_SIZE {
            return Err(bad(format!(
                "source length {source_len} or image size {image_size} out of range"
            )));
        }
        if chunk_count != Self::chunk_count(image_size, chunk_size) || chunk_count > MAX_CHUNKS {
            return Err(bad("chunk count does not match image size".into()));
        }
        let expected = chunk_count
            .checked_mul(32)
            .and_then(|n| n.checked_add((HEADER_LEN + source_len) as u64))
            .ok_or_else(|| bad("chunk count out of range".into()))?;
        if body.len() as u64 != expected {
            return Err(bad(format!(
                "length {} does not match header ({expected})",
                body.len()
            )));
        }
        let source = std::str::from_utf8(&body[HEADER_LEN..HEADER_LEN + source_len])
            .map_err(|_| bad("source description is not UTF-8".into()))?
            .to_string();
        let chunks = body[HEADER_LEN + source_len..]
            .chunks_exact(32)
            .map(|e| {
                if e == ZERO_ENTRY {
                    ChunkRef::Zero
                } else {
                    let mut id = [0u8; 32];
                    id.copy_from_slice(e);
                    ChunkRef::Stored(ChunkId(id))
                }
            })
            .collect();
        Ok(SnapshotIndex {
            image_size,
            chunk_size,
            frame_size,
            created,
            source,
            chunks,
        })
    }

    /// Distinct stored chunk ids.
    pub fn stored_ids(&self) -> Vec<ChunkId> {
        let mut ids: Vec<ChunkId> = self
            .chunks
            .runs()
            .filter_map(|(_, _, c)| match c {
                ChunkRef::Stored(id) => Some(*id),
                ChunkRef::Zero => None,
            })
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SnapshotIndex {
        SnapshotIndex {
            image_size: 3 * 1024 * 1024 + 5,
            chunk_size: 1024 * 1024,
            frame_size: 65536,
            created: 1_700_000_000,
            source: "/dev/vdb on host1".into(),
            chunks: vec![
                ChunkRef::Stored(ChunkId([1; 32])),
                ChunkRef::Zero,
                ChunkRef::Stored(ChunkId([2; 32])),
                ChunkRef::Stored(ChunkId([1; 32])),
            ]
            .into(),
        }
    }

    #[test]
    fn roundtrip() {
        let idx = sample();
        let bytes = idx.encode();
        assert_eq!(SnapshotIndex::decode(Path::new("x"), &bytes).unwrap(), idx);
        assert_eq!(idx.stored_ids().len(), 2);
        assert_eq!(idx.chunk_len(3), 5);
    }

    #[test]
    fn chunk_lists_keep_runs_and_answer_like_a_vector() {
        let a = ChunkRef::Stored(ChunkId([1; 32]));
        let b = ChunkRef::Stored(ChunkId([2; 32]));
        let v = vec![
            ChunkRef::Zero,
            ChunkRef::Zero,
            a,
            a,
            b,
            ChunkRef::Zero,
            ChunkRef::Zero,
            ChunkRef::Zero,
            b,
        ];
        let l = ChunkList::from(v.clone());
        assert_eq!(l.len(), v.len());
        assert_eq!(l.runs().count(), 5);
        for (i, c) in v.iter().enumerate() {
            assert_eq!(l.get(i), Some(c), "{i}");
            assert_eq!(&l[i], c, "{i}");
        }
        assert_eq!(l.get(v.len()), None);
        assert_eq!(l.iter().copied().collect::<Vec<_>>(), v);
        assert_eq!(l.iter().len(), v.len());
        // A 4 TiB image of zero chunks but one, at 1 MiB chunks: three runs.
        let mut big = ChunkList::zeros(2 << 20);
        big.push(a);
        big.push_run(ChunkRef::Zero, (2 << 20) - 1);
        assert_eq!(big.len(), 4 << 20);
        assert_eq!(big.runs().count(), 3);
        assert!(big.heap_bytes() < 1024, "{}", big.heap_bytes());
        assert_eq!(big.get(2 << 20), Some(&a));
        assert_eq!(big.get((2 << 20) + 1), Some(&ChunkRef::Zero));
        let idx = SnapshotIndex {
            image_size: 4 << 40,
            chunk_size: 1 << 20,
            frame_size: 65536,
            created: 1,
            source: String::new(),
            chunks: big,
        };
        let back = SnapshotIndex::decode(Path::new("x"), &idx.encode()).unwrap();
        assert_eq!(back, idx);
        assert!(back.chunks.heap_bytes() < 1024);
    }

    #[test]
    fn truncation_and_flips_are_rejected() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(SnapshotIndex::decode(Path::new("x"), &bytes[..n]).is_err());
        }
        for pos in 0..bytes.len() {
            let mut b = bytes.clone();
            b[pos] ^= 4;
            assert!(
                SnapshotIndex::decode(Path::new("x"), &b).is_err(),
                "flip at {pos}"
            );
        }
    }

    #[test]
    fn future_version_is_named() {
        let mut bytes = sample().encode();
        bytes[8] = 9;
        let e = SnapshotIndex::decode(Path::new("idx"), &bytes).unwrap_err();
        assert!(
            e.to_string()
                .contains("unsupported snapshot index format version 9"),
            "{e}"
        );
    }

    /// Re-seal an index after editing it (its checksum is not a secret).
    fn reseal(bytes: &mut Vec<u8>) {
        bytes.truncate(bytes.len() - 32);
        let sum = blake3::hash(bytes);
        bytes.extend_from_slice(sum.as_bytes());
    }

    #[test]
    fn crafted_sizes_are_refused_before_anything_is_allocated() {
        let good = sample().encode();
        let set_u32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let set_u64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        // Chunk size 1 with a huge image: chunk_count * 32 would overflow.
        let mut b = good.clone();
        set_u32(&mut b, 24, 1);
        set_u64(&mut b, 16, u64::MAX);
        set_u64(&mut b, 40, u64::MAX);
        reseal(&mut b);
        let e = SnapshotIndex::decode(Path::new("x"), &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
        // A frame size larger than the chunk (4 GiB decodes).
        let mut b = good.clone();
        set_u32(&mut b, 28, u32::MAX);
        reseal(&mut b);
        let e = SnapshotIndex::decode(Path::new("x"), &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("frame size 4294967295"), "{e}");
        // An image larger than any disk we mount, with a consistent chunk count.
        let mut b = good;
        let size = MAX_IMAGE_SIZE + 1;
        set_u64(&mut b, 16, size);
        set_u64(&mut b, 40, size.div_ceil(1 << 20));
        reseal(&mut b);
        let e = SnapshotIndex::decode(Path::new("x"), &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("image size"), "{e}");
    }

    /// Found by the `index_decode` fuzz target: an index whose reserved bytes were
    /// not zero decoded, and re-encoding it gave other bytes.
    #[test]
    fn non_zero_reserved_bytes_are_refused() {
        let mut b = sample().encode();
        b[56] = 0xfe;
        reseal(&mut b);
        let e = SnapshotIndex::decode(Path::new("x"), &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reserved"), "{e}");
    }
}
