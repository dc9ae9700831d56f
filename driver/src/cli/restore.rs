//! `livemount restore`.

use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::ops::restore;
use livemount_store::progress::StderrProgress;
use livemount_store::store::Access;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `livemount restore`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// `series@time`, or `series` for its latest.
    snapshot: String,
    /// Target file (created sparse) or block device.
    target: PathBuf,
    /// Overwrite an existing non-empty target file.
    #[arg(long)]
    force: bool,
    /// Worker threads (default: one per core; 16 for a remote store).
    #[arg(long)]
    threads: Option<usize>,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount restore`.
pub fn run(a: Args) -> Outcome {
    let st = a.store.open(Access::ReadOnly)?;
    let snap = st.resolve(&a.snapshot)?;
    let size = st.load_index(&snap)?.image_size;
    let progress = StderrProgress::boxed("restore", size, a.out.quiet || a.out.json);
    let threads = a.threads.unwrap_or_else(|| st.io_threads());
    let r = restore::restore(&st, &snap, &a.target, a.force, threads, progress.as_ref())?;
    if a.out.json {
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
    Ok(ExitCode::SUCCESS)
}
