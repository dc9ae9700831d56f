//! The `livemount` command line. Errors are printed as one line and mapped to exit
//! codes: 0 success, 1 error, 2 bad usage (clap), 3 `verify` found damage.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use livemount::progress::StderrProgress;
use livemount::store::{Access, Store};
use livemount::{backup, gc, info, restore, verify, workers};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "livemount",
    version,
    about = "Boot virtual machines straight from their backups"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Arguments shared by every command that works on a store.
#[derive(Args, Clone)]
struct StoreArgs {
    /// The store directory.
    #[arg(long, value_name = "DIR", env = "LIVEMOUNT_STORE")]
    store: PathBuf,
}

/// Output options shared by reporting commands.
#[derive(Args, Clone, Copy)]
struct OutputArgs {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Back up a disk image or block device (incremental after the first).
    Backup {
        /// Raw image file or block device.
        source: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
        /// Backup series name (one VM disk), e.g. web01.
        #[arg(long)]
        name: String,
        /// Chunk size, e.g. 1M, 4M, 256K (default: the series' previous, else 1M).
        #[arg(long, value_parser = parse_size)]
        chunk_size: Option<u64>,
        /// zstd compression level (1-22).
        #[arg(long, default_value_t = 3)]
        level: i32,
        /// Worker threads (default: one per core).
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List snapshots, all or of one series.
    List {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this series.
        name: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Sizes, chunk counts and ratios of a snapshot.
    Info {
        #[command(flatten)]
        store: StoreArgs,
        /// `series@time`, or `series` for its latest.
        snapshot: String,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Read and check every chunk (of one snapshot, or the whole store).
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        /// Only this snapshot.
        snapshot: Option<String>,
        /// Worker threads.
        #[arg(long)]
        threads: Option<usize>,
        /// Move damaged chunk files aside (to CHUNK.bad), so that the next backup of
        /// the same data stores them again, which heals every snapshot using them.
        #[arg(long)]
        repair: bool,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Restore a snapshot to a file or block device.
    Restore {
        #[command(flatten)]
        store: StoreArgs,
        /// `series@time`, or `series` for its latest.
        snapshot: String,
        /// Target file (created sparse) or block device.
        target: PathBuf,
        /// Overwrite an existing non-empty target file.
        #[arg(long)]
        force: bool,
        /// Worker threads.
        #[arg(long)]
        threads: Option<usize>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove a snapshot (its chunks are freed by the next gc).
    Forget {
        #[command(flatten)]
        store: StoreArgs,
        /// `series@time` (a bare series name is refused, to forget one snapshot at a time).
        snapshot: String,
    },
    /// Expose a snapshot as a block device (/dev/ublkbN) with a copy-on-write overlay.
    Mount(Box<MountArgs>),
    /// Stop a live mount (flushes the overlay, removes the device).
    Unmount {
        /// The device, e.g. /dev/ublkb0.
        device: String,
        /// Seconds to wait for the daemon to stop.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// State, cache and I/O figures of live mounts.
    Status {
        /// Only this device.
        device: Option<String>,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Fill the disk cache from a profile without mounting (prepare a host for a recovery).
    Prestage {
        #[command(flatten)]
        store: StoreArgs,
        /// `series@time`, or `series` for its latest.
        snapshot: String,
        /// The profile (default: the one attached to the series).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Disk cache directory (the one later mounts use with --cache-dir).
        #[arg(long)]
        cache_dir: PathBuf,
        /// Budget of the disk cache.
        #[arg(long, value_parser = parse_size, default_value = "4G")]
        cache_size: u64,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Profiles attached to backup series (used by every mount of the series).
    #[command(subcommand)]
    Profile(ProfileCmd),
    /// Save a live mount's changes: base snapshot + overlay as a new snapshot.
    Commit {
        #[command(flatten)]
        store: StoreArgs,
        /// The overlay file of the mount (unmount first).
        overlay: PathBuf,
        /// Series of the new snapshot.
        #[arg(long)]
        name: String,
        /// zstd compression level (1-22).
        #[arg(long, default_value_t = 3)]
        level: i32,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove chunks that no snapshot references.
    Gc {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// `livemount profile …`.
#[derive(Subcommand)]
enum ProfileCmd {
    /// Attach a profile to a series (replaces an earlier one).
    Attach {
        #[command(flatten)]
        store: StoreArgs,
        /// The series, e.g. web01.
        name: String,
        /// The profile file (from livemount-profiler or mount --record-profile).
        file: PathBuf,
    },
    /// List attached profiles.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// Arguments of `livemount mount`.
#[derive(Args, Clone)]
struct MountArgs {
    #[command(flatten)]
    store: Option<StoreArgsOpt>,
    /// `series@time`, or `series` for its latest (not needed with --recover).
    snapshot: Option<String>,
    /// Overlay file for writes (created if missing; default: a temporary one removed at unmount).
    #[arg(long)]
    overlay: Option<PathBuf>,
    /// Memory tier of the read cache (decoded frames).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    cache_mem: u64,
    /// Directory of the disk tier of the read cache (compressed frames; kept across restarts).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Budget of the disk tier.
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    cache_size: u64,
    /// Hardware queues of the device.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Depth of each queue.
    #[arg(long, default_value_t = 64)]
    depth: u16,
    /// Refuse writes (EROFS); no overlay.
    #[arg(long)]
    read_only: bool,
    /// Return once the device is ready, leaving the daemon running.
    #[arg(long)]
    daemon: bool,
    /// Log file of a --daemon mount.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Re-attach a new daemon to DEV after its daemon died (same snapshot, overlay, cache).
    #[arg(long, value_name = "DEV")]
    recover: Option<String>,
    /// Worker threads for store reads, decoding and fsync.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Seconds to wait for the kernel to create the device.
    #[arg(long, default_value_t = 30)]
    create_timeout: u64,
    /// Profile for pre-staging (default: the profile attached to the series, if any).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Stage the profile's first SECONDS of reads before the device is ready, `all`, or `none`
    /// (the rest is fetched in the background, after on-demand reads).
    #[arg(long, default_value = "2", value_parser = parse_prestage)]
    prestage: String,
    /// Model a remote store: added latency per store request (e.g. 20ms).
    #[arg(long, value_parser = parse_duration)]
    store_latency: Option<std::time::Duration>,
    /// Model a remote store: shared bandwidth in bytes/s (e.g. 100M).
    #[arg(long, value_parser = parse_size)]
    store_bandwidth: Option<u64>,
    /// At unmount, write what the VM read during the mount as a profile to FILE.
    #[arg(long)]
    record_profile: Option<PathBuf>,
    /// With --record-profile: also write it every SECS seconds while serving (0:
    /// only at unmount), so a daemon that dies loses at most that much.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 30,
        requires = "record_profile"
    )]
    record_profile_every: u64,
    /// What a cache miss fetches: `auto` the whole chunk when store requests are
    /// slow (latency-bound, e.g. remote) and only the frames the read needs when they
    /// are fast (measured as the mount runs); `always` the whole chunk; `off` frames.
    #[arg(long, value_enum, default_value = "auto")]
    readahead: livemount::cache::readahead::ReadAheadMode,
    /// Same as `--readahead off`.
    #[arg(long, conflicts_with = "readahead")]
    no_readahead: bool,
    /// Sequential read-ahead: when the VM reads a disk region in order, fetch and
    /// decode this many bytes ahead of it in the background (0: off; at most a
    /// sixteenth of --cache-mem is used).
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size)]
    seq_readahead: u64,
    /// Supervise the daemon: if it dies (crash, SIGKILL), start a new one that
    /// recovers the device (`--recover`), up to 5 times a minute.
    #[arg(long)]
    auto_recover: bool,
}

/// `--auto-recover`: run the mount as a child and re-attach a new daemon to the
/// device whenever the child dies without a clean stop.
fn supervise() -> Result<()> {
    use std::io::{BufRead, Write};
    let exe = std::env::current_exe()?;
    let first: Vec<String> = std::env::args()
        .skip(1)
        .filter(|x| x != "--auto-recover")
        .collect();
    let mut args = first;
    let mut device: Option<String> = None;
    let mut restarts: Vec<std::time::Instant> = Vec::new();
    loop {
        let mut child = std::process::Command::new(&exe)
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        if let Some(out) = child.stdout.take() {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(dev) = line
                    .strip_prefix("device ")
                    .and_then(|l| l.split_whitespace().next())
                {
                    device = Some(dev.to_string());
                }
                // The --daemon parent stops reading once the device is ready.
                let _ = writeln!(std::io::stdout(), "{line}");
            }
        }
        let status = child.wait()?;
        if status.success() {
            return Ok(());
        }
        let Some(dev) = device.clone() else {
            anyhow::bail!("the mount failed before its device was ready ({status})");
        };
        restarts.retain(|t| t.elapsed() < std::time::Duration::from_secs(60));
        if restarts.len() >= 5 {
            anyhow::bail!("the daemon of {dev} died 5 times within a minute; giving up (recover by hand with `livemount mount --recover {dev}`)");
        }
        restarts.push(std::time::Instant::now());
        eprintln!("livemount: the daemon of {dev} died ({status}); recovering the device");
        args = vec!["mount".into(), "--recover".into(), dev];
    }
}

fn parse_prestage(s: &str) -> Result<String, String> {
    s.parse::<livemount::prestage::PrestageWindow>()
        .map(|_| s.to_string())
}

/// Parse durations such as `20ms`, `1.5s`, `500us`.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" => v / 1e6,
        _ => return Err(format!("unknown duration unit in {s:?} (use s, ms, us)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// `--store` where it may come from elsewhere (mount --recover).
#[derive(Args, Clone)]
struct StoreArgsOpt {
    /// The store directory.
    #[arg(long = "store", value_name = "DIR", env = "LIVEMOUNT_STORE")]
    store_dir: Option<PathBuf>,
}

fn mount_cmd(a: MountArgs) -> Result<()> {
    use livemount::mount;
    if a.daemon {
        return daemonize(&a);
    }
    if a.auto_recover {
        return supervise();
    }
    let recover = a.recover.as_deref().map(mount::parse_dev).transpose()?;
    let config = match recover {
        Some(_) => {
            let st = mount::read_status(a.recover.as_deref().unwrap_or_default())?;
            st.config
        }
        None => {
            let store = a
                .store
                .as_ref()
                .and_then(|s| s.store_dir.clone())
                .ok_or_else(|| anyhow::anyhow!("mount needs --store DIR"))?;
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
                    (Some(mount::create_temporary_overlay(&dir)?), true)
                }
            };
            mount::MountConfig {
                store,
                snapshot,
                overlay,
                temporary_overlay,
                cache_mem: a.cache_mem,
                cache_dir: a.cache_dir.clone(),
                cache_size: a.cache_size,
                queues: a.queues,
                depth: a.depth,
                read_only: a.read_only,
                profile: a.profile.clone(),
                prestage: a.prestage.clone(),
                store_latency_ms: a.store_latency.map(|d| d.as_secs_f64() * 1000.0),
                store_bandwidth: a.store_bandwidth,
                record_profile: a.record_profile.clone(),
                record_profile_every_s: a.record_profile_every,
                readahead: if a.no_readahead {
                    livemount::cache::readahead::ReadAheadMode::Off
                } else {
                    a.readahead
                },
                seq_readahead: a.seq_readahead,
            }
        }
    };
    mount::run(
        config,
        mount::RunOptions {
            recover,
            create_timeout: std::time::Duration::from_secs(a.create_timeout),
            workers: a.workers,
            max_io_bytes: 512 * 1024,
        },
    )?;
    Ok(())
}

fn prestage_cmd(
    store_dir: &std::path::Path,
    snapshot: &str,
    profile: Option<PathBuf>,
    cache_dir: PathBuf,
    cache_size: u64,
    out: OutputArgs,
) -> Result<livemount::prestage::PrestageReport> {
    use livemount::cache::{disk::DiskTier, ReadCache};
    use std::sync::Arc;
    let st = Store::open(store_dir, Access::ReadOnly)?;
    let snap = st.resolve(snapshot)?;
    let index = st.load_index(&snap)?;
    let profile = match profile {
        Some(p) => livemount::profile::Profile::load(&p)?,
        None => livemount::mount::attached_profile(&st, &snap.series)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no --profile given and no profile attached to series {}",
                snap.series
            )
        })?,
    };
    let origin = Arc::new(livemount::store::source::DirChunkSource::new(
        st.chunks().dir(),
    ));
    let disk = DiskTier::open(&cache_dir, cache_size)?;
    let cache = Arc::new(ReadCache::new(origin, 0, Some(disk), index.frame_size));
    let p = livemount::prestage::Prestager::new(Arc::new(index), cache, &profile, false, 8)?;
    let total = p.progress.report().planned_bytes;
    let progress = StderrProgress::boxed("prestage", total, out.quiet || out.json);
    std::thread::scope(|s| {
        s.spawn(|| p.stage_before_ready(livemount::prestage::PrestageWindow::All));
        let mut last = 0;
        loop {
            let r = p.progress.report();
            progress.inc(r.staged_bytes.saturating_sub(last));
            last = r.staged_bytes;
            if r.steps_done >= r.steps_total || r.budget_reached {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    progress.finish();
    Ok(p.progress.report())
}

/// `--daemon`: run the mount as a detached child and return once it printed that the
/// device is ready (or report why it failed).
fn daemonize(a: &MountArgs) -> Result<()> {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    // --daemon --auto-recover: the detached child is the supervisor.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|x| x != "--daemon")
        .collect();
    let log = a.log.clone().unwrap_or_else(|| {
        PathBuf::from(format!("/run/livemount/mount-{}.log", std::process::id()))
    });
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let mut child = std::process::Command::new(exe)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(logf)
        .process_group(0)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no pipe to the daemon"))?;
    let mut ready = false;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if line.starts_with("attach with libvirt") {
            ready = true;
            break;
        }
    }
    if ready {
        println!("daemon pid {} (log {})", child.id(), log.display());
        return Ok(());
    }
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let last = text
        .lines()
        .last()
        .unwrap_or("unknown error")
        .trim_start_matches("livemount: error: ")
        .to_string();
    anyhow::bail!("{last}")
}

/// Parse sizes such as `4096`, `64K`, `1M`, `2G` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let mult = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G, T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}"))
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Backup {
            source,
            store,
            name,
            chunk_size,
            level,
            threads,
            out,
        } => {
            // Check the source before touching the store, so a bad source leaves no
            // empty store behind.
            let (_, size) = backup::open_source(&source)?;
            let st = Store::open(&store.store, Access::Write)?;
            let chunk_size = chunk_size
                .map(|c| u32::try_from(c).map_err(|_| anyhow::anyhow!("invalid chunk size {c}")))
                .transpose()?;
            let opts = backup::BackupOptions {
                series: name,
                chunk_size,
                level,
                threads: threads.unwrap_or_else(workers::default_threads),
            };
            let progress = StderrProgress::boxed("backup", size, out.quiet || out.json);
            let r = backup::backup(&st, &source, &opts, progress.as_ref())?;
            if out.json {
                print_json(&r)?;
            } else {
                println!(
                    "snapshot {}{}",
                    r.snapshot,
                    r.previous
                        .as_ref()
                        .map(|p| format!(" (incremental to {p})"))
                        .unwrap_or_default()
                );
                println!(
                    "read {:.1} MiB in {:.2} s ({:.1} MiB/s): new {:.1} MiB ({} chunks), reused {:.1} MiB ({}), zero {:.1} MiB ({})",
                    mib(r.bytes_read), r.seconds, r.throughput_mib_s, mib(r.bytes_new), r.chunks_new,
                    mib(r.bytes_reused), r.chunks_reused, mib(r.bytes_zero), r.chunks_zero
                );
                println!(
                    "stored {:.1} MiB: compression {:.2}x, {}",
                    mib(r.bytes_stored),
                    r.compression_ratio,
                    r.dedup_ratio
                        .map(|d| format!("dedup {d:.2}x"))
                        .unwrap_or_else(|| "nothing new (every chunk was already stored)".into())
                );
            }
        }
        Cmd::List { store, name, out } => {
            let st = Store::open(&store.store, Access::ReadOnly)?;
            let snaps = st.list(name.as_deref())?;
            if let Some(n) = &name {
                if snaps.is_empty() {
                    anyhow::bail!(
                        "no snapshots of series {n} in store {}",
                        store.store.display()
                    );
                }
            }
            if out.json {
                let infos = snaps
                    .iter()
                    .map(|s| info::info(&st, s))
                    .collect::<livemount::Result<Vec<_>>>()?;
                print_json(&infos)?;
            } else {
                // One damaged index must not hide the others: list them all, then
                // fail naming the first damage.
                let mut damage = None;
                for s in snaps {
                    match info::info(&st, &s) {
                        Ok(i) => println!(
                            "{:<40} {:>10.1} MiB  {}",
                            i.snapshot,
                            mib(i.image_size),
                            i.source
                        ),
                        Err(e) => {
                            println!("{:<40} DAMAGED (run `livemount verify`)", s.to_string());
                            damage.get_or_insert(e);
                        }
                    }
                }
                if let Some(e) = damage {
                    return Err(e.into());
                }
            }
        }
        Cmd::Info {
            store,
            snapshot,
            out,
        } => {
            let st = Store::open(&store.store, Access::ReadOnly)?;
            let snap = st.resolve(&snapshot)?;
            let i = info::info(&st, &snap)?;
            if out.json {
                print_json(&i)?;
            } else {
                println!("snapshot      {}", i.snapshot);
                println!("created       {}", i.created);
                println!("source        {}", i.source);
                println!(
                    "image size    {} bytes ({:.1} MiB)",
                    i.image_size,
                    mib(i.image_size)
                );
                println!(
                    "chunk size    {} KiB, frames of {} KiB",
                    i.chunk_size / 1024,
                    i.frame_size / 1024
                );
                println!(
                    "chunks        {} ({} zero, {} distinct stored, {} missing)",
                    i.chunks_total, i.chunks_zero, i.chunks_unique, i.chunks_missing
                );
                println!(
                    "data          {:.1} MiB in {:.1} MiB stored",
                    mib(i.data_bytes),
                    mib(i.stored_bytes)
                );
                println!(
                    "ratios        compression {:.2}x, dedup {:.2}x",
                    i.compression_ratio, i.dedup_ratio
                );
            }
        }
        Cmd::Verify {
            store,
            snapshot,
            threads,
            repair,
            out,
        } => {
            let st = Store::open(&store.store, Access::ReadOnly)?;
            // Repairing renames files: the store must exist (opened above) and be
            // writable, with the backups' shared lock held so gc stays out.
            let st = if repair {
                Store::open(&store.store, Access::Write)?
            } else {
                st
            };
            let snap = snapshot.map(|s| st.resolve(&s)).transpose()?;
            let progress = StderrProgress::boxed("verify", 0, true);
            let mut r = verify::verify(
                &st,
                snap.as_ref(),
                threads.unwrap_or_else(workers::default_threads),
                progress.as_ref(),
            )?;
            if repair {
                verify::repair(&st, &mut r)?;
            }
            let ok = r.ok();
            if out.json {
                print_json(&r)?;
            } else {
                for (s, e) in &r.bad_indexes {
                    println!("BAD index {s}: {e}");
                }
                for b in &r.bad_chunks {
                    let users = if b.snapshots.is_empty() {
                        "unreferenced".to_string()
                    } else {
                        b.snapshots.join(", ")
                    };
                    println!("BAD chunk {}: {} (used by {users})", b.id, b.error);
                    if let Some(to) = &b.moved_to {
                        println!(
                            "  moved aside to {to}: the next backup of this data stores it again"
                        );
                    }
                }
                println!(
                    "{}: {} snapshot(s), {} chunk(s), {:.1} MiB checked, {} bad chunk(s), {} bad index(es)",
                    if ok { "OK" } else { "DAMAGED" },
                    r.snapshots.len(), r.chunks_checked, mib(r.bytes_checked), r.bad_chunks.len(), r.bad_indexes.len()
                );
            }
            if !ok {
                return Ok(ExitCode::from(3));
            }
        }
        Cmd::Restore {
            store,
            snapshot,
            target,
            force,
            threads,
            out,
        } => {
            let st = Store::open(&store.store, Access::ReadOnly)?;
            let snap = st.resolve(&snapshot)?;
            let size = st.load_index(&snap)?.image_size;
            let progress = StderrProgress::boxed("restore", size, out.quiet || out.json);
            let r = restore::restore(
                &st,
                &snap,
                &target,
                force,
                threads.unwrap_or_else(workers::default_threads),
                progress.as_ref(),
            )?;
            if out.json {
                print_json(&r)?;
            } else {
                println!(
                    "restored {} to {}: {:.1} MiB ({:.1} MiB written) in {:.2} s, {:.1} MiB/s",
                    r.snapshot,
                    r.target.display(),
                    mib(r.image_size),
                    mib(r.bytes_written),
                    r.seconds,
                    r.throughput_mib_s
                );
            }
        }
        Cmd::Forget { store, snapshot } => {
            if !snapshot.contains('@') {
                anyhow::bail!("forget needs a full snapshot name series@time (see `livemount list`), got {snapshot:?}");
            }
            let st = Store::open(&store.store, Access::ReadOnly)?;
            let snap = st.resolve(&snapshot)?;
            st.forget(&snap)?;
            println!("forgot {snap}; run `livemount gc` to free its chunks");
        }
        Cmd::Mount(a) => mount_cmd(*a)?,
        Cmd::Prestage {
            store,
            snapshot,
            profile,
            cache_dir,
            cache_size,
            out,
        } => {
            let r = prestage_cmd(&store.store, &snapshot, profile, cache_dir, cache_size, out)?;
            if out.json {
                print_json(&r)?;
            } else {
                println!(
                    "pre-staged {:.1} of {:.1} MiB ({:.0}%) in {} steps, {:.1} MiB fetched{}{}",
                    mib(r.staged_bytes),
                    mib(r.planned_bytes),
                    100.0 * r.share,
                    r.steps_done,
                    mib(r.fetched_bytes),
                    if r.budget_reached {
                        "; stopped at the cache budget"
                    } else {
                        ""
                    },
                    if r.errors > 0 {
                        format!("; {} chunk(s) failed (see above)", r.errors)
                    } else {
                        String::new()
                    }
                );
            }
            if r.errors > 0 {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Profile(ProfileCmd::Attach { store, name, file }) => {
            let st = Store::open(&store.store, Access::Write)?;
            livemount::store::validate_series(&name)?;
            let p = livemount::profile::Profile::load(&file)?;
            let snap = st.resolve(&name)?;
            let size = st.load_index(&snap)?.image_size;
            if p.disk_size != size {
                anyhow::bail!(
                    "profile {} is for a disk of {} bytes, series {name} has {size} bytes",
                    file.display(),
                    p.disk_size
                );
            }
            let dest = livemount::mount::attached_profile_path(&st, &name);
            if let Some(dir) = dest.parent() {
                std::fs::create_dir_all(dir)?;
            }
            p.save(&dest)?;
            println!(
                "attached {} to {name} ({:.1} MiB working set)",
                file.display(),
                mib(p.working_set_bytes())
            );
        }
        Cmd::Profile(ProfileCmd::List { store, out }) => {
            let st = Store::open(&store.store, Access::ReadOnly)?;
            let dir = st.root().join("profiles");
            let mut rows = Vec::new();
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    let name = e
                        .file_name()
                        .to_string_lossy()
                        .trim_end_matches(".json")
                        .to_string();
                    match livemount::profile::Profile::load(e.path()) {
                        Ok(p) => rows.push(serde_json::json!({"series": name, "working_set_bytes": p.working_set_bytes(), "extents": p.extents.len(), "disk_size": p.disk_size, "source": p.source.device, "runs": p.source.runs})),
                        Err(err) => rows.push(serde_json::json!({"series": name, "error": err.to_string()})),
                    }
                }
            }
            if out.json {
                print_json(&rows)?;
            } else if rows.is_empty() {
                println!("no profiles attached");
            } else {
                for r in rows {
                    println!("{}", r);
                }
            }
        }
        Cmd::Commit {
            store,
            overlay,
            name,
            level,
            out,
        } => {
            let opts = backup::BackupOptions {
                series: name,
                chunk_size: None,
                level,
                threads: workers::default_threads(),
            };
            let id = livemount::overlay::read_identity(&overlay)?;
            let progress = StderrProgress::boxed("commit", 0, out.quiet || out.json);
            let r = livemount::commit::commit(&store.store, &overlay, &opts, progress.as_ref())?;
            if out.json {
                print_json(&r)?;
            } else {
                println!(
                    "committed {} + {} as {}: new {:.1} MiB ({} chunks), reused {:.1} MiB",
                    id.snapshot,
                    overlay.display(),
                    r.snapshot,
                    mib(r.bytes_new),
                    r.chunks_new,
                    mib(r.bytes_reused)
                );
            }
        }
        Cmd::Unmount { device, timeout } => {
            livemount::mount::unmount(&device, std::time::Duration::from_secs(timeout))?;
            println!("unmounted {device}");
        }
        Cmd::Status { device, out } => {
            let all = match device {
                Some(d) => vec![livemount::mount::read_status(&d)?],
                None => livemount::mount::list_status(),
            };
            if out.json {
                print_json(&all)?;
            } else if all.is_empty() {
                println!("no live mounts");
            } else {
                for s in all {
                    println!(
                        "{} {} pid {} snapshot {} ({:.1} MiB), overlay {:.1} MiB{}",
                        s.device,
                        s.state,
                        s.pid,
                        s.config.snapshot,
                        mib(s.size),
                        mib(s.overlay_bytes),
                        s.config
                            .overlay
                            .as_ref()
                            .map(|p| format!(" in {}", p.display()))
                            .unwrap_or_else(|| " (read-only)".into())
                    );
                    if let Some(c) = &s.cache {
                        let g = |k: &str| c.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
                        println!("  cache: hit rate {:.1}%, memory {:.1}/{:.1} MiB, disk {:.1}/{:.1} MiB, fetched {:.1} MiB in {} reads, decoded {:.1} MiB",
                            100.0 * g("mem_hit_rate"), g("mem_bytes") / 1048576.0, g("mem_budget") / 1048576.0,
                            g("disk_bytes") / 1048576.0, g("disk_budget") / 1048576.0, g("store_bytes") / 1048576.0,
                            g("store_reads"), g("decoded_bytes") / 1048576.0);
                        if let Some(r) = c.get("readahead") {
                            let n = |k: &str| r.get(k).and_then(|v| v.as_f64());
                            let t = |v: Option<f64>| {
                                v.map(|v| format!("{v:.2} ms"))
                                    .unwrap_or_else(|| "-".into())
                            };
                            println!("  read-ahead: {}, {} whole-chunk and {} frame misses; store: chunk read {}, small read {}; decode {}/MiB; sequential read-ahead {}",
                                r.get("mode").and_then(|v| v.as_str()).unwrap_or("?"),
                                n("whole_chunk_misses").unwrap_or(0.0), n("frame_misses").unwrap_or(0.0),
                                t(n("whole_chunk_ms")), t(n("small_request_ms")), t(n("decode_ms_per_mib")),
                                if r.get("store_latency_bound").and_then(|v| v.as_bool()).unwrap_or(false) { "active (store latency-bound)" } else { "idle (store not latency-bound)" });
                        }
                        if g("seq_readahead_chunks") > 0.0 {
                            println!("  sequential read-ahead: {} chunks, {} frames decoded ahead of the reader",
                                g("seq_readahead_chunks"), g("seq_readahead_frames"));
                        }
                    }
                    if let Some(p) = &s.prestage {
                        let g = |k: &str| p.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
                        println!(
                            "  prestage: {:.1} of {:.1} MiB ({:.0}%), {} of {} steps, {:.1} MiB fetched, {:.0} ms before ready{}",
                            g("staged_bytes") / 1048576.0, g("planned_bytes") / 1048576.0, 100.0 * g("share"),
                            g("steps_done"), g("steps_total"), g("fetched_bytes") / 1048576.0, g("ready_ms"),
                            if p.get("budget_reached").and_then(|v| v.as_bool()).unwrap_or(false) { ", stopped at the cache budget" } else { "" }
                        );
                    }
                    if let Some(io) = &s.io {
                        let g = |k: &str| io.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
                        println!("  io: {} reads ({:.1} MiB, p50 {} us, p99 {} us), {} writes ({:.1} MiB), {} flushes, {} discards, {} errors",
                            g("reads"), g("read_bytes") / 1048576.0, g("read_p50_us"), g("read_p99_us"),
                            g("writes"), g("write_bytes") / 1048576.0, g("flushes"), g("discards"), g("errors"));
                    }
                }
            }
        }
        Cmd::Gc { store, out } => {
            let st = Store::open(&store.store, Access::Exclusive)?;
            let r = gc::gc(&st)?;
            if out.json {
                print_json(&r)?;
            } else {
                println!(
                    "gc: {} snapshot(s), kept {} chunk(s), removed {} chunk(s) ({:.1} MiB) and {} temp file(s)",
                    r.snapshots, r.chunks_kept, r.chunks_removed, mib(r.bytes_removed), r.temp_files_removed
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line: library errors name the thing (path, chunk, snapshot) themselves.
            eprintln!("livemount: error: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("abc").is_err());
    }
}
