//! `record` and `watch`: turn traced events into profiles.

use crate::target::{Target, Translate};
use crate::tracer::{monotonic_ns, Counters, Tracer, TracerConfig};
use anyhow::{bail, Context, Result};
use livemount_ebpf_abi::{Event, InodeKey};
use livemount_store::format::profile::{ExtentBuilder, Profile, Source, Stats, DEFAULT_BLOCK_SIZE};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set by SIGINT/SIGTERM; the loops end cleanly and write what they have.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Route SIGINT and SIGTERM to the [`STOP`] flag.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe;
        // the sigaction struct is fully initialised (zeroed, then handler set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Shared tracing options.
#[derive(Clone, Debug)]
pub struct Options {
    /// Profile granularity in bytes.
    pub block_size: u32,
    /// Coalescing window for adjacent reads (ns).
    pub coalesce_ns: u64,
    /// Ring buffer size in bytes.
    pub ring_bytes: u32,
    /// Process filter (0: all).
    pub tgid: u32,
    /// cgroup v2 id filter (0: all).
    pub cgroup_id: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            block_size: DEFAULT_BLOCK_SIZE,
            coalesce_ns: livemount_store::format::profile::DEFAULT_COALESCE_NS,
            ring_bytes: 64 << 20,
            tgid: 0,
            cgroup_id: 0,
        }
    }
}

fn tracer_config(targets: &[Target], opts: &Options) -> TracerConfig {
    let mut devices: Vec<u32> = targets.iter().filter_map(|t| t.block_dev()).collect();
    devices.sort_unstable();
    devices.dedup();
    let inodes = targets
        .iter()
        .filter_map(|t| match t.translate {
            Translate::PageCache { dev, ino } => Some(InodeKey { dev, _pad: 0, ino }),
            _ => None,
        })
        .collect();
    TracerConfig {
        devices,
        inodes,
        tgid: opts.tgid,
        cgroup_id: opts.cgroup_id,
        ring_bytes: opts.ring_bytes,
    }
}

/// One boot being recorded on one target.
struct Session {
    builder: ExtentBuilder,
    seen: u64,
    outside: u64,
    first_ns: Option<u64>,
    last_ns: u64,
    started_unix: u64,
    counters_at_start: Counters,
}

impl Session {
    fn new(target: &Target, opts: &Options, counters: Counters) -> Session {
        Session {
            builder: ExtentBuilder::new(target.disk_size, opts.block_size, opts.coalesce_ns),
            seen: 0,
            outside: 0,
            first_ns: None,
            last_ns: 0,
            started_unix: unix_now(),
            counters_at_start: counters,
        }
    }

    /// Feed one event that passed the kernel filter for this target's device.
    fn add(&mut self, target: &Target, ev: &Event, scratch: &mut Vec<(u64, u64)>) -> bool {
        scratch.clear();
        if !target.map_event(ev, scratch) {
            return false;
        }
        self.seen += 1;
        for &(off, len) in scratch.iter() {
            self.builder.add(off, len, ev.ts_ns);
        }
        if self.first_ns.is_none_or(|f| ev.ts_ns < f) {
            self.first_ns = Some(ev.ts_ns);
        }
        self.last_ns = self.last_ns.max(ev.ts_ns);
        true
    }

    fn finish(&self, target: &Target, tracer: &str, counters: Counters) -> Profile {
        let mut p = Profile::new(
            target.disk_size,
            self.builder.block_size(),
            source(target, tracer),
        );
        p.source.started_unix = self.started_unix;
        p.extents = self.builder.finish();
        p.stats = Stats {
            events_seen: self.seen,
            events_lost: counters.lost.saturating_sub(self.counters_at_start.lost),
            events_outside: self.outside,
            duration_ns: self
                .first_ns
                .map(|f| self.last_ns.saturating_sub(f))
                .unwrap_or(0),
        };
        p
    }
}

fn source(target: &Target, tracer: &str) -> Source {
    Source {
        host: hostname(),
        device: target.path.display().to_string(),
        kernel: kernel_release(),
        tracer: tracer.to_owned(),
        started_unix: unix_now(),
        runs: 1,
    }
}

/// How `record` ends.
#[derive(Clone, Copy, Debug)]
pub struct StopWhen {
    /// After this long.
    pub duration: Option<Duration>,
    /// After this long without reads, once there was at least one.
    pub until_idle: Option<Duration>,
}

/// `record`: trace one disk until the stop condition or Ctrl-C, write the profile.
pub fn record(target: &Target, opts: &Options, stop: StopWhen, out: &Path) -> Result<Profile> {
    let mut tracer = Tracer::start(&tracer_config(std::slice::from_ref(target), opts))?;
    let tracer_name = tracer.attached.join("+");
    eprintln!(
        "recording {} ({}), {} bytes; Ctrl-C to stop",
        target.path.display(),
        target.description,
        target.disk_size
    );
    if matches!(target.translate, Translate::File { .. }) {
        eprintln!(
            "note: reads the host serves from its page cache never reach the disk and are \
             missing here; use --page-cache to see every buffered read of the image"
        );
    }
    let start = monotonic_ns();
    let mut session = Session::new(target, opts, tracer.counters()?);
    let mut scratch = Vec::new();
    loop {
        tracer.poll(Duration::from_millis(100), |ev| {
            if !session.add(target, ev, &mut scratch) {
                session.outside += 1;
            }
        })?;
        if STOP.load(Ordering::SeqCst) {
            break;
        }
        let now = monotonic_ns();
        if let Some(d) = stop.duration {
            if now.saturating_sub(start) >= d.as_nanos() as u64 {
                break;
            }
        }
        if let (Some(idle), Some(_)) = (stop.until_idle, session.first_ns) {
            if now.saturating_sub(session.last_ns) >= idle.as_nanos() as u64 {
                break;
            }
        }
    }
    // Events submitted before we stopped may still sit in the ring.
    tracer.drain(&mut |ev| {
        if !session.add(target, ev, &mut scratch) {
            session.outside += 1;
        }
    });
    let counters = tracer.counters()?;
    if counters.read_errors > 0 {
        eprintln!(
            "warning: {} tracepoint field reads failed; the tracefs offsets may be wrong",
            counters.read_errors
        );
    }
    let profile = session.finish(target, &tracer_name, counters);
    profile
        .save(out)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "wrote {}: {} extents, {} bytes read, {} events, {} lost",
        out.display(),
        profile.extents.len(),
        profile.working_set_bytes(),
        profile.stats.events_seen,
        profile.stats.events_lost
    );
    if profile.stats.events_lost > 0 {
        eprintln!("warning: events were lost; raise --ring-mib");
    }
    Ok(profile)
}

/// Options of `watch`.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// Output directory.
    pub dir: PathBuf,
    /// A boot ends (and the next read starts a new one) after this long without reads.
    pub idle: Duration,
    /// A boot is cut after this long even if reads continue.
    pub max_boot: Duration,
    /// Profiles kept per disk; older ones are deleted.
    pub keep: usize,
    /// Boots with fewer events than this are not written (stray reads, e.g. udev probes).
    pub min_events: u64,
}

/// `watch`: stay attached to several disks, write one profile per boot.
pub fn watch(targets: &[Target], opts: &Options, wopts: &WatchOptions) -> Result<()> {
    std::fs::create_dir_all(&wopts.dir)
        .with_context(|| format!("creating {}", wopts.dir.display()))?;
    let mut names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        bail!(
            "two --disk paths have the same file name; profiles would collide in {}",
            wopts.dir.display()
        );
    }
    let mut tracer = Tracer::start(&tracer_config(targets, opts))?;
    let tracer_name = tracer.attached.join("+");
    eprintln!(
        "watching {} disk(s), writing to {}; a boot ends after {:?} idle",
        targets.len(),
        wopts.dir.display(),
        wopts.idle
    );
    let mut sessions: Vec<Option<Session>> = targets.iter().map(|_| None).collect();
    let mut scratch = Vec::new();
    let idle_ns = wopts.idle.as_nanos() as u64;
    let max_ns = wopts.max_boot.as_nanos() as u64;
    loop {
        let counters = tracer.counters()?;
        let mut failed: Option<anyhow::Error> = None;
        tracer.poll(Duration::from_millis(500), |ev| {
            for (t, s) in targets.iter().zip(sessions.iter_mut()) {
                let session = s.get_or_insert_with(|| Session::new(t, opts, counters));
                if !session.add(t, ev, &mut scratch) && session.first_ns.is_none() {
                    // Not ours: don't keep an empty session around.
                    *s = None;
                }
            }
        })?;
        let stopping = STOP.load(Ordering::SeqCst);
        let now = monotonic_ns();
        let counters = tracer.counters()?;
        for (t, s) in targets.iter().zip(sessions.iter_mut()) {
            let Some(session) = s else { continue };
            let Some(first) = session.first_ns else {
                continue;
            };
            let ended = stopping
                || now.saturating_sub(session.last_ns) >= idle_ns
                || now.saturating_sub(first) >= max_ns;
            if !ended {
                continue;
            }
            if session.seen >= wopts.min_events {
                let profile = session.finish(t, &tracer_name, counters);
                if let Err(e) = write_rotated(&profile, t, wopts) {
                    failed = Some(e);
                }
            }
            *s = None;
        }
        if let Some(e) = failed {
            // Keep watching: a full disk must not end production tracing.
            eprintln!("error: {e:#}");
        }
        if stopping {
            return Ok(());
        }
    }
}

fn write_rotated(profile: &Profile, target: &Target, wopts: &WatchOptions) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Millisecond stamps: boots of one disk never collide, names sort by time.
    let name = format!(
        "{}-{}.{:03}Z.json",
        target.name,
        timestamp(now.as_secs()).trim_end_matches('Z'),
        now.subsec_millis()
    );
    let path = wopts.dir.join(&name);
    profile
        .save(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "boot of {}: wrote {} ({} extents, {} bytes, {} events, {} lost)",
        target.path.display(),
        path.display(),
        profile.extents.len(),
        profile.working_set_bytes(),
        profile.stats.events_seen,
        profile.stats.events_lost
    );
    // Rotate: names sort by time (fixed-width UTC timestamp), keep the newest.
    let prefix = format!("{}-", target.name);
    let mut old: Vec<PathBuf> = std::fs::read_dir(&wopts.dir)
        .with_context(|| format!("listing {}", wopts.dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix)
                    && n.ends_with(".json")
                    && is_stamp(&n[prefix.len()..n.len() - 5])
            })
        })
        .collect();
    old.sort();
    while old.len() > wopts.keep.max(1) {
        let p = old.remove(0);
        std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    Ok(())
}

fn is_stamp(s: &str) -> bool {
    // YYYYMMDDTHHMMSS.mmmZ
    s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit() || b"TZ.".contains(&b))
}

/// `YYYYMMDDTHHMMSSZ` (UTC) without a date crate.
pub fn timestamp(unix: u64) -> String {
    let days = unix / 86_400;
    let secs = unix % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_and_sortable() {
        assert_eq!(timestamp(0), "19700101T000000Z");
        assert_eq!(timestamp(1_700_000_000), "20231114T221320Z");
        assert!(is_stamp("20231114T221320.123Z"));
        assert!(!is_stamp("20231114T221320Z"));
    }
}
