//! The VM test kit on the host: Debian packages (qemu from backports), the backports
//! kernel unpacked into the cache, and the busybox initramfs.
//!
//! Nothing here touches /boot, /lib/modules or /etc/apt: apt runs with a private
//! state directory (`.cache/vm/apt`) whose sources are the machine's own plus
//! `<codename>-backports` on the machine's own Debian mirror.

use crate::util::{cache_dir, is_root, run};
use anyhow::{bail, Context, Result};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The stage-1 init script packed into the initramfs as `/init`.
const INIT_SCRIPT: &str = include_str!("init.sh");

/// Modules stage 1 loads (with their dependencies, in order) before it can mount the
/// host root: 9p over virtio and overlayfs. virtio_pci is built into the kernel.
const INITRAMFS_MODULES: &[&str] = &["9pnet_virtio", "9p", "overlay"];

/// Packages from the machine's own release (package, why).
const PACKAGES: &[(&str, &str)] = &[
    ("busybox-static", "the initramfs"),
    ("kmod", "depmod and the guest's modprobe"),
    ("cpio", "initramfs tooling for the boot demo"),
    (
        "xz-utils",
        "decompressing kernel modules for busybox insmod",
    ),
    ("fio", "benchmarks"),
    ("libclang-dev", "bindgen in libublk's build"),
    ("e2fsprogs", "mkfs.ext4 in tests"),
    ("zstd", "extracting the kernel for a PVH boot"),
];

/// qemu comes from backports: bookworm's 7.2 conflicts with the installed qemu-utils 10.
const QEMU_PACKAGE: &str = "qemu-system-x86";
/// Oldest qemu major accepted as "installed from backports".
const QEMU_MIN_MAJOR: u32 = 8;

/// `.cache/vm`.
pub fn vm_dir() -> PathBuf {
    cache_dir().join("vm")
}

fn kernel_root() -> PathBuf {
    vm_dir().join("kernel")
}

/// The initramfs built by [`setup`].
pub fn initramfs_path() -> PathBuf {
    vm_dir().join("initramfs.img")
}

/// (vmlinuz, modules dir `.../lib/modules/<kver>`, kver) of the unpacked backports kernel.
pub fn kernel_paths() -> Result<(PathBuf, PathBuf, String)> {
    let root = kernel_root();
    let stamp = root.join("kver");
    let kver = fs::read_to_string(&stamp)
        .map(|s| s.trim().to_owned())
        .map_err(|_| {
            anyhow::anyhow!(
                "the VM kernel is not unpacked ({} missing): run `cargo xtask setup`",
                stamp.display()
            )
        })?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{kver}"));
    let modules = root.join("lib/modules").join(&kver);
    for p in [&vmlinuz, &modules.join("modules.dep")] {
        if !p.exists() {
            bail!(
                "VM kernel incomplete ({} missing): delete {} and run `cargo xtask setup`",
                p.display(),
                root.display()
            );
        }
    }
    Ok((vmlinuz, modules, kver))
}

/// Install/fetch/build whatever is missing; seconds when everything is present.
pub fn setup() -> Result<()> {
    let t0 = Instant::now();
    let dir = vm_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Several people (and CI) may run setup at once in the same tree.
    let lock = fs::File::create(dir.join("setup.lock"))?;
    lock.lock().context("locking .cache/vm/setup.lock")?;

    let mut apt = Apt::new()?;
    let qemu = packages(&mut apt)?;
    let kver = kernel(&mut apt)?;
    let pvh = pvh_vmlinux()?;
    let initramfs = initramfs()?;
    eprintln!(
        "vm setup: ok in {:.2} s (qemu {qemu}, kernel {kver}{}, initramfs {initramfs})",
        t0.elapsed().as_secs_f64(),
        if pvh.is_some() { " + PVH vmlinux" } else { "" }
    );
    Ok(())
}

/// apt with a private state dir whose sources add `<codename>-backports`.
struct Apt {
    dir: PathBuf,
    backports: String,
    updated: bool,
}

impl Apt {
    fn new() -> Result<Apt> {
        let dir = vm_dir().join("apt");
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let codename = os_codename();
        let backports = format!("{codename}-backports");
        let line = format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {backports} main\n",
            debian_mirror()
        );
        let list = dir.join("sources.list");
        if fs::read_to_string(&list).ok().as_deref() != Some(line.as_str()) {
            fs::write(&list, line)?;
        }
        Ok(Apt {
            dir,
            backports,
            updated: false,
        })
    }

    /// The -o options that point apt at the private state (the machine's own
    /// sources.list.d parts still apply, so the lists hold both releases).
    fn opts(&self) -> Vec<String> {
        let d = self.dir.display();
        vec![
            "-o".into(),
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "-o".into(),
            format!("Dir::State::Lists={d}/lists"),
            "-o".into(),
            format!("Dir::Cache={d}/cache"),
            "-o".into(),
            "APT::Sandbox::User=root".into(),
        ]
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(prog);
        c.env("DEBIAN_FRONTEND", "noninteractive").args(self.opts());
        c
    }

    fn update(&mut self) -> Result<()> {
        if !self.updated {
            eprintln!(
                "vm setup: refreshing package lists (private apt dir {})",
                self.dir.display()
            );
            run(self.cmd("apt-get").args(["update", "-q"]))?;
            self.updated = true;
        }
        Ok(())
    }

    fn shell_line(&self, args: &str) -> String {
        format!("apt-get {} {args}", self.opts().join(" "))
    }
}

fn os_codename() -> String {
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|v| v.trim_matches('"').to_owned())
            })
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "bookworm".into())
}

/// The machine's own Debian mirror (deb822 or one-line sources), else deb.debian.org.
pub(crate) fn debian_mirror() -> String {
    let deb822 = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    if let Some(uri) = deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next())
    {
        return uri.to_owned();
    }
    let classic = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    for l in classic.lines() {
        let mut w = l.split_whitespace().filter(|w| !w.starts_with('['));
        if w.next() == Some("deb") {
            if let Some(uri) = w.next() {
                if uri.contains("debian") && !uri.contains("security") {
                    return uri.to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// Installed version of each package (None when not installed).
fn dpkg_versions(pkgs: &[&str]) -> Vec<Option<String>> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${db:Status-Abbrev} ${Version}\n"])
        .args(pkgs)
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    pkgs.iter()
        .map(|p| {
            text.lines().find_map(|l| {
                let mut w = l.split_whitespace();
                let name = w.next()?.split(':').next()?;
                let status = w.next()?;
                let version = w.next()?;
                (name == *p && status.starts_with("ii")).then(|| version.to_owned())
            })
        })
        .collect()
}

/// Major version of a Debian qemu version string such as `1:10.0.2+ds-2+deb13u1~bpo12+1`.
fn qemu_major(version: &str) -> Option<u32> {
    let v = version.split_once(':').map_or(version, |(_, v)| v);
    v.split('.').next()?.parse().ok()
}

/// Host packages; returns the qemu version.
fn packages(apt: &mut Apt) -> Result<String> {
    let names: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).collect();
    let missing: Vec<&str> = names
        .iter()
        .zip(dpkg_versions(&names))
        .filter(|(_, v)| v.is_none())
        .map(|(p, _)| *p)
        .collect();
    let qemu = dpkg_versions(&[QEMU_PACKAGE]).pop().flatten();
    let qemu_ok = qemu
        .as_deref()
        .and_then(qemu_major)
        .is_some_and(|m| m >= QEMU_MIN_MAJOR);
    if missing.is_empty() && qemu_ok {
        return Ok(qemu.unwrap_or_default());
    }
    let install = format!(
        "install -y -q --no-install-recommends --no-remove {}",
        missing.join(" ")
    );
    let install_qemu = format!(
        "install -y -q --no-install-recommends --no-remove -t {} {QEMU_PACKAGE}",
        apt.backports
    );
    if !is_root() {
        let mut msg = String::from(
            "the VM test kit needs Debian packages; run `cargo xtask setup` as root, or as root:\n",
        );
        let _ = writeln!(msg, "  {}", apt.shell_line("update"));
        if !missing.is_empty() {
            let _ = writeln!(msg, "  {}", apt.shell_line(&install));
        }
        if !qemu_ok {
            let _ = writeln!(msg, "  {}", apt.shell_line(&install_qemu));
        }
        bail!("{msg}");
    }
    apt.update()?;
    if !missing.is_empty() {
        eprintln!("vm setup: installing {}", missing.join(" "));
        run(apt.cmd("apt-get").args(install.split_whitespace()))?;
    }
    if !qemu_ok {
        eprintln!(
            "vm setup: installing {QEMU_PACKAGE} from {} (found {})",
            apt.backports,
            qemu.as_deref().unwrap_or("none")
        );
        run(apt.cmd("apt-get").args(install_qemu.split_whitespace()))?;
    }
    // The downloaded .debs are not needed again.
    let _ = run(apt.cmd("apt-get").arg("clean"));
    let qemu = dpkg_versions(&[QEMU_PACKAGE]).pop().flatten();
    match qemu.as_deref().and_then(qemu_major) {
        Some(m) if m >= QEMU_MIN_MAJOR => Ok(qemu.unwrap_or_default()),
        _ => {
            bail!("{QEMU_PACKAGE} >= {QEMU_MIN_MAJOR} not installed after apt-get (found {qemu:?})")
        }
    }
}

/// The backports kernel, unpacked into `.cache/vm/kernel` and depmod'd; returns kver.
fn kernel(apt: &mut Apt) -> Result<String> {
    if let Ok((_, _, kver)) = kernel_paths() {
        return Ok(kver);
    }
    let root = kernel_root();
    eprintln!(
        "vm setup: fetching the {} kernel into {}",
        apt.backports,
        root.display()
    );
    apt.update()?;
    // Resolve through the metapackage: backports versions get replaced.
    let out = apt
        .cmd("apt-cache")
        .args(["-t", &apt.backports, "depends", "linux-image-amd64"])
        .output()
        .context("running apt-cache")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pkg = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| {
            p.starts_with("linux-image-") && p.as_bytes().get(12).is_some_and(u8::is_ascii_digit)
        })
        .with_context(|| {
            format!("no linux-image-<version> in `apt-cache depends linux-image-amd64`:\n{text}")
        })?
        .to_owned();
    let debs = apt.dir.join("debs");
    for e in fs::read_dir(&debs)? {
        fs::remove_file(e?.path())?;
    }
    run(apt
        .cmd("apt-get")
        .args(["download", "-q", &pkg])
        .current_dir(&debs))?;
    let deb = fs::read_dir(&debs)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {pkg} left no .deb in {}", debs.display()))?;
    let tmp = vm_dir().join("kernel.tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let kver = fs::read_dir(tmp.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .context("the kernel package has no lib/modules/<kver>")?;
    run(Command::new("depmod").arg("-b").arg(&tmp).arg(&kver))?;
    let ublk = tmp
        .join("lib/modules")
        .join(&kver)
        .join("kernel/drivers/block/ublk_drv.ko.xz");
    if !ublk.exists() {
        bail!("{pkg} has no ublk_drv module ({} missing)", ublk.display());
    }
    fs::write(tmp.join("kver"), format!("{kver}\n"))?;
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::rename(&tmp, &root)?;
    fs::remove_file(&deb)?;
    Ok(kver)
}

/// Where [`pvh_vmlinux`] puts the uncompressed kernel.
pub fn vmlinux_path(kver: &str) -> PathBuf {
    kernel_root().join("boot").join(format!("vmlinux-{kver}"))
}

/// The uncompressed kernel next to the bzImage, for a direct PVH boot (qemu loads
/// the ELF and skips the real-mode setup and the decompression under TCG: about a
/// second a boot). None when the kernel is not zstd-compressed or lacks PVH.
fn pvh_vmlinux() -> Result<Option<PathBuf>> {
    let (vmlinuz, _, kver) = kernel_paths()?;
    let out = vmlinux_path(&kver);
    if out.exists() {
        return Ok(Some(out));
    }
    let config = fs::read_to_string(kernel_root().join("boot").join(format!("config-{kver}")))
        .unwrap_or_default();
    if !config.lines().any(|l| l == "CONFIG_PVH=y")
        || !config.lines().any(|l| l == "CONFIG_KERNEL_ZSTD=y")
    {
        return Ok(None);
    }
    let img = fs::read(&vmlinuz)?;
    let u32_at = |off: usize| -> Option<usize> {
        img.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    // bzImage setup header: setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c,
    // relative to the protected-mode code after the (setup_sects + 1) * 512 setup.
    let setup_sects = match img.get(0x1f1) {
        Some(0) => 4,
        Some(n) => usize::from(*n),
        None => return Ok(None),
    };
    let (Some(off), Some(len)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Ok(None);
    };
    let start = (setup_sects + 1) * 512 + off;
    // The kernel appends the uncompressed size (4 bytes) after the zstd frame.
    let Some(payload) = img.get(start..start + len.saturating_sub(4)) else {
        return Ok(None);
    };
    if !payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Ok(None);
    }
    eprintln!(
        "vm setup: extracting the uncompressed kernel for PVH boot into {}",
        out.display()
    );
    let mut child = Command::new("zstd")
        .args(["-dc", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running zstd")?;
    let mut stdin = child.stdin.take().context("zstd stdin")?;
    let data = payload.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let res = child.wait_with_output()?;
    let _ = writer.join();
    if !res.status.success() || !res.stdout.starts_with(b"\x7fELF") {
        eprintln!(
            "vm setup: could not extract vmlinux (zstd {}); booting the bzImage",
            res.status
        );
        return Ok(None);
    }
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &res.stdout)?;
    fs::rename(&tmp, &out)?;
    Ok(Some(out))
}

/// Build `.cache/vm/initramfs.img` unless its stored key (init script, modules,
/// kernel, busybox) still matches. Returns "up to date" or "built".
fn initramfs() -> Result<&'static str> {
    let (_, moddir, kver) = kernel_paths()?;
    let busybox = Path::new("/bin/busybox");
    let bb_meta = fs::metadata(busybox).context("/bin/busybox missing (busybox-static)")?;
    let order = module_order(&moddir, INITRAMFS_MODULES)?;
    let bb_mtime = bb_meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let key = format!(
        "{:016x} kver={kver} busybox={}:{bb_mtime} modules={}",
        fnv1a(INIT_SCRIPT.as_bytes()),
        bb_meta.len(),
        order
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    let img = initramfs_path();
    let key_file = vm_dir().join("initramfs.key");
    if img.exists() && fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str()) {
        return Ok("up to date");
    }
    eprintln!("vm setup: building {}", img.display());
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "mnt", "lib", "lib/mod"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT_SCRIPT.as_bytes());
    cpio.file("bin/busybox", 0o755, &fs::read(busybox)?);
    let mut names = String::new();
    for (name, path) in &order {
        cpio.file(&format!("lib/mod/{name}.ko"), 0o644, &module_bytes(path)?);
        names.push_str(name);
        names.push('\n');
    }
    cpio.file("modules.order", 0o644, names.as_bytes());
    let tmp = img.with_extension("tmp");
    fs::write(&tmp, cpio.finish())?;
    fs::rename(&tmp, &img)?;
    fs::write(&key_file, key)?;
    Ok("built")
}

/// Modules to insmod for `wanted`, dependencies first, as (name, path of .ko[.xz]);
/// built-in modules are skipped.
fn module_order(moddir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let dep = fs::read_to_string(moddir.join("modules.dep")).context("reading modules.dep")?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let norm = |s: &str| s.replace('-', "_");
    let name_of = |path: &str| {
        let base = path.rsplit('/').next().unwrap_or(path);
        norm(base.split(".ko").next().unwrap_or(base))
    };
    let mut deps = std::collections::HashMap::new();
    for line in dep.lines() {
        if let Some((m, rest)) = line.split_once(':') {
            let list: Vec<String> = rest.split_whitespace().map(str::to_owned).collect();
            deps.insert(name_of(m), (m.to_owned(), list));
        }
    }
    let builtin: HashSet<String> = builtin.lines().map(name_of).collect();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        builtin: &HashSet<String>,
        moddir: &Path,
        seen: &mut HashSet<String>,
        out: &mut Vec<(String, PathBuf)>,
        name_of: &dyn Fn(&str) -> String,
    ) -> Result<()> {
        if !seen.insert(name.to_owned()) || builtin.contains(name) {
            return Ok(());
        }
        let (path, list) = deps
            .get(name)
            .with_context(|| format!("module {name} is neither in modules.dep nor built in"))?;
        // modules.dep lists the whole closure; the deepest dependency comes last.
        for d in list.iter().rev() {
            visit(&name_of(d), deps, builtin, moddir, seen, out, name_of)?;
        }
        out.push((name.to_owned(), moddir.join(path)));
        Ok(())
    }
    for w in wanted {
        visit(
            &norm(w),
            &deps,
            &builtin,
            moddir,
            &mut seen,
            &mut out,
            &name_of,
        )?;
    }
    Ok(out)
}

/// 64-bit FNV-1a: a stable content hash for cache keys (initramfs, boot image).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A minimal "newc" cpio writer (no root needed for the device node).
#[derive(Default)]
pub(crate) struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    pub(crate) fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    pub(crate) fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// A kernel module's bytes, decompressed if it is `.ko.xz` (busybox `insmod` cannot
/// read compressed modules).
pub(crate) fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    if path.extension().is_none_or(|e| e != "xz") {
        return fs::read(path).with_context(|| format!("reading {}", path.display()));
    }
    let out = Command::new("xz")
        .arg("-dc")
        .arg(path)
        .output()
        .context("running xz")?;
    if !out.status.success() {
        bail!("xz -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_versions() {
        assert_eq!(qemu_major("1:10.0.2+ds-2+deb13u1~bpo12+1"), Some(10));
        assert_eq!(qemu_major("1:7.2+dfsg-7+deb12u18+b3"), Some(7));
        assert_eq!(qemu_major("garbage"), None);
    }

    #[test]
    fn cpio_is_aligned() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let b = c.finish();
        assert_eq!(b.len() % 4, 0);
        assert!(b.starts_with(b"070701"));
    }
}
