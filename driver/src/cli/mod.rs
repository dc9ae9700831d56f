//! The `livemount` command line: one module per command, each with its `Args` and
//! `run()`; arguments shared by several commands are flattened structs defined
//! here. Errors are printed as one line and mapped to exit codes: 0 success,
//! 1 error, 2 bad usage (clap), 3 `verify` found damage.

mod backup;
mod commit;
mod forget;
mod gc;
mod info;
mod list;
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
    /// Remove chunks that no snapshot references.
    Gc(gc::Args),
}

/// Arguments shared by every command that works on a store.
#[derive(Args, Clone)]
struct StoreArgs {
    /// The store directory.
    #[arg(long, value_name = "DIR", env = "LIVEMOUNT_STORE")]
    store: PathBuf,
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
