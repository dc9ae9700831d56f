//! `livemount verify`.

use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::ops::verify;
use livemount_store::progress::StderrProgress;
use livemount_store::store::Access;
use std::process::ExitCode;

/// Arguments of `livemount verify`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// Only this snapshot.
    snapshot: Option<String>,
    /// Worker threads (default: one per core; 16 for a remote store).
    #[arg(long)]
    threads: Option<usize>,
    /// Move damaged chunk files aside (to CHUNK.bad), so that the next backup of
    /// the same data stores them again, which heals every snapshot using them.
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount verify`: exit 3 when it found damage.
pub fn run(a: Args) -> Outcome {
    let st = a.store.open(Access::ReadOnly)?;
    // Repairing renames files: the store must exist (opened above) and be writable,
    // with the backups' shared lock held so gc stays out.
    let st = if a.repair {
        a.store.open(Access::Write)?
    } else {
        st
    };
    let snap = a.snapshot.map(|s| st.resolve(&s)).transpose()?;
    let progress = StderrProgress::boxed("verify", 0, true);
    let threads = a.threads.unwrap_or_else(|| st.io_threads());
    let mut r = verify::verify(&st, snap.as_ref(), threads, progress.as_ref())?;
    if a.repair {
        verify::repair(&st, &mut r)?;
    }
    let ok = r.ok();
    if a.out.json {
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
                println!("  moved aside to {to}: the next backup of this data stores it again");
            }
        }
        println!(
            "{}: {} snapshot(s), {} chunk(s), {:.1} MiB checked, {} bad chunk(s), {} bad index(es)",
            if ok { "OK" } else { "DAMAGED" },
            r.snapshots.len(),
            r.chunks_checked,
            mib(r.bytes_checked),
            r.bad_chunks.len(),
            r.bad_indexes.len()
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}
