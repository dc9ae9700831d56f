//! Chunk files: one content-addressed, zstd-compressed piece of a disk image.
//!
//! # On-disk format (version 1, all integers little-endian; see docs/format.md)
//!
//! ```text
//! ChunkHeader (64 bytes)
//!   0  magic        [u8; 8]  b"LMCHUNK\x01"
//!   8  version      u16      1
//!  10  flags        u16      0 (reserved)
//!  12  frame_size   u32      uncompressed bytes per frame (the last frame may be shorter)
//!  16  content_len  u32      uncompressed length of the chunk
//!  20  frame_count  u32      ceil(content_len / frame_size)
//!  24  id           [u8; 32] the chunk id (must equal the file name)
//!  56  table_crc    u32      crc32c of the seek table
//!  60  header_crc   u32      crc32c of bytes 0..60
//! SeekEntry × frame_count (40 bytes each)
//!   0  frame_hash   [u8; 32] BLAKE3 of the frame's uncompressed bytes
//!  32  stored_len   u32      bytes of the frame in the file
//!  36  raw_len      u32      uncompressed bytes of the frame
//! frames, back to back: a zstd frame each, or the raw bytes when stored_len == raw_len
//! ```
//!
//! # Naming and verification
//! The chunk id is `BLAKE3("livemount chunk v1" ‖ frame_size ‖ content_len ‖ frame_hash…)`,
//! a hash tree of depth two over the uncompressed content. It makes every read
//! verifiable, whole or partial: a reader recomputes the id from the seek table and
//! compares it with the name it asked for (authenticating the table), then checks each
//! decoded frame against its hash in the table. The crcs only give clearer errors for
//! accidental damage; security rests on the hashes. Input from the store is untrusted
//! until these checks pass.

use crate::error::{Error, Result};
use std::fmt;

/// Largest chunk content (the largest chunk size a series may use).
pub const MAX_CONTENT_LEN: u32 = 16 * 1024 * 1024;
/// Smallest frame size a chunk may declare.
pub const MIN_FRAME_SIZE: u32 = 512;
use std::ops::Range;

/// Magic bytes at the start of every chunk file.
pub const CHUNK_MAGIC: [u8; 8] = *b"LMCHUNK\x01";
/// Chunk format version this build writes and reads.
pub const CHUNK_VERSION: u16 = 1;
/// Size of [`ChunkHeader`] on disk.
pub const HEADER_LEN: usize = 64;
/// Size of one seek-table entry on disk.
pub const ENTRY_LEN: usize = 40;
thread_local! {
    static DECODER: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Domain separator of the chunk id hash.
const ID_DOMAIN: &[u8] = b"livemount chunk v1";

/// The name of a chunk: a 32-byte hash of its uncompressed content.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// Lower-case hex, the form used in file names and messages.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Parse 64 hex digits.
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ChunkId(out))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.to_hex())
    }
}

/// Hashes of a chunk's content, computed before deciding whether to store it.
#[derive(Debug, Clone)]
pub struct ChunkDigest {
    /// The chunk id.
    pub id: ChunkId,
    /// BLAKE3 of each frame's uncompressed bytes.
    pub frame_hashes: Vec<[u8; 32]>,
}

fn id_from_hashes(frame_size: u32, content_len: u32, hashes: &[[u8; 32]]) -> ChunkId {
    let mut h = blake3::Hasher::new();
    h.update(ID_DOMAIN);
    h.update(&frame_size.to_le_bytes());
    h.update(&content_len.to_le_bytes());
    for fh in hashes {
        h.update(fh);
    }
    ChunkId(*h.finalize().as_bytes())
}

/// Hash `data` into its chunk id and frame hashes.
pub fn digest(data: &[u8], frame_size: u32) -> ChunkDigest {
    let frame_hashes: Vec<[u8; 32]> = data
        .chunks(frame_size as usize)
        .map(|f| *blake3::hash(f).as_bytes())
        .collect();
    let id = id_from_hashes(frame_size, data.len() as u32, &frame_hashes);
    ChunkDigest { id, frame_hashes }
}

/// Encode `data` as a chunk file. `compressor` is reused across calls by the caller
/// because creating a zstd context per chunk costs more than compressing small frames.
pub fn encode(
    data: &[u8],
    frame_size: u32,
    digest: &ChunkDigest,
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> std::io::Result<Vec<u8>> {
    let frames: Vec<&[u8]> = data.chunks(frame_size as usize).collect();
    let mut table = Vec::with_capacity(frames.len() * ENTRY_LEN);
    let mut body = Vec::with_capacity(data.len() / 2);
    for (frame, hash) in frames.iter().zip(&digest.frame_hashes) {
        let compressed = compressor.compress(frame)?;
        // Store raw when zstd does not help: decoding is then a copy. A stored length
        // equal to the raw length is how a reader tells raw frames apart.
        let stored: &[u8] = if compressed.len() >= frame.len() {
            frame
        } else {
            &compressed
        };
        table.extend_from_slice(hash);
        table.extend_from_slice(&(stored.len() as u32).to_le_bytes());
        table.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        body.extend_from_slice(stored);
    }
    let mut out = Vec::with_capacity(HEADER_LEN + table.len() + body.len());
    out.extend_from_slice(&CHUNK_MAGIC);
    out.extend_from_slice(&CHUNK_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&frame_size.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&(frames.len() as u32).to_le_bytes());
    out.extend_from_slice(&digest.id.0);
    out.extend_from_slice(&crc32c::crc32c(&table).to_le_bytes());
    let header_crc = crc32c::crc32c(&out[..60]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(&table);
    out.extend_from_slice(&body);
    Ok(out)
}

/// One frame's place in a chunk file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLoc {
    /// Offset of the stored frame in the chunk file.
    pub file_offset: u64,
    /// Stored (compressed or raw) length.
    pub stored_len: u32,
    /// Uncompressed length.
    pub raw_len: u32,
    /// BLAKE3 of the uncompressed frame.
    pub hash: [u8; 32],
}

/// A chunk's verified header and seek table: where each frame is and what it hashes to.
#[derive(Debug, Clone)]
pub struct ChunkLayout {
    /// The chunk this describes.
    pub id: ChunkId,
    /// Uncompressed bytes per frame.
    pub frame_size: u32,
    /// Uncompressed length of the chunk.
    pub content_len: u32,
    /// Frames in order.
    pub frames: Vec<FrameLoc>,
}

fn corrupt(id: &ChunkId, reason: impl Into<String>) -> Error {
    Error::CorruptChunk {
        id: id.to_hex(),
        reason: reason.into(),
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl ChunkLayout {
    /// Bytes to read from the start of a chunk file to get the header and the whole
    /// seek table of a chunk of at most `max_content_len` bytes.
    pub fn prefix_len(max_content_len: u32, frame_size: u32) -> usize {
        HEADER_LEN + ENTRY_LEN * max_content_len.div_ceil(frame_size.max(1)) as usize
    }

    /// The largest file a valid chunk of `content_len` bytes in frames of
    /// `frame_size` bytes can have: what a reader may read for it, at most.
    pub fn max_file_len(content_len: u32, frame_size: u32) -> u64 {
        Self::prefix_len(content_len, frame_size.max(MIN_FRAME_SIZE)) as u64 + content_len as u64
    }

    /// Parse and authenticate the header and seek table at the start of `bytes`
    /// (which may hold more, e.g. the whole file), for the chunk named `id`.
    pub fn parse(id: &ChunkId, bytes: &[u8]) -> Result<ChunkLayout> {
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(
                id,
                format!("truncated header ({} bytes)", bytes.len()),
            ));
        }
        let h = &bytes[..HEADER_LEN];
        if h[..8] != CHUNK_MAGIC {
            return Err(corrupt(id, "bad magic"));
        }
        if crc32c::crc32c(&h[..60]) != le_u32(h, 60) {
            return Err(corrupt(id, "header checksum mismatch"));
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version != CHUNK_VERSION {
            return Err(corrupt(id, format!("unsupported chunk version {version}")));
        }
        let frame_size = le_u32(h, 12);
        let content_len = le_u32(h, 16);
        let frame_count = le_u32(h, 20) as usize;
        // Bounded before anything is allocated or decoded from them.
        if !(MIN_FRAME_SIZE..=MAX_CONTENT_LEN).contains(&frame_size)
            || content_len > MAX_CONTENT_LEN
        {
            return Err(corrupt(
                id,
                format!("frame size {frame_size} or length {content_len} out of range"),
            ));
        }
        if frame_count != content_len.div_ceil(frame_size) as usize {
            return Err(corrupt(id, "inconsistent frame count"));
        }
        if h[24..56] != id.0 {
            return Err(corrupt(id, "header names another chunk"));
        }
        let table_end = HEADER_LEN + frame_count * ENTRY_LEN;
        if bytes.len() < table_end {
            return Err(corrupt(id, "truncated seek table"));
        }
        let table = &bytes[HEADER_LEN..table_end];
        if crc32c::crc32c(table) != le_u32(h, 56) {
            return Err(corrupt(id, "seek table checksum mismatch"));
        }
        let mut frames = Vec::with_capacity(frame_count);
        let mut hashes = Vec::with_capacity(frame_count);
        let mut offset = table_end as u64;
        let mut remaining = content_len;
        for e in table.chunks_exact(ENTRY_LEN) {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&e[..32]);
            let stored_len = le_u32(e, 32);
            let raw_len = le_u32(e, 36);
            if raw_len != remaining.min(frame_size) {
                return Err(corrupt(id, "seek table frame length mismatch"));
            }
            // A writer stores a frame raw unless zstd makes it smaller, so a frame is
            // never longer in the file than uncompressed. The stored lengths are not
            // covered by the chunk id: this bound is what keeps a crafted table from
            // asking for more than the index's chunk length allows.
            if stored_len > raw_len || stored_len == 0 {
                return Err(corrupt(
                    id,
                    format!("frame stored in {stored_len} bytes for {raw_len}"),
                ));
            }
            remaining -= raw_len;
            frames.push(FrameLoc {
                file_offset: offset,
                stored_len,
                raw_len,
                hash,
            });
            hashes.push(hash);
            offset += stored_len as u64;
        }
        if id_from_hashes(frame_size, content_len, &hashes) != *id {
            return Err(corrupt(id, "content hash mismatch (seek table)"));
        }
        Ok(ChunkLayout {
            id: *id,
            frame_size,
            content_len,
            frames,
        })
    }

    /// Length of the whole chunk file this layout describes.
    pub fn file_len(&self) -> u64 {
        self.frames
            .last()
            .map(|f| f.file_offset + f.stored_len as u64)
            .unwrap_or((HEADER_LEN) as u64)
    }

    /// The frames that cover `range` of the uncompressed chunk.
    pub fn frames_for(&self, range: Range<u32>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        let first = (range.start / self.frame_size) as usize;
        let last = ((range.end - 1) / self.frame_size) as usize;
        first.min(self.frames.len())..(last + 1).min(self.frames.len())
    }

    /// The byte range in the chunk file that holds frames `frames` (contiguous, so
    /// one read fetches them all).
    pub fn file_range(&self, frames: Range<usize>) -> Range<u64> {
        match (self.frames.get(frames.start), frames.end.checked_sub(1)) {
            (Some(first), Some(last_i)) if last_i >= frames.start => {
                let last = &self.frames[last_i.min(self.frames.len() - 1)];
                first.file_offset..last.file_offset + last.stored_len as u64
            }
            _ => 0..0,
        }
    }

    /// Decode frame `index` from its stored bytes and verify it against its hash.
    pub fn decode_frame(&self, index: usize, stored: &[u8]) -> Result<Vec<u8>> {
        let loc = self
            .frames
            .get(index)
            .ok_or_else(|| corrupt(&self.id, format!("no frame {index}")))?;
        if stored.len() != loc.stored_len as usize {
            return Err(corrupt(&self.id, format!("frame {index} truncated")));
        }
        let raw = if loc.stored_len == loc.raw_len {
            stored.to_vec()
        } else {
            // One reusable decoder context per thread (creating one per frame costs
            // more than decoding 64 KiB), and output capped at the frame's raw length
            // so a damaged frame cannot make us allocate more.
            DECODER.with(|d| {
                let mut d = d.borrow_mut();
                let dec = match d.as_mut() {
                    Some(dec) => dec,
                    None => d.insert(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| corrupt(&self.id, format!("zstd: {e}")))?,
                    ),
                };
                dec.decompress(stored, loc.raw_len as usize)
                    .map_err(|e| corrupt(&self.id, format!("frame {index}: zstd: {e}")))
            })?
        };
        if raw.len() != loc.raw_len as usize || *blake3::hash(&raw).as_bytes() != loc.hash {
            return Err(corrupt(&self.id, format!("frame {index} hash mismatch")));
        }
        Ok(raw)
    }

    /// Decode a contiguous run of frames fetched with one read of
    /// [`file_range`](Self::file_range)`(frames)`, verifying each.
    pub fn decode_frames(&self, frames: Range<usize>, stored: &[u8]) -> Result<Vec<Vec<u8>>> {
        let base = self.file_range(frames.clone()).start;
        frames
            .map(|i| {
                let loc = &self.frames[i];
                let start = (loc.file_offset - base) as usize;
                let end = start + loc.stored_len as usize;
                let bytes = stored
                    .get(start..end)
                    .ok_or_else(|| corrupt(&self.id, format!("frame {i} truncated")))?;
                self.decode_frame(i, bytes)
            })
            .collect()
    }

    /// Decode and verify a whole chunk file.
    pub fn decode_all(&self, file: &[u8]) -> Result<Vec<u8>> {
        if file.len() as u64 != self.file_len() {
            return Err(corrupt(
                &self.id,
                format!("file is {} bytes, expected {}", file.len(), self.file_len()),
            ));
        }
        let mut out = Vec::with_capacity(self.content_len as usize);
        for f in self.decode_frames(
            0..self.frames.len(),
            &file[self.file_range(0..self.frames.len()).start as usize..],
        )? {
            out.extend_from_slice(&f);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // Half text-like (compressible), half pseudo-random (not).
        let mut v: Vec<u8> = (0..len / 2).map(|i| b"livemount "[i % 10]).collect();
        let mut x: u32 = 12345;
        v.extend((len / 2..len).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        }));
        v
    }

    fn enc(data: &[u8], fs: u32) -> (ChunkId, Vec<u8>) {
        let d = digest(data, fs);
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        (d.id, encode(data, fs, &d, &mut c).unwrap())
    }

    #[test]
    fn roundtrip_whole_and_partial() {
        let data = sample(300_000);
        let (id, file) = enc(&data, 65536);
        let layout = ChunkLayout::parse(&id, &file).unwrap();
        assert_eq!(layout.frames.len(), 5);
        assert_eq!(layout.decode_all(&file).unwrap(), data);
        // A read spanning frames 1..3.
        let frames = layout.frames_for(70_000..200_000);
        assert_eq!(frames, 1..4);
        let r = layout.file_range(frames.clone());
        let decoded = layout
            .decode_frames(frames, &file[r.start as usize..r.end as usize])
            .unwrap();
        assert_eq!(decoded.concat(), data[65536..4 * 65536]);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let data = sample(70_000);
        let (id, file) = enc(&data, 16384);
        let layout = ChunkLayout::parse(&id, &file).unwrap();
        // Flip bits across header, table and body; each must be an error, never data.
        for pos in (0..file.len()).step_by(97) {
            let mut bad = file.clone();
            bad[pos] ^= 0x10;
            let res = ChunkLayout::parse(&id, &bad).and_then(|l| l.decode_all(&bad));
            assert!(res.is_err(), "flip at {pos} went unnoticed");
        }
        assert!(layout.decode_all(&file[..file.len() - 1]).is_err());
    }

    #[test]
    fn id_depends_on_content_and_frame_size() {
        let data = sample(100_000);
        assert_ne!(digest(&data, 65536).id, digest(&data, 32768).id);
        let mut other = data.clone();
        other[99_999] ^= 1;
        assert_ne!(digest(&data, 65536).id, digest(&other, 65536).id);
        let id = digest(&data, 65536).id;
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Some(id));
    }

    #[test]
    fn wrong_name_is_rejected() {
        let (_, file) = enc(&sample(10_000), 4096);
        let other = digest(b"other", 4096).id;
        assert!(ChunkLayout::parse(&other, &file).is_err());
    }

    /// Re-seal a chunk file after editing its seek table: the table crc is
    /// forgeable by anyone who can write the file (only the id is not).
    fn reseal(file: &mut [u8]) {
        let frames = le_u32(file, 20) as usize;
        if let Some(table) = file.get(HEADER_LEN..HEADER_LEN.saturating_add(frames * ENTRY_LEN)) {
            let crc = crc32c::crc32c(table);
            file[56..60].copy_from_slice(&crc.to_le_bytes());
        }
        let hcrc = crc32c::crc32c(&file[..60]);
        file[60..64].copy_from_slice(&hcrc.to_le_bytes());
    }

    #[test]
    fn a_forged_stored_length_is_refused_before_anything_is_allocated() {
        let data = sample(200_000);
        let (id, mut file) = enc(&data, 65536);
        // Frame 1 claims to be stored in 4 GiB - 1 bytes: the id still matches (it
        // covers hashes and lengths of content, not of storage), the crcs are redone.
        let at = HEADER_LEN + ENTRY_LEN + 32;
        file[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        reseal(&mut file);
        let e = ChunkLayout::parse(&id, &file).unwrap_err().to_string();
        assert!(e.contains("frame stored in 4294967295 bytes"), "{e}");
        // Every valid file fits the bound readers use.
        let (_, ok) = enc(&data, 65536);
        assert!(ok.len() as u64 <= ChunkLayout::max_file_len(200_000, 65536));
    }

    #[test]
    fn out_of_range_frame_sizes_are_refused() {
        let data = sample(4096);
        for fs in [1u32, 256, MAX_CONTENT_LEN + 1] {
            let d = digest(&data, fs.min(4096));
            let mut c = zstd::bulk::Compressor::new(3).unwrap();
            let mut file = encode(&data, fs.min(4096), &d, &mut c).unwrap();
            file[12..16].copy_from_slice(&fs.to_le_bytes());
            reseal(&mut file);
            let e = ChunkLayout::parse(&d.id, &file).unwrap_err().to_string();
            assert!(e.contains("out of range"), "frame size {fs}: {e}");
        }
    }

    #[test]
    fn decode_returns_err_and_never_panics_on_arbitrary_bytes() {
        // A property test over seeded random inputs: mutated real chunks (which get
        // past the magic and crcs more often than noise) and pure noise.
        let data = sample(100_000);
        let (id, file) = enc(&data, 16384);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..2000 {
            let mut f = if round % 2 == 0 {
                file.clone()
            } else {
                (0..(next() % 4096) as usize)
                    .map(|_| next() as u8)
                    .collect()
            };
            for _ in 0..(next() % 8) {
                if f.is_empty() {
                    break;
                }
                let pos = (next() as usize) % f.len();
                f[pos] = next() as u8;
            }
            if next() % 4 == 0 {
                f.truncate((next() as usize) % (f.len() + 1));
            }
            if round % 3 == 0 && f.len() >= HEADER_LEN {
                reseal(&mut f);
            }
            if let Ok(l) = ChunkLayout::parse(&id, &f) {
                let _ = l.decode_all(&f);
                let r = l.file_range(0..l.frames.len());
                if let Some(b) = f.get(r.start as usize..r.end as usize) {
                    let _ = l.decode_frames(0..l.frames.len(), b);
                }
            }
        }
    }
}
