//! `livemount list`.

use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::ops::info;
use livemount_store::store::Access;
use std::process::ExitCode;

/// Arguments of `livemount list`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// Only this series.
    name: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount list`.
pub fn run(a: Args) -> Outcome {
    let st = a.store.open(Access::ReadOnly)?;
    let snaps = st.list(a.name.as_deref())?;
    if let Some(n) = &a.name {
        if snaps.is_empty() {
            anyhow::bail!("no snapshots of series {n} in store {}", a.store.store);
        }
    }
    if a.out.json {
        let infos = snaps
            .iter()
            .map(|s| info::info(&st, s))
            .collect::<livemount_store::Result<Vec<_>>>()?;
        print_json(&infos)?;
        return Ok(ExitCode::SUCCESS);
    }
    // One damaged index must not hide the others: list them all, then fail naming
    // the first damage.
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
    match damage {
        Some(e) => Err(e.into()),
        None => Ok(ExitCode::SUCCESS),
    }
}
