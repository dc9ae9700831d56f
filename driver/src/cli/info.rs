//! `livemount info`.

use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::ops::info;
use livemount_store::store::Access;
use std::process::ExitCode;

/// Arguments of `livemount info`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// `series@time`, or `series` for its latest.
    snapshot: String,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount info`.
pub fn run(a: Args) -> Outcome {
    let st = a.store.open(Access::ReadOnly)?;
    let snap = st.resolve(&a.snapshot)?;
    let i = info::info(&st, &snap)?;
    if a.out.json {
        print_json(&i)?;
        return Ok(ExitCode::SUCCESS);
    }
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
    Ok(ExitCode::SUCCESS)
}
