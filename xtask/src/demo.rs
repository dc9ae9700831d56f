//! `cargo xtask demo`: the story end to end on a real disk image.
//!
//! 1. Build a 1 GiB ext4 image from a real directory tree (a copy of /usr/share),
//!    cached in `.cache/demo/` between runs.
//! 2. Back it up, change files in it (debugfs, no mount needed), back it up again
//!    (incremental), verify the store, restore both snapshots and compare them with
//!    the images byte for byte.
//! 3. Live-mount the latest snapshot as /dev/ublkbN inside the test VM (the host
//!    kernel has no ublk), compare the device with the image, fsck it, mount it and
//!    checksum files, write to it, and commit the overlay as a new snapshot.
//! 4. Boot a real Debian from a live mount: profile its boot on the host (eBPF),
//!    back it up, boot it in the VM from a local disk, a cold live mount and a
//!    pre-staged one, and print the timings (`cargo xtask bench-boot`, one round).

use crate::util::{cache_dir, root, run as sh};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

fn livemount() -> PathBuf {
    root().join("target/release/livemount")
}

fn lm(args: &[&str]) -> Result<String> {
    crate::util::run_livemount(&livemount(), args)
}

fn json(args: &[&str]) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&lm(args)?)?)
}

fn same_files(a: &Path, b: &Path) -> Result<bool> {
    let status = Command::new("cmp").arg("-s").arg(a).arg(b).status()?;
    Ok(status.success())
}

/// The base image: ext4 made from /usr/share, built once.
pub fn base_image(dir: &Path) -> Result<PathBuf> {
    let img = dir.join("base.img");
    if img.exists() {
        return Ok(img);
    }
    // Callers other than the demo (bench-vm) may be first on a fresh machine.
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("base.img.tmp");
    let _ = std::fs::remove_file(&tmp);
    eprintln!(
        "demo: building a 1 GiB ext4 image from /usr/share (once; cached in {})",
        dir.display()
    );
    sh(Command::new("truncate").arg("-s").arg("1G").arg(&tmp))?;
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "demo", "-d", "/usr/share"])
        .arg(&tmp))?;
    std::fs::rename(&tmp, &img)?;
    Ok(img)
}

fn row(name: &str, value: String) {
    println!("  {name:<44} {value}");
}

/// Run the demo.
pub fn run() -> Result<()> {
    crate::util::build_release_tools()?;
    let dir = cache_dir().join("demo");
    std::fs::create_dir_all(&dir)?;
    let base = base_image(&dir)?;
    let work = root().join("target/demo");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let img = work.join("disk.img");
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(&base)
        .arg(&img))?;
    let store = work.join("store");
    let s = store.to_str().context("non-UTF-8 path")?;
    let i = img.to_str().context("non-UTF-8 path")?;

    println!("\nlivemount demo: a 1 GiB ext4 disk (a copy of /usr/share), backed up twice\n");
    let b1 = json(&["backup", i, "--store", s, "--name", "demo-disk", "--json"])?;
    let snap1 = b1["snapshot"].as_str().unwrap_or_default().to_string();
    let copy1 = work.join("disk-1.img");
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(&img)
        .arg(&copy1))?;

    // Change the disk as a running VM would: new files, a removed file.
    let new_file = root().join("Cargo.lock");
    for cmd in [
        format!("write {} /livemount-demo-new-file", new_file.display()),
        "mkdir /livemount-demo-dir".to_string(),
        format!(
            "write {} /livemount-demo-dir/readme",
            root().join("README.md").display()
        ),
        "rm /doc/zstd/copyright".to_string(),
    ] {
        let out = Command::new("debugfs")
            .args(["-w", "-R", &cmd])
            .arg(&img)
            .output()?;
        if !out.status.success() {
            bail!("debugfs {cmd} failed");
        }
    }
    // Wait a second so the second snapshot gets its own timestamp name.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b2 = json(&["backup", i, "--store", s, "--name", "demo-disk", "--json"])?;
    let snap2 = b2["snapshot"].as_str().unwrap_or_default().to_string();
    let verify = lm(&["verify", "--store", s])?;

    let mut restored_ok = true;
    let mut restore_rate = 0.0;
    for (snap, expect) in [(&snap1, &copy1), (&snap2, &img)] {
        let out = work.join("restored.img");
        let _ = std::fs::remove_file(&out);
        let r = json(&[
            "restore",
            "--store",
            s,
            snap,
            out.to_str().unwrap_or_default(),
            "--json",
        ])?;
        restore_rate = r["throughput_mib_s"].as_f64().unwrap_or(0.0);
        restored_ok &= same_files(&out, expect)?;
        std::fs::remove_file(&out)?;
    }
    let store_bytes = dir_size(&store);
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let mib = |v: f64| format!("{:.1} MiB", v / 1048576.0);
    println!("backup 1 (full):         {snap1}");
    row(
        "read",
        format!(
            "{} at {:.0} MiB/s",
            mib(f(&b1, "bytes_read")),
            f(&b1, "throughput_mib_s")
        ),
    );
    row(
        "new / reused / zero",
        format!(
            "{} / {} / {}",
            mib(f(&b1, "bytes_new")),
            mib(f(&b1, "bytes_reused")),
            mib(f(&b1, "bytes_zero"))
        ),
    );
    row(
        "stored (compressed)",
        format!(
            "{} (compression {:.2}x)",
            mib(f(&b1, "bytes_stored")),
            f(&b1, "compression_ratio")
        ),
    );
    println!("backup 2 (incremental):  {snap2}");
    row(
        "read",
        format!(
            "{} at {:.0} MiB/s",
            mib(f(&b2, "bytes_read")),
            f(&b2, "throughput_mib_s")
        ),
    );
    row(
        "new / reused / zero",
        format!(
            "{} / {} / {}",
            mib(f(&b2, "bytes_new")),
            mib(f(&b2, "bytes_reused")),
            mib(f(&b2, "bytes_zero"))
        ),
    );
    row(
        "stored (compressed)",
        format!(
            "{} ({} new chunks)",
            mib(f(&b2, "bytes_stored")),
            b2["chunks_new"]
        ),
    );
    println!("store");
    row("size on disk for both snapshots", mib(store_bytes as f64));
    row(
        "verify",
        verify.lines().last().unwrap_or_default().to_string(),
    );
    row(
        "restore both, compare with the images",
        if restored_ok {
            "identical".into()
        } else {
            "DIFFERENT".to_string()
        },
    );
    row("restore throughput", format!("{restore_rate:.0} MiB/s"));
    if !restored_ok {
        bail!("a restored image differs from its source");
    }

    live_mount(&work, s, &snap2, &img)?;

    // The rest of the story with a real OS: a Debian minbase disk, profiled on the
    // host with the eBPF profiler, backed up, and booted from a live mount in the VM
    // from a modelled remote store (20 ms, 100 MB/s): local disk, cold, pre-staged.
    if std::env::var("LIVEMOUNT_SKIP_VM").is_ok_and(|v| v == "1") {
        return Ok(());
    }
    println!("\nbooting Debian from a live mount (image built on first use; see docs/boot.md):");
    crate::boot::bench(&crate::boot::Options {
        rounds: 1,
        only: ["L", "C20", "P20"].iter().map(|s| s.to_string()).collect(),
        keep: false,
        reuse: true,
    })
}

/// Live-mount `snap` inside the test VM and show it is the disk.
fn live_mount(work: &Path, store: &str, snap: &str, img: &Path) -> Result<()> {
    if std::env::var("LIVEMOUNT_SKIP_VM").is_ok_and(|v| v == "1") {
        println!("\nlive mount: SKIP (LIVEMOUNT_SKIP_VM=1)");
        return Ok(());
    }
    println!("\nlive mount of {snap} inside the test VM (ublk needs the backports kernel; TCG emulation, so slow):");
    let lmbin = livemount();
    let script = format!(
        r#"set -e
L={lm}
cd {work}
t0=$(date +%s.%N)
$L mount --store {store} {snap} --overlay /tmp/overlay.img --cache-mem 128M --daemon --log /tmp/mount.log >/tmp/mount.out
t1=$(date +%s.%N)
dev=$(awk '/^device/{{print $2}}' /tmp/mount.out)
echo "RESULT mount to device ready: $(awk -v a=$t0 -v b=$t1 'BEGIN{{printf "%.2f s", b-a}}')"
echo "RESULT device $dev"
grep '^attach' /tmp/mount.out | sed 's/^/RESULT /'
if cmp $dev {img}; then echo "RESULT cmp identical"; else echo "RESULT cmp DIFFERENT"; fi
e2fsck -fn $dev >/dev/null 2>&1 && echo "RESULT fsck clean" || echo "RESULT fsck ERRORS"
mkdir -p /tmp/mnt && mount $dev /tmp/mnt
a=$(sha256sum /tmp/mnt/livemount-demo-new-file | cut -d' ' -f1); b=$(sha256sum {lock} | cut -d' ' -f1)
[ "$a" = "$b" ] && echo "RESULT file checksum matches" || echo "RESULT file checksum DIFFERS"
echo "written during the live mount" > /tmp/mnt/live-note.txt
umount /tmp/mnt
$L status | sed 's/^/RESULT status /'
$L unmount $dev >/dev/null
$L commit --store {store} /tmp/overlay.img --name demo-disk-live | sed 's/^/RESULT /'
$L verify --store {store} | tail -1 | sed 's/^/RESULT verify /'
"#,
        lm = lmbin.display(),
        work = work.display(),
        img = img.display(),
        lock = root().join("Cargo.lock").display(),
    );
    let opts = crate::vm::VmOptions {
        stream: false,
        ..crate::vm::VmOptions::default()
    };
    let start = Instant::now();
    let r = crate::vm::run_in_vm(&script, &opts)?;
    for line in r
        .log
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("RESULT "))
    {
        println!("  {line}");
    }
    println!(
        "  (VM boot + script: {:.0} s)",
        start.elapsed().as_secs_f64()
    );
    if !r.success() {
        bail!(
            "the live-mount part of the demo failed (exit {}); console log:\n{}",
            r.exit_code,
            r.log
        );
    }
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += std::os::unix::fs::MetadataExt::blocks(&m) * 512,
                Err(_) => {}
            }
        }
    }
    total
}
