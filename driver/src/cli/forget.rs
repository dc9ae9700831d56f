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
    // A device whose daemon was killed keeps no flock on the index, but still
    // needs every chunk: its status file and the device say so.
    if let Some(m) = crate::daemon::status::devices_serving(st.root(), &snap.to_string()).first() {
        anyhow::bail!(
            "snapshot {snap} is mounted as {} (daemon pid {}{}); unmount it before forgetting it",
            m.device,
            m.pid,
            if crate::daemon::status::pid_alive(m.pid) {
                ""
            } else {
                ", not running: `livemount mount --recover` or `unmount` it"
            }
        );
    }
    st.forget(&snap)?;
    println!("forgot {snap}; run `livemount gc` to free its chunks");
    Ok(ExitCode::SUCCESS)
}
