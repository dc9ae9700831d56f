//! livemount: boot virtual machines straight from their backups.
//!
//! The live-mount side of livemount (backups at rest are crate `livemount_store`).
//! The data path reads in one direction, and the module tree follows it:
//!
//! ```text
//! cli → daemon → frontend (ublk) → block (recorder → overlay → image) → cache → livemount_store
//! ```
//!
//! [`stack`] builds the block stack from a mount's configuration; [`paths`] and
//! [`metrics`] sit at the bottom, importable from everywhere. docs/architecture.md
//! has the rules.

pub mod block;
pub mod cache;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod frontend;
pub mod metrics;
pub mod paths;
pub mod stack;

pub use livemount_store::error;
pub use livemount_store::error::{Error, Result};
