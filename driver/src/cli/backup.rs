//! `livemount backup`.

use super::parse::parse_size;
use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::ops::backup::{self, BackupOptions};
use livemount_store::progress::StderrProgress;
use livemount_store::store::{Access, DEFAULT_CHUNK_SIZE};
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `livemount backup`.
#[derive(clap::Args)]
pub struct Args {
    /// Raw image file or block device.
    source: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Backup series name (one VM disk), e.g. web01.
    #[arg(long)]
    name: String,
    #[arg(long, value_parser = parse_size, help = format!("Chunk size, e.g. 1M, 4M, 256K (default: the series' previous, else {} KiB)", DEFAULT_CHUNK_SIZE >> 10))]
    chunk_size: Option<u64>,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = backup::DEFAULT_LEVEL)]
    level: i32,
    /// Worker threads (default: one per core; 16 for a remote store, whose
    /// requests are bound by latency, not CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Changed-block incremental: read only the byte ranges in FILE (lines `OFFSET
    /// LENGTH`, sorted; docs/format.md) and take the rest from the series' previous
    /// snapshot.
    #[arg(long, value_name = "FILE", conflicts_with = "changed_from")]
    changed: Option<PathBuf>,
    /// Changed-block incremental from a qemu dirty bitmap over NBD, e.g.
    /// nbd+unix:///vda?socket=/run/qsd.sock#bitmap0 (read with nbdinfo --map).
    #[arg(long, value_name = "NBD-URI#BITMAP")]
    changed_from: Option<String>,
    /// With --changed/--changed-from: the snapshot the ranges are relative to
    /// (series@time); the backup is refused unless it is the series' latest (a
    /// bitmap applied to another base would be a silently wrong snapshot).
    #[arg(long, value_name = "SNAPSHOT")]
    changed_base: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount backup`.
pub fn run(a: Args) -> Outcome {
    // Check the source before touching the store, so a bad source leaves no empty
    // store behind.
    let (_, size) = backup::open_source(&a.source)?;
    // Bad ranges or an unreachable bitmap are refused before the store is touched.
    let changed = match (&a.changed, &a.changed_from) {
        (Some(f), _) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("--changed {}: {e}", f.display()))?;
            Some(livemount_store::ops::changed::parse_ranges(&text, size, f)?)
        }
        (None, Some(spec)) => Some(livemount_store::ops::changed::from_dirty_bitmap(
            spec, size,
        )?),
        (None, None) => None,
    };
    if a.changed_base.is_some() && changed.is_none() {
        anyhow::bail!("--changed-base needs --changed or --changed-from");
    }
    let st = a.store.open(Access::Write)?;
    if let Some(base) = &a.changed_base {
        let latest = st.list(Some(&a.name))?.pop();
        if latest.as_ref().map(|s| s.to_string()).as_deref() != Some(base.as_str()) {
            anyhow::bail!(
                "--changed-base {base}: the latest snapshot of {} is {}; the changed ranges do not apply to it (run a full backup)",
                a.name,
                latest.map(|s| s.to_string()).unwrap_or_else(|| "none".into())
            );
        }
    }
    let chunk_size = a
        .chunk_size
        .map(|c| u32::try_from(c).map_err(|_| anyhow::anyhow!("invalid chunk size {c}")))
        .transpose()?;
    let opts = BackupOptions {
        series: a.name,
        chunk_size,
        level: a.level,
        threads: a.threads.unwrap_or_else(|| st.io_threads()),
    };
    let progress = StderrProgress::boxed("backup", size, a.out.quiet || a.out.json);
    let r = backup::backup_changed(&st, &a.source, &opts, changed.as_deref(), progress.as_ref())?;
    if a.out.json {
        print_json(&r)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "snapshot {}{}",
        r.snapshot,
        r.previous
            .as_ref()
            .map(|p| format!(" (incremental to {p})"))
            .unwrap_or_default()
    );
    println!(
        "read {:.1} MiB in {:.2} s ({:.1} MiB/s): new {:.1} MiB ({} chunks), reused {:.1} MiB ({}), zero {:.1} MiB ({}){}",
        mib(r.bytes_read), r.seconds, r.throughput_mib_s, mib(r.bytes_new), r.chunks_new,
        mib(r.bytes_reused), r.chunks_reused, mib(r.bytes_zero), r.chunks_zero,
        if r.bytes_holes > 0 {
            format!(" of which {:.1} MiB holes, not read", mib(r.bytes_holes))
        } else {
            String::new()
        }
    );
    println!(
        "stored {:.1} MiB: compression {:.2}x, {}",
        mib(r.bytes_stored),
        r.compression_ratio,
        r.dedup_ratio
            .map(|d| format!("dedup {d:.2}x"))
            .unwrap_or_else(|| "nothing new (every chunk was already stored)".into())
    );
    Ok(ExitCode::SUCCESS)
}
