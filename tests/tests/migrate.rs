//! `livemount migrate` through the library (the ublk end to end is in ublk.rs): a
//! live mount's stack copied into a local file while it is read and written, then
//! served from that file alone, with the store gone.

use livemount::config::MountConfig;
use livemount::stack::Stack;
use livemount_store::ops::backup::{backup, BackupOptions};
use livemount_store::ops::restore::restore;
use livemount_store::progress::NoProgress;
use livemount_store::store::{Access, Store};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|i| {
            if (i / 65536) % 4 == 0 {
                0
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
        })
        .collect()
}

/// A store with one snapshot of `size` bytes (64 KiB chunks: many regions), and a
/// mount of it with an overlay.
fn mounted(dir: &Path, size: usize) -> (Vec<u8>, Stack) {
    let src = dir.join("disk.img");
    let data = image(size, 1);
    std::fs::write(&src, &data).unwrap();
    let store = Store::open(dir.join("store"), Access::Write).unwrap();
    backup(
        &store,
        &src,
        &BackupOptions {
            series: "vm".into(),
            chunk_size: Some(65536),
            level: 1,
            threads: 2,
        },
        &NoProgress,
    )
    .unwrap();
    let mut c = MountConfig::new(
        dir.join("store").as_path().into(),
        "vm".into(),
        Some(dir.join("ov")),
    );
    c.cache_mem = MIB;
    c.prestage = "none".into();
    (data, Stack::open(&c).unwrap())
}

fn wait_state(stack: &Stack, state: &str, limit: Duration) {
    let t = Instant::now();
    loop {
        let r = stack.migrating.report().expect("a migration");
        if r.state == state {
            return;
        }
        assert!(r.state != "failed", "{r:?}");
        assert!(t.elapsed() < limit, "not {state} after {limit:?}: {r:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_idle_mount_migrates_to_exactly_what_restore_writes() {
    let d = tempfile::tempdir().unwrap();
    let (_, stack) = mounted(d.path(), 6 * MIB as usize + 4096);
    let target = d.path().join("vm.raw");
    stack.migrate(&target, 0).unwrap();
    wait_state(&stack, "migrated", Duration::from_secs(60));
    let r = stack.migrating.report().unwrap();
    assert_eq!(
        (r.copied_bytes, r.regions_left),
        (r.total_bytes, 0),
        "{r:?}"
    );
    let store = Store::open(d.path().join("store"), Access::ReadOnly).unwrap();
    let restored = d.path().join("restored.raw");
    restore(
        &store,
        &store.resolve("vm").unwrap(),
        &restored,
        false,
        2,
        &NoProgress,
    )
    .unwrap();
    assert!(
        std::fs::read(&target).unwrap() == std::fs::read(&restored).unwrap(),
        "TARGET differs from restore of the snapshot"
    );
    // Zero regions are holes in TARGET.
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(used < 6 * MIB, "{used} bytes allocated");
    // A second migration of the same device is refused.
    let e = stack
        .migrate(&d.path().join("other.raw"), 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("already migrating") || e.contains("migrat"),
        "{e}"
    );
}

#[test]
fn writes_during_migration_land_in_target_and_the_store_can_go_away() {
    let d = tempfile::tempdir().unwrap();
    let size = 8 * MIB as usize;
    let (mut shown, stack) = mounted(d.path(), size);
    let target = d.path().join("vm.raw");
    // Slow enough that the writes below overlap the copy.
    stack.migrate(&target, 4 * MIB).unwrap();
    let mut i = 0u64;
    while stack
        .migrating
        .report()
        .is_some_and(|r| r.state != "migrated")
    {
        let at = (i * 7919 * 4096) % (size as u64 - 8192);
        let v = (i % 250) as u8 + 1;
        stack.top.write_at(at, &[v; 8192]).unwrap();
        shown[at as usize..at as usize + 8192].fill(v);
        if i.is_multiple_of(16) {
            stack.top.flush().unwrap();
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        i > 50,
        "the copy ended before the writes could race it ({i})"
    );
    // The snapshot with every write applied is what TARGET holds.
    let t = std::fs::read(&target).unwrap();
    let bad: Vec<usize> = (0..size / 4096)
        .filter(|&b| t[b * 4096..(b + 1) * 4096] != shown[b * 4096..(b + 1) * 4096])
        .collect();
    assert!(
        bad.is_empty(),
        "TARGET differs from the device in 4 KiB blocks {bad:?}"
    );
    // The store goes away: the device keeps serving reads and writes from TARGET.
    std::fs::rename(d.path().join("store"), d.path().join("store.gone")).unwrap();
    let mut buf = vec![0u8; size];
    stack.top.read_at(0, &mut buf).unwrap();
    assert!(buf == shown);
    stack.top.write_at(4096, &[0xfe; 4096]).unwrap();
    stack.top.flush().unwrap();
    let t = std::fs::read(&target).unwrap();
    assert!(t[4096..8192].iter().all(|&b| b == 0xfe));
}

#[test]
fn a_store_that_goes_away_mid_migration_pauses_it_until_it_returns() {
    let d = tempfile::tempdir().unwrap();
    let size = 8 * MIB as usize;
    let (data, stack) = mounted(d.path(), size);
    let target = d.path().join("vm.raw");
    stack.migrate(&target, 2 * MIB).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    std::fs::rename(d.path().join("store"), d.path().join("store.gone")).unwrap();
    wait_state(&stack, "paused", Duration::from_secs(30));
    let r = stack.migrating.report().unwrap();
    assert!(
        r.error.as_deref().unwrap_or("").contains("retrying"),
        "{r:?}"
    );
    assert!(r.regions_left > 0, "{r:?}");
    std::fs::rename(d.path().join("store.gone"), d.path().join("store")).unwrap();
    wait_state(&stack, "migrated", Duration::from_secs(90));
    assert!(std::fs::read(&target).unwrap() == data);
}

#[test]
fn bad_targets_get_one_clear_error_and_nothing_is_touched() {
    let d = tempfile::tempdir().unwrap();
    let (_, stack) = mounted(d.path(), 2 * MIB as usize);
    let e = stack
        .migrate(&d.path().join("ov"), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlay"), "{e}");
    let precious = d.path().join("precious.raw");
    std::fs::write(&precious, b"keep me").unwrap();
    let e = stack.migrate(&precious, 0).unwrap_err().to_string();
    assert!(e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    let e = stack
        .migrate(&d.path().join("missing-dir/vm.raw"), 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing-dir"), "{e}");
    assert!(stack.migrating.report().is_none());
}

/// A TARGET on a file system without room for the disk's data is refused before
/// anything is written (a real tmpfs of 1 MiB; root only), and one on a read-only
/// file system with the system's reason.
#[test]
fn a_target_on_a_full_file_system_is_refused_up_front() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP a_target_on_a_full_file_system_is_refused_up_front: needs root to mount a small tmpfs");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (_, stack) = mounted(d.path(), 4 * MIB as usize);
    let small = d.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let e = stack
        .migrate(&small.join("vm.raw"), 0)
        .unwrap_err()
        .to_string();
    let listed = std::fs::read_dir(&small).unwrap().count();
    // The same file system, roomy but read-only: not writable.
    let ro = std::process::Command::new("mount")
        .args(["-o", "remount,ro,size=64m"])
        .arg(&small)
        .status()
        .unwrap();
    let e_ro = stack
        .migrate(&small.join("vm.raw"), 0)
        .unwrap_err()
        .to_string();
    let _ = std::process::Command::new("umount").arg(&small).status();
    assert!(ro.success(), "remount read-only");
    assert!(
        e_ro.contains("vm.raw") && e_ro.contains("Read-only"),
        "{e_ro}"
    );
    assert!(e.contains("free") && e.contains("small"), "{e}");
    assert_eq!(listed, 0, "files were created on the full file system");
    assert!(stack.migrating.report().is_none());
}

/// A mount whose migration is complete needs nothing but TARGET: when its daemon
/// dies and the store is gone, `mount --recover` (Stack::open of the saved
/// configuration) serves TARGET alone, writable; one not yet complete refuses.
#[test]
fn a_migrated_mount_reopens_from_target_alone_without_the_store() {
    let d = tempfile::tempdir().unwrap();
    let size = 4 * MIB as usize;
    let (mut want, stack) = mounted(d.path(), size);
    let target = d.path().join("vm.raw");
    stack.migrate(&target, 0).unwrap();
    wait_state(&stack, "migrated", Duration::from_secs(60));
    stack.top.write_at(65536, &[0x42; 4096]).unwrap();
    stack.top.flush().unwrap();
    want[65536..65536 + 4096].fill(0x42);
    let mut saved = stack.config.clone();
    saved.migration = stack.migrating.config();
    assert!(saved.migration.is_some());
    drop(stack); // the daemon dies
    std::fs::rename(d.path().join("store"), d.path().join("store.gone")).unwrap();
    let s = Stack::open(&saved).unwrap();
    assert!(s.migrating.migrated());
    assert!(!s.top.read_only());
    let mut got = vec![0u8; size];
    s.top.read_at(0, &mut got).unwrap();
    assert!(got == want, "the reopened device differs");
    s.top.write_at(0, &[0x43; 512]).unwrap();
    s.top.flush().unwrap();
    assert!(std::fs::read(&target).unwrap()[..512] == [0x43; 512]);
    drop(s);
    // A migration that is not complete cannot stand in for the store.
    let map = saved.migration.as_ref().unwrap().map.clone();
    let mut m = std::fs::read(&map).unwrap();
    m[72] = 0;
    let crc = crc32c::crc32c(&m[..4092]);
    m[4092..4096].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&map, &m).unwrap();
    let e = Stack::open(&saved)
        .err()
        .expect("no store, no complete migration")
        .to_string();
    assert!(e.contains("store"), "{e}");
}

/// A complete map whose TARGET cannot be served: a recovery fails with an error
/// naming TARGET instead of serving anything. Cut short, its tail would be padded
/// with zeros; removed, it would be copied again from below, which lacks every
/// write since the migration completed (those went to TARGET alone).
#[test]
fn a_complete_map_without_its_target_is_refused_not_served() {
    let d = tempfile::tempdir().unwrap();
    let size = 2 * MIB as usize;
    let (_, stack) = mounted(d.path(), size);
    let target = d.path().join("vm.raw");
    stack.migrate(&target, 0).unwrap();
    wait_state(&stack, "migrated", Duration::from_secs(60));
    stack.top.write_at(0, &[0x42; 4096]).unwrap(); // TARGET alone has it
    stack.top.flush().unwrap();
    let mut saved = stack.config.clone();
    saved.migration = stack.migrating.config();
    drop(stack);
    let gone = d.path().join("store.gone");
    std::fs::rename(d.path().join("store"), &gone).unwrap();
    // Cut short, the store gone: refused, and left as it is.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    f.set_len(MIB).unwrap();
    drop(f);
    let e = Stack::open(&saved)
        .err()
        .expect("a truncated TARGET was served")
        .to_string();
    assert!(e.contains("vm.raw") && e.contains("truncated"), "{e}");
    assert_eq!(std::fs::metadata(&target).unwrap().len(), MIB);
    // Removed, the store back: refused too, and not recreated.
    std::fs::rename(&gone, d.path().join("store")).unwrap();
    std::fs::remove_file(&target).unwrap();
    let e = Stack::open(&saved)
        .err()
        .expect("a removed TARGET was copied again from below")
        .to_string();
    assert!(e.contains("vm.raw") && e.contains("missing"), "{e}");
    assert!(
        !target.exists(),
        "an empty TARGET was left as if it were the disk"
    );
}
