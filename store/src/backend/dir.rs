//! The local directory back end: chunk files under `STORE/chunks/`.

use super::ChunkSource;
use crate::error::{Error, IoContext, Result};
use crate::format::chunk::ChunkId;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

    /// Open chunk `id`'s file: never through a symlink, never blocking on a FIFO
    /// planted in its place, and only a regular file is a chunk.
    fn open(&self, id: &ChunkId) -> Result<(File, PathBuf)> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path(id);
        let f = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::MissingChunk { id: id.to_hex() })
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(not_a_file(id, "a symlink"))
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let m = f.metadata().at(&path)?;
        if !m.file_type().is_file() {
            return Err(not_a_file(id, "not a regular file"));
        }
        Ok((f, path))
    }
}

fn not_a_file(id: &ChunkId, what: &str) -> Error {
    Error::CorruptChunk {
        id: id.to_hex(),
        reason: format!("its file is {what}"),
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

    fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>> {
        let (f, path) = self.open(id)?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len > limit {
            return Err(too_large(id, len, limit));
        }
        // Sized from the file's length: one allocation instead of a doubling series;
        // the read stops one byte past the limit in case the file grew meanwhile.
        let mut buf = Vec::with_capacity((len as usize).min(PREALLOC_LIMIT));
        io::Read::read_to_end(&mut io::Read::take(f, limit + 1), &mut buf).at(&path)?;
        if buf.len() as u64 > limit {
            return Err(too_large(id, buf.len() as u64, limit));
        }
        Ok(buf)
    }
}

fn too_large(id: &ChunkId, len: u64, limit: u64) -> Error {
    Error::CorruptChunk {
        id: id.to_hex(),
        reason: format!("its file has {len} bytes, more than a valid chunk can ({limit})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> (tempfile::TempDir, DirChunkSource, ChunkId) {
        let d = tempfile::tempdir().unwrap();
        let src = DirChunkSource::new(d.path());
        let id = ChunkId([0xab; 32]);
        std::fs::create_dir_all(src.prefix_dir(&id)).unwrap();
        (d, src, id)
    }

    #[test]
    fn a_fifo_a_symlink_and_an_oversized_file_are_errors_naming_the_chunk() {
        let (d, src, id) = source();
        // A symlink to a device that would read forever.
        std::os::unix::fs::symlink("/dev/zero", src.path(&id)).unwrap();
        let e = src.read_all(&id, 1 << 20).unwrap_err().to_string();
        assert!(e.contains(&id.to_hex()) && e.contains("symlink"), "{e}");
        std::fs::remove_file(src.path(&id)).unwrap();
        // A FIFO nobody writes: the open must not block.
        let c = std::ffi::CString::new(src.path(&id).to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = src.read_range(&id, 0, 64).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(src.path(&id)).unwrap();
        // A file longer than any valid chunk of the expected size.
        std::fs::write(src.path(&id), vec![0u8; 5000]).unwrap();
        let e = src.read_all(&id, 4096).unwrap_err().to_string();
        assert!(e.contains("more than a valid chunk"), "{e}");
        assert_eq!(src.read_all(&id, 5000).unwrap().len(), 5000);
        drop(d);
    }
}
