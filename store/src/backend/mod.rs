//! Where a store's objects live: the [`Backend`] trait every store back end
//! implements ([`dir`], a local directory; [`s3`], an S3-compatible bucket), and the
//! [`ChunkSource`] view of chunks the read path uses.
//!
//! A store is a set of named objects (`livemount-store.json`, `chunks/ab/<id>`,
//! `snapshots/<series>/<time>.fidx`, `profiles/<series>.json`, `leases/<id>.json`).
//! The trait is deliberately the intersection of what a POSIX directory and an
//! object store can both do safely: whole-object puts that appear atomically (with
//! an optional create-only mode), ranged gets, listing by prefix, deletes, and a
//! durability barrier that a directory needs (fsync of parent directories) and an
//! object store does not (a completed PUT is durable). No rename, no append, no
//! locks: concurrency between processes and hosts uses lease objects
//! ([`crate::lease`]), which both back ends support the same way.

pub mod dir;
pub mod s3;
#[cfg(any(test, feature = "test-hooks"))]
pub mod throttle;

use crate::error::{Error, Result};
use crate::format::chunk::ChunkId;
use std::sync::Arc;

/// How a put treats an existing object of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace it (configuration, profiles, lease renewals).
    Overwrite,
    /// Fail with [`Put::Existed`] if it exists (snapshot indexes: a concurrent
    /// backup's snapshot is never replaced; chunks: identical bytes by name).
    Create,
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The object was written.
    Written,
    /// [`PutMode::Create`] found the name taken; nothing was written.
    Existed,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Its key, relative to the store root (e.g. `chunks/ab/ab12…`).
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written, seconds since the epoch, by the back end's clock
    /// (the server's for an object store: leases compare against it).
    pub modified: i64,
}

/// How urgent a read is: demand reads (a VM is waiting) go before background
/// reads (pre-staging, read-ahead, verify) at back ends that queue requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadClass {
    /// A guest or a user is waiting for it.
    Demand,
    /// Pre-staging, read-ahead: may wait behind every demand read.
    Background,
}

/// A store's objects. Every method names the object in its errors
/// ([`Backend::describe_key`]), never a secret.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Where the store is, for messages: a directory path or `s3://bucket/prefix`
    /// (with the endpoint). Never contains credentials.
    fn describe(&self) -> String;

    /// The name of `key` for messages.
    fn describe_key(&self, key: &str) -> String {
        format!("{}/{key}", self.describe().trim_end_matches('/'))
    }

    /// True for a local directory (callers may then also use its path, e.g. to
    /// report disk usage); false for a remote store.
    fn local_root(&self) -> Option<&std::path::Path> {
        None
    }

    /// Whole object `key`, at most `limit` bytes (a larger one is an error: objects
    /// are untrusted and an absurd size must not become an absurd allocation).
    /// `Ok(None)` when it does not exist.
    fn get(&self, key: &str, limit: u64, class: ReadClass) -> Result<Option<Vec<u8>>>;

    /// Up to `len` bytes at `offset` of `key` (fewer only at its end). `Ok(None)`
    /// when it does not exist.
    fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: usize,
        class: ReadClass,
    ) -> Result<Option<Vec<u8>>>;

    /// Write `bytes` as `key`, atomically (a reader sees the old object, the whole
    /// new one, or none). Durable when [`Backend::sync`] of `key` returns.
    fn put(&self, key: &str, bytes: &[u8], mode: PutMode) -> Result<Put>;

    /// Queue a [`PutMode::Create`] of `key` that may complete later (a backup's
    /// chunks, uploaded many at once); its failure is reported by the next
    /// [`Backend::sync`] (or put_deferred). The default writes it now.
    fn put_deferred(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        self.put(key, &bytes, PutMode::Create).map(|_| ())
    }

    /// Remove `key`; removing a missing object is not an error.
    fn delete(&self, key: &str) -> Result<()>;

    /// Every object whose key starts with `prefix` (a `/`-terminated directory-like
    /// prefix), in no particular order.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Size and time of `key`, `Ok(None)` when it does not exist.
    fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;

    /// Make the puts and deletes of `keys` durable (a directory fsyncs their parent
    /// directories; an object store's completed requests already are).
    fn sync(&self, keys: &[String]) -> Result<()>;

    /// Request figures of a remote back end (None for a directory).
    fn requests(&self) -> Option<RequestReport> {
        None
    }
}

/// What a remote back end's requests did, for `status`. Fields missing from a
/// status file (a daemon of an older version) read as 0.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RequestReport {
    /// GET requests sent (hedges included).
    pub gets: u64,
    /// GETs hedged with a second request.
    pub hedged: u64,
    /// PUT requests completed.
    pub puts: u64,
    /// Bytes received by GETs.
    pub bytes_in: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// The most requests that were in flight at once.
    pub peak_in_flight: u64,
    /// Median latency of the recent successful GETs, milliseconds.
    pub get_p50_ms: f64,
    /// 99th percentile of the same, milliseconds.
    pub get_p99_ms: f64,
}

/// The key of chunk `id`'s object.
pub fn chunk_key(id: &ChunkId) -> String {
    let hex = id.to_hex();
    format!("chunks/{}/{hex}", &hex[..2])
}

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
    /// [`ChunkLayout::max_file_len`]: crate::format::chunk::ChunkLayout::max_file_len
    fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>>;

    /// [`read_range`](Self::read_range) with a priority class; sources that queue
    /// requests serve [`ReadClass::Demand`] first.
    fn read_range_as(
        &self,
        id: &ChunkId,
        offset: u64,
        len: usize,
        class: ReadClass,
    ) -> Result<Vec<u8>> {
        let _ = class;
        self.read_range(id, offset, len)
    }

    /// [`read_all`](Self::read_all) with a priority class.
    fn read_all_as(&self, id: &ChunkId, limit: u64, class: ReadClass) -> Result<Vec<u8>> {
        let _ = class;
        self.read_all(id, limit)
    }
}

/// The chunks of a store as a [`ChunkSource`], over any [`Backend`].
#[derive(Debug, Clone)]
pub struct BackendChunks {
    backend: Arc<dyn Backend>,
}

impl BackendChunks {
    /// Chunks of the store in `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        BackendChunks { backend }
    }
}

impl ChunkSource for BackendChunks {
    fn read_range(&self, id: &ChunkId, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_range_as(id, offset, len, ReadClass::Demand)
    }

    fn read_all(&self, id: &ChunkId, limit: u64) -> Result<Vec<u8>> {
        self.read_all_as(id, limit, ReadClass::Demand)
    }

    fn read_range_as(
        &self,
        id: &ChunkId,
        offset: u64,
        len: usize,
        class: ReadClass,
    ) -> Result<Vec<u8>> {
        self.backend
            .get_range(&chunk_key(id), offset, len, class)
            .map_err(|e| chunk_error(id, e))?
            .ok_or_else(|| Error::MissingChunk { id: id.to_hex() })
    }

    fn read_all_as(&self, id: &ChunkId, limit: u64, class: ReadClass) -> Result<Vec<u8>> {
        self.backend
            .get(&chunk_key(id), limit, class)
            .map_err(|e| chunk_error(id, e))?
            .ok_or_else(|| Error::MissingChunk { id: id.to_hex() })
    }
}

/// A back end's "not what a chunk file can be" errors (too large, a symlink, not a
/// regular file) name the chunk.
fn chunk_error(id: &ChunkId, e: Error) -> Error {
    match e {
        Error::BadObject(reason) => Error::CorruptChunk {
            id: id.to_hex(),
            reason,
        },
        e => e,
    }
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
    class: ReadClass,
) -> Result<Vec<u8>> {
    use crate::format::chunk::{ChunkLayout, MAX_CONTENT_LEN, MIN_FRAME_SIZE};
    let limit = match expected {
        Some(e) => ChunkLayout::max_file_len(e.content_len, e.frame_size),
        None => ChunkLayout::max_file_len(MAX_CONTENT_LEN, MIN_FRAME_SIZE),
    };
    let file = source.read_all_as(id, limit, class)?;
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
