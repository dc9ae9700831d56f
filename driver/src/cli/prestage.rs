//! `livemount prestage`: fill a host's disk cache from a profile, without mounting.

use super::parse::parse_size;
use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use crate::block::prestage::{PrestageReport, PrestageWindow, Prestager};
use crate::cache::{disk::DiskTier, ReadCache};
use crate::config::DEFAULT_CACHE_SIZE;
use livemount_store::format::profile::Profile;
use livemount_store::progress::StderrProgress;
use livemount_store::store::Access;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

/// Arguments of `livemount prestage`.
#[derive(clap::Args)]
pub struct Args {
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
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CACHE_SIZE)]
    cache_size: u64,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount prestage`: exit 1 if any chunk failed.
pub fn run(a: Args) -> Outcome {
    let quiet = a.out.quiet || a.out.json;
    let json = a.out.json;
    let r = stage(a, quiet)?;
    if json {
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
    Ok(if r.errors > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn stage(a: Args, quiet: bool) -> anyhow::Result<PrestageReport> {
    let st = a.store.open(Access::ReadOnly)?;
    let snap = st.resolve(&a.snapshot)?;
    let index = st.load_index(&snap)?;
    let profile = match a.profile {
        Some(p) => Profile::load(&p)?,
        None => st.attached_profile(&snap.series)?.ok_or_else(|| {
            anyhow::anyhow!(
                "no --profile given and no profile attached to series {}",
                snap.series
            )
        })?,
    };
    let origin = Arc::new(st.chunks().clone());
    let disk = DiskTier::open(&a.cache_dir, a.cache_size)?;
    let cache = Arc::new(ReadCache::new(origin, 0, Some(disk), index.frame_size));
    let p = Prestager::new(Arc::new(index), cache, &profile, false, 8)?;
    let total = p.progress.report().planned_bytes;
    let progress = StderrProgress::boxed("prestage", total, quiet);
    let stage = |_| p.stage_before_ready(PrestageWindow::All);
    livemount_store::workers::with_workers(1, stage, || {
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
