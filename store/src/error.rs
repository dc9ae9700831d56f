//! The library's error type, with the errno a block device returns for each.
//!
//! Every message names the thing it is about (a path, a chunk, a snapshot) so that the
//! binary can print it as one line.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the store, the backup, the restore and the mount.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file or device.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file, directory or device.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A chunk file whose content does not match its name, or that cannot be decoded.
    #[error("chunk {id} is corrupt: {reason}")]
    CorruptChunk {
        /// Hex chunk id.
        id: String,
        /// What check failed.
        reason: String,
    },
    /// A chunk a snapshot references is not in the store.
    #[error("chunk {id} is missing from the store")]
    MissingChunk {
        /// Hex chunk id.
        id: String,
    },
    /// A snapshot index that is truncated, bit-flipped or otherwise malformed.
    #[error("snapshot index {}: {reason}", path.display())]
    CorruptIndex {
        /// The index file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },
    /// A file written by a newer (or unknown) version of the on-disk format.
    #[error("{}: unsupported {what} format version {found} (this livemount supports version {supported})", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Which format.
        what: &'static str,
        /// The version found.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The named snapshot or series does not exist.
    #[error("snapshot {0} not found in the store")]
    SnapshotNotFound(String),
    /// The store or snapshot is in use (locked) by another process.
    #[error("{0}")]
    Busy(String),
    /// Bad input from the user (names, sizes, paths of the wrong kind).
    #[error("{0}")]
    Invalid(String),
    /// A stored object that cannot be what its name says (too large, a symlink, not
    /// a regular file); the message names it.
    #[error("{0}")]
    BadObject(String),
    /// A remote store failed a request (after its retries); names the endpoint,
    /// bucket and object, never a credential.
    #[error("{what}: {reason}")]
    Remote {
        /// `s3://bucket/key at endpoint`.
        what: String,
        /// What the server or the network said.
        reason: String,
    },
}

impl Error {
    /// Wrap an I/O error with the path it happened on.
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// The errno to complete a block request with when this error happens on the
    /// read or write path. Data errors become EIO: never return wrong bytes.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Busy(_) => libc::EBUSY,
            Error::Invalid(_) => libc::EINVAL,
            Error::Remote { .. } | Error::BadObject(_) => libc::EIO,
            Error::SnapshotNotFound(_) => libc::ENOENT,
            Error::CorruptChunk { .. }
            | Error::MissingChunk { .. }
            | Error::CorruptIndex { .. }
            | Error::UnsupportedVersion { .. } => libc::EIO,
        }
    }

    /// True when this error means the store holds bad or missing data (as opposed to
    /// an environment problem such as a full disk).
    pub fn is_data_error(&self) -> bool {
        matches!(
            self,
            Error::CorruptChunk { .. } | Error::MissingChunk { .. } | Error::CorruptIndex { .. }
        )
    }
}

/// Extension to attach a path to `io::Result`s.
pub trait IoContext<T> {
    /// Map the error to [`Error::Io`] naming `path`.
    fn at(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_map_to_eio() {
        let e = Error::MissingChunk { id: "ab".into() };
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.is_data_error());
        let e = Error::io("/x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(e.to_string(), "/x: No space left on device (os error 28)");
    }
}
