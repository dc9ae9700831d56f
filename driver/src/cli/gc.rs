//! `livemount gc`.

use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::ops::gc;
use livemount_store::store::Access;
use std::process::ExitCode;

/// Arguments of `livemount gc`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount gc`.
pub fn run(a: Args) -> Outcome {
    let st = a.store.open(Access::Exclusive)?;
    let quiet = a.out.quiet;
    let r = gc::gc(&st, &move |what, total, unit| {
        livemount_store::progress::StderrProgress::counting(what, total, unit, quiet)
    })?;
    if a.out.json {
        print_json(&r)?;
    } else {
        println!(
            "gc: {} snapshot(s), kept {} chunk(s), removed {} chunk(s) ({:.1} MiB) and {} temp file(s)",
            r.snapshots, r.chunks_kept, r.chunks_removed, mib(r.bytes_removed), r.temp_files_removed
        );
    }
    Ok(ExitCode::SUCCESS)
}
