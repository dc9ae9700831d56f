//! Where chunk files come from: the [`ChunkSource`] trait and the local directory back end.
//!
//! The trait is deliberately small (range reads of a named object) so that an object
//! store back end (`GET` with a `Range` header) can be added without touching the
//! read cache, the restore or the verify code above it.

use super::chunk::ChunkId;
use crate::error::{Error, IoContext, Result};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Read access to stored chunk files. Bytes returned are untrusted: callers verify
/// them with [`ChunkLayout`](super::chunk::ChunkLayout) before use.
pub trait ChunkSource: Send + Sync {
    /// Read up to `len` bytes at `offset` of chunk `id`'s file. Returns fewer bytes
    /// only at the end of the file. A missing chunk is [`Error::MissingChunk`].
    fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>>;

    /// Read chunk `id`'s whole file.
    fn read_all(&self, id: &ChunkId) -> Result<Vec<u8>>;
}

/// Largest buffer reserved up front from a chunk file's length (a store file is
/// untrusted: an absurd length must not become an absurd allocation).
const PREALLOC_LIMIT: usize = 64 << 20;

/// Chunk files in `STORE/chunks/<first two hex digits>/<hex id>`.
#[derive(Debug, Clone)]
pub struct DirChunkSource {
    dir: PathBuf,
}

impl DirChunkSource {
    /// Chunks under `dir` (the store's `chunks/`).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirChunkSource { dir: dir.into() }
    }

    /// The prefix directory of chunk `id`.
    pub fn prefix_dir(&self, id: &ChunkId) -> PathBuf {
        self.dir.join(format!("{:02x}", id.0[0]))
    }

    /// The file of chunk `id`.
    pub fn path(&self, id: &ChunkId) -> PathBuf {
        self.prefix_dir(id).join(id.to_hex())
    }

    /// The directory holding all prefix directories.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn open(&self, id: &ChunkId) -> Result<(File, PathBuf)> {
        let path = self.path(id);
        match File::open(&path) {
            Ok(f) => Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(Error::MissingChunk { id: id.to_hex() })
            }
            Err(e) => Err(Error::io(path, e)),
        }
    }
}

impl ChunkSource for DirChunkSource {
    fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
        let (f, path) = self.open(id)?;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(path, e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn read_all(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let (mut f, path) = self.open(id)?;
        // Sized from the file's length: one allocation instead of a doubling series.
        let len = f.metadata().map(|m| m.len() as usize).unwrap_or(0);
        let mut buf = Vec::with_capacity(len.min(PREALLOC_LIMIT));
        io::Read::read_to_end(&mut f, &mut buf).at(&path)?;
        Ok(buf)
    }
}

/// Read chunk `id` whole from `source` and verify it against its name.
pub fn read_verified(source: &dyn ChunkSource, id: &ChunkId) -> Result<Vec<u8>> {
    let file = source.read_all(id)?;
    super::chunk::ChunkLayout::parse(id, &file)?.decode_all(&file)
}
