//! `livemount mount`: a snapshot as a live block device, in the foreground, as a
//! daemon (`--daemon`), or supervised (`--auto-recover`).

use super::parse::{parse_prestage, parse_size};
use super::Outcome;
use crate::cache::readahead::ReadAheadMode;
use crate::config::*;
use crate::daemon::ready::{self, Readiness};
use crate::daemon::{self, status, RunOptions};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// Arguments of `livemount mount`.
#[derive(clap::Args, Clone)]
pub struct Args {
    /// The store: a directory or `s3://BUCKET/PREFIX` (not needed with --recover).
    #[arg(
        long = "store",
        value_name = "DIR|s3://BUCKET/PREFIX",
        env = "LIVEMOUNT_STORE"
    )]
    store: Option<String>,
    #[command(flatten)]
    s3: super::S3Args,
    /// `series@time`, or `series` for its latest (not needed with --recover).
    snapshot: Option<String>,
    /// Overlay file for writes (created if missing; default: a temporary one removed at unmount).
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Memory tier of the read cache (decoded frames), bytes or with K/M/G.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CACHE_MEM)]
    cache_mem: u64,
    /// Directory of the disk tier of the read cache (compressed frames; kept across restarts).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Budget of the disk tier, bytes or with K/M/G.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CACHE_SIZE)]
    cache_size: u64,
    /// Hardware queues of the device.
    #[arg(long, default_value_t = DEFAULT_QUEUES)]
    queues: u16,
    /// Depth of each queue.
    #[arg(long, default_value_t = DEFAULT_DEPTH)]
    depth: u16,
    /// Refuse writes (EROFS); no overlay.
    #[arg(long)]
    read_only: bool,
    /// Return once the device is ready, leaving the daemon running.
    #[arg(long)]
    daemon: bool,
    /// Log file of a --daemon mount (default: /run/livemount/mount-PID.log).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Re-attach a new daemon to DEV after its daemon died (same snapshot, overlay, cache).
    #[arg(long, value_name = "DEV")]
    recover: Option<String>,
    /// Worker threads for store reads, decoding and fsync.
    #[arg(long, default_value_t = DEFAULT_WORKERS)]
    workers: usize,
    /// Seconds to wait for the kernel to create the device.
    #[arg(long, default_value_t = DEFAULT_CREATE_TIMEOUT_S)]
    create_timeout: u64,
    /// Profile for pre-staging (default: the profile attached to the series, if any).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Stage the profile's first SECONDS of reads before the device is ready, `all`, or `none`
    /// (the rest is fetched in the background, after on-demand reads).
    #[arg(long, default_value = DEFAULT_PRESTAGE, value_parser = parse_prestage)]
    prestage: String,
    /// At unmount, write what the VM read during the mount as a profile to FILE.
    #[arg(long)]
    record_profile: Option<PathBuf>,
    /// With --record-profile: also write it every SECS seconds while serving (0:
    /// only at unmount), so a daemon that dies loses at most that much.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = DEFAULT_RECORD_PROFILE_EVERY_S,
        requires = "record_profile"
    )]
    record_profile_every: u64,
    /// What a cache miss fetches: `auto` the whole chunk when store requests are
    /// slow (latency-bound, e.g. remote) and only the frames the read needs when they
    /// are fast (measured as the mount runs); `always` the whole chunk; `off` frames.
    #[arg(long, value_enum, default_value_t = ReadAheadMode::Auto)]
    readahead: ReadAheadMode,
    /// Same as `--readahead off`.
    #[arg(long, conflicts_with = "readahead")]
    no_readahead: bool,
    /// Sequential read-ahead: when the VM reads a disk region in order, fetch and
    /// decode this many bytes ahead of it in the background (0: off; at most a
    /// sixteenth of --cache-mem is used).
    #[arg(long, value_name = "SIZE", default_value_t = DEFAULT_SEQ_READAHEAD, value_parser = parse_size)]
    seq_readahead: u64,
    /// Supervise the daemon: if it dies (crash, SIGKILL), start a new one that
    /// recovers the device (`--recover`), up to 5 times a minute.
    #[arg(long)]
    auto_recover: bool,
    #[cfg(feature = "test-hooks")]
    #[command(flatten)]
    hooks: TestHooks,
}

/// A remote store's model, for tests and benchmarks (`test-hooks` builds only).
#[cfg(feature = "test-hooks")]
#[derive(clap::Args, Clone)]
struct TestHooks {
    /// Model a remote store: added latency per store request (e.g. 20ms).
    #[arg(long, value_parser = super::parse::parse_duration)]
    store_latency: Option<Duration>,
    /// Model a remote store: shared bandwidth in bytes/s (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    store_bandwidth: Option<u64>,
}

/// Run `livemount mount`.
pub fn run(a: Args) -> Outcome {
    if a.daemon {
        return daemonize(&a);
    }
    if a.auto_recover {
        return supervise();
    }
    let recover = a.recover.as_deref().map(status::parse_dev).transpose()?;
    let config = match &a.recover {
        Some(dev) => status::read_status(dev)?.config,
        None => config(&a)?,
    };
    daemon::run(
        config,
        RunOptions {
            recover,
            create_timeout: Duration::from_secs(a.create_timeout),
            workers: a.workers,
            max_io_bytes: 512 * 1024,
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// The configuration of a new mount.
fn config(a: &Args) -> anyhow::Result<MountConfig> {
    let store = a
        .store
        .clone()
        .ok_or_else(|| anyhow::anyhow!("mount needs --store DIR|s3://BUCKET/PREFIX"))?;
    let store = livemount_store::StoreLocation::parse(&store, a.s3.options()?).absolute()?;
    let snapshot = a
        .snapshot
        .clone()
        .ok_or_else(|| anyhow::anyhow!("mount needs a SNAPSHOT"))?;
    let (overlay, temporary_overlay) = match (&a.overlay, a.read_only) {
        (_, true) => (None, false),
        (Some(p), false) => (Some(p.clone()), false),
        (None, false) => {
            let dir = std::env::var_os("TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/var/tmp".into());
            (Some(daemon::create_temporary_overlay(&dir)?), true)
        }
    };
    let mut c = MountConfig::new(store, snapshot, overlay);
    c.temporary_overlay = temporary_overlay;
    c.cache_mem = a.cache_mem;
    c.cache_dir = a.cache_dir.clone();
    c.cache_size = a.cache_size;
    c.queues = a.queues;
    c.depth = a.depth;
    c.read_only = a.read_only;
    c.profile = a.profile.clone();
    c.prestage = a.prestage.clone();
    c.record_profile = a.record_profile.clone();
    c.record_profile_every_s = a.record_profile_every;
    c.readahead = if a.no_readahead {
        ReadAheadMode::Off
    } else {
        a.readahead
    };
    c.seq_readahead = a.seq_readahead;
    #[cfg(feature = "test-hooks")]
    {
        c.store_latency_ms = a.hooks.store_latency.map(|d| d.as_secs_f64() * 1000.0);
        c.store_bandwidth = a.hooks.store_bandwidth;
    }
    Ok(c)
}

/// This command line without `flag`, to start a child with.
/// `--daemon`: run the mount as a detached child and return once it reports its
/// device ready (or say how it failed).
fn daemonize(a: &Args) -> Outcome {
    // --daemon --auto-recover: the detached child is the supervisor.
    super::detach::daemonize("mount", a.log.as_deref(), |device, pid, log| {
        println!("{}", daemon::attach_help(device));
        println!("daemon pid {pid} (log {})", log.display());
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `--auto-recover`: run the mount as a child and re-attach a new daemon to the
/// device whenever the child dies without a clean stop.
fn supervise() -> Outcome {
    let exe = std::env::current_exe()?;
    let mut args = super::detach::args_without("--auto-recover");
    let mut device: Option<String> = None;
    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        let mut w = ready::spawn(Command::new(&exe).args(&args))?;
        if let Ok(Readiness::Ready { device: d, .. }) = w.wait_ready() {
            if device.is_none() {
                // Our parent (--daemon) waits for the first device only.
                ready::notify(&Readiness::Ready {
                    device: d.clone(),
                    pid: std::process::id(),
                });
            }
            device = Some(d);
        }
        let status = w.child.wait()?;
        if status.success() {
            return Ok(ExitCode::SUCCESS);
        }
        let Some(dev) = device.clone() else {
            anyhow::bail!(
                "the mount failed before its device was ready ({})",
                ready::describe(status)
            );
        };
        restarts.retain(|t| t.elapsed() < Duration::from_secs(60));
        if restarts.len() >= 5 {
            anyhow::bail!("the daemon of {dev} died 5 times within a minute; giving up (recover by hand with `livemount mount --recover {dev}`)");
        }
        restarts.push(Instant::now());
        eprintln!(
            "livemount: the daemon of {dev} died ({}); recovering the device",
            ready::describe(status)
        );
        args = vec!["mount".into(), "--recover".into(), dev];
    }
}
