//! The `livemount` command line: one module per command, each with its `Args` and
//! `run()`; arguments shared by several commands are flattened structs defined
//! here. Errors are printed as one line and mapped to exit codes: 0 success,
//! 1 error, 2 bad usage (clap), 3 `verify` found damage.

mod backup;
mod commit;
mod detach;
mod forget;
mod gc;
mod info;
mod list;
mod migrate;
mod mount;
pub mod parse;
mod prestage;
mod profile;
mod restore;
mod serve;
mod status;
mod unmount;
mod verify;

use clap::{Args, Parser, Subcommand};
use livemount_store::backend::s3::S3Options;
use livemount_store::StoreLocation;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

/// What a command returns: its exit code, or an error printed as one line.
type Outcome = anyhow::Result<ExitCode>;

#[derive(Parser)]
#[command(
    name = "livemount",
    version,
    about = "Boot virtual machines straight from their backups"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Back up a disk image or block device (incremental after the first).
    Backup(backup::Args),
    /// List snapshots, all or of one series.
    List(list::Args),
    /// Sizes, chunk counts and ratios of a snapshot.
    Info(info::Args),
    /// Read and check every chunk (of one snapshot, or the whole store).
    Verify(verify::Args),
    /// Restore a snapshot to a file or block device.
    Restore(restore::Args),
    /// Remove a snapshot (its chunks are freed by the next gc).
    Forget(forget::Args),
    /// Expose a snapshot as a block device (/dev/ublkbN) with a copy-on-write overlay.
    Mount(Box<mount::Args>),
    /// Serve snapshots as NBD exports (qemu, libvirt, nbd-client, on this or other hosts).
    Serve(serve::Args),
    /// Stop a live mount (flushes the overlay, removes the device).
    Unmount(unmount::Args),
    /// State, cache and I/O figures of live mounts.
    Status(status::Args),
    /// Fill the disk cache from a profile without mounting (prepare a host for a recovery).
    Prestage(prestage::Args),
    /// Profiles attached to backup series (used by every mount of the series).
    #[command(subcommand)]
    Profile(profile::Cmd),
    /// Save a live mount's changes: base snapshot + overlay as a new snapshot.
    Commit(commit::Args),
    /// Copy a running live mount to a local file or block device, then serve it
    /// from there (finish a recovery without stopping the VM).
    Migrate(migrate::Args),
    /// Remove chunks that no snapshot references.
    Gc(gc::Args),
}

/// Arguments shared by every command that works on a store.
#[derive(Args, Clone)]
struct StoreArgs {
    /// The store: a directory, or `s3://BUCKET/PREFIX` (see the --s3-* options).
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX", env = "LIVEMOUNT_STORE")]
    store: String,
    #[command(flatten)]
    s3: S3Args,
}

impl StoreArgs {
    /// Where the store is.
    fn location(&self) -> anyhow::Result<StoreLocation> {
        Ok(StoreLocation::parse(&self.store, self.s3.options()?).absolute()?)
    }

    /// Open the store.
    fn open(&self, access: livemount_store::Access) -> anyhow::Result<livemount_store::Store> {
        Ok(livemount_store::Store::open_at(&self.location()?, access)?)
    }
}

/// How to reach an S3-compatible store (used with `--store s3://…`). Credentials
/// come from `--s3-credentials`, `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, or
/// `~/.aws/credentials`, and are never printed.
#[derive(Args, Clone, Default)]
struct S3Args {
    /// Endpoint URL of the object store, e.g. http://127.0.0.1:3900 (default: AWS,
    /// or AWS_ENDPOINT_URL).
    #[arg(long, value_name = "URL", env = "LIVEMOUNT_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// Region (default: AWS_REGION, else us-east-1).
    #[arg(long, value_name = "REGION", env = "LIVEMOUNT_S3_REGION")]
    s3_region: Option<String>,
    /// A credentials file (AWS INI format, mode 0600).
    #[arg(long, value_name = "FILE", env = "LIVEMOUNT_S3_CREDENTIALS")]
    s3_credentials: Option<PathBuf>,
    /// Profile in the credentials file (default: AWS_PROFILE, else default).
    #[arg(long, value_name = "NAME")]
    s3_profile: Option<String>,
    /// Virtual-host style requests (BUCKET.endpoint) instead of path style.
    #[arg(long)]
    s3_virtual_host: bool,
    /// Requests in flight at once.
    #[arg(long, value_name = "N", default_value_t = 16)]
    s3_in_flight: usize,
    /// Time limit of one request with its retries; a read still failing then is EIO.
    #[arg(long, value_name = "DURATION", value_parser = parse::parse_duration, default_value = "30s")]
    s3_timeout: std::time::Duration,
}

impl S3Args {
    fn options(&self) -> anyhow::Result<S3Options> {
        if self.s3_in_flight == 0 || self.s3_in_flight > 1024 {
            anyhow::bail!("--s3-in-flight {}: use 1 to 1024", self.s3_in_flight);
        }
        let credentials_file = match &self.s3_credentials {
            Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
            other => other.clone(),
        };
        Ok(S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            virtual_host: self.s3_virtual_host,
            credentials_file,
            profile: self.s3_profile.clone(),
            in_flight: self.s3_in_flight,
            attempt_timeout: self.s3_timeout.min(std::time::Duration::from_secs(5)),
            io_timeout: self.s3_timeout,
        })
    }
}

/// Output options shared by reporting commands.
#[derive(Args, Clone, Copy)]
struct OutputArgs {
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn dispatch(cmd: Cmd) -> Outcome {
    match cmd {
        Cmd::Backup(a) => backup::run(a),
        Cmd::List(a) => list::run(a),
        Cmd::Info(a) => info::run(a),
        Cmd::Verify(a) => verify::run(a),
        Cmd::Restore(a) => restore::run(a),
        Cmd::Forget(a) => forget::run(a),
        Cmd::Mount(a) => mount::run(*a),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Unmount(a) => unmount::run(a),
        Cmd::Status(a) => status::run(a),
        Cmd::Prestage(a) => prestage::run(a),
        Cmd::Profile(c) => profile::run(c),
        Cmd::Commit(a) => commit::run(a),
        Cmd::Migrate(a) => migrate::run(a),
        Cmd::Gc(a) => gc::run(a),
    }
}

/// Parse the command line, run the command, print an error as one line.
pub fn main() -> ExitCode {
    match dispatch(Cli::parse().cmd) {
        Ok(code) => code,
        Err(e) => {
            // One line: library errors name the thing (path, chunk, snapshot) themselves.
            eprintln!("livemount: error: {e}");
            ExitCode::from(1)
        }
    }
}
