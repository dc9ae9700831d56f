//! `cargo xtask bench-boot`: profile, back up, live-mount and boot the Debian image,
//! timing the boot to its multi-user marker from a local disk (L), a cold live mount
//! (C) and a pre-staged live mount (P), with the chunk store modelled as remote
//! storage and unthrottled. `--smoke`: a hypervisor attaches the live mount as a raw
//! disk (nested qemu inside the test VM).

use super::image::{self, boot_dir, Image};
use super::qemu::{boot_kernel, require_marker, Console, Qemu};
use crate::report::{Report, Table};
use crate::util::{root, run, sh_quote};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The remote-storage model of the throttled cases.
pub const STORE_LATENCY: &str = "20ms";
pub const STORE_BANDWIDTH: &str = "100M";
/// Memory of the test VM (MiB) and of the read cache's memory tier.
const VM_MEMORY_MB: u32 = 2048;
const CACHE_MEM: &str = "256M";
/// Wall-clock limit of one boot (a cold boot at 20 ms per request is the slowest).
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
/// Serial numbers of the test VM's disks (how prepare.sh finds them).
const SERIAL_ROOT: &str = "lm-root";
const SERIAL_STORE: &str = "lm-store";
/// The series the image is backed up as.
pub(super) const SERIES: &str = "debian";

/// Options of `cargo xtask bench-boot`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rounds over all cases (medians are reported).
    pub rounds: u32,
    /// Only these case ids (`L`, `C20`, `P20`, `M20`, `C0`, `P0`, ...).
    pub only: Vec<String>,
    /// Keep per-boot files (console logs, status JSON) even on success.
    pub keep: bool,
    /// Reuse the previous run's profiles and store when the image is unchanged.
    pub reuse: bool,
}

/// What the driver supports (from `livemount mount --help`).
#[derive(Clone, Debug, Default)]
struct Caps {
    profile: bool,
    throttle: bool,
    record_profile: bool,
    no_readahead: bool,
    seq_readahead: bool,
    /// The `--prestage` default the help states.
    default_prestage: String,
}

impl Caps {
    fn probe(livemount: &Path) -> Result<Caps> {
        let out = Command::new(livemount)
            .args(["mount", "--help"])
            .output()
            .context("running livemount mount --help")?;
        let help = String::from_utf8_lossy(&out.stdout);
        Ok(Caps {
            profile: help.contains("--profile") && help.contains("--prestage"),
            throttle: help.contains("--store-latency") && help.contains("--store-bandwidth"),
            record_profile: help.contains("--record-profile"),
            no_readahead: help.contains("--no-readahead"),
            seq_readahead: help.contains("--seq-readahead"),
            default_prestage: help
                .split("--prestage")
                .nth(1)
                .and_then(|t| t.split("[default: ").nth(1))
                .and_then(|t| t.split(']').next())
                .unwrap_or("?")
                .to_owned(),
        })
    }
}

/// A host-recorded profile and its figures.
#[derive(Clone, Debug)]
pub(super) struct ProfileInfo {
    pub(super) path: PathBuf,
    runs: u64,
    extents: usize,
    working_set: u64,
    disk_size: u64,
    /// Boot time of the recording boot (switch-root → marker, guest seconds).
    boot_s: Option<f64>,
}

impl ProfileInfo {
    fn load(path: &Path, boot_s: Option<f64>) -> Result<ProfileInfo> {
        let v: Value = serde_json::from_str(
            &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        let extents = v["extents"].as_array().map_or(&[][..], |a| a.as_slice());
        Ok(ProfileInfo {
            path: path.to_path_buf(),
            runs: v["source"]["runs"].as_u64().unwrap_or(1),
            extents: extents.len(),
            working_set: extents.iter().filter_map(|e| e["length"].as_u64()).sum(),
            disk_size: v["disk_size"].as_u64().unwrap_or(0),
            boot_s,
        })
    }
}

/// Everything the boots need, prepared on the host.
pub(super) struct Prepared {
    pub(super) image: Image,
    pub(super) kernel: PathBuf,
    pub(super) initrd: PathBuf,
    pub(super) livemount: PathBuf,
    profiler: PathBuf,
    pub(super) work: PathBuf,
    store_img: PathBuf,
    /// The snapshot's stored size (compressed chunks).
    store_bytes: u64,
    caps: Caps,
    /// Held for the whole run: one bench-boot / smoke test at a time per tree
    /// (they share `.cache/boot/work`).
    _lock: fs::File,
}

/// One way of booting.
#[derive(Clone, Debug)]
struct Case {
    id: String,
    what: String,
    live: bool,
    /// Local cases: boot from a loop device over a copy of the image in guest
    /// RAM (tmpfs) instead of from the virtio disk itself.
    loop_ram: bool,
    throttle: bool,
    profile: Option<PathBuf>,
    /// `--prestage` with a profile: `all`, `none` or seconds (None: the driver's default).
    prestage: Option<&'static str>,
    /// `--no-readahead`.
    no_readahead: bool,
    /// `--seq-readahead 0`.
    no_seq_readahead: bool,
    /// `--record-profile`: the learned profile is copied here after the boot.
    record: Option<PathBuf>,
}

/// One timed boot.
#[derive(Clone, Debug, Default)]
struct BootRun {
    case: String,
    round: u32,
    /// Host 1-minute load average when the boot started.
    host_load: f64,
    /// switch_root → multi-user marker (guest seconds).
    boot_s: f64,
    /// mount command → device ready (guest seconds), live mounts only.
    ready_s: Option<f64>,
    /// Bytes the booted system read from its root device (/sys/block/*/stat).
    dev_read_bytes: u64,
    /// Read requests completed and ms spent on them (the same file's fields 1 and 4).
    dev_reads: u64,
    dev_read_ms: u64,
    failed_units: String,
    status: Option<Value>,
    wall_s: f64,
}

impl BootRun {
    fn to_json(&self) -> Value {
        serde_json::json!({
            "case": self.case, "round": self.round, "host_load": self.host_load,
            "boot_s": self.boot_s, "ready_s": self.ready_s,
            "dev_read_bytes": self.dev_read_bytes, "dev_reads": self.dev_reads,
            "dev_read_ms": self.dev_read_ms, "failed_units": self.failed_units,
            "status": self.status, "wall_s": self.wall_s,
        })
    }

    fn from_json(v: &Value) -> BootRun {
        BootRun {
            case: v["case"].as_str().unwrap_or_default().to_owned(),
            round: v["round"].as_u64().unwrap_or(0) as u32,
            host_load: v["host_load"].as_f64().unwrap_or(0.0),
            boot_s: v["boot_s"].as_f64().unwrap_or(0.0),
            ready_s: v["ready_s"].as_f64(),
            dev_read_bytes: v["dev_read_bytes"].as_u64().unwrap_or(0),
            dev_reads: v["dev_reads"].as_u64().unwrap_or(0),
            dev_read_ms: v["dev_read_ms"].as_u64().unwrap_or(0),
            failed_units: v["failed_units"].as_str().unwrap_or_default().to_owned(),
            status: v.get("status").filter(|s| !s.is_null()).cloned(),
            wall_s: v["wall_s"].as_f64().unwrap_or(0.0),
        }
    }

    fn cache(&self, key: &str) -> Option<f64> {
        self.status.as_ref()?.get("cache")?.get(key)?.as_f64()
    }
    fn prestage(&self, key: &str) -> Option<f64> {
        self.status.as_ref()?.get("prestage")?.get(key)?.as_f64()
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn mib(b: f64) -> String {
    format!("{:.1} MiB", b / 1048576.0)
}

/// Copy the release binaries out of the shared target dir, so a concurrent build
/// cannot change them under a running VM.
fn stable_copy(src: &Path, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let name = src.file_name().context("binary name")?;
    let dst = dir.join(name);
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    fs::copy(src, &tmp).with_context(|| format!("copying {}", src.display()))?;
    fs::rename(&tmp, &dst)?;
    Ok(dst)
}

pub(super) fn prepare(build_store: bool, reuse: bool) -> Result<(Prepared, Vec<ProfileInfo>)> {
    if !crate::util::is_root() {
        bail!("bench-boot needs root (debootstrap, loop devices, eBPF, mkfs)");
    }
    fs::create_dir_all(boot_dir())?;
    let lock = fs::File::create(boot_dir().join("work.lock"))?;
    if lock.try_lock().is_err() {
        eprintln!("bench-boot: another bench-boot uses .cache/boot/work; waiting for it");
        lock.lock().context("locking .cache/boot/work.lock")?;
    }
    crate::util::build_release_tools()?;
    let work = boot_dir().join("work");
    fs::create_dir_all(&work)?;
    let bin_dir = work.join("bin");
    let livemount = stable_copy(&root().join("target/release/livemount"), &bin_dir)?;
    let profiler = stable_copy(&root().join("target/release/livemount-profiler"), &bin_dir)?;
    let image = image::ensure_image()?;
    let initrd = image::ensure_initramfs()?;
    let (vmlinuz, _, kver) = crate::vm::kernel_paths()?;
    let kernel = boot_kernel(&vmlinuz, &kver);
    let caps = Caps::probe(&livemount)?;
    let mut p = Prepared {
        image,
        kernel,
        initrd,
        livemount,
        profiler,
        work,
        store_img: PathBuf::new(),
        store_bytes: 0,
        caps,
        _lock: lock,
    };
    let mut profiles = Vec::new();
    if build_store {
        let stamp = p.work.join("prepared.json");
        if reuse {
            if let Some(v) = fs::read_to_string(&stamp)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .filter(|v| v["image_key"] == p.image.key.as_str())
            {
                let dir = p.work.join("profiles");
                for (i, name) in ["boot-1.json", "boot-2.json", "merged.json"]
                    .iter()
                    .enumerate()
                {
                    let boot_s = v["boot_s"].get(i).and_then(Value::as_f64);
                    profiles.push(ProfileInfo::load(&dir.join(name), boot_s)?);
                }
                p.store_img = p.work.join("store.img");
                p.store_bytes = v["store_bytes"].as_u64().unwrap_or(0);
                if p.store_img.exists() {
                    eprintln!("bench-boot: --reuse: profiles and store of the previous run");
                    return Ok((p, profiles));
                }
                profiles.clear();
            }
        }
        let _ = fs::remove_file(&stamp);
        profiles = record_profiles(&p)?;
        backup(&mut p)?;
        let v = serde_json::json!({
            "image_key": p.image.key,
            "store_bytes": p.store_bytes,
            "boot_s": profiles.iter().map(|x| x.boot_s).collect::<Vec<_>>(),
        });
        fs::write(&stamp, serde_json::to_string_pretty(&v)?)?;
    }
    Ok((p, profiles))
}

/// `LIVEMOUNT_SKIP_VM=1`: this machine cannot run the test VM; say so visibly.
fn skip_vm(what: &str) -> bool {
    let skip = std::env::var("LIVEMOUNT_SKIP_VM").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("SKIP: {what} (LIVEMOUNT_SKIP_VM=1)");
    }
    skip
}

/// A loop device over `file` (read-only), detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Result<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "-r"])
            .arg(file)
            .output()
            .context("running losetup")?;
        if !out.status.success() {
            bail!(
                "losetup {} failed: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The host boot used for profiling: the image on a loop device, root on virtio.
fn host_boot(p: &Prepared, dev: &str, label: &str) -> Qemu {
    Qemu {
        label: label.into(),
        kernel: p.kernel.clone(),
        initrd: p.initrd.clone(),
        append: format!("lm.mode=disk lm.root=/dev/vda{}", debug_arg()),
        args: vec![
            "-drive".into(),
            // cache=none: the guest's reads reach the loop device (no host page
            // cache in between); snapshot=on: its writes go to a throwaway overlay.
            format!("file={dev},format=raw,if=none,id=root,cache=none,snapshot=on"),
            "-device".into(),
            "virtio-blk-pci,drive=root".into(),
        ],
        cpus: 2,
        memory_mb: VM_MEMORY_MB,
        timeout: Duration::from_secs(300),
        stream: verbose(),
    }
}

/// `LIVEMOUNT_BOOT_DEBUG=1`: the booted system prints systemd-analyze after its marker.
fn debug_arg() -> &'static str {
    if std::env::var("LIVEMOUNT_BOOT_DEBUG").is_ok_and(|v| v == "1") {
        " lm.debug"
    } else {
        ""
    }
}

pub(super) fn verbose() -> bool {
    std::env::var("LIVEMOUNT_BOOT_VERBOSE").is_ok_and(|v| v == "1")
}

/// Boot time (switch-root → multi-user marker) of a console, in guest seconds.
pub(super) fn boot_seconds(con: &Console, what: &str) -> Result<f64> {
    let sw = require_marker(con, "switch-root", what)?;
    let mk = require_marker(con, "multi-user", what)?;
    match (sw.uptime(), mk.uptime()) {
        (Some(a), Some(b)) => Ok(b - a),
        _ => bail!("{what}: markers without uptime"),
    }
}

/// Record two profiles on the host: `livemount-profiler record` traces a loop
/// device over the image while qemu boots it, until the multi-user marker. Then
/// merge them.
fn record_profiles(p: &Prepared) -> Result<Vec<ProfileInfo>> {
    let dir = p.work.join("profiles");
    fs::create_dir_all(&dir)?;
    let lo = Loop::attach(&p.image.path)?;
    let mut out = Vec::new();
    for n in 1..=2 {
        let file = dir.join(format!("boot-{n}.json"));
        let _ = fs::remove_file(&file);
        let mut rec = Profiler::start(&p.profiler, &lo.0, &file)?;
        let mut stopped = false;
        let con = host_boot(
            p,
            &lo.0,
            &format!("profiling boot {n} on the host from {}", lo.0),
        )
        .run(|line, _| {
            if !stopped && line.contains("@@LMBOOT-MARKER") {
                rec.interrupt();
                stopped = true;
            }
        });
        rec.interrupt();
        let rec_result = rec.wait();
        let con = con?;
        let boot_s = boot_seconds(&con, &format!("profiling boot {n}"))?;
        rec_result?;
        let info = ProfileInfo::load(&file, Some(boot_s))?;
        eprintln!(
            "bench-boot: profile {n}: boot {boot_s:.2} s, {} extents, working set {} ({:.1}% of the image)",
            info.extents,
            mib(info.working_set as f64),
            100.0 * info.working_set as f64 / info.disk_size.max(1) as f64
        );
        out.push(info);
    }
    drop(lo);
    let merged = dir.join("merged.json");
    run(Command::new(&p.profiler)
        .arg("merge")
        .arg(&out[0].path)
        .arg(&out[1].path)
        .arg("--out")
        .arg(&merged))?;
    out.push(ProfileInfo::load(&merged, None)?);
    Ok(out)
}

/// `livemount-profiler record` running in the background.
struct Profiler {
    child: Child,
    log: PathBuf,
}

impl Profiler {
    fn start(bin: &Path, dev: &str, out: &Path) -> Result<Profiler> {
        let log = out.with_extension("log");
        let child = Command::new(bin)
            .args(["record", "--disk", dev, "--out"])
            .arg(out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting livemount-profiler")?;
        let mut p = Profiler { child, log };
        // Attached once it says "recording ...".
        let t0 = Instant::now();
        loop {
            if fs::read_to_string(&p.log)
                .unwrap_or_default()
                .contains("recording ")
            {
                return Ok(p);
            }
            if let Some(st) = p.child.try_wait()? {
                bail!(
                    "livemount-profiler exited ({st}): {}",
                    fs::read_to_string(&p.log).unwrap_or_default().trim()
                );
            }
            if t0.elapsed() > Duration::from_secs(60) {
                p.interrupt();
                bail!("livemount-profiler did not attach within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn interrupt(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
        }
    }

    fn wait(mut self) -> Result<()> {
        let st = self.child.wait()?;
        if !st.success() {
            bail!(
                "livemount-profiler record failed ({st}): {}",
                fs::read_to_string(&self.log).unwrap_or_default().trim()
            );
        }
        Ok(())
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

/// Back the image up into a fresh store and put the store on an ext4 disk image
/// for the test VM (a local disk there, like the image in the L case).
fn backup(p: &mut Prepared) -> Result<()> {
    let store = p.work.join("store");
    if store.exists() {
        fs::remove_dir_all(&store)?;
    }
    let t0 = Instant::now();
    let v = backup_into(p, &store)?;
    p.store_bytes = v["bytes_stored"]
        .as_u64()
        .unwrap_or_else(|| dir_bytes(&store));
    eprintln!(
        "bench-boot: backup of the image: {} stored in {:.0} s",
        mib(p.store_bytes as f64),
        t0.elapsed().as_secs_f64()
    );
    let img = p.work.join("store.img");
    let size = (dir_bytes(&store) * 5 / 4 + (64 << 20)).next_multiple_of(1 << 20);
    let _ = fs::remove_file(&img);
    fs::File::create(&img)?.set_len(size)?;
    let parent = p.work.join("store-fs");
    if parent.exists() {
        fs::remove_dir_all(&parent)?;
    }
    fs::create_dir_all(&parent)?;
    fs::rename(&store, parent.join("store"))?;
    let r = run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "lmstore", "-d"])
        .arg(&parent)
        .arg(&img));
    fs::rename(parent.join("store"), &store)?;
    r?;
    p.store_img = img;
    Ok(())
}

/// `livemount backup` of the image into `store` as series [`SERIES`]; its JSON report.
pub(super) fn backup_into(p: &Prepared, store: &Path) -> Result<Value> {
    let out = Command::new(&p.livemount)
        .arg("backup")
        .arg(&p.image.path)
        .arg("--store")
        .arg(store)
        .args(["--name", SERIES, "--json"])
        .output()
        .context("running livemount backup")?;
    if !out.status.success() {
        bail!(
            "livemount backup failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// The first 12 hex digits of the md5 of the image tree's /bin/bash (what the
/// booted guest's marker reports as `bash_md5`).
pub(super) fn image_bash_md5() -> Result<String> {
    let path = image::boot_dir().join("root/usr/bin/bash");
    let out = Command::new("md5sum")
        .arg(&path)
        .output()
        .context("running md5sum")?;
    let s: String = String::from_utf8_lossy(&out.stdout)
        .chars()
        .take(12)
        .collect();
    if !out.status.success() || s.len() != 12 {
        bail!("md5sum {} failed", path.display());
    }
    Ok(s)
}

/// The `livemount mount` arguments of a live case.
fn mount_args(p: &Prepared, case: &Case) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "mount".into(),
        "--store".into(),
        "/mnt/lmstore/store".into(),
        SERIES.into(),
        "--overlay".into(),
        "/tmp/lm-overlay.img".into(),
        "--cache-mem".into(),
        CACHE_MEM.into(),
        "--daemon".into(),
        "--log".into(),
        "/tmp/lm-daemon.log".into(),
    ];
    if let Some(prof) = &case.profile {
        a.extend(["--profile".into(), prof.display().to_string()]);
        if let Some(w) = case.prestage {
            a.extend(["--prestage".into(), w.into()]);
        }
    }
    if case.no_readahead {
        a.push("--no-readahead".into());
    }
    if case.no_seq_readahead {
        a.extend(["--seq-readahead".into(), "0".into()]);
    }
    if case.record.is_some() {
        a.extend(["--record-profile".into(), "/tmp/lm-learned.json".into()]);
    }
    if case.throttle && p.caps.throttle {
        a.extend([
            "--store-latency".into(),
            STORE_LATENCY.into(),
            "--store-bandwidth".into(),
            STORE_BANDWIDTH.into(),
        ]);
    }
    a
}

/// prepare.sh (run by the initramfs chrooted into the host root) and watch.sh.
fn scripts(p: &Prepared, case: &Case) -> (String, String) {
    let lm = sh_quote(&p.livemount.display().to_string());
    let common = format!(
        r#"set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mark() {{ read -r up _ < /proc/uptime; echo "@@LMBOOT $1 uptime=$up${{2:+ $2}}"; }}
disk() {{
    for d in /sys/block/vd*; do
        [ "$(cat $d/serial 2>/dev/null)" = "$1" ] && {{ echo /dev/${{d##*/}}; return 0; }}
    done
    return 1
}}
LM={lm}
"#
    );
    let mut prepare = common.clone();
    if case.live {
        let args: Vec<String> = mount_args(p, case).iter().map(|a| sh_quote(a)).collect();
        write!(
            prepare,
            r#"store=$(disk {SERIAL_STORE}) || {{ echo "no store disk"; exit 1; }}
mkdir -p /mnt/lmstore
mount -t ext4 "$store" /mnt/lmstore || exit 1
# Load the binary into the page cache (9p under TCG is slow): not part of the timing.
$LM --version >/dev/null
mark mount-start
$LM {args} > /run/lmboot/mount.out 2> /run/lmboot/mount.err || {{ cat /run/lmboot/mount.err; exit 1; }}
mark mount-ready
dev=$(awk '/^device/{{print $2}}' /run/lmboot/mount.out)
[ -b "$dev" ] || {{ echo "no device in: $(cat /run/lmboot/mount.out)"; exit 1; }}
"#,
            args = args.join(" ")
        )
        .ok();
    } else {
        writeln!(
            prepare,
            r#"dev=$(disk {SERIAL_ROOT}) || {{ echo "no root disk"; exit 1; }}"#
        )
        .ok();
        if case.loop_ram {
            // Not timed: copy the image into guest RAM (holes stay holes), loop it.
            prepare.push_str(
                r#"dd if="$dev" of=/tmp/debian.img bs=1M iflag=direct conv=sparse status=none || exit 1
dev=$(losetup -f --show /tmp/debian.img) || exit 1
"#,
            );
        }
    }
    prepare.push_str(
        r#"# Every case boots with cold caches (the copy above, the store's file system).
sync
echo 3 > /proc/sys/vm/drop_caches
echo "$dev" > /run/lmboot/root-dev
setsid bash /run/lmboot/watch.sh "${dev#/dev/}" < /dev/null > /dev/console 2>&1 &
exit 0
"#,
    );
    let mut watch = common;
    write!(
        watch,
        r#"blk=$1
# The booted system's marker unit also writes its line to the kernel log.
timeout {} grep -q -m1 '@@LMBOOT-MARKER' /dev/kmsg
mark watcher
cat /sys/block/$blk/stat > /run/lmboot/blockstat
"#,
        BOOT_TIMEOUT.as_secs()
    )
    .ok();
    if case.live {
        watch.push_str(
            r#"$LM status --json > /run/lmboot/status.json 2> /run/lmboot/status.err
"#,
        );
    }
    if case.record.is_some() {
        // The learned profile is written when the daemon stops (SIGTERM, as at
        // unmount). The booted system loses its disk, but it is powered off next.
        // The daemon itself may not exit (deleting a device whose file system is
        // still mounted waits for the last opener), so wait for the file only.
        watch.push_str(
            r#"sync
pid=$(grep -o '"pid": *[0-9]*' /run/lmboot/status.json | head -1 | grep -o '[0-9]*$')
if [ -n "$pid" ]; then
    kill -TERM "$pid"
    for _ in $(seq 150); do [ -s /tmp/lm-learned.json ] && break; sleep 0.2; done
    cp /tmp/lm-learned.json /run/lmboot/learned.json
fi
mark profile-written
"#,
        );
    }
    if case.live {
        watch.push_str(
            r#"cp /tmp/lm-daemon.log /run/lmboot/daemon.log 2>/dev/null
"#,
        );
    }
    watch.push_str(
        r#"sync
mark collected
echo o > /proc/sysrq-trigger
"#,
    );
    (prepare, watch)
}

/// Boot the Debian image once in the test VM as `case`.
fn boot_case(p: &Prepared, case: &Case, round: u32, keep: bool) -> Result<BootRun> {
    // A fresh control directory for this boot (shared as 9p `lmctl`).
    let dir = crate::vm::runner::new_run_dir_in(&p.work.join("runs"))?;
    let (prepare, watch) = scripts(p, case);
    fs::write(dir.join("prepare.sh"), prepare)?;
    fs::write(dir.join("watch.sh"), watch)?;
    let drive = |file: &Path, id: &str, serial: &str| {
        [
            "-drive".to_string(),
            format!(
                "file={},format=raw,if=none,id={id},snapshot=on,cache=unsafe",
                file.display()
            ),
            "-device".to_string(),
            format!("virtio-blk-pci,drive={id},serial={serial}"),
        ]
    };
    let mut args = vec![
        "-fsdev".to_string(),
        "local,id=hostroot,path=/,security_model=none,multidevs=remap,readonly=on".into(),
        "-device".into(),
        "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot".into(),
        "-fsdev".into(),
        format!(
            "local,id=lmctl,path={},security_model=none,multidevs=remap",
            dir.display()
        ),
        "-device".into(),
        "virtio-9p-pci,fsdev=lmctl,mount_tag=lmctl".into(),
    ];
    if case.live {
        args.extend(drive(&p.store_img, "store", SERIAL_STORE));
    } else {
        args.extend(drive(&p.image.path, "root", SERIAL_ROOT));
    }
    let q = Qemu {
        label: format!("{} round {round}: {}", case.id, case.what),
        kernel: p.kernel.clone(),
        initrd: p.initrd.clone(),
        append: format!("lm.mode=vm lm.hold{}", debug_arg()),
        args,
        cpus: 2,
        memory_mb: VM_MEMORY_MB,
        timeout: BOOT_TIMEOUT + Duration::from_secs(60),
        stream: verbose(),
    };
    let host_load = fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let con = q.run(|_, _| {})?;
    fs::write(dir.join("console.log"), &con.log)?;
    let what = format!("{} round {round} (files in {})", case.id, dir.display());
    let boot_s = boot_seconds(&con, &what)?;
    let mk = require_marker(&con, "multi-user", &what)?;
    let ready_s = match (con.marker("mount-start"), con.marker("mount-ready")) {
        (Some(a), Some(b)) => Some(b.uptime().unwrap_or(0.0) - a.uptime().unwrap_or(0.0)),
        _ => None,
    };
    // /sys/block/X/stat: reads completed, merged, sectors read, ms reading, ...
    let stat = fs::read_to_string(dir.join("blockstat")).unwrap_or_default();
    let field = |i: usize| {
        stat.split_whitespace()
            .nth(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (dev_reads, dev_read_bytes, dev_read_ms) = (field(0), field(2) * 512, field(3));
    let status = fs::read_to_string(dir.join("status.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| match v {
            Value::Array(mut a) if !a.is_empty() => Some(a.swap_remove(0)),
            Value::Object(_) => Some(v),
            _ => None,
        });
    if let Some(dst) = &case.record {
        let learned = dir.join("learned.json");
        if learned.exists() {
            fs::copy(&learned, dst)?;
        } else {
            eprintln!(
                "bench-boot: warning: {} wrote no learned profile (see {})",
                case.id,
                dir.display()
            );
        }
    }
    if case.live && status.is_none() {
        eprintln!(
            "bench-boot: warning: no status from {} (see {})",
            case.id,
            dir.display()
        );
    }
    let r = BootRun {
        case: case.id.clone(),
        round,
        host_load,
        boot_s,
        ready_s,
        dev_read_bytes,
        dev_reads,
        dev_read_ms,
        failed_units: mk.fields.get("failed_units").cloned().unwrap_or_default(),
        status,
        wall_s: con.elapsed.as_secs_f64(),
    };
    eprintln!(
        "bench-boot: {:<5} round {round}: boot {:6.2} s{}, read {} from {}, failed units {}, VM wall {:.0} s, host load {host_load:.1}",
        case.id,
        r.boot_s,
        r.ready_s
            .map(|s| format!(", device ready {s:.2} s"))
            .unwrap_or_default(),
        mib(r.dev_read_bytes as f64),
        mk.fields.get("root").map_or("?", String::as_str),
        r.failed_units,
        r.wall_s
    );
    if !keep {
        let _ = fs::remove_dir_all(&dir);
    }
    Ok(r)
}

/// The cases of one round, in the order they boot.
fn cases(p: &Prepared, profiles: &[ProfileInfo]) -> Vec<Case> {
    let model = format!("{STORE_LATENCY}/request, {STORE_BANDWIDTH}B/s");
    let learned = p.work.join("profiles/learned.json");
    let dflt = format!("default `--prestage {}`", p.caps.default_prestage);
    let case = |id: String, what: String, live: bool, throttle: bool| Case {
        id,
        what,
        live,
        loop_ram: false,
        throttle,
        profile: None,
        prestage: None,
        no_readahead: false,
        no_seq_readahead: false,
        record: None,
    };
    let mut v = vec![
        Case {
            loop_ram: true,
            ..case(
                "L".into(),
                "local raw image: loop device over the image file in guest RAM".into(),
                false,
                false,
            )
        },
        case(
            "Lv".into(),
            "local raw image as a virtio disk (host page cache behind it)".into(),
            false,
            false,
        ),
    ];
    for throttle in [true, false] {
        if throttle && !p.caps.throttle {
            continue;
        }
        let (n, how) = if throttle {
            ("20", model.as_str())
        } else {
            ("0", "unthrottled")
        };
        let record = throttle && p.caps.record_profile;
        v.push(Case {
            record: record.then(|| learned.clone()),
            ..case(
                format!("C{n}"),
                format!(
                    "live mount, cold, no profile{}, store {how}",
                    if record {
                        " (recording a learned profile)"
                    } else {
                        ""
                    }
                ),
                true,
                throttle,
            )
        });
        if throttle && p.caps.no_readahead {
            v.push(Case {
                no_readahead: true,
                ..case(
                    format!("C{n}nr"),
                    format!("cold, no profile, `--no-readahead` (only the frames a read needs), store {how}"),
                    true,
                    throttle,
                )
            });
        }
        if throttle && p.caps.seq_readahead {
            v.push(Case {
                no_seq_readahead: true,
                ..case(
                    format!("C{n}ns"),
                    format!("cold, no profile, `--seq-readahead 0` (no sequential read-ahead), store {how}"),
                    true,
                    throttle,
                )
            });
        }
        if !p.caps.profile {
            continue;
        }
        let host = Some(profiles[0].path.clone());
        v.push(Case {
            profile: host.clone(),
            ..case(
                format!("P{n}"),
                format!("pre-staged with one host boot's profile ({dflt}), store {how}"),
                true,
                throttle,
            )
        });
        if !throttle {
            continue;
        }
        v.push(Case {
            profile: Some(profiles[2].path.clone()),
            ..case(
                format!("M{n}"),
                format!("pre-staged with two host boots' merged profile ({dflt}), store {how}"),
                true,
                throttle,
            )
        });
        if record {
            v.push(Case {
                profile: Some(learned.clone()),
                ..case(
                    format!("R{n}"),
                    format!("pre-staged with the profile C{n} learned (`--record-profile`; {dflt}), store {how}"),
                    true,
                    throttle,
                )
            });
        }
        v.push(Case {
            profile: host.clone(),
            prestage: Some("all"),
            ..case(
                format!("P{n}all"),
                format!(
                    "host profile, `--prestage all` (the whole profile before ready), store {how}"
                ),
                true,
                throttle,
            )
        });
        v.push(Case {
            profile: host,
            prestage: Some("none"),
            ..case(
                format!("P{n}n"),
                format!("host profile, `--prestage none` (all in the background), store {how}"),
                true,
                throttle,
            )
        });
    }
    v
}

/// `cargo xtask bench-boot`.
pub fn bench(opts: &Options) -> Result<()> {
    if skip_vm("bench-boot") {
        return Ok(());
    }
    let t0 = Instant::now();
    let (p, profiles) = prepare(true, opts.reuse)?;
    if !p.caps.profile || !p.caps.throttle {
        eprintln!(
            "bench-boot: note: this livemount lacks {}{}; those cases are skipped",
            if p.caps.profile {
                ""
            } else {
                "--profile/--prestage "
            },
            if p.caps.throttle {
                ""
            } else {
                "--store-latency/--store-bandwidth"
            }
        );
    }
    let all = cases(&p, &profiles);
    let chosen: Vec<&Case> = all
        .iter()
        .filter(|c| opts.only.is_empty() || opts.only.iter().any(|o| o == &c.id))
        .collect();
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    // A subset (`--only`, e.g. the demo's L/C20/P20) does not replace the full table.
    let name = if opts.only.is_empty() {
        "bench-boot"
    } else {
        "bench-boot-only"
    };
    let runs_file = root().join(format!("results/{name}-runs.json"));
    // LIVEMOUNT_BOOT_REPORT_ONLY=1: no boots, the report of the last run's figures.
    let report_only = std::env::var("LIVEMOUNT_BOOT_REPORT_ONLY").is_ok_and(|v| v == "1");
    if report_only {
        let v: Value = serde_json::from_str(
            &fs::read_to_string(&runs_file)
                .with_context(|| format!("reading {}", runs_file.display()))?,
        )?;
        runs = v
            .as_array()
            .map(|a| a.iter().map(BootRun::from_json).collect())
            .unwrap_or_default();
    }
    for round in 1..=opts.rounds {
        for case in chosen.iter().filter(|_| !report_only) {
            if let Some(prof) = &case.profile {
                if !prof.exists() {
                    eprintln!(
                        "bench-boot: {} skipped: {} does not exist (run C20 first)",
                        case.id,
                        prof.display()
                    );
                    continue;
                }
            }
            match boot_case(&p, case, round, opts.keep) {
                Ok(r) => runs.push(r),
                Err(e) => {
                    eprintln!("bench-boot: {} round {round} FAILED: {e:#}", case.id);
                    failed.push(format!("{} round {round}: {}", case.id, first_line(&e)));
                }
            }
        }
    }
    if !report_only {
        fs::create_dir_all(runs_file.parent().context("results dir")?)?;
        let v: Vec<Value> = runs.iter().map(BootRun::to_json).collect();
        fs::write(&runs_file, serde_json::to_string_pretty(&v)?)?;
    }
    let mut rep = report(&p, &profiles, &all, &runs, opts, t0.elapsed());
    rep.bench = name.to_string();
    if !failed.is_empty() {
        rep.note(format!("Failed boots: {}.", failed.join("; ")));
    }
    rep.save()?;
    if !failed.is_empty() {
        bail!(
            "bench-boot: {} boot(s) failed: {}",
            failed.len(),
            failed.join("; ")
        );
    }
    Ok(())
}

fn first_line(e: &anyhow::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_owned()
}

/// The report: one table of every case, the host's profiles, the targets; notes
/// of the side-by-side variants. What the cases and the store model are is in
/// docs/performance.md ("Boot").
fn report(
    p: &Prepared,
    profiles: &[ProfileInfo],
    cases: &[Case],
    runs: &[BootRun],
    opts: &Options,
    elapsed: Duration,
) -> Report {
    let of = |id: &str| -> Vec<&BootRun> { runs.iter().filter(|r| r.case == id).collect() };
    let med = |id: &str, f: &dyn Fn(&BootRun) -> Option<f64>| -> Option<f64> {
        median(of(id).into_iter().filter_map(f).collect())
    };
    let boot = |id: &str| med(id, &|r| Some(r.boot_s));
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".to_string(), f);
    let secs = |v: f64| format!("{v:.2}");
    let count = |v: f64| format!("{v:.0}");
    let only = match opts.only.is_empty() {
        true => String::new(),
        false => format!(" --only {}", opts.only.join(",")),
    };
    let mut rep = Report::new(
        "bench-boot",
        format!("cargo xtask bench-boot --rounds {}{only}", opts.rounds),
    );
    rep.note(format!(
        "The run took {:.0} min (root; image, host profiles and backup included).",
        elapsed.as_secs_f64() / 60.0
    ));
    let mut t = Table::new(
        format!(
            "Debian minbase, {} MiB ext4, kernel {}, in the ublk test VM (TCG, 2 vCPU, {VM_MEMORY_MB} MiB); \
             medians of {} round(s); `…20` cases: `--store-latency {STORE_LATENCY} --store-bandwidth {STORE_BANDWIDTH}`, \
             `--cache-mem {CACHE_MEM}`; commit {}:",
            image::IMAGE_SIZE >> 20,
            p.image.kver,
            opts.rounds,
            crate::util::git_head()
        ),
        &[
            "case", "what", "boot (s)", "per round (s)", "fastest (s)", "device ready (s)",
            "ready + boot (s)", "store requests", "fetched (compressed)", "decoded",
            "device reads", "read requests", "time in them (s)",
        ],
    );
    for c in cases {
        let rs = of(&c.id);
        if rs.is_empty() {
            continue;
        }
        let per: Vec<String> = rs.iter().map(|r| format!("{:.2}", r.boot_s)).collect();
        t.row([
            c.id.clone(),
            c.what.clone(),
            opt(boot(&c.id), &secs),
            per.join(", "),
            opt(rs.iter().map(|r| r.boot_s).min_by(f64::total_cmp), &secs),
            opt(med(&c.id, &|r| r.ready_s), &secs),
            opt(
                med(&c.id, &|r| Some(r.ready_s.unwrap_or(0.0) + r.boot_s)),
                &secs,
            ),
            opt(med(&c.id, &|r| r.cache("store_reads")), &count),
            opt(med(&c.id, &|r| r.cache("store_bytes")), &mib),
            opt(med(&c.id, &|r| r.cache("decoded_bytes")), &mib),
            mib(med(&c.id, &|r| Some(r.dev_read_bytes as f64)).unwrap_or(0.0)),
            opt(med(&c.id, &|r| Some(r.dev_reads as f64)), &count),
            opt(med(&c.id, &|r| Some(r.dev_read_ms as f64 / 1000.0)), &secs),
        ]);
    }
    rep.tables.push(t);
    rep.tables.push(profile_table(p, profiles));
    rep.tables.push(targets(p, profiles, runs, opts));
    let loads: Vec<String> = (1..=opts.rounds)
        .map(|round| {
            let l: Vec<String> = runs
                .iter()
                .filter(|r| r.round == round)
                .map(|r| format!("{} {:.1}", r.case, r.host_load))
                .collect();
            format!("round {round}: {}", l.join(", "))
        })
        .collect();
    rep.note(format!(
        "Host 1-min load average when each boot started: {}.",
        loads.join("; ")
    ));
    rep.note(format!(
        "The snapshot in the store: {} of compressed chunks.",
        mib(p.store_bytes as f64)
    ));
    let (c, pp) = (boot("C20"), boot("P20"));
    if let (Some(lv), Some(c), Some(p)) = (boot("Lv"), c, pp) {
        rep.note(format!(
            "Against Lv (virtio disk, served outside the guest's vCPUs) instead of L: P/Lv = {:.2}, (C − P) / (C − Lv) = {:.2}, C/Lv = {:.2}.",
            p / lv,
            (c - p) / (c - lv),
            c / lv
        ));
    }
    if let (Some(m), Some(pv)) = (boot("M20"), pp) {
        let extra = match (profiles.first(), profiles.get(2)) {
            (Some(a), Some(b)) => mib(b.working_set as f64 - a.working_set as f64),
            _ => "?".into(),
        };
        rep.note(format!("One host profile vs two merged: P20 {pv:.2} s, M20 {m:.2} s (merged: {extra} more working set)."));
    }
    let reads = |id: &str| opt(med(id, &|r| r.cache("store_reads")), &count);
    if let (Some(c), Some(nr)) = (c, boot("C20nr")) {
        rep.note(format!(
            "Chunk read-ahead vs `--no-readahead`: C20 {c:.2} s ({} store requests), C20nr {nr:.2} s ({}).",
            reads("C20"),
            reads("C20nr")
        ));
    }
    let decoded = |id: &str| opt(med(id, &|r| r.cache("decoded_bytes")), &mib);
    if let (Some(c), Some(ns)) = (c, boot("C20ns")) {
        rep.note(format!(
            "Sequential read-ahead vs `--seq-readahead 0`: C20 {c:.2} s ({} decoded), C20ns {ns:.2} s ({}).",
            decoded("C20"),
            decoded("C20ns")
        ));
    }
    if let Some(r) = boot("R20") {
        rep.note(format!(
            "Learned profile (`--record-profile` during C20, no eBPF): R20 {r:.2} s vs P20 {} s.",
            opt(pp, &secs)
        ));
    }
    if let Some(v) = med("P20", &|r| r.prestage("staged_bytes")) {
        rep.note(format!(
            "P20 pre-staged {} in {} steps, {} ms of its device-ready time; {} demand frame reads were served from pre-staged frames.",
            mib(v),
            opt(med("P20", &|r| r.prestage("steps_done")), &count),
            opt(med("P20", &|r| r.prestage("ready_ms")), &count),
            opt(med("P20", &|r| r.cache("prestage_saved_reads")), &count)
        ));
    }
    rep
}

/// The profiles recorded on the host (and the one C20 learned).
fn profile_table(p: &Prepared, profiles: &[ProfileInfo]) -> Table {
    let mut t = Table::new(
        "Profiles: `livemount-profiler record --disk /dev/loopN` while qemu booted the image from that loop device on the host, stopped at the marker:",
        &["profile", "runs", "extents", "working set", "share of the image", "recording boot (s)"],
    );
    let mut all: Vec<ProfileInfo> = profiles.to_vec();
    if let Ok(l) = ProfileInfo::load(&p.work.join("profiles/learned.json"), None) {
        all.push(l);
    }
    for pi in &all {
        let name = pi
            .path
            .file_name()
            .map_or("?".into(), |f| f.to_string_lossy());
        let learned = if pi.path.ends_with("learned.json") {
            " (learned by C20's live mount)"
        } else {
            ""
        };
        t.row([
            format!("{name}{learned}"),
            pi.runs.to_string(),
            pi.extents.to_string(),
            mib(pi.working_set as f64),
            format!(
                "{:.2}%",
                100.0 * pi.working_set as f64 / pi.disk_size.max(1) as f64
            ),
            pi.boot_s.map_or("–".into(), |v| format!("{v:.2}")),
        ]);
    }
    t
}

/// The targets of the 20 ms model, against L (a loop device over the image in guest
/// RAM: like the live mount, served by the guest's own CPUs). Ratios of the
/// medians (the verdict), per round, and of each case's fastest boot (contention
/// only adds time, so the minimum is the least disturbed estimate).
fn targets(p: &Prepared, profiles: &[ProfileInfo], runs: &[BootRun], opts: &Options) -> Table {
    let of = |id: &str| -> Vec<&BootRun> { runs.iter().filter(|r| r.case == id).collect() };
    let med = |id: &str, f: &dyn Fn(&BootRun) -> Option<f64>| -> Option<f64> {
        median(of(id).into_iter().filter_map(f).collect())
    };
    let boot = |id: &str| med(id, &|r| Some(r.boot_s));
    let secs = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.2}"));
    let mut t = Table::new(
        "Targets (20 ms model; L = loop device over the image in guest RAM, C = C20, P = P20):",
        &[
            "target",
            "medians",
            "per round",
            "fastest boots",
            "met (medians / fastest)",
        ],
    );
    let yes = |b: bool| if b { "yes" } else { "**no**" };
    let fastest = |id: &str| of(id).iter().map(|r| r.boot_s).min_by(f64::total_cmp);
    let triple = |get: &dyn Fn(&str) -> Option<f64>| -> Option<(f64, f64, f64)> {
        Some((get("L")?, get("C20")?, get("P20")?))
    };
    let rounds_of = |round: u32| {
        move |id: &str| {
            runs.iter()
                .find(|r| r.round == round && r.case == id)
                .map(|r| r.boot_s)
        }
    };
    type Ratio = (&'static str, fn(f64, f64, f64) -> f64, fn(f64) -> bool);
    let time_targets: [Ratio; 3] = [
        ("P ≤ 1.05 × L (P/L)", |l, _, p| p / l, |v| v <= 1.05),
        (
            "(C − P) / (C − L) ≥ 0.9",
            |l, c, p| (c - p) / (c - l),
            |v| v >= 0.9,
        ),
        ("C ≤ 1.5 × L (C/L)", |l, c, _| c / l, |v| v <= 1.5),
    ];
    for (name, f, ok) in time_targets {
        let m = triple(&boot).map(|(l, c, p)| f(l, c, p));
        let fast = triple(&fastest).map(|(l, c, p)| f(l, c, p));
        let per: Vec<String> = (1..=opts.rounds)
            .filter_map(|round| {
                let (l, c, p) = triple(&rounds_of(round))?;
                Some(format!("{:.2}", f(l, c, p)))
            })
            .collect();
        match (m, fast) {
            (Some(m), Some(fv)) => t.row([
                name.to_string(),
                format!("{m:.2}"),
                per.join(", "),
                format!("{fv:.2}"),
                format!("{} / {}", yes(ok(m)), yes(ok(fv))),
            ]),
            _ => t.row([name, "not measured"]),
        }
    }
    let ready = med("P20", &|r| r.ready_s);
    t.row([
        "device ready (mount + pre-staging) ≤ 1 s".to_string(),
        ready.map_or("not measured".into(), |v| {
            format!(
                "{v:.2} s (P20, `--prestage {}`); `all` {} s, `none` {} s, no profile (C20) {} s",
                p.caps.default_prestage,
                secs(med("P20all", &|r| r.ready_s)),
                secs(med("P20n", &|r| r.ready_s)),
                secs(med("C20", &|r| r.ready_s)),
            )
        }),
        String::new(),
        String::new(),
        ready.map_or("–".into(), |v| yes(v <= 1.0).to_string()),
    ]);
    let ws = profiles.first().map(|p| p.working_set as f64);
    let fetched = med("P20", &|r| r.cache("store_bytes")).zip(ws);
    t.row([
        "fetched during a pre-staged boot ≤ 1.2 × working set".to_string(),
        fetched.map_or("not measured".into(), |(f, w)| {
            let d = med("P20", &|r| r.cache("decoded_bytes")).unwrap_or(0.0);
            format!(
                "{} compressed = {:.2} × the {} working set ({} decoded = {:.2} ×)",
                mib(f),
                f / w,
                mib(w),
                mib(d),
                d / w
            )
        }),
        String::new(),
        String::new(),
        fetched.map_or("–".into(), |(f, w)| yes(f <= 1.2 * w).to_string()),
    ]);
    t
}

/// `q`'s qemu command line for a guest shell script: quoted, except that `$dev`
/// (the live mount's device, known only in the guest) is expanded there.
fn shell_args(q: &Qemu) -> String {
    q.command_args()
        .iter()
        .map(|a| {
            if a.contains("$dev") {
                format!("\"{a}\"")
            } else {
                sh_quote(a)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `cargo xtask bench-boot --smoke`: inside the test VM, qemu attaches the live
/// mount as a raw virtio disk and boots the Debian from it.
///
/// By default the guest runs the marker script as its init (it reads files from its
/// root and prints them): nested TCG is ~30× slower than TCG, so a full systemd
/// boot (`LIVEMOUNT_BOOT_SMOKE_FULL=1`, up to 40 min) takes far longer.
pub fn smoke() -> Result<()> {
    if skip_vm("bench-boot --smoke") {
        return Ok(());
    }
    let (mut p, _) = prepare(false, false)?;
    backup(&mut p)?;
    let store = p.work.join("store");
    let full = std::env::var("LIVEMOUNT_BOOT_SMOKE_FULL").is_ok_and(|v| v == "1");
    let inner = Qemu {
        label: "nested".into(),
        kernel: p.kernel.clone(),
        initrd: p.initrd.clone(),
        append: if full {
            "lm.mode=disk lm.root=/dev/vda".into()
        } else {
            "lm.mode=disk lm.root=/dev/vda lm.init=/usr/local/sbin/lm-boot-marker".into()
        },
        args: vec![
            "-drive".into(),
            "file=$dev,format=raw,if=virtio,cache=none".into(),
        ],
        cpus: 1,
        memory_mb: 768,
        timeout: Duration::from_secs(if full { 2400 } else { 600 }),
        stream: false,
    };
    let qargs = shell_args(&inner);
    let script = format!(
        r#"set -u
L={lm}
$L mount --store {store} {SERIES} --overlay /tmp/lm-overlay.img --daemon --log /tmp/lm.log > /tmp/mount.out || exit 1
dev=$(awk '/^device/{{print $2}}' /tmp/mount.out)
echo "SMOKE device $dev"
before=$(awk '{{print $3}}' /sys/block/${{dev#/dev/}}/stat)
t0=$(date +%s.%N)
timeout {secs} qemu-system-x86_64 {qargs} 2>&1 | sed -u 's/^/NESTED /'
t1=$(date +%s.%N)
after=$(awk '{{print $3}}' /sys/block/${{dev#/dev/}}/stat)
echo "SMOKE nested qemu ran $(awk -v a=$t0 -v b=$t1 'BEGIN{{printf "%.0f", b-a}}') s"
echo "SMOKE the nested guest read $(( (after - before) * 512 / 1048576 )) MiB from $dev"
$L status | sed 's/^/SMOKE status /'
$L unmount "$dev" > /dev/null
"#,
        lm = sh_quote(&p.livemount.display().to_string()),
        store = sh_quote(&store.display().to_string()),
        secs = inner.timeout.as_secs(),
        qargs = qargs,
    );
    let opts = crate::vm::VmOptions {
        timeout: inner.timeout + Duration::from_secs(300),
        stream: verbose(),
        ..crate::vm::VmOptions::default()
    };
    eprintln!(
        "bench-boot --smoke: qemu inside the test VM boots the Debian from the live mount \
         (-drive file=/dev/ublkbN,format=raw,if=virtio); nested TCG, up to {} s",
        inner.timeout.as_secs()
    );
    let r = crate::vm::run_in_vm(&script, &opts)?;
    let mut marker = None;
    for l in r.log.lines() {
        if let Some(x) = l.strip_prefix("SMOKE ") {
            println!("  {x}");
        }
        if l.contains("@@LMBOOT-MARKER") {
            marker = super::qemu::parse_marker(l);
            println!("  guest: {}", l.trim_start_matches("NESTED "));
        }
    }
    let Some(m) = marker else {
        bail!(
            "smoke test: the nested guest printed no multi-user marker (script exit {}); \
             console tail:\n{}",
            r.exit_code,
            r.log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    };
    // The guest's checksum of its /bin/bash must be the image's.
    let want = image_bash_md5()?;
    let got = m.fields.get("bash_md5").cloned().unwrap_or_default();
    if got != want {
        bail!(
            "smoke test: the nested guest read /bin/bash with md5 {got:?}, the image has {want:?}"
        );
    }
    println!("  /bin/bash read by the nested guest matches the image (md5 {got}…)");
    if m.fields.get("root").map(String::as_str) != Some("/dev/vda") {
        bail!(
            "smoke test: the nested guest's root is not /dev/vda: {:?}",
            m.fields
        );
    }
    println!(
        "smoke test passed: the nested guest ({}) printed its marker at {} s guest uptime, root on the live mount",
        if full {
            "systemd, multi-user"
        } else {
            "marker script as init"
        },
        m.fields.get("uptime").map_or("?", String::as_str)
    );
    Ok(())
}

/// `cargo xtask bench-boot --smoke-migrate`: inside the test VM, qemu boots the
/// Debian from a live mount while `livemount migrate` copies it to a raw file; the
/// boot leaves a stamp on its root (`lm.stamp`, written by the initramfs through the
/// disk). After the shutdown and the end of the migration the device is unmounted
/// and qemu boots again straight from the raw file: it must boot and find the stamp.
pub fn smoke_migrate() -> Result<()> {
    if skip_vm("bench-boot --smoke-migrate") {
        return Ok(());
    }
    let (mut p, _) = prepare(false, false)?;
    backup(&mut p)?;
    let store = p.work.join("store");
    let boot = |label: &str, disk: &str, stamp: &str| Qemu {
        label: label.into(),
        kernel: p.kernel.clone(),
        initrd: p.initrd.clone(),
        append: format!(
            "lm.mode=disk lm.root=/dev/vda lm.init=/usr/local/sbin/lm-boot-marker lm.stamp={stamp}"
        ),
        args: vec![
            "-drive".into(),
            format!("file={disk},format=raw,if=virtio,cache=none"),
        ],
        cpus: 1,
        memory_mb: 768,
        timeout: Duration::from_secs(600),
        stream: false,
    };
    let first = boot("live", "$dev", "first-boot-7f3a");
    let second = boot("migrated", "/tmp/migrated.raw", "second-boot-91c2");
    let script = format!(
        r#"set -u
L={lm}
$L mount --store {store} {SERIES} --overlay /tmp/lm-overlay.img --daemon --log /tmp/lm.log > /tmp/mount.out || exit 1
dev=$(awk '/^device/{{print $2}}' /tmp/mount.out)
echo "SMOKE device $dev"
$L migrate "$dev" --to /tmp/migrated.raw --rate 2M 2>&1 | sed 's/^/SMOKE /' || exit 1
timeout 600 qemu-system-x86_64 {first} 2>&1 | sed -u 's/^/NESTED1 /'
$L status "$dev" | sed 's/^/SMOKE after boot 1: /'
$L status "$dev" | grep -q "migration to .*: copying" && echo "SMOKE boot 1 ended while the copy was running"
i=0
until $L status "$dev" | grep -q "migration to .*: migrated"; do
    i=$((i + 1)); [ $i -gt 900 ] && {{ echo "SMOKE migration did not complete"; exit 1; }}
    sleep 1
done
$L status "$dev" | sed 's/^/SMOKE migrated: /'
$L unmount "$dev" 2>&1 | sed 's/^/SMOKE /'
timeout 600 qemu-system-x86_64 {second} 2>&1 | sed -u 's/^/NESTED2 /'
"#,
        lm = sh_quote(&p.livemount.display().to_string()),
        store = sh_quote(&store.display().to_string()),
        first = shell_args(&first),
        second = shell_args(&second),
    );
    let opts = crate::vm::VmOptions {
        timeout: Duration::from_secs(2400),
        stream: verbose(),
        ..crate::vm::VmOptions::default()
    };
    eprintln!(
        "bench-boot --smoke-migrate: boot from the live mount while it migrates to a raw file, then boot from that file (nested TCG)"
    );
    let r = crate::vm::run_in_vm(&script, &opts)?;
    let (mut m1, mut m2, mut found) = (None, None, None);
    for l in r.log.lines() {
        if let Some(x) = l.strip_prefix("SMOKE ") {
            println!("  {x}");
        }
        if l.contains("@@LMBOOT-MARKER") {
            let m = super::qemu::parse_marker(l);
            if l.starts_with("NESTED1") {
                m1 = m;
            } else if l.starts_with("NESTED2") {
                m2 = m;
            }
        }
        if l.starts_with("NESTED2") && l.contains("@@LMBOOT-STAMP") {
            found = l
                .split("found=")
                .nth(1)
                .map(|f| f.split(' ').next().unwrap_or("").to_string());
        }
    }
    let tail = || {
        let lines: Vec<&str> = r.log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    if m1.is_none() {
        bail!(
            "smoke-migrate: the first boot (live mount) printed no marker; console tail:\n{}",
            tail()
        );
    }
    if m2.is_none() {
        bail!("smoke-migrate: the boot from the migrated raw file printed no marker; console tail:\n{}", tail());
    }
    // The first boot's writes (its stamp among them) must have happened while the
    // copy ran, or this would only test a finished migration.
    if !r
        .log
        .contains("SMOKE boot 1 ended while the copy was running")
    {
        bail!("smoke-migrate: the migration finished before the first boot did; its writes did not race the copy (lower --rate)");
    }
    if found.as_deref() != Some("first-boot-7f3a") {
        bail!(
            "smoke-migrate: the boot from the migrated file found stamp {found:?}, not the one the first boot wrote"
        );
    }
    println!("smoke-migrate passed: booted from the live mount while it migrated, then from the migrated raw file, which holds the first boot's write");
    Ok(())
}
