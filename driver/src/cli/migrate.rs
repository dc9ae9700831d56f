//! `livemount migrate`: copy a running live mount to local storage.

use super::parse::parse_size;
use super::Outcome;
use crate::block::migrate::MigrationReport;
use crate::daemon::control::{self, Request};
use crate::daemon::status::{list_serve_status, parse_dev, read_status};
use livemount_store::progress::StderrProgress;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `livemount migrate`.
#[derive(clap::Args)]
pub struct Args {
    /// The live mount (/dev/ublkbN) or the name of an export of a running
    /// `livemount serve`.
    device: String,
    /// Raw image file to create (sparse; it must not exist) or block device (at
    /// least as large as the device) that receives the disk. Without it, `--wait`
    /// follows the migration already running.
    #[arg(long, value_name = "TARGET", required_unless_present = "wait")]
    to: Option<PathBuf>,
    /// At most this many bytes per second read for the copy (K/M/G suffixes);
    /// default: as fast as the store allows, after the VM's own reads.
    #[arg(long, value_parser = parse_size)]
    rate: Option<u64>,
    /// Show progress and return when the migration is complete.
    #[arg(long)]
    wait: bool,
    /// The pid of the `livemount serve` whose export to migrate, when several
    /// servers export the same name.
    #[arg(long, value_name = "PID")]
    server: Option<u32>,
}

/// Where a migration is asked for and followed: a ublk mount or a served export.
enum Subject {
    Device(String),
    Export { name: String, pid: u32 },
}

impl Subject {
    fn find(name: &str, server: Option<u32>) -> anyhow::Result<Subject> {
        if name.starts_with("/dev/") {
            read_status(name)?;
            return Ok(Subject::Device(name.to_string()));
        }
        let servers: Vec<u32> = list_serve_status()
            .into_iter()
            .filter(|s| s.exports.iter().any(|e| e.name == name))
            .filter(|s| server.is_none_or(|p| s.pid == p))
            .map(|s| s.pid)
            .collect();
        match servers[..] {
            [pid] => Ok(Subject::Export {
                name: name.to_string(),
                pid,
            }),
            [] => anyhow::bail!(
                "{name}: neither a device (/dev/ublkbN) nor an export of a running livemount serve"
            ),
            _ => anyhow::bail!(
                "export {name} is served by several servers (pids {servers:?}); name one with --server PID"
            ),
        }
    }

    fn migration(&self) -> anyhow::Result<Option<MigrationReport>> {
        match self {
            Subject::Device(d) => Ok(read_status(d)
                .map_err(|e| anyhow::anyhow!("{d}: the daemon went away while migrating ({e})"))?
                .migration),
            Subject::Export { name, pid } => {
                let s = list_serve_status()
                    .into_iter()
                    .find(|s| s.pid == *pid)
                    .ok_or_else(|| anyhow::anyhow!("export {name}: its server {pid} went away"))?;
                Ok(s.exports
                    .into_iter()
                    .find(|e| &e.name == name)
                    .and_then(|e| e.migration))
            }
        }
    }
}

/// Run `livemount migrate`.
pub fn run(a: Args) -> Outcome {
    let subject = Subject::find(&a.device, a.server)?;
    let Some(to) = &a.to else {
        // `--wait` alone: follow the migration in progress.
        return wait(&a.device, &subject);
    };
    // The daemon resolves nothing relative to our working directory.
    let target = if to.is_absolute() {
        to.clone()
    } else {
        std::env::current_dir()?.join(to)
    };
    let rate = a.rate.unwrap_or(0);
    let r = match &subject {
        Subject::Device(d) => control::request(
            &control::path(parse_dev(d)?),
            d,
            &Request::Migrate {
                target,
                rate,
                export: None,
            },
        )?,
        Subject::Export { name, pid } => control::request(
            &control::serve_path(*pid),
            &format!("export {name}"),
            &Request::Migrate {
                target,
                rate,
                export: Some(name.clone()),
            },
        )?,
    };
    if !r.ok {
        anyhow::bail!("{}: {}", a.device, r.message);
    }
    println!("{}: {}", a.device, r.message);
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    wait(&a.device, &subject)
}

/// Follow the migration in the status file until it is complete or failed.
fn wait(dev: &str, subject: &Subject) -> Outcome {
    // The status file is rewritten every second: a migration just started may not
    // be in it yet.
    let status = || -> anyhow::Result<MigrationReport> {
        let t = std::time::Instant::now();
        loop {
            if let Some(m) = subject.migration()? {
                return Ok(m);
            }
            if t.elapsed() > Duration::from_secs(5) {
                anyhow::bail!("{dev}: no migration in progress");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
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
