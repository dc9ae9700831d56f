//! `livemount unmount`.

use super::Outcome;
use std::process::ExitCode;

/// Arguments of `livemount unmount`.
#[derive(clap::Args)]
pub struct Args {
    /// The device, e.g. /dev/ublkb0.
    device: String,
    /// Seconds to wait for the daemon to stop.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

/// Run `livemount unmount`.
pub fn run(a: Args) -> Outcome {
    crate::daemon::unmount(&a.device, std::time::Duration::from_secs(a.timeout))?;
    println!("unmounted {}", a.device);
    Ok(ExitCode::SUCCESS)
}
