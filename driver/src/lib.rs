//! livemount: boot virtual machines straight from their backups.
//!
//! The data path reads in one direction:
//! frontend (ublk) → overlay → snapshot index → read cache → chunk source.
//! This crate holds the chunk store (backups), and the layers of the live mount.

pub mod error;
pub mod profile;
pub mod store;

pub use error::{Error, Result};
pub mod backup;
pub mod cache;
pub mod commit;
pub mod copy;
pub mod gc;
pub mod image;
pub mod info;
pub mod metrics;
pub mod mount;
pub mod overlay;
pub mod prestage;
pub mod progress;
pub mod restore;
pub mod sequential;
pub mod ublk;
pub mod verify;
pub mod workers;
