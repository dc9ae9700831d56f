//! livemount-store: everything about backups at rest.
//!
//! - [`format`]: the byte-level formats (chunk files, snapshot indexes, profiles);
//! - [`backend`]: where chunk bytes come from ([`backend::ChunkSource`]; today the
//!   local directory);
//! - [`store`]: opening a store, its configuration, series, snapshots and locks;
//! - [`ops`]: backup, restore, verify, gc, info, commit.
//!
//! No block device, no io_uring: the live-mount stack (crate `livemount`) and the
//! profiler build on this crate, never the other way round.

pub mod backend;
pub mod error;
pub mod format;
pub mod fsutil;
pub mod ops;
pub mod progress;
pub mod store;
pub mod workers;

pub use error::{Error, IoContext, Result};
pub use store::{Access, SnapshotRef, Store};
