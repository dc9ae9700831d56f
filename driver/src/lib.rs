//! livemount: boot virtual machines straight from their backups.
//!
//! The data path reads in one direction:
//! frontend (ublk) → overlay → snapshot index → read cache → chunk source.
//! This crate holds the chunk store (backups), and the layers of the live mount.

pub mod profile;
