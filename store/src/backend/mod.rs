//! Where chunk files come from: the [`ChunkSource`] trait every store back end
//! implements, and its back ends ([`dir`], the local directory).
//!
//! The trait is deliberately small (range reads of a named object) so that an object
//! store back end (`GET` with a `Range` header) can be added without touching the
//! read cache, the restore or the verify code above it.

pub mod dir;
#[cfg(any(test, feature = "test-hooks"))]
pub mod throttle;

use crate::error::Result;
use crate::format::chunk::ChunkId;

/// Read access to stored chunk files. Bytes returned are untrusted: callers verify
/// them with [`ChunkLayout`](crate::format::chunk::ChunkLayout) before use.
pub trait ChunkSource: Send + Sync {
    /// Read up to `len` bytes at `offset` of chunk `id`'s file. Returns fewer bytes
    /// only at the end of the file. A missing chunk is [`Error::MissingChunk`].
    fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Read chunk `id`'s whole file, which must be at most `limit` bytes (a larger
    /// one is [`Error::CorruptChunk`]: the caller knows from the index how large a
    /// valid file can be, see [`ChunkLayout::max_file_len`]).
    ///
    /// [`Error::CorruptChunk`]: crate::error::Error::CorruptChunk
    /// [`ChunkLayout::max_file_len`]: crate::format::chunk::ChunkLayout::max_file_len
    fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>>;
}

/// What an index says a chunk holds: its length and frame size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// Uncompressed bytes.
    pub content_len: u32,
    /// Frame size.
    pub frame_size: u32,
}

/// Read chunk `id` whole from `source` and verify it against its name and, when
/// known, what the index expects of it (a chunk of the right name but another
/// length would make the image wrong).
pub fn read_verified(
    source: &dyn ChunkSource,
    id: &ChunkId,
    expected: Option<Expected>,
) -> Result<Vec<u8>> {
    use crate::format::chunk::{ChunkLayout, MAX_CONTENT_LEN, MIN_FRAME_SIZE};
    let limit = match expected {
        Some(e) => ChunkLayout::max_file_len(e.content_len, e.frame_size),
        None => ChunkLayout::max_file_len(MAX_CONTENT_LEN, MIN_FRAME_SIZE),
    };
    let file = source.read_all(id, limit)?;
    let layout = ChunkLayout::parse(id, &file)?;
    if let Some(e) = expected {
        if layout.content_len != e.content_len || layout.frame_size != e.frame_size {
            return Err(crate::error::Error::CorruptChunk {
                id: id.to_hex(),
                reason: format!(
                    "holds {} bytes in frames of {}, the index expects {} in frames of {}",
                    layout.content_len, layout.frame_size, e.content_len, e.frame_size
                ),
            });
        }
    }
    layout.decode_all(&file)
}
