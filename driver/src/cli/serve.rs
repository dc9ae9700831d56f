//! `livemount serve`: snapshots as NBD exports.

use super::parse::parse_size;
use super::{Outcome, StoreArgs};
use crate::config::{DEFAULT_CACHE_MEM, DEFAULT_CACHE_SIZE, DEFAULT_WORKERS};
use crate::daemon::serve::{serve, ServeOptions};
use crate::frontend::nbd::tls::TlsOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `livemount serve`.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    store: StoreArgs,
    /// An export: NAME serving SNAPSHOT (`series@time`; default: series NAME's
    /// latest). Repeat for more exports.
    #[arg(long = "export", value_name = "NAME[=SNAPSHOT]", required = true)]
    exports: Vec<String>,
    /// Directory of the exports' overlays (NAME.overlay, kept across restarts).
    #[arg(long, value_name = "DIR")]
    overlay_dir: Option<PathBuf>,
    /// Serve every export read-only (no overlay).
    #[arg(long)]
    read_only: bool,
    /// Unix socket to listen on (default /run/livemount/nbd.sock unless --tcp is given).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address to listen on, e.g. 127.0.0.1:10809. Repeatable. Requires TLS when
    /// --tls-cert is given; without it, for loopback or a trusted network only.
    #[arg(long, value_name = "ADDR:PORT")]
    tcp: Vec<SocketAddr>,
    /// The server's TLS certificate chain (PEM): TCP clients must then use TLS
    /// (qemu `tls-creds`, `nbds://` URIs); the Unix socket offers it.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM, mode 0600).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Clients must present a certificate issued by this CA (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Only clients whose certificate is valid for one of NAMEs (its DNS names) may
    /// list or open EXPORT. Repeatable; exports without one are open to every
    /// client the CA vouches for.
    #[arg(long, value_name = "EXPORT=NAME[,NAME...]", requires = "tls_client_ca")]
    tls_allow: Vec<String>,
    /// Memory tier of each export's read cache, bytes or with K/M/G.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CACHE_MEM)]
    cache_mem: u64,
    /// Directory of the host's disk cache (compressed chunks; shared with every
    /// mount and server that names it, one budget for all; kept across restarts).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Budget of the disk cache, bytes or with K/M/G.
    #[arg(long, value_parser = parse_size, default_value_t = DEFAULT_CACHE_SIZE)]
    cache_size: u64,
    /// Worker threads shared by every connection.
    #[arg(long, default_value_t = DEFAULT_WORKERS)]
    workers: usize,
    /// Return once the exports are served, leaving the server running (its output
    /// in --log). systemd runs it in the foreground instead.
    #[arg(long)]
    daemon: bool,
    /// Log file of a --daemon server (default: /run/livemount/serve-PID.log).
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
}

/// Run `livemount serve` until SIGTERM/SIGINT.
pub fn run(a: Args) -> Outcome {
    if a.daemon {
        super::detach::daemonize("serve", a.log.as_deref(), |_, pid, log| {
            // The server printed its export lines (with their URIs) before ready.
            let text = std::fs::read_to_string(log).unwrap_or_default();
            for l in text.lines().filter(|l| l.starts_with("export ")) {
                println!("{l}");
            }
            println!(
                "server pid {pid} (log {}); stop it with kill -TERM {pid}",
                log.display()
            );
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    let exports = a
        .exports
        .iter()
        .map(|e| match e.split_once('=') {
            Some((n, s)) => (n.to_string(), s.to_string()),
            None => (e.clone(), e.clone()),
        })
        .collect();
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(TlsOptions {
            cert,
            key,
            client_ca: a.tls_client_ca,
            allow: a
                .tls_allow
                .iter()
                .map(|s| match s.split_once('=') {
                    Some((e, names)) if !e.is_empty() && !names.is_empty() => Ok((
                        e.to_string(),
                        names.split(',').map(str::to_string).collect(),
                    )),
                    _ => Err(format!("--tls-allow {s:?}: expected EXPORT=NAME[,NAME...]")),
                })
                .collect::<Result<_, String>>()
                .map_err(anyhow::Error::msg)?,
        }),
        _ => None,
    };
    serve(ServeOptions {
        store: a.store.location()?,
        exports,
        overlay_dir: a.overlay_dir,
        read_only: a.read_only,
        socket: a.socket,
        tcp: a.tcp,
        tls,
        cache_mem: a.cache_mem,
        cache_dir: a.cache_dir,
        cache_size: a.cache_size,
        workers: a.workers,
    })?;
    Ok(ExitCode::SUCCESS)
}
