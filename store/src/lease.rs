//! Leases: how backups, gc, mounts and `forget` on any number of hosts stay out of
//! each other's way without locks (an object store has none; a local `flock` dies
//! with its process, which let `forget` + `gc` delete chunks under a device whose
//! daemon had been killed).
//!
//! # Protocol (also in docs/format.md)
//! A lease is an object `leases/<kind>-<host>-<pid>-<nonce>.json` holding a
//! [`LeaseRecord`]. A process that needs protection:
//! 1. writes its lease,
//! 2. lists `leases/` and looks for a *live* lease that conflicts with it,
//! 3. if it finds one, deletes its own and backs off (fails "busy" or waits);
//!    otherwise it proceeds, renewing its lease every [`renew_interval`] while it
//!    runs, and deletes it when done.
//!
//! Because each side writes before it lists (and S3, Garage, Ceph RGW and local
//! directories all list what a completed write created), of two conflicting
//! processes at least one sees the other: both may back off, never both proceed.
//! Conflicts: `gc` with `backup` (a backup reuses chunks it found in the store or
//! in the previous index: gc must not sweep them before the new index exists) and
//! with another `gc`; `forget S` with `mount S` (a mounted snapshot's index, and so
//! its chunks, stays). Mounts and backups do not conflict with each other.
//!
//! A lease is live while `now <= max(renewed, object time) + ttl + MAX_CLOCK_SKEW`:
//! the writer's clock and the server's are both believed, whichever is later, and
//! skew up to [`MAX_CLOCK_SKEW`] is tolerated in the safe direction (a lease lives
//! longer, gc waits longer). A process killed without cleanup leaves its lease until
//! it expires: a mount's (long ttl) until `mount --recover` adopts it or `unmount`
//! removes it, a backup's (short ttl) for minutes.

use crate::backend::{Backend, PutMode, ReadClass};
use crate::error::{Error, Result};
use crate::store::{hostname, now_secs};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Clock difference between hosts the protocol tolerates (in the safe direction).
pub const MAX_CLOCK_SKEW: i64 = 120;
/// Lifetime of a backup's or gc's lease without renewal.
pub const WRITER_TTL: u64 = 15 * 60;
/// Lifetime of a mount's lease without renewal: a killed daemon's snapshot stays
/// protected this long unless `mount --recover` or `unmount` acts first.
pub const MOUNT_TTL: u64 = 7 * 24 * 3600;
/// The directory of lease objects.
pub const LEASE_PREFIX: &str = "leases/";
/// Largest lease object read (a lease is a few hundred bytes; anything larger is
/// not one).
const LEASE_LIMIT: u64 = 64 * 1024;

/// What a lease protects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum LeaseKind {
    /// A backup or commit writing chunks and an index.
    Backup,
    /// Garbage collection.
    Gc,
    /// A live mount of `snapshot` (`series@time`).
    Mount {
        /// The mounted snapshot.
        snapshot: String,
    },
    /// `forget` removing `snapshot`.
    Forget {
        /// The snapshot being forgotten.
        snapshot: String,
    },
    /// A backup naming its new index in `series` (object stores that ignore
    /// `If-None-Match: *`, such as Garage, would let two backups finishing in the
    /// same second replace each other's index).
    Commit {
        /// The series.
        series: String,
    },
}

impl LeaseKind {
    fn tag(&self) -> &'static str {
        match self {
            LeaseKind::Backup => "backup",
            LeaseKind::Gc => "gc",
            LeaseKind::Mount { .. } => "mount",
            LeaseKind::Forget { .. } => "forget",
            LeaseKind::Commit { .. } => "commit",
        }
    }

    /// True if a process holding `self` must not proceed while `other` is live.
    pub fn conflicts_with(&self, other: &LeaseKind) -> bool {
        use LeaseKind::*;
        match (self, other) {
            (Gc, Backup | Gc) | (Backup, Gc) => true,
            (Forget { snapshot: a }, Mount { snapshot: b })
            | (Mount { snapshot: a }, Forget { snapshot: b }) => a == b,
            (Commit { series: a }, Commit { series: b }) => a == b,
            _ => false,
        }
    }

    fn ttl(&self) -> u64 {
        match self {
            LeaseKind::Mount { .. } => MOUNT_TTL,
            _ => WRITER_TTL,
        }
    }
}

/// A lease object's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// What it protects.
    #[serde(flatten)]
    pub kind: LeaseKind,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder (on `host`).
    pub pid: u32,
    /// When the lease was first taken (holder's clock, seconds since the epoch).
    pub created: i64,
    /// When it was last renewed (holder's clock).
    pub renewed: i64,
    /// Seconds it lives past `renewed` without renewal.
    pub ttl: u64,
    /// Which process table `pid` is in: machine id, boot id and pid namespace.
    #[serde(default)]
    pub holder: Option<String>,
}

impl LeaseRecord {
    /// True if the holder is a process of this very process table (same machine,
    /// same boot, same pid namespace) that no longer exists: a killed backup, gc or
    /// forget, whose lease need not wait for its expiry. Never for mounts: a killed
    /// daemon's device still needs its chunks until it is recovered or unmounted.
    pub fn holder_is_dead_here(&self) -> bool {
        if matches!(self.kind, LeaseKind::Mount { .. }) {
            return false;
        }
        match (&self.holder, holder_id()) {
            (Some(h), Some(me)) if *h == me => {
                // SAFETY: kill with signal 0 only checks that the process exists.
                let rc = unsafe { libc::kill(self.pid as i32, 0) };
                rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            }
            _ => false,
        }
    }

    /// True while the lease protects what it names (see the module docs).
    pub fn is_live(&self, object_time: i64, now: i64) -> bool {
        let ttl = i64::try_from(self.ttl).unwrap_or(i64::MAX / 4);
        self.renewed
            .max(object_time)
            .saturating_add(ttl)
            .saturating_add(MAX_CLOCK_SKEW)
            >= now
    }

    /// "gc by host pid 123 since …" for messages.
    pub fn describe(&self) -> String {
        let what = match &self.kind {
            LeaseKind::Mount { snapshot } => format!("a mount of {snapshot}"),
            LeaseKind::Forget { snapshot } => format!("forget of {snapshot}"),
            LeaseKind::Commit { series } => format!("a backup naming its snapshot of {series}"),
            k => k.tag().to_string(),
        };
        format!(
            "{what} (host {}, pid {}, since {})",
            self.host,
            self.pid,
            crate::store::format_utc(self.created)
        )
    }
}

/// Every lease in the store with its key, live ones only unless `all`.
pub fn list(backend: &dyn Backend, all: bool) -> Result<Vec<(String, LeaseRecord)>> {
    let now = now_secs();
    let mut out = Vec::new();
    for meta in backend.list(LEASE_PREFIX)? {
        if !meta.key.ends_with(".json") {
            continue;
        }
        // A lease removed between list and get is gone: not live.
        let Some(bytes) = backend.get(&meta.key, LEASE_LIMIT, ReadClass::Demand)? else {
            continue;
        };
        // A lease that cannot be read is treated as live and conflicting with
        // everything would block the store forever; as not live it could let gc
        // sweep under a writer. Refuse loudly instead: the operator removes it.
        let rec: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Invalid(format!(
                "{}: not a livemount lease ({e}); remove it if no livemount process wrote it",
                backend.describe_key(&meta.key)
            ))
        })?;
        if rec.holder_is_dead_here() {
            // Its process is gone: remove it for everyone (best effort).
            if !all {
                let _ = backend.delete(&meta.key);
                continue;
            }
        }
        if all || rec.is_live(meta.modified, now) {
            out.push((meta.key, rec));
        }
    }
    Ok(out)
}

struct Renewal {
    stop: Mutex<bool>,
    wake: Condvar,
    /// When the lease was last written successfully (this host's clock).
    last_ok: std::sync::atomic::AtomicI64,
}

/// A held lease: renewed by a background thread, deleted on drop (or left for
/// recovery with [`Lease::keep`]).
pub struct Lease {
    backend: Arc<dyn Backend>,
    key: String,
    record: LeaseRecord,
    renewal: Arc<Renewal>,
    thread: Option<std::thread::JoinHandle<()>>,
    delete_on_drop: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("key", &self.key).finish()
    }
}

/// How often a lease of `ttl` seconds is renewed.
pub fn renew_interval(ttl: u64) -> Duration {
    Duration::from_secs((ttl / 4).clamp(1, 600))
}

/// This process table's identity: `machine-id/boot-id/pid-namespace`, or None when
/// any part is unknown (then no lease is ever judged dead by its pid).
fn holder_id() -> Option<String> {
    let machine = std::fs::read_to_string("/etc/machine-id").ok()?;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let (machine, boot) = (machine.trim(), boot.trim());
    if machine.is_empty() || boot.is_empty() {
        return None;
    }
    Some(format!("{machine}/{boot}/{}", ns.display()))
}

fn nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl Lease {
    /// Take a lease of `kind`: write it, then fail with [`Error::Busy`] (after
    /// deleting it again) if a live conflicting lease exists.
    pub fn acquire(backend: Arc<dyn Backend>, kind: LeaseKind) -> Result<Lease> {
        let host = hostname();
        let pid = std::process::id();
        let safe_host: String = host
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(64)
            .collect();
        let key = format!(
            "{LEASE_PREFIX}{}-{safe_host}-{pid}-{:016x}.json",
            kind.tag(),
            nonce()
        );
        let now = now_secs();
        let record = LeaseRecord {
            ttl: kind.ttl(),
            kind,
            host,
            pid,
            created: now,
            renewed: now,
            holder: holder_id(),
        };
        Self::take(backend, key, record, false)
    }

    /// Take over the lease at `key` (written by a daemon that died: `mount
    /// --recover`), renewing it from now on; acquired anew if it is gone.
    pub fn adopt(backend: Arc<dyn Backend>, key: &str, kind: LeaseKind) -> Result<Lease> {
        if !key.starts_with(LEASE_PREFIX) || key.contains("..") || !key.ends_with(".json") {
            return Err(Error::Invalid(format!("{key:?} is not a lease name")));
        }
        let now = now_secs();
        // Gone (expired and removed, or never written): written anew under the same
        // key, still never deleted on failure.
        let created = match backend.get(key, LEASE_LIMIT, ReadClass::Demand)? {
            Some(b) => serde_json::from_slice::<LeaseRecord>(&b)
                .map(|r| r.created)
                .unwrap_or(now),
            None => now,
        };
        let record = LeaseRecord {
            ttl: kind.ttl(),
            kind,
            host: hostname(),
            pid: std::process::id(),
            created,
            renewed: now,
            holder: holder_id(),
        };
        // An adopted lease is the only protection of a device still waiting in the
        // kernel: no failure here or later deletes it (`Stack::release_lease` does,
        // once the device is gone).
        Self::take(backend, key.to_string(), record, true)
    }

    fn take(
        backend: Arc<dyn Backend>,
        key: String,
        record: LeaseRecord,
        adopted: bool,
    ) -> Result<Lease> {
        write(&*backend, &key, &record)?;
        let conflict = match list(&*backend, false) {
            Ok(all) => all
                .into_iter()
                .find(|(k, r)| *k != key && record.kind.conflicts_with(&r.kind)),
            Err(e) => {
                if !adopted {
                    let _ = backend.delete(&key);
                }
                return Err(e);
            }
        };
        if let Some((_, other)) = conflict {
            if !adopted {
                let _ = backend.delete(&key);
                let _ = durable(&*backend, &key);
            }
            return Err(Error::Busy(format!(
                "store {} is busy: {} is running",
                backend.describe(),
                other.describe()
            )));
        }
        let renewal = Arc::new(Renewal {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            last_ok: std::sync::atomic::AtomicI64::new(record.renewed),
        });
        let thread = {
            let (backend, key, record, renewal) = (
                backend.clone(),
                key.clone(),
                record.clone(),
                renewal.clone(),
            );
            std::thread::Builder::new()
                .name("lease-renew".into())
                .spawn(move || renew_loop(&*backend, &key, record, &renewal))
                .map_err(|e| Error::io("lease renewal thread", e))?
        };
        Ok(Lease {
            backend,
            key,
            record,
            renewal,
            thread: Some(thread),
            delete_on_drop: !adopted,
        })
    }

    /// The lease object's key (kept in a mount's run file for `--recover`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What it holds.
    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    /// Fail unless the lease surely still lives for others: its last successful
    /// write is younger than its ttl less the clock-skew margin. A holder that was
    /// stopped or cut off from the store longer may have lost it (gc may have run):
    /// a backup must then not commit an index naming chunks it uploaded.
    pub fn check_fresh(&self) -> Result<()> {
        let last = self
            .renewal
            .last_ok
            .load(std::sync::atomic::Ordering::SeqCst);
        let ttl = i64::try_from(self.record.ttl).unwrap_or(i64::MAX / 4);
        let age = now_secs().saturating_sub(last);
        if age > ttl.saturating_sub(MAX_CLOCK_SKEW) {
            return Err(Error::Busy(format!(
                "lease {} was last renewed {age} s ago (ttl {ttl} s): another host may have collected garbage meanwhile; run the backup again",
                self.key
            )));
        }
        Ok(())
    }

    /// Stop renewing but leave the object in place (a daemon handing its mount to a
    /// recovering successor); it expires unless adopted.
    pub fn keep(mut self) {
        self.delete_on_drop = false;
    }

    /// Stop renewing and delete the lease now, reporting a failure (dropping it
    /// deletes it too, silently).
    pub fn release(mut self) -> Result<()> {
        self.delete_on_drop = false;
        self.stop_renewal();
        let key = self.key.clone();
        self.backend
            .delete(&key)
            .and_then(|()| durable(&*self.backend, &key))
            .map_err(|e| Error::Invalid(format!("lease {key} stays until it expires: {e}")))
    }

    fn stop_renewal(&mut self) {
        if let Ok(mut s) = self.renewal.stop.lock() {
            *s = true;
        }
        self.renewal.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Remove a lease by key (`unmount` of a mount whose daemon died).
    pub fn remove(backend: &dyn Backend, key: &str) -> Result<()> {
        if !key.starts_with(LEASE_PREFIX) || key.contains("..") {
            return Err(Error::Invalid(format!("{key:?} is not a lease name")));
        }
        backend.delete(key)?;
        durable(backend, key)
    }
}

fn write(backend: &dyn Backend, key: &str, record: &LeaseRecord) -> Result<()> {
    let bytes = serde_json::to_vec(record).map_err(|e| Error::Invalid(e.to_string()))?;
    backend.put(key, &bytes, PutMode::Overwrite)?;
    durable(backend, key)
}

/// Make a lease put or delete durable. Only a directory needs a barrier; an object
/// store's completed request is durable, and its `sync` would also wait for (and
/// report) the holder's own pending chunk uploads — a renewal must never wait
/// behind a backup's upload queue, nor take its errors.
fn durable(backend: &dyn Backend, key: &str) -> Result<()> {
    match backend.local_root() {
        Some(_) => backend.sync(&[key.to_string()]),
        None => Ok(()),
    }
}

fn renew_loop(backend: &dyn Backend, key: &str, mut record: LeaseRecord, r: &Renewal) {
    let every = renew_interval(record.ttl);
    let Ok(mut stop) = r.stop.lock() else { return };
    loop {
        // Checked before every wait: a stop signalled before this thread first took
        // the lock must not be missed (the wait would last a whole interval).
        if *stop {
            return;
        }
        let (guard, _) = match r.wake.wait_timeout(stop, every) {
            Ok(x) => x,
            Err(_) => return,
        };
        stop = guard;
        if *stop {
            return;
        }
        record.renewed = now_secs();
        if let Err(e) = write(backend, key, &record) {
            // Keep trying: the lease still lives for its ttl; a store that stays
            // away that long leaves the holder unprotected, which is worth a line.
            eprintln!("livemount: cannot renew lease {key}: {e}");
        } else {
            r.last_ok
                .store(record.renewed, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewal();
        if self.delete_on_drop {
            let _ = self.backend.delete(&self.key);
            let _ = durable(&*self.backend, &self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::dir::DirBackend;

    fn backend() -> (tempfile::TempDir, Arc<dyn Backend>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("tmp")).unwrap();
        let b: Arc<dyn Backend> = Arc::new(DirBackend::new(d.path()));
        (d, b)
    }

    #[test]
    fn conflicting_leases_exclude_each_other_and_others_coexist() {
        let (_d, b) = backend();
        let backup = Lease::acquire(b.clone(), LeaseKind::Backup).unwrap();
        let _backup2 = Lease::acquire(b.clone(), LeaseKind::Backup).unwrap();
        let e = Lease::acquire(b.clone(), LeaseKind::Gc).unwrap_err();
        assert!(
            matches!(e, Error::Busy(_)) && e.to_string().contains("backup"),
            "{e}"
        );
        let m = LeaseKind::Mount {
            snapshot: "web@t".into(),
        };
        let _mount = Lease::acquire(b.clone(), m).unwrap();
        let e = Lease::acquire(
            b.clone(),
            LeaseKind::Forget {
                snapshot: "web@t".into(),
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("a mount of web@t"), "{e}");
        // Another snapshot can be forgotten; the refused leases left nothing behind.
        Lease::acquire(
            b.clone(),
            LeaseKind::Forget {
                snapshot: "web@u".into(),
            },
        )
        .unwrap();
        assert_eq!(list(&*b, true).unwrap().len(), 3);
        drop(backup);
        assert_eq!(list(&*b, true).unwrap().len(), 2);
    }

    #[test]
    fn a_kept_lease_outlives_its_process_until_removed_and_can_be_adopted() {
        let (_d, b) = backend();
        let kind = LeaseKind::Mount {
            snapshot: "s@t".into(),
        };
        let l = Lease::acquire(b.clone(), kind.clone()).unwrap();
        let key = l.key().to_string();
        l.keep();
        let forget = LeaseKind::Forget {
            snapshot: "s@t".into(),
        };
        assert!(Lease::acquire(b.clone(), forget.clone()).is_err());
        let adopted = Lease::adopt(b.clone(), &key, kind).unwrap();
        assert_eq!(adopted.key(), key);
        adopted.release().unwrap();
        Lease::acquire(b.clone(), forget).unwrap();
    }

    #[test]
    fn an_adopted_lease_is_never_deleted_by_a_failure_or_a_drop() {
        let (_d, b) = backend();
        let snap = "s@t".to_string();
        let kind = LeaseKind::Mount {
            snapshot: snap.clone(),
        };
        let l = Lease::acquire(b.clone(), kind.clone()).unwrap();
        let key = l.key().to_string();
        l.keep(); // its daemon was killed
                  // A forget that got in (both back off): adopting fails, the lease stays.
        let forget = LeaseRecord {
            kind: LeaseKind::Forget { snapshot: snap },
            host: "other".into(),
            pid: 1,
            created: now_secs(),
            renewed: now_secs(),
            ttl: 600,
            holder: None,
        };
        write(&*b, "leases/forget-x.json", &forget).unwrap();
        assert!(Lease::adopt(b.clone(), &key, kind.clone()).is_err());
        assert!(
            b.head(&key).unwrap().is_some(),
            "a failed adopt removed the lease"
        );
        b.delete("leases/forget-x.json").unwrap();
        // Adopted, then dropped (a recovering daemon failing later): still there.
        drop(Lease::adopt(b.clone(), &key, kind).unwrap());
        assert!(
            b.head(&key).unwrap().is_some(),
            "dropping an adopted lease removed it"
        );
    }

    #[test]
    fn a_lease_not_renewed_for_its_ttl_is_not_fresh() {
        let (_d, b) = backend();
        let l = Lease::acquire(b.clone(), LeaseKind::Backup).unwrap();
        l.check_fresh().unwrap();
        // As if the holder had been stopped (or cut off) for an hour.
        l.renewal
            .last_ok
            .store(now_secs() - 3600, std::sync::atomic::Ordering::SeqCst);
        let e = l.check_fresh().unwrap_err().to_string();
        assert!(e.contains("last renewed"), "{e}");
    }

    #[test]
    fn expiry_believes_the_later_clock_and_tolerates_skew() {
        let r = LeaseRecord {
            kind: LeaseKind::Backup,
            host: "h".into(),
            pid: 1,
            created: 1000,
            renewed: 1000,
            ttl: 100,
            holder: None,
        };
        assert!(r.is_live(0, 1100 + MAX_CLOCK_SKEW));
        assert!(!r.is_live(0, 1101 + MAX_CLOCK_SKEW));
        // The server saw a later write than the holder's clock says.
        assert!(r.is_live(5000, 5100));
        // A crafted lease cannot overflow the arithmetic.
        let huge = LeaseRecord {
            renewed: i64::MAX - 1,
            ttl: u64::MAX,
            ..r
        };
        assert!(huge.is_live(0, 0));
    }

    #[test]
    fn a_dead_local_holder_frees_its_lease_but_a_dead_mount_keeps_it() {
        let (_d, b) = backend();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let put = |key: &str, kind: LeaseKind| {
            let rec = LeaseRecord {
                kind,
                host: hostname(),
                pid: dead_pid,
                created: now_secs(),
                renewed: now_secs(),
                ttl: 3600,
                holder: holder_id(),
            };
            write(&*b, key, &rec).unwrap();
        };
        put("leases/backup-x.json", LeaseKind::Backup);
        Lease::acquire(b.clone(), LeaseKind::Gc).unwrap();
        assert!(b.head("leases/backup-x.json").unwrap().is_none());
        put(
            "leases/mount-x.json",
            LeaseKind::Mount {
                snapshot: "s@t".into(),
            },
        );
        let forget = LeaseKind::Forget {
            snapshot: "s@t".into(),
        };
        assert!(Lease::acquire(b.clone(), forget).is_err());
    }

    #[test]
    fn a_garbled_lease_is_an_error_naming_it() {
        let (_d, b) = backend();
        b.put("leases/x.json", b"{not json", PutMode::Overwrite)
            .unwrap();
        let e = Lease::acquire(b.clone(), LeaseKind::Gc)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("leases/x.json") && e.contains("not a livemount lease"),
            "{e}"
        );
        // Its own lease was removed again.
        assert_eq!(b.list(LEASE_PREFIX).unwrap().len(), 1);
    }
}
