//! `livemount mount` and `unmount`: a snapshot served as a live block device.
//!
//! A [`Daemon`] builds the block stack ([`crate::stack`]), hands its top to the ublk
//! frontend and, while it serves, runs three helpers: a watchdog bounding device
//! creation, a signal handler that stops the device, and a status writer
//! ([`status`]) that also saves a learned profile. Readiness reaches a parent
//! through [`ready`]. The daemon runs in its own mount namespace ([`namespace`]).

pub mod control;
pub mod namespace;
pub mod ready;
pub mod serve;
pub mod status;

use crate::config::MountConfig;
use crate::error::{Error, Result};
use crate::frontend::ublk::{self, DeviceOptions};
use crate::metrics::IoMetrics;
use crate::stack::Stack;
use status::{parse_dev, status_path, write_status, MountStatus};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of the mount command beyond the configuration.
pub struct RunOptions {
    /// Recover this device id instead of creating one.
    pub recover: Option<u32>,
    /// Bounded wait for the kernel to create the device.
    pub create_timeout: Duration,
    /// Worker threads.
    pub workers: usize,
    /// Largest request.
    pub max_io_bytes: u32,
}

/// Run a mount in the foreground until SIGTERM/SIGINT or `unmount`. Prints the device
/// path (and how to attach it) on stdout once it is usable.
pub fn run(config: MountConfig, opts: RunOptions) -> Result<()> {
    // A new temporary overlay is ours alone until the device exists: a mount that
    // fails removes it (a recovered daemon's overlay holds the VM's writes: never).
    let fresh_overlay = match (&config.overlay, opts.recover) {
        (Some(p), None) if config.temporary_overlay => Some(p.clone()),
        _ => None,
    };
    let result = Daemon::start(config, &opts).and_then(|d| d.serve(&opts, fresh_overlay.clone()));
    if let (Err(_), Some(p)) = (&result, &fresh_overlay) {
        let _ = std::fs::remove_file(p);
    }
    result
}

/// What a user needs to attach `dev` to a hypervisor.
pub fn attach_help(dev: &str) -> String {
    format!(
        "device {dev} ready\n\
         attach with qemu:    -drive file={dev},format=raw,if=virtio,cache=none,aio=native\n\
         attach with libvirt: <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none' io='native'/><source dev='{dev}'/><target dev='vdb' bus='virtio'/></disk>"
    )
}

/// A mount being served.
struct Daemon {
    stack: Stack,
    metrics: Arc<IoMetrics>,
    started: Instant,
    stopping: AtomicBool,
    is_ready: AtomicBool,
    /// Held while the status file is written or removed: once shutdown removed it,
    /// the writer (which checks `stopping` under it) never writes it again.
    status_lock: std::sync::Mutex<()>,
}

impl Daemon {
    /// Build the stack, continue a learned profile, stage before ready.
    fn start(config: MountConfig, opts: &RunOptions) -> Result<Arc<Daemon>> {
        namespace::private_mount_namespace();
        let stack = Stack::open(&config)?;
        if opts.recover.is_some() {
            resume_learned_profile(&stack);
        }
        // A recovered mount's migration was continued by Stack::open — before the
        // device serves a single request, so that no VM write misses TARGET.
        if let Some(p) = &stack.prestager {
            let window: crate::block::prestage::PrestageWindow =
                stack.config.prestage.parse().map_err(Error::Invalid)?;
            p.stage_before_ready(window);
        }
        Ok(Arc::new(Daemon {
            stack,
            metrics: Arc::new(IoMetrics::default()),
            started: Instant::now(),
            stopping: AtomicBool::new(false),
            is_ready: AtomicBool::new(false),
            status_lock: std::sync::Mutex::new(()),
        }))
    }

    /// Create (or recover) the device and serve it until it is stopped.
    fn serve(self: Arc<Self>, opts: &RunOptions, fresh_overlay: Option<PathBuf>) -> Result<()> {
        let config = &self.stack.config;
        let dev_opts = DeviceOptions {
            queues: config.queues,
            depth: config.depth,
            max_io_bytes: opts.max_io_bytes,
            recover: opts.recover,
        };
        ublk::check_driver()?;
        self.clone().watchdog(opts.create_timeout, fresh_overlay);
        #[cfg(feature = "test-hooks")]
        test_hooks::delay_device_creation();
        let ctrl = Arc::new(ublk::control(&dev_opts)?);
        let dev_id = ctrl.dev_info().dev_id;
        let device = ctrl.get_bdev_path();
        self.clone().handle_signals(ctrl.clone())?;
        self.clone().status_writer(dev_id, device.clone());
        let me = self.clone();
        control::listen(&control::path(dev_id), move |r| me.control(r))?;
        let me = self.clone();
        let ready = move |c: &libublk::ctrl::UblkCtrl| me.on_ready(dev_id, &c.get_bdev_path());
        let result = ublk::serve(
            &ctrl,
            self.stack.top.clone(),
            self.metrics.clone(),
            opts.workers,
            ready,
        );
        self.stopping.store(true, Ordering::SeqCst);
        let flushed = self.shutdown(&ctrl, dev_id, &device);
        result?;
        flushed
    }

    /// Answer a control request (`livemount migrate`).
    fn control(&self, r: control::Request) -> control::Reply {
        match r {
            control::Request::Migrate {
                export: Some(e), ..
            } => control::Reply {
                ok: false,
                message: format!("this is a ublk mount, not a server of export {e:?}"),
            },
            control::Request::Migrate { target, rate, .. } => {
                match self.stack.migrate(&target, rate) {
                    Ok(c) => control::Reply {
                        ok: true,
                        message: format!(
                            "migrating to {} (progress map {})",
                            c.target.display(),
                            c.map.display()
                        ),
                    },
                    Err(e) => control::Reply {
                        ok: false,
                        message: e.to_string(),
                    },
                }
            }
        }
    }

    /// The status file's content now.
    fn status(&self, dev_id: u32, device: &str, state: &str) -> MountStatus {
        // The migration goes into the saved configuration: `--recover` continues it.
        let mut config = self.stack.config.clone();
        config.migration = self.stack.migrating.config();
        MountStatus {
            device: device.to_string(),
            dev_id,
            pid: std::process::id(),
            state: state.into(),
            config,
            size: self.stack.top.size(),
            overlay_bytes: self.stack.overlay_bytes(),
            overlay_state: self.stack.overlay_state(),
            cache: Some(self.stack.cache.report()),
            io: Some(self.metrics.report()),
            uptime_s: self.started.elapsed().as_secs_f64(),
            prestage: self.stack.prestager.as_ref().map(|p| p.progress.report()),
            memory: Some(status::MemoryReport::of(&self.stack)),
            store_requests: self.stack.backend.requests(),
            migration: self.stack.migrating.report(),
        }
    }

    /// Device creation can hang in a buggy kernel (ubiblk#480): bound the wait and
    /// exit with a clear error. (libublk's control ring is per thread, so the device
    /// itself stays on the serving thread.)
    fn watchdog(self: Arc<Self>, timeout: Duration, fresh_overlay: Option<PathBuf>) {
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            if !self.is_ready.load(Ordering::SeqCst) {
                // The exit skips `run`'s clean-up of a new temporary overlay.
                if let Some(p) = fresh_overlay {
                    let _ = std::fs::remove_file(p);
                }
                eprintln!(
                    "livemount: error: the kernel did not answer ublk device creation within {} s; check dmesg",
                    timeout.as_secs()
                );
                std::process::exit(1);
            }
        });
    }

    /// SIGTERM / SIGINT: stop the device; `ublk::serve` then returns.
    fn handle_signals(self: Arc<Self>, ctrl: Arc<libublk::ctrl::UblkCtrl>) -> Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT])
            .map_err(|e| Error::io("signal handler", e))?;
        std::thread::spawn(move || {
            if signals.forever().next().is_some() {
                self.stopping.store(true, Ordering::SeqCst);
                // libublk's control ring is per thread: give this one its own.
                let _ = libublk::ctrl::ublk_init_ctrl_task_ring(|r| {
                    if r.is_none() {
                        *r = Some(
                            io_uring::IoUring::builder()
                                .build(16)
                                .map_err(libublk::UblkError::IOError)?,
                        );
                    }
                    Ok(())
                });
                let _ = ctrl.kill_dev();
            }
        });
        Ok(())
    }

    /// The device is live: start the clock of a learned profile, pre-stage the rest
    /// in the background, write the status file, tell the user and the parent.
    fn on_ready(&self, dev_id: u32, dev: &str) {
        self.is_ready.store(true, Ordering::SeqCst);
        if let Some(r) = &self.stack.recorder {
            r.restart_recording();
        }
        // Keep fetching ahead of the VM in profile order, yielding to demand reads.
        if let Some(p) = self.stack.prestager.clone() {
            std::thread::spawn(move || p.continue_in_background());
        }

        let _ = write_status(&self.status(dev_id, dev, "running"));
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", attach_help(dev));
        let _ = out.flush();
        ready::notify(&ready::Readiness::Ready {
            device: dev.to_string(),
            pid: std::process::id(),
        });
    }

    /// Refresh the status file every second while serving; write the learned profile
    /// every `record_profile_every_s` seconds when it changed (a killed daemon then
    /// loses at most that much of it).
    fn status_writer(self: Arc<Self>, dev_id: u32, device: String) {
        std::thread::spawn(move || {
            let (mut tick, mut saved_reads, mut warned) = (0u64, 0u64, false);
            let every = self.stack.config.record_profile_every_s;
            while !self.stopping.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(1));
                if self.stopping.load(Ordering::SeqCst) {
                    break;
                }
                {
                    let _g = self.status_lock.lock();
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let _ = write_status(&self.status(dev_id, &device, "running"));
                }
                tick += 1;
                let (Some(path), Some(rec)) =
                    (&self.stack.config.record_profile, &self.stack.recorder)
                else {
                    continue;
                };
                let reads = rec.recorded_reads();
                if every > 0 && tick % every == 0 && reads != saved_reads {
                    match rec.save_learned_profile(&device, path) {
                        Ok(()) => saved_reads = reads,
                        Err(e) if !warned => {
                            eprintln!("livemount: warning: cannot write the learned profile: {e}");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                }
            }
        });
    }

    /// Clean stop: make every write durable, save the learned profile, remove the
    /// device and our files. Returns the flush's result.
    fn shutdown(&self, ctrl: &libublk::ctrl::UblkCtrl, dev_id: u32, device: &str) -> Result<()> {
        // The copier stops first (its map is made durable); then the final flush.
        self.stack.migrating.stop();
        let _ = std::fs::remove_file(control::path(dev_id));
        // The overlay's close also removes its map mirror: nothing is left in /run.
        let flushed = self
            .stack
            .top
            .flush()
            .and_then(|()| match &self.stack.overlay {
                Some(o) => o.close(),
                None => Ok(()),
            });
        if let (Some(path), Some(rec)) = (&self.stack.config.record_profile, &self.stack.recorder) {
            match rec.save_learned_profile(device, path) {
                Ok(()) => eprintln!("livemount: wrote the learned profile to {}", path.display()),
                Err(e) => eprintln!("livemount: cannot write the learned profile: {e}"),
            }
        }
        let _ = ctrl.del_dev();
        {
            let _g = self.status_lock.lock();
            let _ = std::fs::remove_file(status_path(dev_id));
        }
        self.stack.release_lease();
        if self.stack.migrating.migrated() {
            if let Some(m) = self.stack.migrating.config() {
                let _ = std::fs::remove_file(&m.map);
                eprintln!(
                    "livemount: {} holds the disk (every write since the migration completed is there, not in the overlay); start the VM on it as a raw disk",
                    m.target.display()
                );
            }
        }
        if self.stack.config.temporary_overlay {
            if let Some(p) = &self.stack.config.overlay {
                let _ = std::fs::remove_file(p);
            }
        }
        flushed
    }
}

/// A recovered daemon continues the learned profile its predecessor wrote.
fn resume_learned_profile(stack: &Stack) {
    let (Some(path), Some(rec)) = (&stack.config.record_profile, &stack.recorder) else {
        return;
    };
    if !path.exists() {
        return;
    }
    match livemount_store::format::profile::Profile::load(path) {
        Ok(prev) if rec.resume_recording(&prev) => eprintln!(
            "livemount: continuing the learned profile {} ({} extents)",
            path.display(),
            prev.extents.len()
        ),
        Ok(_) => eprintln!(
            "livemount: warning: {} is a profile of another disk; recording a new one",
            path.display()
        ),
        Err(e) => eprintln!(
            "livemount: warning: cannot continue the learned profile: {e}; recording a new one"
        ),
    }
}

/// Fault injection for tests, compiled only with the `test-hooks` feature.
#[cfg(feature = "test-hooks")]
mod test_hooks {
    /// `LIVEMOUNT_FAULT_CREATE_DELAY_MS`: a kernel that does not answer device
    /// creation for that long (the test of the watchdog).
    pub fn delay_device_creation() {
        if let Some(ms) = std::env::var("LIVEMOUNT_FAULT_CREATE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
}

/// Create a new, empty temporary overlay file (mode 0600) in `dir` and return its
/// path. Never an existing file (O_EXCL): an overlay left behind by a mount that
/// crashed must not lend its writes to a new mount that happens to get its name.
pub fn create_temporary_overlay(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let tag = seed.wrapping_add(attempt.wrapping_mul(0x9e37_79b9));
        let path = dir.join(format!(
            "livemount-overlay-{}-{tag:08x}.img",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => return Ok(path),
            // Taken: try another name (the last failure is the error).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {}
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
}

/// Stop the daemon serving `dev` and wait for it to exit; if it is gone, remove
/// the device ourselves.
pub fn unmount(dev: &str, timeout: Duration) -> Result<()> {
    unmount_in(Path::new(crate::paths::RUN_DIR), dev, timeout)
}

fn unmount_in(run_dir: &Path, dev: &str, timeout: Duration) -> Result<()> {
    let id = parse_dev(dev)?;
    let st = status::read_status_in(run_dir, dev).ok();
    // Signal only the process that serves this device: a status file can be stale
    // (a reused pid is an unrelated process) or damaged (pid 0 would be kill(0)).
    if let Some(daemon) = st.as_ref().and_then(|s| DaemonProcess::find(s.pid, id)) {
        return daemon.stop(id, timeout);
    }
    // The daemon is gone (crashed, killed): remove the device ourselves.
    let ctrl = libublk::ctrl::UblkCtrl::new_simple(id as i32)
        .map_err(|e| Error::Invalid(format!("/dev/ublkb{id}: {e}")))?;
    ctrl.del_dev()
        .map_err(|e| Error::Invalid(format!("cannot delete /dev/ublkb{id}: {e}")))?;
    // The dead daemon's lease kept its snapshot from forget + gc; with the device
    // gone, nothing needs it. A store that cannot be reached keeps the lease until
    // it expires (safe), which is worth a line.
    if let Some(cfg) = st.as_ref().map(|s| &s.config) {
        if let Some(key) = &cfg.lease {
            let removed =
                livemount_store::Store::open_at(&cfg.store, livemount_store::Access::ReadOnly)
                    .and_then(|store| {
                        livemount_store::lease::Lease::remove(&**store.backend(), key)
                    });
            if let Err(e) = removed {
                eprintln!("livemount: warning: lease {key} stays until it expires: {e}");
            }
        }
    }
    let _ = std::fs::remove_file(run_dir.join(format!("ublkb{id}.json")));
    Ok(())
}

/// The live daemon of a device, held by a pidfd so that its pid cannot be reused
/// between the check and the signal.
struct DaemonProcess {
    pidfd: std::os::fd::OwnedFd,
    pid: u32,
}

impl DaemonProcess {
    /// `pid` if it is alive and serves `/dev/ublkbN` (holds `/dev/ublkcN` open).
    fn find(pid: u32, dev_id: u32) -> Option<DaemonProcess> {
        use std::os::fd::FromRawFd;
        if pid <= 1 || pid > i32::MAX as u32 || !serves(pid, dev_id) {
            return None;
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        // Checked again now that the pidfd pins the process: the one we checked
        // before might have exited and its pid been reused in between.
        serves(pid, dev_id).then_some(DaemonProcess { pidfd, pid })
    }

    /// SIGTERM, then wait (bounded) for the process to exit.
    fn stop(&self, dev_id: u32, timeout: Duration) -> Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_send_signal on our pidfd with no siginfo.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGTERM,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                format!("daemon {} of /dev/ublkb{dev_id}", self.pid),
                std::io::Error::last_os_error(),
            ));
        }
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own; a pidfd becomes readable when it exits.
        let n = unsafe {
            libc::poll(
                &mut pfd,
                1,
                timeout.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n <= 0 {
            return Err(Error::Busy(format!(
                "daemon {} of /dev/ublkb{dev_id} did not stop within {} s (is the device still in use?)",
                self.pid,
                timeout.as_secs()
            )));
        }
        Ok(())
    }
}

/// True if process `pid` holds `/dev/ublkcN`, the char device of `/dev/ublkbN`.
fn serves(pid: u32, dev_id: u32) -> bool {
    let want = PathBuf::from(format!("/dev/ublkc{dev_id}"));
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == want))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn temporary_overlays_are_new_private_files() {
        let d = tempfile::tempdir().unwrap();
        let a = create_temporary_overlay(d.path()).unwrap();
        std::fs::write(&a, b"stale writes of a crashed mount").unwrap();
        let b = create_temporary_overlay(d.path()).unwrap();
        assert_ne!(a, b, "an existing overlay file was handed out again");
        let m = std::fs::metadata(&b).unwrap();
        assert_eq!(m.len(), 0);
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let e = create_temporary_overlay(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn unmount_never_signals_a_process_that_does_not_serve_the_device() {
        let run = tempfile::tempdir().unwrap();
        let mut bystander = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Stale status files: an unrelated live pid, pid 0 (kill(0) would signal our
        // own process group), u32::MAX (kill(-1): every process we may signal).
        for (id, pid) in [(77u32, bystander.id()), (78, 0), (79, u32::MAX)] {
            let st = status::MountStatus::for_test(id, pid, Path::new("/s"), "vm@t");
            std::fs::write(
                run.path().join(format!("ublkb{id}.json")),
                serde_json::to_vec(&st).unwrap(),
            )
            .unwrap();
            // No such device here: the fallback fails, and nothing was signalled.
            let _ = unmount_in(
                run.path(),
                &format!("/dev/ublkb{id}"),
                Duration::from_secs(1),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "unmount killed a process that was not its daemon"
        );
        let _ = bystander.kill();
        let _ = bystander.wait();
    }
}
