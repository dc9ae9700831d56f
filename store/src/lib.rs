//! livemount-store: everything about backups at rest.
//!
//! - [`format`]: the byte-level formats (chunk files, snapshot indexes, profiles);
//! - [`backend`]: where a store's objects live ([`backend::Backend`]: a local
//!   directory or an S3 bucket) and the chunk view the read path uses
//!   ([`backend::ChunkSource`]);
//! - [`store`]: opening a store, its configuration, series and snapshots;
//! - [`lease`]: how backups, gc, mounts and forget on many hosts coordinate;
//! - [`ops`]: backup, restore, verify, gc, info, commit.
//!
//! No block device, no io_uring: the live-mount stack (crate `livemount`) and the
//! profiler build on this crate, never the other way round.

pub mod backend;
pub mod error;
pub mod format;
pub mod fsutil;
pub mod lease;
pub mod ops;
pub mod progress;
pub mod store;
pub mod workers;

pub use error::{Error, IoContext, Result};
pub use store::{Access, SnapshotRef, Store, StoreLocation};
