//! `livemount forget`.

use super::{Outcome, StoreArgs};
use livemount_store::store::Access;
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
    let st = a.store.open(Access::ReadOnly)?;
    let snap = st.resolve(&a.snapshot)?;
    // A device on this host whose daemon was killed still needs every chunk: its
    // status file names it (its lease in the store, checked by forget, says so
    // for every host, without the device name).
    if let Some(m) =
        crate::daemon::status::devices_serving(&a.store.location()?, &snap.to_string()).first()
    {
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
