//! `livemount serve`: snapshots as NBD exports, each with its own block stack
//! (overlay or read-only), on a Unix socket and/or TCP, until SIGTERM/SIGINT.
//!
//! The Unix socket is created 0600 in a private directory (only root connects).
//! With a certificate (`--tls-cert`) TCP listeners require TLS and the Unix socket
//! offers it (see [`nbd::tls`]); without one, TCP is for loopback or a trusted
//! storage network, and the server says so when it binds anything else. A stop flushes every export's
//! overlay before the process exits: writes a client completed are durable even if
//! it never sent FLUSH.

use crate::config::MountConfig;
use crate::error::{Error, Result};
use crate::frontend::nbd::{self, Export, Exports};
use crate::metrics::IoMetrics;
use crate::stack::Stack;
use livemount_store::workers::Pool;
use livemount_store::StoreLocation;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What to serve and where.
pub struct ServeOptions {
    /// The store.
    pub store: StoreLocation,
    /// (export name, snapshot spec).
    pub exports: Vec<(String, String)>,
    /// Where each writable export keeps its overlay, `NAME.overlay` (kept across
    /// restarts: a restarted server keeps every flushed write).
    pub overlay_dir: Option<PathBuf>,
    /// Serve every export read-only.
    pub read_only: bool,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// TCP addresses.
    pub tcp: Vec<SocketAddr>,
    /// TLS (required on TCP, offered on the Unix socket).
    pub tls: Option<nbd::tls::TlsOptions>,
    /// Memory tier of each export's read cache.
    pub cache_mem: u64,
    /// The host's disk cache directory, shared by every export (and every other
    /// process naming it).
    pub cache_dir: Option<PathBuf>,
    /// Its budget.
    pub cache_size: u64,
    /// Worker threads shared by all connections.
    pub workers: usize,
}

/// Build every export's stack (and stage its profile's start, like a mount).
/// Stacks by export name (the same order as the exports).
type Stacks = std::collections::BTreeMap<String, Stack>;

fn open_exports(o: &ServeOptions) -> Result<(Stacks, Exports)> {
    if !o.read_only && o.overlay_dir.is_none() {
        return Err(Error::Invalid(
            "writable exports need --overlay-dir DIR (one overlay file per export, kept across restarts), or use --read-only".into(),
        ));
    }
    if let Some(d) = &o.overlay_dir {
        crate::paths::ensure_dir(d)?;
    }
    let mut stacks = Stacks::new();
    let mut exports = Exports::new();
    for (name, snap) in &o.exports {
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\0']) {
            return Err(Error::Invalid(format!(
                "export name {name:?}: 1 to 255 characters, no '/'"
            )));
        }
        if exports.contains_key(name) {
            return Err(Error::Invalid(format!("export {name:?} given twice")));
        }
        let overlay = match (&o.overlay_dir, o.read_only) {
            (Some(d), false) => Some(d.join(format!("{name}.overlay"))),
            _ => None,
        };
        let mut config = MountConfig::new(o.store.clone(), snap.clone(), overlay);
        config.read_only = o.read_only;
        config.cache_mem = o.cache_mem;
        config.cache_dir = o.cache_dir.clone();
        config.cache_size = o.cache_size;
        // A restarted server continues the migration its predecessor started
        // (Stack::open resumes it before anything is served).
        config.migration = saved_migration(&config);
        let stack = Stack::open(&config)?;
        if let Some(p) = &stack.prestager {
            let window = config.prestage.parse().map_err(Error::Invalid)?;
            p.stage_before_ready(window);
            let p = p.clone();
            std::thread::spawn(move || p.continue_in_background());
        }
        exports.insert(
            name.clone(),
            Export {
                device: stack.top.clone(),
                metrics: Arc::new(IoMetrics::default()),
                description: stack.config.snapshot.clone(),
            },
        );
        stacks.insert(name.clone(), stack);
    }
    Ok((stacks, exports))
}

/// Serve until SIGTERM/SIGINT; print one line per export with its URIs.
pub fn serve(o: ServeOptions) -> Result<()> {
    let tls = match &o.tls {
        Some(t) => Some(Arc::new(nbd::tls::TlsServer::load(t)?)),
        None => None,
    };
    let (stacks, exports) = open_exports(&o)?;
    let exports = Arc::new(exports);
    let shared = Shared {
        exports: exports.clone(),
        pool: Pool::new("livemount-io", o.workers),
        budget: nbd::Budget::new(REQUEST_BUDGET),
        connections: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
    };
    let socket = listen(&o, &tls, &shared)?;
    // Status file and control socket exist before anyone is told the server is
    // ready (`livemount migrate EXPORT` finds the server by its status file).
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
        .map_err(|e| Error::io("signal handler", e))?;
    let stacks = Arc::new(stacks);
    let ctl = super::control::serve_path(std::process::id());
    {
        let stacks = stacks.clone();
        // Serving does not need it: without it only `livemount migrate` is missing.
        if let Err(e) = super::control::listen(&ctl, move |r| migrate_export(&stacks, r)) {
            eprintln!("livemount: warning: no control socket, so no `livemount migrate` for these exports: {e}");
        }
    }
    let status_stop = Arc::new(std::sync::Mutex::new(false));
    status_writer(
        stacks.clone(),
        exports.clone(),
        socket.clone(),
        o.tcp.clone(),
        status_stop.clone(),
    );
    announce(&exports, socket.as_deref(), &o.tcp, tls.is_some());
    signals.forever().next();
    // The status file goes first, and is never written again.
    if let Ok(mut stopped) = status_stop.lock() {
        *stopped = true;
        let _ = std::fs::remove_file(super::status::serve_status_path(std::process::id()));
    }
    let _ = std::fs::remove_file(&ctl);
    let result = stop_exports(&stacks);
    if let Some(s) = &socket {
        let _ = std::fs::remove_file(s);
    }
    result
}

/// Start the accept threads: the Unix socket (`--socket`, or the default one when
/// no `--tcp` is given) and every TCP address. Returns the socket's path.
fn listen(
    o: &ServeOptions,
    tls: &Option<Arc<nbd::tls::TlsServer>>,
    shared: &Shared,
) -> Result<Option<PathBuf>> {
    let socket = match (&o.socket, o.tcp.is_empty()) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(Path::new(crate::paths::RUN_DIR).join("nbd.sock")),
        (None, false) => None,
    };
    if let Some(path) = &socket {
        let l = super::control::bind_private(path)?;
        let sh = shared.clone();
        let lt = nbd::ListenerTls {
            server: tls.clone(),
            required: false,
        };
        std::thread::spawn(move || accept_loop(|| l.accept().map(|(c, _)| c), lt, sh));
    }
    for addr in &o.tcp {
        let l = TcpListener::bind(addr).map_err(|e| Error::io(addr.to_string(), e))?;
        if !addr.ip().is_loopback() && tls.is_none() {
            eprintln!("livemount: warning: serving {addr} without TLS: anyone who can reach it reads and writes these disks; use a trusted network");
        }
        let sh = shared.clone();
        let lt = nbd::ListenerTls {
            server: tls.clone(),
            required: tls.is_some(),
        };
        std::thread::spawn(move || {
            accept_loop(
                || {
                    let (c, _) = l.accept()?;
                    let _ = c.set_nodelay(true);
                    Ok(c)
                },
                lt,
                sh,
            )
        });
    }
    Ok(socket)
}

/// One line per export with its URIs on stdout, then readiness to a `--daemon`
/// parent.
fn announce(exports: &Exports, socket: Option<&Path>, tcp: &[SocketAddr], tls: bool) {
    for (name, e) in exports.iter() {
        let mut uris = Vec::new();
        if let Some(s) = socket {
            uris.push(format!("nbd+unix:///{name}?socket={}", s.display()));
        }
        let scheme = if tls { "nbds" } else { "nbd" };
        uris.extend(tcp.iter().map(|a| format!("{scheme}://{a}/{name}")));
        println!(
            "export {name}: {} ({} bytes{}) at {}",
            e.description,
            e.device.size(),
            if e.device.read_only() {
                ", read-only"
            } else {
                ""
            },
            uris.join(" ")
        );
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    super::ready::notify(&super::ready::Readiness::Ready {
        device: socket
            .map(|s| s.display().to_string())
            .unwrap_or_else(|| tcp.first().map(|a| a.to_string()).unwrap_or_default()),
        pid: std::process::id(),
    });
}

/// Stop every export: every completed write durable, mirrors removed, leases
/// released; a completed migration's map removed once its final flush succeeded.
fn stop_exports(stacks: &Stacks) -> Result<()> {
    let mut result = Ok(());
    for s in stacks.values() {
        s.migrating.stop();
        let r = s.top.flush().and_then(|()| match &s.overlay {
            Some(o) => o.close(),
            None => Ok(()),
        });
        // Only after a successful final flush: until then the map is what says
        // that TARGET, not the overlay, holds the disk.
        if r.is_ok() && s.migrating.migrated() {
            if let Some(m) = s.migrating.config() {
                let _ = std::fs::remove_file(&m.map);
                if let Some(p) = migration_file(&s.config) {
                    let _ = std::fs::remove_file(p);
                }
                eprintln!(
                    "livemount: {} holds the disk (writes since the migration completed are there, not in the overlay); start the VM on it as a raw disk",
                    m.target.display()
                );
            }
        }
        if let Err(e) = r {
            eprintln!("livemount: error: {e}");
            result = Err(e);
        }
        s.release_lease();
    }
    result
}

/// Where an export keeps its migration's configuration across restarts of the
/// server: beside its overlay (`NAME.overlay.migration`).
fn migration_file(config: &MountConfig) -> Option<PathBuf> {
    config
        .overlay
        .as_ref()
        .map(|o| o.with_extension("overlay.migration"))
}

fn saved_migration(config: &MountConfig) -> Option<crate::config::MigrationConfig> {
    let text = std::fs::read_to_string(migration_file(config)?).ok()?;
    serde_json::from_str(&text).ok()
}

/// `livemount migrate EXPORT`: start migrating one export, saving the request
/// beside its overlay so that a restarted server continues it.
fn migrate_export(stacks: &Stacks, r: super::control::Request) -> super::control::Reply {
    let super::control::Request::Migrate {
        target,
        rate,
        export,
    } = r;
    let fail = |message: String| super::control::Reply { ok: false, message };
    let Some(name) = export else {
        return fail("name the export to migrate".into());
    };
    let Some(stack) = stacks.get(&name) else {
        return fail(format!("this server has no export {name:?}"));
    };
    match stack.migrate(&target, rate) {
        Ok(m) => {
            if let Some(p) = migration_file(&stack.config) {
                let saved = serde_json::to_vec(&m)
                    .map_err(|e| livemount_store::Error::Invalid(e.to_string()))
                    .and_then(|text| {
                        livemount_store::fsutil::write_atomic_nosync_dir(
                            &p.with_extension("migration.tmp"),
                            &p,
                            &text,
                            0o600,
                        )
                    });
                if let Err(e) = saved {
                    eprintln!("livemount: warning: cannot save the migration of {name} to {} (a restarted server will not continue it): {e}", p.display());
                }
            }
            super::control::Reply {
                ok: true,
                message: format!(
                    "export {name}: migrating to {} (progress map {})",
                    m.target.display(),
                    m.map.display()
                ),
            }
        }
        Err(e) => fail(format!("export {name}: {e}")),
    }
}

/// Refresh `/run/livemount/serve-PID.json` every second (`livemount status`).
fn status_writer(
    stacks: Arc<Stacks>,
    exports: Arc<Exports>,
    socket: Option<PathBuf>,
    tcp: Vec<SocketAddr>,
    stop: Arc<std::sync::Mutex<bool>>,
) {
    let started = std::time::Instant::now();
    let snapshot = move || super::status::ServeStatus {
        pid: std::process::id(),
        socket: socket.clone(),
        tcp: tcp.iter().map(|a| a.to_string()).collect(),
        uptime_s: started.elapsed().as_secs_f64(),
        exports: exports
            .iter()
            .zip(stacks.values())
            .map(|((name, e), s)| super::status::ExportStatus {
                name: name.clone(),
                snapshot: e.description.clone(),
                size: e.device.size(),
                read_only: e.device.read_only(),
                overlay: s.overlay.as_ref().map(|o| o.path().to_path_buf()),
                overlay_bytes: s.overlay_bytes(),
                overlay_state: s.overlay_state(),
                cache: s.cache.report(),
                io: e.metrics.report(),
                store_requests: s.backend.requests(),
                memory: Some(super::status::MemoryReport::of(s)),
                migration: s.migrating.report(),
            })
            .collect(),
    };
    // The first one before returning: the server is listed as soon as it is ready.
    let _ = super::status::write_serve_status(&snapshot());
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let st = snapshot();
        match stop.lock() {
            Ok(stopped) if !*stopped => {
                let _ = super::status::write_serve_status(&st);
            }
            _ => return,
        }
    });
}

/// Request buffers of all connections together (see [`nbd::Budget`]).
const REQUEST_BUDGET: u64 = 256 << 20;
/// Connections served at once; more are closed at once (each holds a thread).
const MAX_CONNECTIONS: usize = 256;

/// What every connection shares.
#[derive(Clone)]
struct Shared {
    exports: Arc<Exports>,
    pool: Arc<Pool>,
    budget: Arc<nbd::Budget>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
}

/// Accept connections until the process ends: each on its own thread, at most
/// [`MAX_CONNECTIONS`]; an accept error (EMFILE, …) pauses instead of spinning.
fn accept_loop<C: nbd::Conn>(
    mut accept: impl FnMut() -> std::io::Result<C>,
    tls: nbd::ListenerTls,
    sh: Shared,
) {
    use std::sync::atomic::Ordering::SeqCst;
    loop {
        let c = match accept() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("livemount: nbd accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(200));
                continue;
            }
        };
        if sh.connections.fetch_add(1, SeqCst) >= MAX_CONNECTIONS {
            sh.connections.fetch_sub(1, SeqCst);
            eprintln!("livemount: nbd: {MAX_CONNECTIONS} connections already; refusing one");
            continue;
        }
        let (sh, tls) = (sh.clone(), tls.clone());
        std::thread::spawn(move || {
            log_end(nbd::serve_connection(
                Box::new(c),
                &sh.exports,
                &tls,
                &sh.pool,
                &sh.budget,
            ));
            sh.connections.fetch_sub(1, SeqCst);
        });
    }
}

/// Log how a connection ended, unless the client simply went away.
fn log_end(r: std::io::Result<()>) {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset, UnexpectedEof};
    match r {
        Err(e) if !matches!(e.kind(), BrokenPipe | ConnectionReset | UnexpectedEof) => {
            eprintln!("livemount: nbd connection closed: {e}")
        }
        _ => {}
    }
}
