//! A mount's configuration: one source for every default (the CLI's flags take
//! their defaults from here), saved in the status file so `--recover` reuses it.

use crate::cache::readahead::ReadAheadMode;
use livemount_store::StoreLocation;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Everything a mount needs; saved in the status file so `--recover` can reuse it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountConfig {
    /// The store (a directory or a bucket; no secrets). Status files of older
    /// versions hold a plain directory path.
    #[serde(deserialize_with = "store_location")]
    pub store: StoreLocation,
    /// The mount's lease object in the store, adopted by `--recover`.
    #[serde(default)]
    pub lease: Option<String>,
    /// Snapshot spec as resolved (`series@time`).
    pub snapshot: String,
    /// Overlay file (None: read-only).
    pub overlay: Option<PathBuf>,
    /// True when the overlay is temporary (removed at unmount).
    pub temporary_overlay: bool,
    /// Memory-tier budget, bytes.
    pub cache_mem: u64,
    /// Disk-tier directory.
    pub cache_dir: Option<PathBuf>,
    /// Disk-tier budget, bytes.
    pub cache_size: u64,
    /// Queues.
    pub queues: u16,
    /// Queue depth.
    pub depth: u16,
    /// Refuse writes.
    pub read_only: bool,
    /// Profile that drives pre-staging (default: the one attached to the series).
    #[serde(default)]
    pub profile: Option<PathBuf>,
    /// How much of the profile to stage before ready: seconds, `all` or `none`.
    #[serde(default = "default_prestage")]
    pub prestage: String,
    /// Model a remote store: latency per request, milliseconds (`test-hooks` builds).
    #[serde(default)]
    pub store_latency_ms: Option<f64>,
    /// Model a remote store: bandwidth, bytes/s (`test-hooks` builds).
    #[serde(default)]
    pub store_bandwidth: Option<u64>,
    /// Write what the VM read, as a profile, to this file at unmount (and every
    /// `record_profile_every_s` seconds while serving, so a crash loses little; a
    /// recovered daemon continues the file).
    #[serde(default)]
    pub record_profile: Option<PathBuf>,
    /// Seconds between writes of the learned profile while serving (0: only at stop).
    #[serde(default = "default_record_profile_every")]
    pub record_profile_every_s: u64,
    /// Chunk read-ahead on demand misses (a quarter of `cache_mem` holds compressed
    /// chunks): `auto` chooses by measured store request times.
    #[serde(default)]
    pub readahead: ReadAheadMode,
    /// Sequential read-ahead window in bytes (0: off), capped at `cache_mem / 16` so
    /// read-ahead frames stay in the memory tier's probation segment until read.
    #[serde(default = "default_seq_readahead")]
    pub seq_readahead: u64,
    /// A migration to local storage in progress or done.
    #[serde(default)]
    pub migration: Option<MigrationConfig>,
}

/// Memory tier of the read cache (`--cache-mem`).
pub const DEFAULT_CACHE_MEM: u64 = 256 << 20;
/// Budget of the disk tier (`--cache-size`).
pub const DEFAULT_CACHE_SIZE: u64 = 4 << 30;
/// Hardware queues of the device (`--queues`).
pub const DEFAULT_QUEUES: u16 = 1;
/// Depth of each queue (`--depth`).
pub const DEFAULT_DEPTH: u16 = 64;
/// Worker threads for store reads, decoding and fsync (`--workers`).
pub const DEFAULT_WORKERS: usize = 4;
/// Seconds to wait for the kernel to create the device (`--create-timeout`).
pub const DEFAULT_CREATE_TIMEOUT_S: u64 = 30;
/// Sequential read-ahead window (`--seq-readahead`): 16 MiB.
pub const DEFAULT_SEQ_READAHEAD: u64 = 16 << 20;
/// Seconds between writes of a learned profile (`--record-profile-every`).
pub const DEFAULT_RECORD_PROFILE_EVERY_S: u64 = 30;
/// Pre-staging window (`--prestage`): the profile's first 2 s before the device is
/// ready, the rest in the background (measured: ready in 0.46 s instead of 1.34 s
/// with `all`, and the same boot time; docs/performance.md).
pub const DEFAULT_PRESTAGE: &str = "2";

fn store_location<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StoreLocation, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Location(StoreLocation),
        Path(PathBuf),
    }
    Ok(match Either::deserialize(d)? {
        Either::Location(l) => l,
        Either::Path(path) => StoreLocation::Dir { path },
    })
}

fn default_seq_readahead() -> u64 {
    DEFAULT_SEQ_READAHEAD
}

fn default_record_profile_every() -> u64 {
    DEFAULT_RECORD_PROFILE_EVERY_S
}

fn default_prestage() -> String {
    DEFAULT_PRESTAGE.into()
}

/// A live migration to local storage (`livemount migrate`), kept in the mount's
/// configuration so that `mount --recover` continues it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// The raw image file or block device that receives the disk.
    pub target: PathBuf,
    /// The progress map.
    pub map: PathBuf,
    /// Bytes per second read for the copy (0: unlimited).
    pub rate: u64,
}

impl MountConfig {
    /// A configuration with defaults for everything but store, snapshot and overlay.
    pub fn new(store: StoreLocation, snapshot: String, overlay: Option<PathBuf>) -> Self {
        MountConfig {
            store,
            lease: None,
            snapshot,
            read_only: overlay.is_none(),
            overlay,
            temporary_overlay: false,
            cache_mem: DEFAULT_CACHE_MEM,
            cache_dir: None,
            cache_size: DEFAULT_CACHE_SIZE,
            queues: DEFAULT_QUEUES,
            depth: DEFAULT_DEPTH,
            profile: None,
            prestage: default_prestage(),
            store_latency_ms: None,
            store_bandwidth: None,
            record_profile: None,
            record_profile_every_s: default_record_profile_every(),
            readahead: ReadAheadMode::Auto,
            seq_readahead: default_seq_readahead(),
            migration: None,
        }
    }
}
