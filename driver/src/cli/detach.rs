//! `--daemon` for the long-running commands (`mount`, `serve`): run this same
//! command line, minus `--daemon`, as a detached child with its output in a 0600 log,
//! and return once the child reports ready over the readiness pipe (or say how it
//! failed, with its last error line).

use crate::daemon::ready::{self, Readiness};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// This process's arguments without `flag`.
pub(super) fn args_without(flag: &str) -> Vec<String> {
    std::env::args().skip(1).filter(|x| x != flag).collect()
}

/// Start the detached child, logging to `log` (default
/// /run/livemount/`what`-PID.log), and wait until it is ready; `ready` gets what it
/// reported, the child's pid and the log's path.
pub(super) fn daemonize(
    what: &str,
    log: Option<&Path>,
    ready: impl FnOnce(&str, u32, &Path),
) -> anyhow::Result<()> {
    let log: PathBuf = match log {
        Some(l) => l.to_path_buf(),
        None => crate::paths::run_dir()?.join(format!("{what}-{}.log", std::process::id())),
    };
    let logf = crate::paths::open_private_append(&log)?;
    let mut w = ready::spawn(
        Command::new(std::env::current_exe()?)
            .args(args_without("--daemon"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .process_group(0),
    )?;
    match w.wait_ready() {
        Ok(Readiness::Ready { device, .. }) => {
            ready(&device, w.child.id(), &log);
            Ok(())
        }
        Err(status) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("livemount: error: "))
                .map(str::to_string);
            match last {
                Some(e) => anyhow::bail!("{e}"),
                None => anyhow::bail!(
                    "the daemon exited before it was ready ({}); see {}",
                    ready::describe(status),
                    log.display()
                ),
            }
        }
    }
}
