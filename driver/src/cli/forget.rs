//! `livemount forget`.

use super::{Outcome, StoreArgs};
use livemount_store::store::{Access, Store};
use std::process::ExitCode;

/// Arguments of `livemount forget`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// `series@time` (a bare series name is refused, to forget one snapshot at a time).
    snapshot: String,
}

/// Run `livemount forget`.
pub fn run(a: Args) -> Outcome {
    if !a.snapshot.contains('@') {
        anyhow::bail!(
            "forget needs a full snapshot name series@time (see `livemount list`), got {:?}",
            a.snapshot
        );
    }
    let st = Store::open(&a.store.store, Access::ReadOnly)?;
    let snap = st.resolve(&a.snapshot)?;
    st.forget(&snap)?;
    println!("forgot {snap}; run `livemount gc` to free its chunks");
    Ok(ExitCode::SUCCESS)
}
