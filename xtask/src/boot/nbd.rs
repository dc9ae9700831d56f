//! `cargo xtask boot-nbd`: a real OS over the NBD frontend, natively on the host.
//!
//! The Debian image is backed up into a fresh store and exported by `livemount serve`
//! on a Unix socket with an overlay; qemu (TCG, on the host) boots it with its root
//! disk on the export (`-drive file=nbd+unix:///debian?socket=…`). The initramfs
//! leaves a stamp on the root (`lm.stamp`: a write through the disk, then `sync`),
//! systemd comes up to multi-user.target and the marker unit powers off. The server
//! is stopped and started again on the same overlay, and a second boot must find
//! the first boot's stamp. A third boot runs while `livemount migrate` copies the
//! export into a local raw file (held to ~20 s, longer than the boot); after it is
//! complete and the server stopped, a fourth boot straight from that file finds the
//! third boot's stamp. A boot of the raw image file, in the same run, is the
//! reference of the timings (results/boot-nbd.md).
//!
//! Part of `cargo xtask test`: it needs root (the image is built with debootstrap
//! and mkfs), not the VM.

use super::bench::{backup_into, boot_seconds, image_bash_md5, prepare, verbose, Prepared, SERIES};
use super::qemu::{require_marker, Console, Qemu};
use crate::report::{Report, Table};
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The stamps of the two boots (any words the image cannot already hold).
const STAMP_1: &str = "nbd-boot-one-5d21";
const STAMP_2: &str = "nbd-boot-two-a8e0";
const STAMP_3: &str = "nbd-boot-migrating-71c3";
/// Written by the boot from the migrated file into qemu's throwaway snapshot (the
/// initramfs prints the earlier stamp only when given a new one).
const STAMP_4: &str = "nbd-boot-migrated-0b9e";

/// A `livemount serve --daemon`, stopped (SIGTERM, then waited for) on drop.
pub(super) struct Server {
    pub(super) pid: u32,
}

impl Server {
    fn start(p: &Prepared, dir: &Path, sock: &Path, log: &Path) -> Result<Server> {
        let (store, overlays, cache) = (dir.join("store"), dir.join("overlays"), dir.join("cache"));
        let args: [&std::ffi::OsStr; 8] = [
            "--store".as_ref(),
            store.as_os_str(),
            "--overlay-dir".as_ref(),
            overlays.as_os_str(),
            "--cache-dir".as_ref(),
            cache.as_os_str(),
            "--socket".as_ref(),
            sock.as_os_str(),
        ];
        Self::start_with(p, &args, log)
    }

    /// `livemount serve --export debian ARGS --daemon --log LOG`, once it returns
    /// (the export is served).
    pub(super) fn start_with(
        p: &Prepared,
        args: &[&std::ffi::OsStr],
        log: &Path,
    ) -> Result<Server> {
        let out = Command::new(&p.livemount)
            .arg("serve")
            .args(["--export", SERIES])
            .args(args)
            .args(["--daemon", "--log"])
            .arg(log)
            .output()
            .context("running livemount serve --daemon")?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "livemount serve failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let pid = text
            .lines()
            .find_map(|l| l.strip_prefix("server pid "))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("livemount serve --daemon printed no pid: {text:?}"))?;
        Ok(Server { pid })
    }

    /// This server's entry of export [`SERIES`] in `livemount status --nbd --json`.
    pub(super) fn export_status(&self, p: &Prepared) -> Result<serde_json::Value> {
        let status = crate::util::run_livemount(&p.livemount, &["status", "--nbd", "--json"])?;
        serde_json::from_str::<serde_json::Value>(&status)
            .ok()
            .and_then(|v| {
                let s = v.as_array()?.iter().find(|s| s["pid"] == self.pid)?;
                s["exports"]
                    .as_array()?
                    .iter()
                    .find(|e| e["name"] == SERIES)
                    .cloned()
            })
            .with_context(|| {
                format!(
                    "no export {SERIES} of server {} in `livemount status --nbd --json`: {status}",
                    self.pid
                )
            })
    }

    /// SIGTERM and wait (up to 60 s) for the process to go.
    pub(super) fn stop(&mut self) -> Result<()> {
        if self.pid == 0 {
            return Ok(());
        }
        let pid = std::mem::take(&mut self.pid);
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let t0 = Instant::now();
        while running(pid) {
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
                bail!("livemount serve (pid {pid}) did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// True while `pid` runs (a zombie that nobody reaps yet has stopped).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// One boot of the image, full systemd to the multi-user marker.
pub(super) fn boot(p: &Prepared, label: &str, drive: String, stamp: Option<&str>) -> Qemu {
    let mut append = "lm.mode=disk lm.root=/dev/vda".to_string();
    if let Some(s) = stamp {
        let _ = write!(append, " lm.stamp={s}");
    }
    Qemu {
        label: label.into(),
        kernel: p.kernel.clone(),
        initrd: p.initrd.clone(),
        append,
        args: vec![
            "-drive".into(),
            format!("{drive},format=raw,if=none,id=root"),
            "-device".into(),
            "virtio-blk-pci,drive=root".into(),
        ],
        cpus: 2,
        memory_mb: 2048,
        timeout: Duration::from_secs(600),
        stream: verbose(),
    }
}

/// What one boot showed.
pub(super) struct Booted {
    pub(super) con: Console,
    /// switch_root → multi-user marker, guest seconds.
    pub(super) boot_s: f64,
    pub(super) failed_units: String,
}

pub(super) fn run_boot(q: &Qemu, want_bash: &str) -> Result<Booted> {
    let con = q.run(|_, _| {})?;
    let what = format!("the {} boot", q.label);
    let m = require_marker(&con, "multi-user", &what)?;
    if m.fields.get("root").map(String::as_str) != Some("/dev/vda") {
        bail!("{what}: the root is not /dev/vda: {:?}", m.fields);
    }
    let got = m.fields.get("bash_md5").cloned().unwrap_or_default();
    if got != want_bash {
        bail!("{what}: /bin/bash read with md5 {got:?}, the image has {want_bash:?}");
    }
    Ok(Booted {
        boot_s: boot_seconds(&con, &what)?,
        failed_units: m.fields.get("failed_units").cloned().unwrap_or_default(),
        con,
    })
}

/// The `found=` word of the boot's `@@LMBOOT-STAMP` line.
fn stamp_found(con: &Console) -> Option<String> {
    con.log.lines().find_map(|l| {
        let rest = l.split("@@LMBOOT-STAMP found=").nth(1)?;
        Some(rest.split_whitespace().next().unwrap_or("").to_owned())
    })
}

/// Boot 3, over NBD while `livemount migrate` copies the export into a local raw
/// file at about the disk's size per boot; then, once complete and the server
/// stopped, boot 4 straight from that file. Returns both boots and the fraction
/// copied when the third boot's guest had shut down.
fn boot_while_migrating(
    p: &Prepared,
    dir: &Path,
    sock: &Path,
    drive: String,
    want_bash: &str,
) -> Result<(Booted, Booted, f64)> {
    eprintln!("boot-nbd: boot 3 over NBD while the export is migrated to a local file");
    let target = dir.join("migrated.raw");
    let mut server = Server::start(p, dir, sock, &dir.join("serve-3.log"))?;
    let size = fs::metadata(&p.image.path)?.len();
    // Longer than a boot (~15 s wall), so the guest runs and shuts down mid-copy;
    // its own reads (~26 MiB) go first.
    let rate = (size / 20).max(1 << 20);
    let pid = server.pid.to_string();
    let to = target.display().to_string();
    let rate = rate.to_string();
    let lm = |args: &[&str]| crate::util::run_livemount(&p.livemount, args);
    lm(&[
        "migrate", SERIES, "--server", &pid, "--to", &to, "--rate", &rate,
    ])?;
    let booted = run_boot(&boot(p, "NBD, migrating", drive, Some(STAMP_3)), want_bash)?;
    let m = server.export_status(p)?["migration"].clone();
    let copied = m["copied_bytes"]
        .as_f64()
        .zip(m["total_bytes"].as_f64())
        .map(|(c, t)| c / t)
        .with_context(|| format!("no migration of {SERIES} in the server's status: {m}"))?;
    let waited = lm(&["migrate", SERIES, "--server", &pid, "--wait"])?;
    if !waited.contains("migrated to") {
        bail!("boot-nbd: `livemount migrate --wait` said: {waited}");
    }
    server.stop()?;
    eprintln!("boot-nbd: boot 4 straight from the migrated file (no livemount)");
    let migrated = run_boot(
        &boot(
            p,
            "migrated file",
            format!("file={},snapshot=on", target.display()),
            Some(STAMP_4),
        ),
        want_bash,
    )?;
    Ok((booted, migrated, copied))
}

/// `cargo xtask boot-nbd`.
pub fn run() -> Result<()> {
    let (p, _) = prepare(false, false)?;
    let dir = p.work.join("nbd");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir)?;
    let want_bash = image_bash_md5()?;

    let t0 = Instant::now();
    backup_into(&p, &dir.join("store"))?;
    eprintln!(
        "boot-nbd: backup of the image in {:.0} s",
        t0.elapsed().as_secs_f64()
    );

    eprintln!("boot-nbd: reference boot from the raw image file");
    let local = run_boot(
        &boot(
            &p,
            "raw file",
            format!("file={},snapshot=on", p.image.path.display()),
            None,
        ),
        &want_bash,
    )?;

    let sock = dir.join("nbd.sock");
    let drive = format!("file=nbd+unix:///{SERIES}?socket={}", sock.display());
    eprintln!("boot-nbd: boot 1 over NBD (fresh server, empty caches)");
    let mut server = Server::start(&p, &dir, &sock, &dir.join("serve-1.log"))?;
    let first = run_boot(
        &boot(&p, "first NBD", drive.clone(), Some(STAMP_1)),
        &want_bash,
    )?;
    server.stop()?;
    eprintln!("boot-nbd: boot 2 over NBD (a new server on the same overlay and disk cache)");
    let mut server = Server::start(&p, &dir, &sock, &dir.join("serve-2.log"))?;
    let second = run_boot(
        &boot(&p, "second NBD", drive.clone(), Some(STAMP_2)),
        &want_bash,
    )?;
    server.stop()?;

    let (migrating, migrated, copied_at_shutdown) =
        boot_while_migrating(&p, &dir, &sock, drive, &want_bash)?;
    if stamp_found(&first.con).as_deref() != Some("none") {
        bail!(
            "boot-nbd: the first boot found stamp {:?} on a fresh overlay",
            stamp_found(&first.con)
        );
    }
    if stamp_found(&second.con).as_deref() != Some(STAMP_1) {
        bail!(
            "boot-nbd: the second boot found stamp {:?}, not {STAMP_1} that the first boot wrote before the server restart",
            stamp_found(&second.con)
        );
    }
    if stamp_found(&migrating.con).as_deref() != Some(STAMP_2) {
        bail!(
            "boot-nbd: the boot during the migration found stamp {:?}, not {STAMP_2}",
            stamp_found(&migrating.con)
        );
    }
    if stamp_found(&migrated.con).as_deref() != Some(STAMP_3) {
        bail!(
            "boot-nbd: the boot from the migrated file found stamp {:?}, not {STAMP_3} that the boot during the migration wrote",
            stamp_found(&migrated.con)
        );
    }
    for b in [&first, &second, &migrating, &migrated] {
        if b.failed_units != local.failed_units {
            bail!(
                "boot-nbd: a boot over NBD had {} failed units, the boot from the raw file {}",
                b.failed_units,
                local.failed_units
            );
        }
    }

    let mut rep = Report::new("boot-nbd", "cargo xtask boot-nbd");
    let mut t = Table::new(
        format!(
            "qemu TCG on the host (2 vCPU, 2 GiB), the Debian image; boot = switch_root → multi-user marker (guest s), wall = qemu start → exit; commit {}:",
            crate::util::git_head()
        ),
        &["boot", "boot s", "wall s", "boot / raw file"],
    );
    for (name, b) in [
        ("raw image file (reference)", &local),
        ("NBD, cold (fresh server, empty caches)", &first),
        ("NBD, second (restarted server, disk cache warm)", &second),
        ("NBD, while migrating to a local file", &migrating),
        ("the migrated local file", &migrated),
    ] {
        t.row([
            name.to_string(),
            format!("{:.2}", b.boot_s),
            format!("{:.1}", b.con.elapsed.as_secs_f64()),
            format!("{:.2}", b.boot_s / local.boot_s),
        ]);
    }
    rep.tables.push(t);
    rep.note(format!(
        "The migration had copied {:.0} % of the disk when the guest of the third boot shut down.",
        copied_at_shutdown * 100.0
    ));
    let path = rep.save()?;
    println!(
        "boot-nbd passed: Debian booted three times from the NBD export and once from the file it was migrated to (failed units {}); each boot found the write of the one before, across a server restart and the migration ({})",
        local.failed_units,
        path.display()
    );
    Ok(())
}
