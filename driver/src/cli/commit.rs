//! `livemount commit`.

use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::ops::backup::{BackupOptions, DEFAULT_LEVEL};
use livemount_store::progress::StderrProgress;
use livemount_store::workers::default_threads;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `livemount commit`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// The overlay file of the mount (unmount first).
    overlay: PathBuf,
    /// Series of the new snapshot.
    #[arg(long)]
    name: String,
    /// zstd compression level (1-22).
    #[arg(long, default_value_t = DEFAULT_LEVEL)]
    level: i32,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount commit`.
pub fn run(a: Args) -> Outcome {
    let opts = BackupOptions {
        series: a.name,
        chunk_size: None,
        level: a.level,
        threads: default_threads(),
    };
    let id = crate::block::overlay::read_identity(&a.overlay)?;
    let progress = StderrProgress::boxed("commit", 0, a.out.quiet || a.out.json);
    let r = crate::stack::commit(&a.store.location()?, &a.overlay, &opts, progress.as_ref())?;
    if a.out.json {
        print_json(&r)?;
    } else {
        println!(
            "committed {} + {} as {}: new {:.1} MiB ({} chunks), reused {:.1} MiB",
            id.snapshot,
            a.overlay.display(),
            r.snapshot,
            mib(r.bytes_new),
            r.chunks_new,
            mib(r.bytes_reused)
        );
    }
    Ok(ExitCode::SUCCESS)
}
