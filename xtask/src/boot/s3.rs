//! `cargo xtask boot-s3`: a real OS booted over NBD from a snapshot in an object
//! store at a real round-trip time, natively on the host (a benchmark, not in
//! `cargo xtask test`).
//!
//! `lm-s3-testbed` (tests/src/bin) runs a single-node Garage behind the delay proxy
//! (`LIVEMOUNT_BOOT_S3_RTT_MS`, default 20 ms; 1 Gbit/s each way). The Debian image
//! is backed up into the bucket through it. Then, against a boot of the raw image
//! file in the same run: a **cold** boot (a fresh `serve --daemon`, empty caches,
//! no profile yet); bench-boot's host-recorded profile is attached to the series; a
//! boot from a fresh server with empty caches that stages the attached profile
//! itself from the bucket; and a **pre-staged** one (`livemount prestage` fills a
//! fresh disk cache with the profile's chunks, then a fresh server on that cache).
//! **Ready** is how long `serve --daemon` takes to return with the export served
//! (the store opened, the index fetched, the lease taken). Table in
//! results/boot-s3.md.

use super::bench::{image_bash_md5, prepare, Prepared, SERIES};
use super::nbd::{boot, run_boot, Booted, Server};
use crate::report::{Report, Table};
use crate::util::root;
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The object store of the run; stopped when dropped (its stdin closes).
struct Testbed {
    child: std::process::Child,
    endpoint: String,
    credentials: PathBuf,
}

impl Testbed {
    fn start(rtt_ms: u64) -> Result<Testbed> {
        crate::util::cargo(&[
            "build",
            "--release",
            "-p",
            "livemount-tests",
            "--bin",
            "lm-s3-testbed",
        ])?;
        let mut child = Command::new(root().join("target/release/lm-s3-testbed"))
            .args(["lm-boot", &rtt_ms.to_string(), "125000000"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting lm-s3-testbed")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("lm-s3-testbed printed {line:?}"))?;
        Ok(Testbed {
            endpoint: v["endpoint"].as_str().unwrap_or_default().to_string(),
            credentials: PathBuf::from(v["credentials"].as_str().unwrap_or_default()),
            child,
        })
    }

    /// `--s3-endpoint URL --s3-credentials FILE`.
    fn args(&self) -> Vec<String> {
        vec![
            "--s3-endpoint".into(),
            self.endpoint.clone(),
            "--s3-region".into(),
            "garage".into(),
            "--s3-credentials".into(),
            self.credentials.display().to_string(),
        ]
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One boot over NBD from a fresh server on `store`, with `extra` serve arguments;
/// the boot and the seconds `serve --daemon` took to return.
fn served_boot(
    p: &Prepared,
    dir: &Path,
    store: &[String],
    extra: &[&OsStr],
    label: &str,
    want_bash: &str,
) -> Result<(Booted, f64, String)> {
    let sock = dir.join(format!("{label}.sock"));
    let ovl = dir.join(format!("{label}-overlays"));
    let _ = fs::remove_dir_all(&ovl);
    let mut args: Vec<&OsStr> = store.iter().map(OsStr::new).collect();
    args.extend([
        OsStr::new("--overlay-dir"),
        ovl.as_os_str(),
        OsStr::new("--socket"),
        sock.as_os_str(),
    ]);
    args.extend_from_slice(extra);
    let t0 = Instant::now();
    let mut server = Server::start_with(p, &args, &dir.join(format!("{label}.log")))?;
    let ready = t0.elapsed().as_secs_f64();
    let drive = format!("file=nbd+unix:///{SERIES}?socket={}", sock.display());
    let booted = run_boot(&boot(p, label, drive, None), want_bash)?;
    let gets = server.export_status(p)?["store_requests"]["gets"]
        .as_u64()
        .map_or("?".into(), |g| g.to_string());
    server.stop()?;
    Ok((booted, ready, gets))
}

/// `cargo xtask boot-s3`.
pub fn run() -> Result<()> {
    let rtt: u64 = std::env::var("LIVEMOUNT_BOOT_S3_RTT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (p, profiles) = prepare(true, true)?;
    let profile = profiles
        .last()
        .map(|i| i.path.clone())
        .context("no merged profile")?;
    let want_bash = image_bash_md5()?;
    let dir = p.work.join("s3");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let tb = Testbed::start(rtt)?;
    let url = format!("s3://lm-boot/{SERIES}");
    let mut store = vec!["--store".to_string(), url.clone()];
    store.extend(tb.args());
    let lm = |args: &[&str]| {
        let mut a: Vec<&str> = args.to_vec();
        a.extend(store.iter().map(String::as_str));
        crate::util::run_livemount(&p.livemount, &a)
    };
    let t0 = Instant::now();
    let image = p.image.path.display().to_string();
    lm(&["backup", &image, "--name", SERIES, "-q"])?;
    let backup_s = t0.elapsed().as_secs_f64();
    eprintln!("boot-s3: backup into the bucket at {rtt} ms RTT in {backup_s:.1} s");

    eprintln!("boot-s3: reference boot from the raw image file");
    let local = run_boot(
        &boot(&p, "raw file", format!("file={image},snapshot=on"), None),
        &want_bash,
    )?;
    eprintln!("boot-s3: cold boot over NBD from the bucket (empty caches, no profile)");
    let (cold, cold_ready, cold_gets) = served_boot(&p, &dir, &store, &[], "cold", &want_bash)?;
    // Only now: a server stages the series' attached profile on its own, and the
    // cold boot must have none.
    let prof = profile.display().to_string();
    lm(&["profile", "attach", SERIES, &prof])?;
    eprintln!("boot-s3: boot over NBD from a fresh server that stages the attached profile itself");
    let (served, served_ready, served_gets) =
        served_boot(&p, &dir, &store, &[], "profile", &want_bash)?;
    eprintln!("boot-s3: pre-staging a fresh disk cache from the bucket with the profile");
    let cache = dir.join("cache");
    let cache_s = cache.display().to_string();
    let t0 = Instant::now();
    lm(&["prestage", SERIES, "--cache-dir", &cache_s])?;
    let prestage_s = t0.elapsed().as_secs_f64();
    eprintln!("boot-s3: pre-staged boot over NBD (a fresh server on that cache)");
    let (staged, staged_ready, staged_gets) = served_boot(
        &p,
        &dir,
        &store,
        &[OsStr::new("--cache-dir"), cache.as_os_str()],
        "prestaged",
        &want_bash,
    )?;
    for b in [&cold, &served, &staged] {
        if b.failed_units != local.failed_units {
            bail!(
                "boot-s3: a boot over S3 had {} failed units, the raw file {}",
                b.failed_units,
                local.failed_units
            );
        }
    }
    let mut rep = Report::new("boot-s3", "cargo xtask boot-s3");
    let mut t = Table::new(
        format!(
            "Garage behind the delay proxy at {rtt} ms RTT, 1 Gbit/s; qemu TCG on the host (2 vCPU), \
             the Debian image over NBD from `livemount serve`; boot = switch_root → multi-user marker \
             (guest s); ready = `serve --daemon` start → return; commit {}:",
            crate::util::git_head()
        ),
        &["boot", "boot s", "boot / raw file", "ready s", "store GETs"],
    );
    t.row([
        "raw image file (reference)".to_string(),
        format!("{:.2}", local.boot_s),
        "1.00".into(),
    ]);
    for (name, b, ready, gets) in [
        (
            "cold (no profile, empty caches)",
            &cold,
            cold_ready,
            &cold_gets,
        ),
        (
            "profile attached, staged by the server (empty caches)",
            &served,
            served_ready,
            &served_gets,
        ),
        (
            "pre-staged (profile in the disk cache)",
            &staged,
            staged_ready,
            &staged_gets,
        ),
    ] {
        t.row([
            name.to_string(),
            format!("{:.2}", b.boot_s),
            format!("{:.2}", b.boot_s / local.boot_s),
            format!("{ready:.2}"),
            gets.to_string(),
        ]);
    }
    rep.tables.push(t);
    rep.note(format!("Backup of the image into the bucket: {backup_s:.1} s; `livemount prestage` of the profile: {prestage_s:.1} s."));
    rep.save()?;
    drop(tb);
    Ok(())
}
