//! The bootable Debian image and the boot initramfs, built once and cached in
//! `.cache/boot/`.
//!
//! - `root/`: `debootstrap --variant=minbase --include=systemd-sysv,udev,kmod,e2fsprogs
//!   bookworm` from the machine's own Debian mirror (~70 s, 263 MB), redone only when
//!   the debootstrap recipe changes (`root.key`).
//! - `debian.img`: 1 GiB ext4 made with `mkfs.ext4 -d` from that tree after adding the
//!   boot marker (a oneshot unit after multi-user.target), a fixed hostname and
//!   machine-id, multi-user as the default target, and the backports kernel's disk
//!   modules (virtio_blk, ext4 and its dependencies) under /lib/modules. Rebuilt when
//!   `debian.key` (hash of the recipe, marker files, kernel version) changes.
//! - `initramfs.img`: static busybox, `init.sh` and the decompressed modules it
//!   loads (busybox insmod cannot read .ko.xz). Rebuilt when `initramfs.key` changes.

use crate::util::{cache_dir, run};
use crate::vm::kit::Cpio;
use anyhow::{bail, Context, Result};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The Debian release and debootstrap arguments of the image (part of the keys).
const SUITE: &str = "bookworm";
const DEBOOTSTRAP_ARGS: &[&str] = &[
    "--variant=minbase",
    "--include=systemd-sysv,udev,kmod,e2fsprogs",
];
/// Bump when the customisation below changes in a way the hashed inputs miss.
const RECIPE_VERSION: &str = "boot-image-1";
/// Size of the image.
pub const IMAGE_SIZE: u64 = 1 << 30;
/// Fixed file system UUID and machine-id: every build boots the same way.
const FS_UUID: &str = "6c6d6f75-6e74-4465-6269-616e2d313200";
const MACHINE_ID: &str = "6c6d6f756e7464656269616e626f6f74";
const HOSTNAME: &str = "lmdebian";

const MARKER_SH: &str = include_str!("marker.sh");
const MARKER_SERVICE: &str = include_str!("marker.service");
const INIT_SH: &str = include_str!("init.sh");

/// Modules a root on a virtio disk needs (virtio_pci is built in). crc32c is a soft
/// dependency of ext4/jbd2 (metadata checksums), not in modules.dep.
pub const DISK_MODULES: &[&str] = &["virtio_blk", "crc32c_generic", "ext4"];
/// More modules for the image only: systemd loads autofs4 at startup.
const IMAGE_EXTRA_MODULES: &[&str] = &["autofs4"];
/// Modules the test-VM mode adds: the host root over 9p with an overlay, ublk, and
/// loop (the local-image baseline).
pub const VM_MODULES: &[&str] = &["9pnet_virtio", "9p", "overlay", "ublk_drv", "loop"];

/// `.cache/boot`.
pub fn boot_dir() -> PathBuf {
    cache_dir().join("boot")
}

/// Serialise image builds between processes working in the same tree.
pub fn lock() -> Result<fs::File> {
    let dir = boot_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let f = fs::File::create(dir.join("boot.lock"))?;
    f.lock().context("locking .cache/boot/boot.lock")?;
    Ok(f)
}

use crate::vm::kit::{debian_mirror, fnv1a};

/// The cached image.
#[derive(Clone, Debug)]
pub struct Image {
    pub path: PathBuf,
    /// The recipe hash it was built from.
    pub key: String,
    pub kver: String,
}

/// Build `.cache/boot/debian.img` unless it is there with the current key.
pub fn ensure_image() -> Result<Image> {
    let _lock = lock()?;
    let (_, moddir, kver) = crate::vm::kernel_paths()?;
    let dir = boot_dir();
    let img = dir.join("debian.img");
    let key = format!(
        "{RECIPE_VERSION} {:016x} kver={kver} size={IMAGE_SIZE} modules={}",
        fnv1a(
            format!(
                "{}\n{MARKER_SH}\n{MARKER_SERVICE}\n{FS_UUID} {MACHINE_ID} {HOSTNAME}",
                root_key()
            )
            .as_bytes()
        ),
        [DISK_MODULES, IMAGE_EXTRA_MODULES].concat().join(",")
    );
    let key_file = dir.join("debian.key");
    if img.exists() && fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str()) {
        return Ok(Image {
            path: img,
            key,
            kver,
        });
    }
    let t0 = Instant::now();
    let root = debootstrap_tree()?;
    customize(&root, &moddir, &kver)?;
    eprintln!(
        "boot image: mkfs.ext4 -d {} into a {} MiB image",
        root.display(),
        IMAGE_SIZE >> 20
    );
    let tmp = dir.join("debian.img.tmp");
    let _ = fs::remove_file(&tmp);
    fs::File::create(&tmp)?.set_len(IMAGE_SIZE)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "lmdebian", "-U", FS_UUID, "-d"])
        .arg(&root)
        .arg(&tmp))?;
    run(Command::new("e2fsck").args(["-fn"]).arg(&tmp))?;
    fs::rename(&tmp, &img)?;
    fs::write(&key_file, &key)?;
    eprintln!(
        "boot image: {} built in {:.0} s",
        img.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(Image {
        path: img,
        key,
        kver,
    })
}

fn root_key() -> String {
    format!("{SUITE} {}", DEBOOTSTRAP_ARGS.join(" "))
}

/// `.cache/boot/root`, debootstrapped once (again when the recipe changes).
fn debootstrap_tree() -> Result<PathBuf> {
    let dir = boot_dir();
    let root = dir.join("root");
    let key_file = dir.join("root.key");
    let key = root_key();
    if root.join("sbin/init").exists()
        && fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str())
    {
        return Ok(root);
    }
    if !crate::util::is_root() {
        bail!("building the boot image needs root (debootstrap, device nodes)");
    }
    crate::setup::apt_install(&[("debootstrap", "debootstrap")])?;
    let tmp = dir.join("root.tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    let mirror = debian_mirror();
    eprintln!(
        "boot image: debootstrap {} {SUITE} from {mirror} (once, ~1-2 min)",
        DEBOOTSTRAP_ARGS.join(" ")
    );
    let log = dir.join("debootstrap.log");
    let out = Command::new("debootstrap")
        .args(DEBOOTSTRAP_ARGS)
        .arg(SUITE)
        .arg(&tmp)
        .arg(&mirror)
        .output()
        .context("running debootstrap")?;
    fs::write(
        &log,
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    )?;
    if !out.status.success() {
        bail!(
            "debootstrap failed ({}); log in {}",
            out.status,
            log.display()
        );
    }
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    fs::rename(&tmp, &root)?;
    fs::write(&key_file, key)?;
    Ok(root)
}

fn write(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn relink(target: &str, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        fs::remove_file(link)?;
    }
    if let Some(d) = link.parent() {
        fs::create_dir_all(d)?;
    }
    symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

/// Marker unit, identity, default target and kernel modules (idempotent: every
/// file is rewritten).
fn customize(root: &Path, moddir: &Path, kver: &str) -> Result<()> {
    write(
        &root.join("usr/local/sbin/lm-boot-marker"),
        MARKER_SH,
        0o755,
    )?;
    write(
        &root.join("etc/systemd/system/lm-boot-marker.service"),
        MARKER_SERVICE,
        0o644,
    )?;
    relink(
        "/etc/systemd/system/lm-boot-marker.service",
        &root.join("etc/systemd/system/multi-user.target.wants/lm-boot-marker.service"),
    )?;
    relink(
        "/lib/systemd/system/multi-user.target",
        &root.join("etc/systemd/system/default.target"),
    )?;
    write(&root.join("etc/hostname"), &format!("{HOSTNAME}\n"), 0o644)?;
    write(
        &root.join("etc/machine-id"),
        &format!("{MACHINE_ID}\n"),
        0o444,
    )?;
    // The kernel's disk modules, so `modprobe ext4` & co work in the booted system
    // (the initramfs loads them before the switch; this keeps the root consistent).
    let mods = root.join("usr/lib/modules");
    if mods.exists() {
        fs::remove_dir_all(&mods)?;
    }
    let dest = mods.join(kver);
    let wanted: Vec<&str> = DISK_MODULES
        .iter()
        .chain(IMAGE_EXTRA_MODULES)
        .copied()
        .collect();
    for (_, path) in module_order(moddir, &wanted)? {
        let rel = path.strip_prefix(moddir)?;
        let to = dest.join(rel);
        fs::create_dir_all(to.parent().context("module path")?)?;
        fs::copy(&path, &to).with_context(|| format!("copying {}", path.display()))?;
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if moddir.join(f).exists() {
            fs::copy(moddir.join(f), dest.join(f))?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(root).arg(kver))?;
    Ok(())
}

/// Modules to insmod for `wanted`, dependencies first, as (name, path of .ko[.xz]);
/// built-in modules are skipped.
pub fn module_order(moddir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let dep = fs::read_to_string(moddir.join("modules.dep")).context("reading modules.dep")?;
    let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| {
        let base = path.rsplit('/').next().unwrap_or(path);
        base.split(".ko").next().unwrap_or(base).replace('-', "_")
    };
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in dep.lines() {
        if let Some((m, rest)) = line.split_once(':') {
            let list = rest.split_whitespace().map(str::to_owned).collect();
            deps.insert(name_of(m), (m.to_owned(), list));
        }
    }
    let builtin: HashSet<String> = builtin.lines().map(name_of).collect();
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    // modules.dep lists the whole closure with the deepest dependency last, so
    // walking it backwards loads dependencies first.
    for w in wanted {
        let w = w.replace('-', "_");
        if builtin.contains(&w) {
            continue;
        }
        let (path, list) = deps
            .get(&w)
            .with_context(|| format!("module {w} is neither in modules.dep nor built in"))?;
        for d in list.iter().rev().chain(std::iter::once(path)) {
            let n = name_of(d);
            if seen.insert(n.clone()) {
                out.push((n, moddir.join(d)));
            }
        }
    }
    Ok(out)
}

/// Build `.cache/boot/initramfs.img` unless its key matches.
pub fn ensure_initramfs() -> Result<PathBuf> {
    let _lock = lock()?;
    let (_, moddir, kver) = crate::vm::kernel_paths()?;
    let busybox = Path::new("/bin/busybox");
    let bb = fs::metadata(busybox).context("/bin/busybox missing (busybox-static)")?;
    let disk = module_order(&moddir, DISK_MODULES)?;
    let vm: Vec<_> = module_order(&moddir, VM_MODULES)?
        .into_iter()
        .filter(|(n, _)| !disk.iter().any(|(d, _)| d == n))
        .collect();
    let names = |v: &[(String, PathBuf)]| {
        v.iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let key = format!(
        "{:016x} kver={kver} busybox={} disk={} vm={}",
        fnv1a(INIT_SH.as_bytes()),
        bb.len(),
        names(&disk),
        names(&vm)
    );
    let img = boot_dir().join("initramfs.img");
    let key_file = boot_dir().join("initramfs.key");
    if img.exists() && fs::read_to_string(&key_file).ok().as_deref() == Some(key.as_str()) {
        return Ok(img);
    }
    let mut cpio = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/mod"] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT_SH.as_bytes());
    cpio.file("bin/busybox", 0o755, &fs::read(busybox)?);
    for (list, order) in [("modules.disk", &disk), ("modules.vm", &vm)] {
        let mut text = String::new();
        for (name, path) in order.iter() {
            let data = crate::vm::kit::module_bytes(path)?;
            cpio.file(&format!("lib/mod/{name}.ko"), 0o644, &data);
            text.push_str(name);
            text.push('\n');
        }
        cpio.file(list, 0o644, text.as_bytes());
    }
    let tmp = img.with_extension("tmp");
    fs::write(&tmp, cpio.finish())?;
    fs::rename(&tmp, &img)?;
    fs::write(&key_file, key)?;
    eprintln!("boot: built {}", img.display());
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_aligned() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"abc");
        let b = c.finish();
        assert_eq!(b.len() % 4, 0);
        assert!(b.starts_with(b"070701"));
    }

    #[test]
    fn module_closure_orders_dependencies_first() {
        let dir = std::env::temp_dir().join(format!("lmboot-mods-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("modules.dep"),
            "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n\
             kernel/fs/jbd2/jbd2.ko.xz:\nkernel/lib/crc16.ko.xz:\nkernel/fs/mbcache.ko.xz:\n",
        )
        .unwrap();
        fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/block/virtio_blk.ko\n",
        )
        .unwrap();
        let order: Vec<String> = module_order(&dir, &["virtio_blk", "ext4", "jbd2"])
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(order, ["jbd2", "mbcache", "crc16", "ext4"]);
        let _ = fs::remove_dir_all(&dir);
    }
}
