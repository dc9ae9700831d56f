//! A mount daemon's control socket, `/run/livemount/ublkbN.ctl`: 0600 in the 0700
//! run directory, so only its owner (root) can connect. One JSON request per
//! connection, one JSON reply line; requests are bounded (64 KiB, 30 s) and a
//! malformed one gets an error reply, never a crash.

use crate::error::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start migrating the device to `target` (absolute path).
    Migrate {
        /// Raw image file or block device.
        target: PathBuf,
        /// Bytes per second for the copy (0: unlimited).
        rate: u64,
        /// The export to migrate (`livemount serve`; None for a ublk mount).
        #[serde(default)]
        export: Option<String>,
    },
}

/// The daemon's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// True if the request was carried out.
    pub ok: bool,
    /// What was done, or the one-line error.
    pub message: String,
}

/// The control socket of device `dev_id`.
pub fn path(dev_id: u32) -> PathBuf {
    Path::new(crate::paths::RUN_DIR).join(format!("ublkb{dev_id}.ctl"))
}

/// The control socket of the `livemount serve` with `pid`.
pub fn serve_path(pid: u32) -> PathBuf {
    Path::new(crate::paths::RUN_DIR).join(format!("serve-{pid}.ctl"))
}

const MAX_REQUEST: u64 = 64 << 10;
const TIMEOUT: Duration = Duration::from_secs(30);

/// Listen on `path` (a stale socket is replaced), answering each request with
/// `handler` on a thread of its own.
pub fn listen(
    path: &Path,
    handler: impl Fn(Request) -> Reply + Send + Sync + 'static,
) -> Result<()> {
    let l = bind_private(path)?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in l.incoming().flatten() {
                let _ = answer(conn, &handler);
            }
        })
        .map_err(|e| Error::io("control thread", e))?;
    Ok(())
}

/// Bind a Unix socket at `path`, 0600 (its directory created 0700): a stale socket
/// file is replaced, anything else there is refused. Used for the control sockets
/// and `livemount serve`'s NBD socket.
pub fn bind_private(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        crate::paths::ensure_dir(dir)?;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(Error::Invalid(format!(
                "{} exists and is not a socket; remove it",
                path.display()
            )));
        }
        std::fs::remove_file(path).at(path)?;
    }
    let l = UnixListener::bind(path).at(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).at(path)?;
    Ok(l)
}

fn answer(conn: UnixStream, handler: &impl Fn(Request) -> Reply) -> std::io::Result<()> {
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    let mut line = Vec::new();
    BufReader::new((&conn).take(MAX_REQUEST)).read_until(b'\n', &mut line)?;
    let reply = match serde_json::from_slice::<Request>(&line) {
        Ok(r) => handler(r),
        Err(e) => Reply {
            ok: false,
            message: format!("bad control request: {e}"),
        },
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    (&conn).write_all(text.as_bytes())
}

/// Send `req` to the daemon listening on `p` (`what` names it in errors) and
/// return its reply.
pub fn request(p: &Path, what: &str, req: &Request) -> Result<Reply> {
    let conn = UnixStream::connect(p).map_err(|e| {
        Error::io(
            p,
            std::io::Error::new(
                e.kind(),
                format!("cannot reach the daemon of {what} ({e}); is it running?"),
            ),
        )
    })?;
    conn.set_read_timeout(Some(TIMEOUT)).at(p)?;
    conn.set_write_timeout(Some(TIMEOUT)).at(p)?;
    let mut text = serde_json::to_string(req).map_err(|e| Error::Invalid(e.to_string()))?;
    text.push('\n');
    (&conn).write_all(text.as_bytes()).at(p)?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_REQUEST))
        .read_line(&mut line)
        .at(p)?;
    serde_json::from_str(&line)
        .map_err(|e| Error::Invalid(format!("bad reply from the daemon of {what}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_and_garbage_gets_an_error_reply() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.ctl");
        listen(&p, |r| match r {
            Request::Migrate { target, rate, .. } => Reply {
                ok: true,
                message: format!("{} {rate}", target.display()),
            },
        })
        .unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ask = |text: &[u8]| {
            let c = UnixStream::connect(&p).unwrap();
            (&c).write_all(text).unwrap();
            let mut s = String::new();
            BufReader::new(&c).read_line(&mut s).unwrap();
            serde_json::from_str::<Reply>(&s).unwrap()
        };
        let r = ask(b"{\"op\":\"migrate\",\"target\":\"/t\",\"rate\":5}\n");
        assert!(r.ok && r.message == "/t 5", "{r:?}");
        let r = ask(b"{\"op\":\"format_disk\"}\n");
        assert!(!r.ok && r.message.contains("bad control request"), "{r:?}");
        let r = ask(&[&[0xffu8; 100][..], b"\n"].concat());
        assert!(!r.ok, "{r:?}");
    }
}
