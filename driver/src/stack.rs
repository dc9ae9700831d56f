//! Building a live mount's block stack from its configuration: store → read cache
//! → snapshot image → overlay → migration → recorder, plus pre-staging. Used by the daemon (to
//! serve it) and by `commit` (to read the merged image), so both see exactly the
//! same bytes.

use crate::block::image::SnapshotImage;
use crate::block::migrate::{DeviceKey, Migrating};
use crate::block::overlay::{Overlay, OverlayIdentity};
use crate::block::prestage::Prestager;
use crate::block::recording::Recorder;
use crate::block::{device_size, BlockDevice};
use crate::cache::disk::DiskTier;
use crate::cache::ReadCache;
use crate::config::{MigrationConfig, MountConfig};
use crate::error::{Error, Result};
use livemount_store::backend::ChunkSource;
use livemount_store::format::index::ChunkRef;
use livemount_store::format::profile::Profile;
use livemount_store::lease::Lease;
use livemount_store::ops::backup::{BackupOptions, BackupReport};
use livemount_store::ops::commit::ImageRead;
use livemount_store::progress::Progress;
use livemount_store::store::{Access, SnapshotRef, Store, StoreLocation};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::Arc;

/// Threads of sequential read-ahead: requests in flight ahead of a reader.
const SEQ_READAHEAD_THREADS: usize = 2;
/// Concurrent store reads of pre-staging.
const PRESTAGE_THREADS: usize = 8;

/// An opened mount: layers built, device not yet created.
pub struct Stack {
    /// The configuration, with the snapshot resolved to `series@time`.
    pub config: MountConfig,
    /// What a frontend serves: the top layer.
    pub top: Arc<dyn BlockDevice>,
    /// The recording layer (`--record-profile`).
    pub recorder: Option<Arc<Recorder>>,
    /// The overlay (None: read-only).
    pub overlay: Option<Arc<Overlay>>,
    /// Live migration to local storage (idle until `livemount migrate`).
    pub migrating: Arc<Migrating>,
    /// The snapshot image at the bottom.
    pub image: Arc<SnapshotImage>,
    /// The read cache (for status).
    pub cache: Arc<ReadCache>,
    /// Pre-staging, when a profile applies.
    pub prestager: Option<Arc<Prestager>>,
    /// The store's back end (its request figures for status).
    pub backend: Arc<dyn livemount_store::backend::Backend>,
    /// Keeps the snapshot from being forgotten while the mount lives (None: the
    /// store is read-only to this host, see [`Stack::open`]); released by
    /// [`Stack::release_lease`] when the device is gone (a daemon exits without
    /// dropping its stack).
    lease: std::sync::Mutex<Option<Lease>>,
}

/// Identity of `snap` for overlays: the index's checksum and the device size.
pub fn snapshot_identity(
    store: &Store,
    snap: &SnapshotRef,
    device_size: u64,
) -> Result<OverlayIdentity> {
    Ok(OverlayIdentity {
        snapshot: snap.to_string(),
        index_sum: store.snapshot_sum(snap)?,
        device_size,
    })
}

/// The store back end a mount reads chunks from. With the `test-hooks` feature, the
/// throttled model of a remote store (`--store-latency`, `--store-bandwidth`).
fn origin(store: &Store, config: &MountConfig) -> Arc<dyn ChunkSource> {
    let dir: Arc<dyn ChunkSource> = Arc::new(store.chunks().clone());
    #[cfg(feature = "test-hooks")]
    if config.store_latency_ms.is_some() || config.store_bandwidth.is_some() {
        return Arc::new(livemount_store::backend::throttle::ThrottledSource::new(
            dir,
            std::time::Duration::from_secs_f64(config.store_latency_ms.unwrap_or(0.0) / 1000.0),
            config.store_bandwidth,
        ));
    }
    #[cfg(not(feature = "test-hooks"))]
    let _ = config;
    dir
}

/// True if `e` says the store does not let this host write (read-only file system,
/// permissions, read-only credentials).
fn refuses_writes(e: &livemount_store::Error) -> bool {
    match e {
        livemount_store::Error::Io { source, .. } => matches!(
            source.raw_os_error(),
            Some(libc::EROFS | libc::EACCES | libc::EPERM)
        ),
        livemount_store::Error::Remote { reason, .. } => reason.starts_with("access denied"),
        _ => false,
    }
}

impl Stack {
    /// Remove the mount's lease from the store: the device is gone and nothing
    /// reads the snapshot any more. A store that cannot be reached keeps it until
    /// it expires, which is worth a line.
    pub fn release_lease(&self) {
        let lease = self.lease.lock().ok().and_then(|mut l| l.take());
        if let Some(l) = lease {
            if let Err(e) = l.release() {
                eprintln!("livemount: warning: {e}");
            }
        }
    }

    /// Build the layers of a mount (the store opened read-only). A mount whose
    /// migration is complete is rebuilt from its TARGET alone when the store cannot
    /// be opened (it no longer needs it).
    /// A migration in the configuration (a recovered mount's) is continued before
    /// the stack is returned, so no request is served before it is in place.
    pub fn open(config: &MountConfig) -> Result<Stack> {
        match Self::open_with_store(config) {
            Ok(s) => {
                if let Some(m) = &config.migration {
                    if let Err(e) = s.resume_migration(m) {
                        // A completed migration's TARGET is the disk: serving the
                        // overlay instead would show stale data.
                        if crate::block::migrate::completed(&m.map).is_some() {
                            return Err(e);
                        }
                        eprintln!(
                            "livemount: error: cannot continue the migration to {}: {e}",
                            m.target.display()
                        );
                    }
                }
                Ok(s)
            }
            // Another process holds the overlay: not a store problem.
            Err(e @ Error::Busy(_)) => Err(e),
            Err(e) => {
                let done = config
                    .migration
                    .as_ref()
                    .and_then(|m| crate::block::migrate::completed(&m.map).map(|k| (m, k)));
                let Some((m, key)) = done else {
                    return Err(e);
                };
                eprintln!(
                    "livemount: warning: the store is unavailable ({e}); the migration to {} is complete, so the device is served from it alone",
                    m.target.display()
                );
                let s = Self::open_migrated(config, key)?;
                // Over a stand-in image of zeros: it must serve TARGET before
                // anything, and never copy (it would copy zeros).
                s.start_migration(m, true, true)?;
                if !s.migrating.migrated() {
                    return Err(Error::Invalid(format!(
                        "the migration map {} says complete but TARGET could not be served",
                        m.map.display()
                    )));
                }
                Ok(s)
            }
        }
    }

    /// The stack of a completed migration without its store: the migration layer
    /// (serving TARGET) over an image of zero chunks that is never read.
    fn open_migrated(config: &MountConfig, key: DeviceKey) -> Result<Stack> {
        use livemount_store::format::index::{ChunkList, SnapshotIndex};
        let region = u32::try_from(key.region).map_err(|_| {
            Error::Invalid(format!("migration map: region {} out of range", key.region))
        })?;
        let index = SnapshotIndex {
            image_size: key.size,
            chunk_size: region,
            frame_size: region.min(64 << 10),
            created: 0,
            source: "migrated".into(),
            chunks: ChunkList::zeros(key.size.div_ceil(key.region) as usize),
        };
        let backend: Arc<dyn livemount_store::backend::Backend> =
            Arc::new(livemount_store::backend::dir::DirBackend::new(
                std::path::PathBuf::from("/nonexistent-store"),
            ));
        let origin: Arc<dyn ChunkSource> = Arc::new(livemount_store::backend::BackendChunks::new(
            backend.clone(),
        ));
        let cache = Arc::new(ReadCache::new(origin, 1 << 20, None, index.frame_size));
        let image = Arc::new(SnapshotImage::new(index, cache.clone()));
        let migrating =
            Arc::new(Migrating::new(image.clone(), key).with_read_only(config.read_only));
        Ok(Stack {
            config: config.clone(),
            top: migrating.clone(),
            recorder: None,
            overlay: None,
            migrating,
            image,
            cache,
            prestager: None,
            lease: std::sync::Mutex::new(None),
            backend,
        })
    }

    fn open_with_store(config: &MountConfig) -> Result<Stack> {
        let store = Store::open_at(&config.store, Access::ReadOnly)?;
        let snap = store.resolve(&config.snapshot)?;
        // The lease comes before the index is read (crate::lease). A store this host
        // may only read (read-only credentials or file system) cannot hold one: the
        // mount still works, but forget + gc elsewhere could take its chunks (reads
        // would then fail with EIO, never return wrong bytes), so say so.
        let lease = match store.lease_mount(&snap, config.lease.as_deref()) {
            Ok(l) => Some(l),
            // Only a store this host may not write to: any other failure (a timeout,
            // a server error) would leave a mount meant to live for days unprotected
            // after one blip, so it fails the mount instead.
            Err(e) if !refuses_writes(&e) => return Err(e),
            Err(e) => {
                eprintln!(
                    "livemount: warning: no lease on {snap} (it is not protected from forget + gc): {e}"
                );
                None
            }
        };
        let index = store.load_index(&snap)?;
        let size = device_size(index.image_size);
        let index_chunk_size = index.chunk_size as u64;
        let image_size = index.image_size;
        let profile = match &config.profile {
            Some(p) => Some(Profile::load(p).map_err(|e| Error::Invalid(e.to_string()))?),
            None => store.attached_profile(&snap.series)?,
        };
        let disk = match &config.cache_dir {
            Some(d) => Some(DiskTier::open(d, config.cache_size)?),
            None => None,
        };
        let cache = Arc::new(
            ReadCache::new(
                origin(&store, config),
                config.cache_mem,
                disk,
                index.frame_size,
            )
            .with_chunk_readahead(config.readahead, config.cache_mem / 4),
        );
        let prestager = match &profile {
            Some(p) => Some(Arc::new(Prestager::new(
                Arc::new(index.clone()),
                cache.clone(),
                p,
                true,
                PRESTAGE_THREADS,
            )?)),
            None => None,
        };
        let image = Arc::new(
            SnapshotImage::new(index, cache.clone()).with_sequential_readahead(
                config.seq_readahead.min(config.cache_mem / 16),
                SEQ_READAHEAD_THREADS,
            ),
        );
        let mut top: Arc<dyn BlockDevice> = image.clone();
        let id = snapshot_identity(&store, &snap, size)?;
        let overlay = match (&config.overlay, config.read_only) {
            (Some(p), false) => {
                let o = Arc::new(Overlay::open(p, top.clone(), &id)?);
                top = o.clone();
                Some(o)
            }
            _ => None,
        };
        let migrating = Arc::new(Migrating::new(
            top.clone(),
            DeviceKey {
                size,
                region: index_chunk_size,
                index_sum: id.index_sum,
            },
        ));
        top = migrating.clone();
        let recorder = config.record_profile.as_ref().map(|_| {
            let r = Arc::new(Recorder::new(top.clone(), image_size));
            top = r.clone();
            r
        });
        let mut config = config.clone();
        config.snapshot = snap.to_string();
        config.lease = lease.as_ref().map(|l| l.key().to_string());
        Ok(Stack {
            config,
            top,
            recorder,
            overlay,
            migrating,
            image,
            cache,
            prestager,
            lease: std::sync::Mutex::new(lease),
            backend: store.backend().clone(),
        })
    }

    /// Start (or resume) migrating the device to `target` (see
    /// [`crate::block::migrate`]): the progress map goes next to a file target,
    /// next to the overlay for a block device. Profile regions are copied first; the
    /// copier yields to demand reads.
    pub fn migrate(&self, target: &Path, rate: u64) -> Result<MigrationConfig> {
        let map = match std::fs::metadata(target) {
            Ok(m) if m.file_type().is_block_device() => match &self.config.overlay {
                Some(o) => o.with_extension("lmmig"),
                None => {
                    return Err(Error::Invalid(format!(
                        "{} is a block device and the mount has no overlay to keep the progress map beside; migrate to a file",
                        target.display()
                    )))
                }
            },
            _ => {
                let mut m = target.as_os_str().to_owned();
                m.push(".lmmig");
                m.into()
            }
        };
        let config = MigrationConfig {
            target: target.to_path_buf(),
            map,
            rate,
        };
        if !target.exists() {
            self.check_room(target)?;
        }
        self.start_migration(&config, false, false)?;
        Ok(config)
    }

    /// Refuse a new TARGET file on a file system without room for the disk's data:
    /// every stored chunk and every byte the overlay holds (zero chunks stay holes).
    fn check_room(&self, target: &Path) -> Result<()> {
        let index = self.image.index();
        let stored: u64 = index
            .chunks
            .runs()
            .filter(|(_, _, c)| matches!(c, ChunkRef::Stored(_)))
            .map(|(_, n, _)| n as u64 * index.chunk_size as u64)
            .sum();
        let needed = (stored + self.overlay_bytes()).min(self.top.size());
        let dir = target
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let free = livemount_store::fsutil::free_bytes(dir).map_err(|e| Error::io(dir, e))?;
        if free < needed {
            return Err(Error::Invalid(format!(
                "{} has {:.1} MiB free; the disk holds up to {:.1} MiB of data: make room or migrate elsewhere",
                dir.display(),
                free as f64 / 1048576.0,
                needed as f64 / 1048576.0
            )));
        }
        Ok(())
    }

    /// Continue the migration `config` describes from its durable map (a recovered
    /// mount, a restarted server).
    pub fn resume_migration(&self, config: &MigrationConfig) -> Result<()> {
        self.start_migration(config, true, false)
    }

    fn start_migration(
        &self,
        config: &MigrationConfig,
        resume: bool,
        only_if_complete: bool,
    ) -> Result<()> {
        let order = self
            .prestager
            .as_ref()
            .map(|p| p.chunk_order())
            .unwrap_or_default();
        let cache = self.cache.clone();
        // Copier 0 waits for the VM's fetches in flight; the others copy only while
        // the VM has not fetched for 200 ms (on a busy VM, one copier's CPU is all
        // the copy takes from it).
        let wait_idle: Arc<dyn Fn(usize) -> bool + Send + Sync> = Arc::new(move |k| {
            use std::time::Duration;
            if k > 0 && cache.demand_recent(Duration::from_millis(200)) {
                std::thread::sleep(Duration::from_millis(100));
                return false;
            }
            cache.wait_for_demand_idle(Duration::from_millis(50));
            true
        });
        self.migrating.start(
            config.clone(),
            self.config.overlay.as_deref(),
            order,
            wait_idle,
            resume,
            only_if_complete,
        )
    }

    /// Bytes in the snapshot's image (the device may be rounded up to 512).
    pub fn image_size(&self) -> u64 {
        self.image.image_size()
    }

    /// The overlay's state (None without an overlay).
    pub fn overlay_state(&self) -> Option<crate::block::overlay::OverlayState> {
        self.overlay.as_ref().map(|o| o.state())
    }

    /// Bytes the overlay holds (0 for a read-only mount).
    pub fn overlay_bytes(&self) -> u64 {
        self.overlay
            .as_ref()
            .map(|o| o.mapped_sectors.load(std::sync::atomic::Ordering::Relaxed) * 512)
            .unwrap_or(0)
    }
}

/// The top of a stack as the store's commit reads it: the image's exact size.
struct Merged<'a>(&'a Stack);

impl ImageRead for Merged<'_> {
    fn size(&self) -> u64 {
        self.0.image_size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.top.read_at(offset, buf)
    }
    fn unchanged(&self, offset: u64, len: u64) -> Option<ChunkRef> {
        let index = self.0.image.index();
        let cs = index.chunk_size as u64;
        let i = usize::try_from(offset / cs).ok()?;
        let entry = index.chunks.get(i)?;
        let whole = offset.is_multiple_of(cs) && len == index.chunk_len(i) as u64;
        let untouched = self
            .0
            .overlay
            .as_ref()
            .is_none_or(|o| o.untouched(offset, len));
        (whole && untouched).then_some(*entry)
    }
}

/// `livemount commit`: back up `overlay` over the snapshot it records as a new
/// snapshot of `opts.series`. The overlay is locked while it is read, so a running
/// mount's overlay is refused.
pub fn commit(
    store_loc: &StoreLocation,
    overlay: &Path,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupReport> {
    if !overlay.is_file() {
        return Err(Error::Invalid(format!(
            "overlay {} does not exist",
            overlay.display()
        )));
    }
    let identity = crate::block::overlay::read_identity(overlay)?;
    let mut config = MountConfig::new(
        store_loc.clone(),
        identity.snapshot.clone(),
        Some(overlay.to_path_buf()),
    );
    config.cache_mem = 64 << 20;
    // Pre-staging is for boots, not for a sequential read of the whole disk.
    config.prestage = "none".into();
    let stack = Stack::open(&config)?;
    let store = Store::open_at(store_loc, Access::Write)?;
    let description = format!("{} + overlay {}", identity.snapshot, overlay.display());
    livemount_store::ops::commit::commit(
        &store,
        &Merged(&stack),
        overlay,
        &description,
        opts,
        progress,
    )
}
