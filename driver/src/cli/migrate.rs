//! `livemount migrate`: copy a running live mount to local storage.

use super::parse::parse_size;
use super::Outcome;
use crate::block::migrate::MigrationReport;
use crate::daemon::control::{self, Request};
use crate::daemon::status::{parse_dev, read_status};
use livemount_store::progress::StderrProgress;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `livemount migrate`.
#[derive(clap::Args)]
pub struct Args {
    /// The live mount, e.g. /dev/ublkb0.
    device: String,
    /// Raw image file to create (sparse; it must not exist) or block device (at
    /// least as large as the device) that receives the disk.
    #[arg(long, value_name = "TARGET")]
    to: PathBuf,
    /// At most this many bytes per second read for the copy (K/M/G suffixes);
    /// default: as fast as the store allows, after the VM's own reads.
    #[arg(long, value_parser = parse_size)]
    rate: Option<u64>,
    /// Show progress and return when the migration is complete.
    #[arg(long)]
    wait: bool,
}

/// Run `livemount migrate`.
pub fn run(a: Args) -> Outcome {
    let id = parse_dev(&a.device)?;
    read_status(&a.device)?;
    // The daemon resolves nothing relative to our working directory.
    let target = if a.to.is_absolute() {
        a.to.clone()
    } else {
        std::env::current_dir()?.join(&a.to)
    };
    let r = control::request(
        id,
        &Request::Migrate {
            target,
            rate: a.rate.unwrap_or(0),
        },
    )?;
    if !r.ok {
        anyhow::bail!("{}: {}", a.device, r.message);
    }
    println!("{}: {}", a.device, r.message);
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait(&a.device)
}

/// Follow the migration in the status file until it is complete or failed.
fn wait(dev: &str) -> Outcome {
    let status = || -> anyhow::Result<MigrationReport> {
        let st = read_status(dev)
            .map_err(|e| anyhow::anyhow!("{dev}: the daemon went away while migrating ({e})"))?;
        st.migration
            .ok_or_else(|| anyhow::anyhow!("{dev}: no migration in progress"))
    };
    let first = status()?;
    let progress = StderrProgress::boxed("migrating", first.total_bytes, false);
    progress.inc(first.copied_bytes);
    let (mut shown, mut said) = (first.copied_bytes, None::<String>);
    loop {
        let m = status()?;
        progress.inc(m.copied_bytes.saturating_sub(shown));
        shown = shown.max(m.copied_bytes);
        if m.error != said {
            if let Some(e) = &m.error {
                eprintln!("migrate {dev}: {}: {e}", m.state);
            }
            said = m.error.clone();
        }
        match m.state.as_str() {
            "migrated" => {
                progress.finish();
                println!(
                    "{dev}: migrated to {}: the device is served from it alone",
                    m.target.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
            "failed" => {
                progress.finish();
                anyhow::bail!(
                    "{dev}: migration to {} failed: {}",
                    m.target.display(),
                    m.error.unwrap_or_default()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}
