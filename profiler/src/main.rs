//! `livemount-profiler`: record which blocks of a disk a VM reads while it boots.
//!
//! An aya eBPF program on the block tracepoints (or the page-cache tracepoint for
//! image files) filters reads of the traced disk in the kernel and sends them
//! through a ring buffer; this binary maps them into the VM disk's address space
//! and writes `livemount_store::format::profile` files that the driver uses for pre-staging.

mod fiemap;
mod record;
mod show;
mod target;
mod tracer;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use livemount_store::format::profile::{MergeOptions, Profile};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "livemount-profiler",
    version,
    about = "Record which disk blocks a VM reads while it boots (eBPF)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct TraceArgs {
    /// Profile granularity in bytes (power of two, 512..=1048576).
    #[arg(long, default_value_t = livemount_store::format::profile::DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// Ring buffer size in MiB (power of two). 64 MiB kept up with ~100k IOPS here.
    #[arg(long, default_value_t = 64)]
    ring_mib: u32,
    /// Only reads submitted by this process (traces block_bio_queue instead of block_rq_issue).
    #[arg(long)]
    pid: Option<u32>,
    /// Only reads submitted from this cgroup v2 directory (e.g. /sys/fs/cgroup/machine.slice/vm1).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// For image files: trace every buffered read of the file (page-cache hits too,
    /// `mm_filemap_get_pages`) instead of host-disk reads; O_DIRECT reads bypass it.
    #[arg(long)]
    page_cache: bool,
    /// Adjacent reads whose first accesses are at most this many µs apart form one extent.
    #[arg(long, default_value_t = 1000)]
    coalesce_us: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Trace one disk and write its profile.
    Record {
        /// Whole disk, partition, loop or ublk device, or a disk image file.
        #[arg(long)]
        disk: PathBuf,
        /// Stop after this many seconds.
        #[arg(long, value_name = "SECS")]
        duration: Option<f64>,
        /// Stop once no read was seen for this many seconds (after the first read).
        #[arg(long, value_name = "SECS")]
        until_idle: Option<f64>,
        /// Profile to write (atomically).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Stay attached to disks and write one profile per VM boot, rotating old ones.
    Watch {
        /// Disks to watch (same kinds as for record).
        #[arg(long, num_args = 1.., required = true)]
        disk: Vec<PathBuf>,
        /// Directory for the profiles (`NAME-YYYYMMDDTHHMMSSZ.json`).
        #[arg(long)]
        dir: PathBuf,
        /// Seconds without reads that end a boot (the next read starts a new one).
        #[arg(long, default_value_t = 30.0)]
        idle: f64,
        /// Longest boot in seconds; a longer one is cut and written.
        #[arg(long, default_value_t = 600.0)]
        max_boot: f64,
        /// Profiles kept per disk.
        #[arg(long, default_value_t = 20)]
        keep: usize,
        /// Boots with fewer reads are not written (udev probes, monitoring).
        #[arg(long, default_value_t = 16)]
        min_events: u64,
        #[command(flatten)]
        trace: TraceArgs,
    },
    /// Combine recordings of the same disk: union of blocks (or those read by at
    /// least --min-runs runs), summed counts, median first-access time.
    Merge {
        /// Profiles to combine.
        #[arg(required = true, num_args = 1..)]
        inputs: Vec<PathBuf>,
        /// Keep blocks read by at least this many runs.
        #[arg(long, default_value_t = 1)]
        min_runs: u32,
        /// Profile to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Summarise a profile; optionally draw its access pattern as SVG.
    Show {
        /// The profile.
        file: PathBuf,
        /// Write an SVG (offset against time, plus a heat strip of the disk).
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // One line: the error and its causes.
        eprintln!("livemount-profiler: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Record {
            disk,
            duration,
            until_idle,
            out,
            trace,
        } => {
            require_privileges()?;
            let opts = options(&trace)?;
            let target = target::Target::resolve(&disk, trace.page_cache)?;
            let stop = record::StopWhen {
                duration: secs(duration, "--duration")?,
                until_idle: secs(until_idle, "--until-idle")?,
            };
            record::install_signal_handlers();
            record::record(&target, &opts, stop, &out)?;
            Ok(())
        }
        Cmd::Watch {
            disk,
            dir,
            idle,
            max_boot,
            keep,
            min_events,
            trace,
        } => {
            require_privileges()?;
            let opts = options(&trace)?;
            let targets = disk
                .iter()
                .map(|d| target::Target::resolve(d, trace.page_cache))
                .collect::<Result<Vec<_>, _>>()?;
            let wopts = record::WatchOptions {
                dir,
                idle: secs(Some(idle), "--idle")?.unwrap_or(Duration::from_secs(30)),
                max_boot: secs(Some(max_boot), "--max-boot")?.unwrap_or(Duration::from_secs(600)),
                keep,
                min_events,
            };
            record::install_signal_handlers();
            record::watch(&targets, &opts, &wopts)
        }
        Cmd::Merge {
            inputs,
            min_runs,
            out,
        } => {
            let profiles = inputs
                .iter()
                .map(|p| Profile::load(p).with_context(|| format!("{}", p.display())))
                .collect::<Result<Vec<_>>>()?;
            let merged = Profile::merge(&profiles, &MergeOptions { min_runs })?;
            merged
                .save(&out)
                .with_context(|| format!("writing {}", out.display()))?;
            eprintln!(
                "wrote {}: {} runs, {} extents, {} bytes",
                out.display(),
                merged.source.runs,
                merged.extents.len(),
                merged.working_set_bytes()
            );
            Ok(())
        }
        Cmd::Show { file, plot } => {
            let p = Profile::load(&file).with_context(|| format!("{}", file.display()))?;
            print!("{}", show::summary(&p));
            if let Some(svg) = plot {
                std::fs::write(&svg, show::svg(&p))
                    .with_context(|| format!("writing {}", svg.display()))?;
                println!("plot written to {}", svg.display());
            }
            Ok(())
        }
    }
}

fn options(t: &TraceArgs) -> Result<record::Options> {
    let bs = t.block_size;
    if !bs.is_power_of_two() || !(512..=1 << 20).contains(&bs) {
        bail!("--block-size {bs} must be a power of two between 512 and 1048576");
    }
    if !t.ring_mib.is_power_of_two() || t.ring_mib > 2048 {
        bail!(
            "--ring-mib {} must be a power of two up to 2048",
            t.ring_mib
        );
    }
    let cgroup_id = match &t.cgroup {
        Some(p) => {
            use std::os::unix::fs::MetadataExt;
            // A cgroup v2 id is the inode number of its directory in cgroupfs.
            std::fs::metadata(p)
                .with_context(|| format!("cgroup {}", p.display()))?
                .ino()
        }
        None => 0,
    };
    Ok(record::Options {
        block_size: bs,
        coalesce_ns: t.coalesce_us.saturating_mul(1000),
        ring_bytes: t.ring_mib << 20,
        tgid: t.pid.unwrap_or(0),
        cgroup_id,
    })
}

fn secs(v: Option<f64>, flag: &str) -> Result<Option<Duration>> {
    match v {
        None => Ok(None),
        Some(s) if s.is_finite() && s > 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) => bail!("{flag} {s} must be a positive number of seconds"),
    }
}

/// Attaching tracepoint programs needs CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN).
fn require_privileges() -> Result<()> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |c: u32| eff & (1u64 << c) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        return Ok(());
    }
    bail!("tracing needs root (CAP_BPF and CAP_PERFMON); run it as root")
}
