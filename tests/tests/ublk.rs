//! Live mounts against the real kernel ublk driver (issue 3, "Tests against the real
//! kernel driver"). The host kernel has no ublk: these tests print `SKIP` there and run
//! inside the qemu VM of `cargo xtask vm-test` (`LIVEMOUNT_IN_VM=1`, one test at a
//! time). Every daemon is started with `--daemon` and removed by a drop guard; every
//! wait is bounded.
//!
//! One fixture is shared by all tests of the run: a real ext4 image (64 MiB + 1536
//! bytes, made with `mkfs.ext4 -d` from real files) and a small odd-sized image,
//! backed up into a store whose chunk files are stamped (size, mtime, inode) right
//! after the backups; every test checks the store is untouched.

#[path = "ublk_support/mod.rs"]
mod support;

use livemount_store::store::{Access, Store};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::dm;
use support::*;

const MIB: u64 = 1 << 20;

fn tmp(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("lm-{test}-"))
        .tempdir_in("/tmp")
        .unwrap()
}

/// 1. Byte-exact reads of the snapshot against the original image: the whole device
///    (buffered), ~200 random ranges (buffered, any offset and length, many touching
///    the unaligned tail) and ~100 O_DIRECT aligned ranges; an image whose size is not
///    a multiple of 512 reads back with a zero tail.
#[test]
fn ublk_reads_are_byte_exact() {
    if !have_ublk("ublk_reads_are_byte_exact") {
        return;
    }
    let _t = Timer::start("ublk_reads_are_byte_exact");
    let fx = fixture();
    let t = tmp("reads");
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.snap),
            os("--read-only"),
            os("--cache-mem"),
            os("16M"),
        ],
        &t.path().join("m.log"),
    );
    let original = fs::read(&fx.image).unwrap();
    assert_eq!(original.len() as u64, fx.image_size);
    let dev = m.dev.clone();
    let dev_size = tool(
        "blockdev",
        &[os("--getsize64"), os(&dev)],
        Duration::from_secs(10),
    );
    assert_eq!(dev_size.trim(), fx.image_size.to_string());

    // Whole device, buffered.
    let whole = {
        let dev = dev.clone();
        bounded(
            "reading the whole device",
            Duration::from_secs(120),
            move || fs::read(&dev).unwrap(),
        )
    };
    assert_eq!(whole.len(), original.len());
    if let Some(i) = whole.iter().zip(&original).position(|(a, b)| a != b) {
        panic!("device differs from the image at byte {i}");
    }

    // Random buffered reads (fresh page cache: drop it first), then O_DIRECT ones.
    tool(
        "blockdev",
        &[os("--flushbufs"), os(&dev)],
        Duration::from_secs(10),
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let size = fx.image_size;
    let mut ranges: Vec<(u64, usize)> = Vec::new();
    for i in 0..200 {
        let len = match i % 4 {
            0 => rng.gen_range(1..4096),
            1 => rng.gen_range(1..300_000),
            2 => rng.gen_range(1..2 * MIB as usize),
            _ => rng.gen_range(1..8192),
        };
        let off = if i % 5 == 0 {
            // Ranges that end in (or at) the unaligned tail.
            size - rng
                .gen_range(1..=len.min(size as usize) as u64 + 8192)
                .min(size)
        } else {
            rng.gen_range(0..size)
        };
        let len = len.min((size - off) as usize).max(1);
        ranges.push((off, len));
    }
    ranges.push((size - 1536, 1536));
    ranges.push((size - 1, 1));
    ranges.push((size - 4096 - 100, 4096 + 100));
    let (dev2, ranges2) = (dev.clone(), ranges.clone());
    let got = bounded(
        "random buffered reads",
        Duration::from_secs(120),
        move || {
            let f = fs::File::open(&dev2).unwrap();
            ranges2
                .iter()
                .map(|&(off, len)| {
                    let mut b = vec![0u8; len];
                    f.read_exact_at(&mut b, off).map(|_| b)
                })
                .collect::<Vec<_>>()
        },
    );
    for ((off, len), r) in ranges.iter().zip(got) {
        let b = r.unwrap_or_else(|e| panic!("pread of {len} bytes at {off}: {e}"));
        assert!(
            b == original[*off as usize..*off as usize + len],
            "buffered read of {len} bytes at {off} differs from the image"
        );
    }
    let mut direct: Vec<(u64, usize)> = (0..100)
        .map(|_| {
            let len = rng.gen_range(1..=1024usize) * 512;
            let off = rng.gen_range(0..(size - len as u64) / 512) * 512;
            (off, len)
        })
        .collect();
    // The last sectors of the device (the image ends on a 512 boundary, not 4096).
    direct.push((size - 1536, 1536));
    direct.push((size - 512, 512));
    direct.push((size - 64 * 1024 - 1536, 64 * 1024 + 1536));
    let (dev2, d2) = (dev.clone(), direct.clone());
    let got = bounded("O_DIRECT reads", Duration::from_secs(120), move || {
        let f = open_direct(&dev2, false).unwrap();
        d2.iter()
            .map(|&(off, len)| read_direct(&f, off, len))
            .collect::<Vec<_>>()
    });
    for ((off, len), r) in direct.iter().zip(got) {
        let b = r.unwrap_or_else(|e| panic!("O_DIRECT read of {len} bytes at {off}: {e}"));
        assert!(
            b == original[*off as usize..*off as usize + len],
            "O_DIRECT read of {len} bytes at {off} differs from the image"
        );
    }
    let st = m.status();
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(st["config"]["snapshot"], fx.snap.as_str(), "{st}");
    m.unmount();

    // A snapshot of 1 MiB + 700 bytes: the device is 1 MiB + 1024, the padding reads as zeros.
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.odd_snap),
            os("--read-only"),
        ],
        &t.path().join("odd.log"),
    );
    let odd = fs::read(&fx.odd).unwrap();
    let dev = m.dev.clone();
    let got = bounded(
        "reading the odd device",
        Duration::from_secs(60),
        move || fs::read(&dev).unwrap(),
    );
    assert_eq!(got.len(), (1 << 20) + 1024);
    assert!(got[..odd.len()] == odd[..], "odd image differs");
    assert!(got[odd.len()..].iter().all(|&b| b == 0), "padding not zero");
    m.unmount();
    fx.assert_store_untouched();
}

/// Sequential read-ahead with the real kernel: a 24 MiB image of incompressible data
/// (every chunk stored: the fixture's ext4 image is mostly zero chunks, which a
/// reader passes without waiting), a store 50 ms away per request (the gate opens: a
/// request costs more than a quarter of a chunk's decode in this VM, even loaded),
/// the whole device read in order with O_DIRECT 1 MiB reads, byte-exact, and the
/// status shows chunks read ahead of the reader. `--seq-readahead 0` reads nothing
/// ahead.
#[test]
fn ublk_sequential_readahead_is_byte_exact() {
    if !have_ublk("ublk_sequential_readahead_is_byte_exact") {
        return;
    }
    let _t = Timer::start("ublk_sequential_readahead_is_byte_exact");
    let t = tmp("seq-ahead");
    let image = t.path().join("seq.img");
    let original = pattern(0x5e9, 24 << 20);
    write_file(&image, &original);
    let store = t.path().join("store");
    lm(
        &[
            os("backup"),
            image.as_os_str(),
            os("--store"),
            store.as_os_str(),
            os("--name"),
            os("seq"),
        ],
        Duration::from_secs(300),
    )
    .ok();
    for window in ["16M", "0"] {
        let m = mount(
            &[
                os("--store"),
                store.as_os_str(),
                os("seq"),
                os("--read-only"),
                os("--store-latency"),
                os("50ms"),
                os("--seq-readahead"),
                os(window),
            ],
            &t.path().join(format!("m-{window}.log")),
        );
        let dev = m.dev.clone();
        let whole = bounded(
            "reading the device in order",
            Duration::from_secs(300),
            move || {
                let f = open_direct(&dev, false).unwrap();
                let mut out = Vec::with_capacity(24 << 20);
                for off in (0..24u64 << 20).step_by(MIB as usize) {
                    out.extend(read_direct(&f, off, MIB as usize).unwrap());
                }
                out
            },
        );
        assert_eq!(whole.len(), original.len());
        if let Some(i) = whole.iter().zip(&original).position(|(a, b)| a != b) {
            panic!("--seq-readahead {window}: device differs from the image at byte {i}");
        }
        let st = m.status();
        let ahead = st["cache"]["seq_readahead_chunks"].as_u64().unwrap_or(0);
        if window == "0" {
            assert_eq!(ahead, 0, "read ahead with --seq-readahead 0: {st}");
        } else {
            // 24 chunks; the first ones are read before the gate has measurements.
            assert!(ahead >= 8, "only {ahead} chunks read ahead: {st}");
        }
        m.unmount();
    }
}

/// 2. ext4 on a live mount with an overlay: the files match the original tree by
///    checksum; new files written and synced survive umount, fsck, device unmount and a
///    remount with the same overlay.
#[test]
fn ublk_ext4_write_fsck_remount() {
    if !have_ublk("ublk_ext4_write_fsck_remount") {
        return;
    }
    let _t = Timer::start("ublk_ext4_write_fsck_remount");
    let fx = fixture();
    let t = tmp("ext4");
    let ov = t.path().join("web01.overlay");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let m = mount(&args, &t.path().join("m1.log"));
    let mnt = t.path().join("mnt");
    let fsm = FsMount::mount(&m.dev, &mnt, "rw");
    assert_daemon_ns_clean(m.pid(), &m.dev);
    let want = checksums(&fx.tree);
    let got = checksums(&mnt);
    assert_eq!(got.len(), want.len(), "file count differs");
    for (p, s) in &want {
        assert_eq!(got.get(p), Some(s), "checksum of {} differs", p.display());
    }

    // New files: a big one, many small ones, one overwritten original.
    let new_dir = mnt.join("new");
    fs::create_dir(&new_dir).unwrap();
    let big = pattern(1, 6 * MIB as usize + 123);
    write_file(&new_dir.join("big.bin"), &big);
    for i in 0..50u64 {
        write_file(
            &new_dir.join(format!("small-{i}")),
            &pattern(100 + i, (i as usize * 997) % 20000 + 1),
        );
    }
    let (victim, _) = want.iter().next().unwrap();
    write_file(&mnt.join(victim), b"overwritten\n");
    tool("sync", &[], Duration::from_secs(60));
    fsm.umount();
    fsck_clean(&m.dev);
    let ov_before = m.status()["overlay_bytes"].as_u64().unwrap();
    assert!(ov_before > 6 * MIB, "overlay holds only {ov_before} bytes");
    m.unmount();
    assert!(ov.exists(), "the overlay file was removed at unmount");
    // A clean unmount leaves no map mirror behind (a later overlay on the same
    // inode must not inherit its bits). Other tests' mounts run meanwhile: look for
    // this overlay's mirror, named by its device and inode.
    let meta = fs::metadata(&ov).unwrap();
    let mirror =
        Path::new("/run/livemount").join(format!("overlay-{:x}-{}.map", meta.dev(), meta.ino()));
    assert!(
        !mirror.exists(),
        "{} left after a clean unmount",
        mirror.display()
    );
    assert_eq!(
        fs::metadata(&ov).unwrap().mode() & 0o777,
        0o600,
        "overlay mode"
    );

    let m = mount(&args, &t.path().join("m2.log"));
    fsck_clean(&m.dev);
    let fsm = FsMount::mount(&m.dev, &mnt, "ro");
    assert!(fs::read(new_dir.join("big.bin")).unwrap() == big);
    for i in 0..50u64 {
        assert!(
            fs::read(new_dir.join(format!("small-{i}"))).unwrap()
                == pattern(100 + i, (i as usize * 997) % 20000 + 1),
            "small-{i} differs after remount"
        );
    }
    assert_eq!(fs::read(mnt.join(victim)).unwrap(), b"overwritten\n");
    let after = checksums(&mnt);
    for (p, s) in &want {
        if p != victim {
            assert_eq!(after.get(p), Some(s), "{} changed", p.display());
        }
    }
    fsm.umount();
    m.unmount();
    fx.assert_store_untouched();
}

fn fio(dev: &str, extra: &[&str], limit: Duration) -> String {
    let mut a: Vec<&std::ffi::OsStr> = [
        "--name=lmverify",
        "--ioengine=libaio",
        "--direct=1",
        "--rw=randwrite",
        "--bsrange=4k-64k",
        "--iodepth=16",
        "--offset=8M",
        "--size=32M",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--output-format=terse",
    ]
    .iter()
    .map(os)
    .collect();
    a.extend(extra.iter().map(os));
    let f = format!("--filename={dev}");
    a.push(os(&f));
    tool("fio", &a, limit)
}

/// 3. fio random writes with crc32c verification (interleaved verify reads while
///    writing, then a full verify pass) over a live mount, and the same data verified
///    again after an unmount and a remount with the same overlay.
#[test]
fn ublk_fio_verify() {
    if !have_ublk("ublk_fio_verify") {
        return;
    }
    let _t = Timer::start("ublk_fio_verify");
    let fx = fixture();
    let t = tmp("fio");
    let ov = t.path().join("ov");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let m = mount(&args, &t.path().join("m1.log"));
    let start = Instant::now();
    fio(&m.dev, &["--verify_backlog=256"], Duration::from_secs(120));
    eprintln!(
        "fio write+verify took {:.1} s",
        start.elapsed().as_secs_f64()
    );
    // A mixed random read/write job over the whole device (reads of the snapshot and
    // of the overlay), checked for I/O errors only.
    tool(
        "fio",
        &[
            os("--name=mixed"),
            os("--ioengine=libaio"),
            os("--direct=1"),
            os("--rw=randrw"),
            os("--bs=4k"),
            os("--iodepth=8"),
            os("--offset=48M"),
            os("--size=8M"),
            os("--time_based"),
            os("--runtime=4"),
            os(&format!("--filename={}", m.dev)),
        ],
        Duration::from_secs(60),
    );
    let st = m.status();
    assert_eq!(st["io"]["errors"].as_u64(), Some(0), "{st}");
    m.unmount();
    let m = mount(&args, &t.path().join("m2.log"));
    fio(&m.dev, &["--verify_only"], Duration::from_secs(120));
    m.unmount();
    fx.assert_store_untouched();
}

/// An ext4 on the first 32 MiB of `dev` (the raw slots live above it).
#[track_caller]
fn mkfs_first_32m(dev: &str) {
    tool(
        "mkfs.ext4",
        &[
            os("-q"),
            os("-F"),
            os("-b"),
            os("4096"),
            os(dev),
            os("8192"),
        ],
        Duration::from_secs(120),
    );
}

/// What a writer has made durable: slot → generation written and flushed.
#[derive(Default)]
struct Ledger {
    flushed: HashMap<u64, u64>,
    /// (slot, generation) issued but not yet flushed.
    pending: Option<(u64, u64)>,
    error: Option<String>,
}

const SLOTS: u64 = 48;
const SLOT_LEN: usize = 64 * 1024;

/// Raw slots live in 40..59 MiB, the ext4 made on the device in 0..32 MiB, the
/// volatile write at 63 MiB.
fn slot_offset(slot: u64) -> u64 {
    // Some slots share a 1 MiB chunk.
    40 * MIB + slot * 400 * 1024
}

const VOLATILE_AT: u64 = 63 * MIB;

fn slot_data(slot: u64, gen: u64) -> Vec<u8> {
    pattern(slot << 32 | gen, SLOT_LEN)
}

/// A thread writing slots with O_DIRECT, each write followed by fdatasync (FLUSH).
fn start_writer(
    dev: &str,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    ledger: Arc<Mutex<Ledger>>,
) -> std::thread::JoinHandle<()> {
    start_writer_from(dev, stop, progress, ledger, 0)
}

/// [`start_writer`] whose generations start after `first_gen` (a later writer's data
/// never equals an earlier one's, so a lost write cannot hide behind old bytes).
fn start_writer_from(
    dev: &str,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    ledger: Arc<Mutex<Ledger>>,
    first_gen: u64,
) -> std::thread::JoinHandle<()> {
    let f = open_direct(dev, true).unwrap();
    std::thread::spawn(move || {
        let mut gen = first_gen;
        while !stop.load(Ordering::SeqCst) {
            gen += 1;
            let slot = gen * 7 % SLOTS;
            ledger.lock().unwrap().pending = Some((slot, gen));
            let r = write_direct(&f, slot_offset(slot), &slot_data(slot, gen))
                .and_then(|_| f.sync_data());
            let mut l = ledger.lock().unwrap();
            if let Err(e) = r {
                l.error = Some(format!("write+flush of slot {slot} gen {gen}: {e}"));
                return;
            }
            l.flushed.insert(slot, gen);
            l.pending = None;
            progress.fetch_add(1, Ordering::SeqCst);
        }
    })
}

#[track_caller]
fn wait_progress(progress: &AtomicU64, ledger: &Mutex<Ledger>, target: u64, what: &str) {
    let start = Instant::now();
    while progress.load(Ordering::SeqCst) < target {
        if let Some(e) = &ledger.lock().unwrap().error {
            panic!("{what}: writer failed: {e}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{what}: writer stuck at {} of {target}",
            progress.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[track_caller]
fn check_slots(dev: &str, ledger: &Ledger) {
    let f = open_direct(dev, false).unwrap();
    for (&slot, &gen) in &ledger.flushed {
        let got = read_direct(&f, slot_offset(slot), SLOT_LEN).unwrap();
        if got != slot_data(slot, gen) {
            let other = (0..=gen + 1000).find(|g| got == slot_data(slot, *g));
            panic!(
                "slot {slot}: flushed generation {gen} does not read back (found generation {other:?})"
            );
        }
    }
}

#[track_caller]
fn sigkill_daemon(m: &Mount) -> i32 {
    let pid = m.pid();
    assert!(alive(pid), "daemon {pid} not running");
    // SAFETY: killing the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "daemon {pid} survived SIGKILL for 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pid
}

/// 4b. Kill loop: SIGKILL the daemon under a write+flush load, `mount --recover`, and
///     after each recovery stop the writer and check that every flushed write reads
///     back (the one write in flight may read either way): zero acknowledged bytes
///     lost. 5 kills here; the soak run takes more:
///     `LIVEMOUNT_KILL_LOOP=100 LIVEMOUNT_VM_TEST_ARGS=ublk_kill_loop cargo xtask vm-test`.
#[test]
fn ublk_kill_loop() {
    if !have_ublk("ublk_kill_loop") {
        return;
    }
    let _t = Timer::start("ublk_kill_loop");
    let fx = fixture();
    let t = tmp("killloop");
    let ov = t.path().join("ov");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let kills: u64 = std::env::var("LIVEMOUNT_KILL_LOOP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut m = mount(&args, &t.path().join("m0.log"));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    for k in 0..kills {
        let (stop, progress) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let w = start_writer_from(
            &m.dev,
            stop.clone(),
            progress.clone(),
            ledger.clone(),
            k * 1_000_000,
        );
        wait_progress(&progress, &ledger, 3 + k % 5, &format!("kill {k}: before"));
        sigkill_daemon(&m);
        let log = t.path().join(format!("recover{k}.log"));
        let rec = try_mount(&[os("--recover"), os(&m.dev)], &log);
        assert_eq!(
            rec.code,
            Some(0),
            "kill {k}: mount --recover failed: {}\nlog:\n{}",
            rec.stderr,
            fs::read_to_string(&log).unwrap_or_default()
        );
        let m2 = Mount::from_output(&rec.stdout, &log);
        assert_eq!(m2.dev, m.dev, "kill {k}: recovery attached another device");
        std::mem::forget(m);
        m = m2;
        stop.store(true, Ordering::SeqCst);
        bounded(
            &format!("kill {k}: stopping the writer"),
            Duration::from_secs(60),
            move || w.join().unwrap(),
        );
        let l = ledger.lock().unwrap();
        assert!(l.error.is_none(), "kill {k}: {:?}", l.error);
        let f = open_direct(&m.dev, false).unwrap();
        for (&slot, &gen) in &l.flushed {
            let got = read_direct(&f, slot_offset(slot), SLOT_LEN).unwrap();
            let pending_here = l.pending.filter(|p| p.0 == slot);
            assert!(
                got == slot_data(slot, gen)
                    || pending_here.is_some_and(|p| got == slot_data(slot, p.1)),
                "kill {k}: slot {slot}: flushed generation {gen} lost"
            );
        }
    }
    eprintln!("ublk_kill_loop: {kills} kills, every flushed write read back after each");
    m.unmount();
    fx.assert_store_untouched();
}

/// 4c. Kill loop under fio: fio writes 4 KiB blocks at random with crc32c verify
///     headers, an fsync every 32 writes, saving its verify state; the daemon is
///     SIGKILLed while fio runs (fio's I/O waits, no error) and `mount --recover`
///     re-attaches, again and again. fio must finish without an error; then one more
///     SIGKILL right after its last (unflushed) writes, a recovery, and fio's verify
///     pass (`--verify_only`, with `--verify_state_load=1` when fio saved a state)
///     must find every block fio completed (seen failing when one block is zeroed
///     before it). 5 kills here; `LIVEMOUNT_KILL_LOOP=100` for the soak.
#[test]
fn ublk_kill_loop_fio_verify() {
    if !have_ublk("ublk_kill_loop_fio_verify") {
        return;
    }
    let _t = Timer::start("ublk_kill_loop_fio_verify");
    let fx = fixture();
    let t = tmp("killfio");
    let ov = t.path().join("ov");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let kills: u64 = std::env::var("LIVEMOUNT_KILL_LOOP")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut m = mount(&args, &t.path().join("m0.log"));
    const BLOCKS: u64 = 4096;
    // Slow enough that every kill lands while fio writes: a kill and its recovery
    // take ~2 s in the VM, fio writes for ~6 s per kill (its rate limit catches up
    // after each stall, so the stalls do not lengthen it).
    let rate = (BLOCKS / (kills * 6)).max(5);
    // Recovery re-attaches the same device.
    let dev = m.dev.clone();
    let job = |extra: &[String]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--name=killloop",
            "--ioengine=psync",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--offset=8M",
            "--size=16M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randrepeat=1",
            "--verify_state_save=1",
            "--output-format=terse",
        ]
        .map(String::from)
        .to_vec();
        a.push(format!("--filename={dev}"));
        a.extend(extra.iter().cloned());
        a
    };
    let mut writer = std::process::Command::new("fio")
        .args(job(&[
            "--do_verify=0".into(),
            "--fsync=32".into(),
            format!("--rate_iops={rate}"),
        ]))
        .current_dir(t.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(1200));
        assert!(
            writer.try_wait().unwrap().is_none(),
            "fio finished after {k} of {kills} kills (the kills must land while it writes)"
        );
        sigkill_daemon(&m);
        let log = t.path().join(format!("recover{k}.log"));
        let rec = try_mount(&[os("--recover"), os(&m.dev)], &log);
        assert_eq!(
            rec.code,
            Some(0),
            "kill {k}: mount --recover failed: {}",
            rec.stderr
        );
        let m2 = Mount::from_output(&rec.stdout, &log);
        std::mem::forget(std::mem::replace(&mut m, m2));
    }
    let out = bounded(
        "fio under the kill loop",
        Duration::from_secs(60 + kills * 10),
        move || writer.wait_with_output().unwrap(),
    );
    assert!(
        out.status.success(),
        "fio failed under the kill loop: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Its last writes were acknowledged, not all flushed: one more kill.
    sigkill_daemon(&m);
    let log = t.path().join("recover-last.log");
    let rec = try_mount(&[os("--recover"), os(&m.dev)], &log);
    assert_eq!(rec.code, Some(0), "mount --recover failed: {}", rec.stderr);
    let m2 = Mount::from_output(&rec.stdout, &log);
    std::mem::forget(std::mem::replace(&mut m, m2));
    // fio saves its state when a job ends during the write phase; one that finished
    // wrote every block, and all of them are verified.
    let mut check = vec!["--verify_only".to_string()];
    if t.path().join("local-killloop-0-verify.state").exists() {
        check.push("--verify_state_load=1".into());
    }
    let mut verify = std::process::Command::new("fio");
    verify
        .args(job(&check))
        .current_dir(t.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let verify = bounded("fio --verify_only", Duration::from_secs(300), move || {
        verify.output().unwrap()
    });
    assert!(
        verify.status.success(),
        "fio found lost or wrong blocks after {kills} kills: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    eprintln!("ublk_kill_loop_fio_verify: {kills} kills under fio, then one after its last writes; every block fio completed verified");
    m.unmount();
    fx.assert_store_untouched();
}

/// 4. FLUSH durability and crash recovery under a write load: SIGKILL the daemon while a
///    writer is writing+flushing; I/O waits (no error), `mount --recover` re-attaches, the
///    waiting I/O completes, every flushed write reads back. Then with ext4 mounted:
///    kill, recover, finish, umount, fsck clean, synced files intact. Finally SIGKILL
///    without recovery: `unmount` removes the device; a copy of the overlay (no mirror:
///    its on-disk map alone) shows every flushed write, and a fresh mount of the
///    overlay itself shows those and the acknowledged unflushed one.
#[test]
fn ublk_crash_recovery() {
    if !have_ublk("ublk_crash_recovery") {
        return;
    }
    let _t = Timer::start("ublk_crash_recovery");
    let fx = fixture();
    let t = tmp("crash");
    let ov = t.path().join("ov");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let m = mount(&args, &t.path().join("m1.log"));
    let (stop, progress) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let w = start_writer(&m.dev, stop.clone(), progress.clone(), ledger.clone());
    wait_progress(&progress, &ledger, 60, "before the kill");
    // The mount's lease in the store: what keeps forget + gc off its chunks on any
    // host; it must outlive the daemon and be adopted (not duplicated) by recovery.
    let lease = m.status()["config"]["lease"]
        .as_str()
        .expect("a mount holds a lease")
        .to_string();
    let leases = || {
        let mut v: Vec<String> = fs::read_dir(fx.store.join("leases"))
            .map(|d| {
                d.flatten()
                    .map(|e| format!("leases/{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    // Other tests' killed daemons may have left theirs in the shared store.
    let before = leases();
    assert!(before.contains(&lease), "{before:?}");
    let old_pid = sigkill_daemon(&m);
    assert_eq!(leases(), before, "the lease died with the daemon");
    // I/O waits for a new daemon: no error, no progress (at most the one in flight).
    let p0 = progress.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    {
        let l = ledger.lock().unwrap();
        assert!(
            l.error.is_none(),
            "I/O failed after the daemon died: {:?}",
            l.error
        );
    }
    assert!(
        progress.load(Ordering::SeqCst) <= p0 + 1,
        "I/O completed without a daemon"
    );
    assert!(
        Path::new(&m.dev).exists(),
        "device vanished with its daemon"
    );
    // The dead daemon's flock is gone, but its device still needs every chunk:
    // forget (and so gc) must refuse the snapshot.
    let snap_full = m.status()["config"]["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let f = lm(
        &[
            os("forget"),
            os("--store"),
            fx.store.as_os_str(),
            os(&snap_full),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        f.code,
        Some(1),
        "forget of a mounted snapshot: {}",
        f.stdout
    );
    assert!(
        f.stderr.contains("is mounted as") && f.stderr.contains(&m.dev),
        "{}",
        f.stderr
    );
    let rec = try_mount(
        &[os("--recover"), os(&m.dev)],
        &t.path().join("recover1.log"),
    );
    assert_eq!(
        rec.code,
        Some(0),
        "mount --recover failed: {}\nlog:\n{}",
        rec.stderr,
        fs::read_to_string(t.path().join("recover1.log")).unwrap_or_default()
    );
    let m2 = Mount::from_output(&rec.stdout, &t.path().join("recover1.log"));
    assert_eq!(m2.dev, m.dev, "recovery attached another device");
    std::mem::forget(m);
    let m = m2;
    assert_ne!(m.pid(), old_pid);
    assert_eq!(m.status()["config"]["lease"], lease.as_str());
    assert_eq!(leases(), before, "recovery did not adopt the lease");
    // The waiting I/O completes and the load goes on.
    wait_progress(
        &progress,
        &ledger,
        progress.load(Ordering::SeqCst) + 40,
        "after recovery",
    );
    stop.store(true, Ordering::SeqCst);
    bounded("stopping the writer", Duration::from_secs(60), move || {
        w.join().unwrap()
    });
    let l = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(l.error.is_none(), "{:?}", l.error);
    assert!(l.pending.is_none());
    check_slots(&m.dev, &l);

    // A write acknowledged but not flushed survives the daemon's death: the kernel
    // and the device's users never went away, so it must not be undone.
    let volatile = pattern(0xf1a5, 256 * 1024);
    {
        let f = open_direct(&m.dev, true).unwrap();
        write_direct(&f, VOLATILE_AT, &volatile).unwrap();
    }
    sigkill_daemon(&m);
    let rec = try_mount(
        &[os("--recover"), os(&m.dev)],
        &t.path().join("recover-v.log"),
    );
    assert_eq!(rec.code, Some(0), "recovery failed: {}", rec.stderr);
    let m2 = Mount::from_output(&rec.stdout, &t.path().join("recover-v.log"));
    std::mem::forget(m);
    let m = m2;
    {
        let f = open_direct(&m.dev, true).unwrap();
        assert!(
            read_direct(&f, VOLATILE_AT, volatile.len()).unwrap() == volatile,
            "an acknowledged (unflushed) write was undone by the daemon's death"
        );
        f.sync_data().unwrap();
    }

    // mkfs on the live mount (first 32 MiB), ext4 written to while the daemon dies and
    // is recovered.
    mkfs_first_32m(&m.dev);
    let mnt = t.path().join("mnt");
    let fsm = FsMount::mount(&m.dev, &mnt, "rw");
    let dir = mnt.join("crash");
    fs::create_dir(&dir).unwrap();
    let synced = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let fw = {
        let (dir, synced, stop) = (dir.clone(), synced.clone(), stop.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let p = dir.join(format!("f{i}"));
                let mut f = fs::File::create(&p).map_err(|e| e.to_string())?;
                std::io::Write::write_all(&mut f, &pattern(1000 + i, 40_000 + i as usize))
                    .map_err(|e| e.to_string())?;
                f.sync_all().map_err(|e| e.to_string())?;
                fs::File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| e.to_string())?;
                i += 1;
                synced.store(i, Ordering::SeqCst);
            }
            Ok(())
        })
    };
    let wait_files = |n: u64, what: &str| {
        let start = Instant::now();
        while synced.load(Ordering::SeqCst) < n {
            assert!(!fw.is_finished(), "{what}: file writer stopped early");
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{what}: file writer stuck at {}",
                synced.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_files(15, "before the kill");
    sigkill_daemon(&m);
    std::thread::sleep(Duration::from_millis(500));
    let rec = try_mount(
        &[os("--recover"), os(&m.dev)],
        &t.path().join("recover2.log"),
    );
    assert_eq!(rec.code, Some(0), "second recovery failed: {}", rec.stderr);
    let m2 = Mount::from_output(&rec.stdout, &t.path().join("recover2.log"));
    std::mem::forget(m);
    let m = m2;
    assert_daemon_ns_clean(m.pid(), &m.dev);
    wait_files(synced.load(Ordering::SeqCst) + 10, "after recovery");
    stop.store(true, Ordering::SeqCst);
    bounded(
        "stopping the file writer",
        Duration::from_secs(60),
        move || fw.join().unwrap(),
    )
    .unwrap_or_else(|e| panic!("file writer failed: {e}"));
    let n = synced.load(Ordering::SeqCst);
    fsm.umount();
    fsck_clean(&m.dev);

    // SIGKILL without recovery: unmount removes the device.
    sigkill_daemon(&m);
    let out = lm(&[os("unmount"), os(&m.dev)], Duration::from_secs(60));
    out.ok();
    wait_gone(&m.dev, m.id);
    assert!(
        !Path::new(&format!("/run/livemount/ublkb{}.json", m.id)).exists(),
        "status file left behind"
    );
    std::mem::forget(m);

    // Without the map mirror on tmpfs (as after a power cut or reboot), the on-disk
    // map alone must show every flushed write: mount a copy of the overlay (another
    // inode, so the mirror is not its own and is ignored).
    let copy = t.path().join("ov-copy");
    fs::copy(&ov, &copy).unwrap();
    let copy_args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        copy.as_os_str(),
    ];
    let mc = mount(&copy_args, &t.path().join("m-copy.log"));
    check_slots(&mc.dev, &l);
    fsck_clean(&mc.dev);
    mc.unmount();

    // A fresh mount of the same overlay shows every flushed write, and (through the
    // mirror) the acknowledged unflushed one too.
    let m = mount(&args, &t.path().join("m3.log"));
    check_slots(&m.dev, &l);
    let f = open_direct(&m.dev, false).unwrap();
    assert!(read_direct(&f, VOLATILE_AT, volatile.len()).unwrap() == volatile);
    drop(f);
    fsck_clean(&m.dev);
    let fsm = FsMount::mount(&m.dev, &mnt, "ro");
    for i in 0..n {
        let got = fs::read(dir.join(format!("f{i}"))).unwrap();
        assert!(
            got == pattern(1000 + i, 40_000 + i as usize),
            "synced file f{i} differs after the crashes"
        );
    }
    fsm.umount();
    m.unmount();
    fx.assert_store_untouched();
}

/// The learned profile (`--record-profile`) is written while serving, so a daemon
/// killed with SIGKILL leaves it behind, and the daemon `mount --recover` starts
/// continues it: the first daemon's reads, then its own, in that order.
#[test]
fn ublk_learned_profile_survives_a_crash() {
    if !have_ublk("ublk_learned_profile_survives_a_crash") {
        return;
    }
    let _t = Timer::start("ublk_learned_profile_survives_a_crash");
    let fx = fixture();
    let t = tmp("learned");
    let learned = t.path().join("learned.json");
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.snap),
            os("--record-profile"),
            learned.as_os_str(),
            os("--record-profile-every"),
            os("1"),
        ],
        &t.path().join("m1.log"),
    );
    let (first, second) = (8 * MIB, 40 * MIB);
    let read_at = |dev: &str, off: u64| {
        let f = open_direct(dev, false).unwrap();
        read_direct(&f, off, 65536).unwrap();
    };
    // (offset, length) in access order, once the file holds a read at `off`.
    let wait_for = |off: u64, what: &str| -> Vec<(u64, u64)> {
        let start = Instant::now();
        loop {
            if let Ok(p) = livemount_store::format::profile::Profile::load(&learned) {
                let order: Vec<(u64, u64)> = p
                    .extents_in_access_order()
                    .map(|e| (e.offset, e.length))
                    .collect();
                if order.iter().any(|&(o, l)| o <= off && off < o + l) {
                    return order;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{what}: no read at {off} in {} after 20 s",
                learned.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    read_at(&m.dev, first);
    wait_for(first, "written while serving");
    sigkill_daemon(&m);
    let rec = try_mount(
        &[os("--recover"), os(&m.dev)],
        &t.path().join("recover.log"),
    );
    assert_eq!(rec.code, Some(0), "mount --recover failed: {}", rec.stderr);
    let m2 = Mount::from_output(&rec.stdout, &t.path().join("recover.log"));
    std::mem::forget(m);
    assert!(
        m2.log_text().contains("continuing the learned profile"),
        "{}",
        m2.log_text()
    );
    read_at(&m2.dev, second);
    m2.unmount();
    let order = wait_for(second, "after recovery and unmount");
    let pos = |off: u64| order.iter().position(|&(o, l)| o <= off && off < o + l);
    assert!(
        matches!((pos(first), pos(second)), (Some(a), Some(b)) if a < b),
        "the first daemon's read is lost or out of order: {order:?}"
    );
}

/// 5a. DISCARD and WRITE_ZEROES read back as zeros; discarding written data shrinks the
///     overlay file's allocation.
#[test]
fn ublk_discard() {
    if !have_ublk("ublk_discard") {
        return;
    }
    let _t = Timer::start("ublk_discard");
    let fx = fixture();
    let t = tmp("discard");
    let ov = t.path().join("ov");
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.snap),
            os("--overlay"),
            ov.as_os_str(),
        ],
        &t.path().join("m.log"),
    );
    let original = fs::read(&fx.image).unwrap();
    let f = open_direct(&m.dev, true).unwrap();
    let data = pattern(77, 8 * MIB as usize);
    write_direct(&f, 16 * MIB, &data).unwrap();
    f.sync_data().unwrap();
    let alloc_written = fs::metadata(&ov).unwrap().blocks() * 512;
    assert!(
        alloc_written >= 8 * MIB,
        "overlay allocates {alloc_written}"
    );
    // Discard 4 MiB of what we wrote, and 2 MiB of the snapshot (non-zero data there).
    let base_off = (0..60 * MIB)
        .step_by(MIB as usize)
        .find(|&o| {
            !(16 * MIB..24 * MIB).contains(&o)
                && original[o as usize..(o + 2 * MIB) as usize]
                    .iter()
                    .filter(|&&b| b != 0)
                    .count()
                    > 100_000
        })
        .expect("no dense 2 MiB in the image");
    let dev = m.dev.clone();
    for (o, l) in [(18 * MIB, 4 * MIB), (base_off, 2 * MIB)] {
        tool(
            "blkdiscard",
            &[
                os("-o"),
                os(&o.to_string()),
                os("-l"),
                os(&l.to_string()),
                os(&dev),
            ],
            Duration::from_secs(60),
        );
    }
    // WRITE_ZEROES (BLKZEROOUT) over the snapshot.
    let zoff = if base_off >= 40 * MIB {
        4 * MIB
    } else {
        44 * MIB
    };
    tool(
        "blkdiscard",
        &[
            os("-z"),
            os("-o"),
            os(&zoff.to_string()),
            os("-l"),
            os(&MIB.to_string()),
            os(&dev),
        ],
        Duration::from_secs(60),
    );
    f.sync_data().unwrap();
    let got = read_direct(&f, 16 * MIB, 8 * MIB as usize).unwrap();
    assert!(got[..2 * MIB as usize] == data[..2 * MIB as usize]);
    assert!(
        got[2 * MIB as usize..6 * MIB as usize]
            .iter()
            .all(|&b| b == 0),
        "discarded overlay data does not read as zeros"
    );
    assert!(got[6 * MIB as usize..] == data[6 * MIB as usize..]);
    for (o, l, what) in [(base_off, 2 * MIB, "discard"), (zoff, MIB, "write zeroes")] {
        let z = read_direct(&f, o, l as usize).unwrap();
        assert!(
            z.iter().all(|&b| b == 0),
            "{what} at {o} does not read as zeros"
        );
    }
    // Untouched neighbours still read the snapshot.
    let nb = read_direct(&f, base_off + 2 * MIB, MIB as usize).unwrap();
    assert!(nb == original[(base_off + 2 * MIB) as usize..(base_off + 3 * MIB) as usize]);
    let alloc_after = fs::metadata(&ov).unwrap().blocks() * 512;
    assert!(
        alloc_after + 4 * MIB - 64 * 1024 <= alloc_written,
        "discarding 4 MiB did not release overlay space: {alloc_written} -> {alloc_after}"
    );
    drop(f);
    m.unmount();
    fx.assert_store_untouched();
}

/// 5b. `--read-only`: the device is read-only (writes and discards fail with
///     EROFS/EPERM), reads are fine.
#[test]
fn ublk_read_only() {
    if !have_ublk("ublk_read_only") {
        return;
    }
    let _t = Timer::start("ublk_read_only");
    let fx = fixture();
    let t = tmp("ro");
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.snap),
            os("--read-only"),
        ],
        &t.path().join("m.log"),
    );
    let ro = tool(
        "blockdev",
        &[os("--getro"), os(&m.dev)],
        Duration::from_secs(10),
    );
    assert_eq!(ro.trim(), "1");
    match fs::OpenOptions::new().write(true).open(&m.dev) {
        Err(e) => assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES)
            ),
            "opening the read-only device for writing: {e}"
        ),
        Ok(f) => {
            let e = f
                .write_all_at(&[1u8; 4096], 0)
                .and_then(|_| f.sync_data())
                .expect_err("a write to a read-only mount succeeded");
            assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EIO)
                ),
                "{e}"
            );
        }
    }
    let out = run_bounded(
        Path::new("blkdiscard"),
        &[os("-l"), os("1048576"), os(&m.dev)],
        Duration::from_secs(30),
    );
    assert_ne!(out.code, Some(0), "discard on a read-only mount succeeded");
    let original = fs::read(&fx.image).unwrap();
    let f = open_direct(&m.dev, false).unwrap();
    let got = read_direct(&f, 0, 4 * MIB as usize).unwrap();
    assert!(got == original[..4 * MIB as usize]);
    let st = m.status();
    assert!(st["config"]["overlay"].is_null(), "{st}");
    drop(f);
    m.unmount();
    fx.assert_store_untouched();
}

/// 7. Bad input: a kernel that never answers device creation (bounded wait).
#[test]
fn ublk_create_timeout_is_bounded() {
    if !have_ublk("ublk_create_timeout_is_bounded") {
        return;
    }
    let fx = fixture();
    // A kernel that never answers device creation (simulated by a delay before the
    // ADD_DEV command): the mount gives up after --create-timeout with a clear error.
    // Read-only, and with a temporary overlay, which must not be left behind.
    let t = tmp("create-timeout");
    for extra in [&["--read-only"][..], &[][..]] {
        let start = std::time::Instant::now();
        let out = std::process::Command::new(bin())
            .args([
                os("mount"),
                os("--store"),
                fx.store.as_os_str(),
                os(&fx.snap),
                os("--create-timeout"),
                os("1"),
            ])
            .args(extra)
            .env("LIVEMOUNT_FAULT_CREATE_DELAY_MS", "20000")
            .env("TMPDIR", t.path())
            .output()
            .unwrap();
        let took = start.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("did not answer ublk device creation within 1 s"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
        let left: Vec<_> = fs::read_dir(t.path()).unwrap().flatten().collect();
        assert!(left.is_empty(), "{extra:?} left {left:?}");
    }
    fx.assert_store_untouched();
}

/// 7a. Bad input: a missing snapshot, and an overlay of another snapshot.
#[test]
fn ublk_bad_snapshot_and_foreign_overlay() {
    if !have_ublk("ublk_bad_snapshot_and_foreign_overlay") {
        return;
    }
    let _t = Timer::start("ublk_bad_snapshot_and_foreign_overlay");
    let fx = fixture();
    let t = tmp("badsnap");
    let out = try_mount(
        &[os("--store"), fx.store.as_os_str(), os("nosuchvm")],
        &t.path().join("a.log"),
    );
    out.one_line_error(&["nosuchvm"]);
    assert!(out.took < Duration::from_secs(30));
    // An overlay made for web01, used for odd.
    let ov = t.path().join("ov");
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.snap),
            os("--overlay"),
            ov.as_os_str(),
        ],
        &t.path().join("b.log"),
    );
    m.unmount();
    let out = try_mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.odd_snap),
            os("--overlay"),
            ov.as_os_str(),
        ],
        &t.path().join("c.log"),
    );
    out.one_line_error(&[&fx.snap, "belongs to"]);
    assert!(
        !Path::new("/sys/class/ublk-char").exists()
            || fs::read_dir("/sys/class/ublk-char").unwrap().count() == 0,
        "a refused mount left a device behind"
    );
    fx.assert_store_untouched();
}

fn copy_store(fx: &Fixture, dst: &Path) {
    tool(
        "cp",
        &[os("-a"), fx.store.as_os_str(), dst.as_os_str()],
        Duration::from_secs(60),
    );
}

/// Read the whole device in 256 KiB O_DIRECT pieces; the offsets that failed, and how.
fn scan(dev: &str, size: u64, limit: Duration) -> Vec<(u64, i32)> {
    let dev = dev.to_string();
    bounded("scanning the device", limit, move || {
        let f = open_direct(&dev, false).unwrap();
        let mut bad = Vec::new();
        let step = 256 * 1024u64;
        let mut off = 0;
        while off < size {
            let len = step.min(size - off) as usize;
            if let Err(e) = read_direct(&f, off, len) {
                bad.push((off, e.raw_os_error().unwrap_or(0)));
            }
            off += step;
        }
        bad
    })
}

/// 7b. A corrupt chunk (in a copy of the store): the reader gets EIO for the ranges it
///     covers, everything else reads fine, the daemon log names the chunk.
#[test]
fn ublk_corrupt_chunk_eio() {
    if !have_ublk("ublk_corrupt_chunk_eio") {
        return;
    }
    let _t = Timer::start("ublk_corrupt_chunk_eio");
    let fx = fixture();
    let t = tmp("corrupt");
    let store = t.path().join("store");
    copy_store(fx, &store);
    // The largest chunk file of web01 (dense file-system data), a byte flipped in
    // its middle.
    let st = Store::open(&store, Access::ReadOnly).unwrap();
    let ids = |spec: &str| {
        let snap = st.resolve(spec).unwrap();
        st.load_index(&snap).unwrap().stored_ids()
    };
    let odd_ids = ids(&fx.odd_snap);
    let chunk = ids(&fx.snap)
        .into_iter()
        .filter(|id| !odd_ids.contains(id))
        .map(|id| store.join(livemount_store::backend::chunk_key(&id)))
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    drop(st);
    let id = chunk.file_name().unwrap().to_string_lossy().into_owned();
    let mut bytes = fs::read(&chunk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    fs::write(&chunk, &bytes).unwrap();
    let m = mount(
        &[
            os("--store"),
            store.as_os_str(),
            os(&fx.snap),
            os("--read-only"),
        ],
        &t.path().join("m.log"),
    );
    let bad = scan(&m.dev, fx.image_size, Duration::from_secs(120));
    assert!(!bad.is_empty(), "a corrupt chunk read without error");
    assert!(
        bad.iter().all(|&(_, e)| e == libc::EIO),
        "expected EIO: {bad:?}"
    );
    // One 1 MiB chunk: a few 256 KiB pieces, not the whole device.
    assert!(bad.len() <= 8, "too many failed reads: {bad:?}");
    let log = m.log_text();
    assert!(
        log.contains(&id),
        "the daemon log does not name chunk {id}:\n{log}"
    );
    // The device keeps serving: a good range still reads.
    let original = fs::read(&fx.image).unwrap();
    let good = (0..fx.image_size - MIB)
        .step_by(MIB as usize)
        .find(|o| bad.iter().all(|&(b, _)| b < *o || b >= o + MIB))
        .unwrap();
    let f = open_direct(&m.dev, false).unwrap();
    assert!(
        read_direct(&f, good, MIB as usize).unwrap()
            == original[good as usize..(good + MIB) as usize]
    );
    drop(f);
    m.unmount();
    fx.assert_store_untouched();
}

/// 7c. The store removed while mounted: reads of data not yet cached fail with EIO,
///     promptly; nothing hangs; the device still unmounts.
#[test]
fn ublk_store_removed_while_mounted() {
    if !have_ublk("ublk_store_removed_while_mounted") {
        return;
    }
    let _t = Timer::start("ublk_store_removed_while_mounted");
    let fx = fixture();
    let t = tmp("gone");
    let store = t.path().join("store");
    copy_store(fx, &store);
    let m = mount(
        &[
            os("--store"),
            store.as_os_str(),
            os(&fx.snap),
            os("--read-only"),
        ],
        &t.path().join("m.log"),
    );
    let original = fs::read(&fx.image).unwrap();
    let f = open_direct(&m.dev, false).unwrap();
    assert!(read_direct(&f, 0, MIB as usize).unwrap() == original[..MIB as usize]);
    fs::remove_dir_all(&store).unwrap();
    let start = Instant::now();
    let bad = scan(&m.dev, fx.image_size, Duration::from_secs(120));
    assert!(
        !bad.is_empty(),
        "every read succeeded with the store gone (all cached?)"
    );
    assert!(bad.iter().all(|&(_, e)| e == libc::EIO), "{bad:?}");
    eprintln!(
        "store gone: {} failed reads in {:.1} s",
        bad.len(),
        start.elapsed().as_secs_f64()
    );
    drop(f);
    m.unmount();
    fx.assert_store_untouched();
}

/// 6. Mounts never change the store: `verify` passes and the chunk and index files
///    have their original sizes, mtimes and inodes, whenever this runs (every mount
///    test also checks the stamps at its end, so no order is needed).
#[test]
fn ublk_store_unchanged_by_mounts() {
    if !have_ublk("ublk_store_unchanged_by_mounts") {
        return;
    }
    let _t = Timer::start("ublk_store_unchanged_by_mounts");
    let fx = fixture();
    fx.assert_store_untouched();
    let out = lm(
        &[
            os("verify"),
            os("--store"),
            fx.store.as_os_str(),
            os("--json"),
        ],
        Duration::from_secs(300),
    );
    out.ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["bad_chunks"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(v["chunks_checked"].as_u64().unwrap() > 0, "{v}");
    fx.assert_store_untouched();
}

/// 7d. ublk_drv not loaded: unload the module; `mount` fails at once with a one-line
///     error telling the user to `modprobe ublk_drv`; reload. Needs the driver to
///     itself, not a position in the run: the VM runs these tests one at a time
///     (`--test-threads=1`) and every other test removes its devices before it ends.
#[test]
fn ublk_driver_not_loaded() {
    if !have_ublk("ublk_driver_not_loaded") {
        return;
    }
    let _t = Timer::start("ublk_driver_not_loaded");
    let fx = fixture();
    let t = tmp("nodrv");
    let devs: Vec<_> = fs::read_dir("/sys/class/ublk-char")
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        devs.is_empty(),
        "devices left behind by other tests: {devs:?}"
    );
    tool("rmmod", &[os("ublk_drv")], Duration::from_secs(30));
    let out = try_mount(
        &[os("--store"), fx.store.as_os_str(), os(&fx.snap)],
        &t.path().join("m.log"),
    );
    let reload = run_bounded(
        Path::new("modprobe"),
        &[os("ublk_drv")],
        Duration::from_secs(30),
    );
    out.one_line_error(&["modprobe ublk_drv"]);
    assert!(out.took < Duration::from_secs(20));
    assert_eq!(reload.code, Some(0), "modprobe ublk_drv: {}", reload.stderr);
    let start = Instant::now();
    while !Path::new("/dev/ublk-control").exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the driver is usable again.
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.odd_snap),
            os("--read-only"),
        ],
        &t.path().join("m2.log"),
    );
    m.unmount();
    fx.assert_store_untouched();
}

/// A snapshot in an S3 bucket as a ublk device: a single-node Garage in the VM (on
/// its loopback), the fixture's ext4 image backed up into it, mounted, read back
/// byte-exact, written through ext4 and checked with fsck; the bucket's chunks are
/// never modified (only the mount's lease comes and goes).
#[test]
fn ublk_s3_snapshot_reads_exact_and_takes_ext4_writes() {
    if !have_ublk("ublk_s3_snapshot_reads_exact_and_takes_ext4_writes") {
        return;
    }
    let _t = Timer::start("ublk_s3_snapshot_reads_exact_and_takes_ext4_writes");
    let fx = fixture();
    let bin = livemount_tests::garage::garage_bin()
        .expect("no garage binary: `cargo xtask setup` builds it into .cache/tools");
    let g = livemount_tests::garage::Garage::start(&bin);
    g.bucket("lm-vm");
    let creds = g.credentials_file();
    let s3 = [
        os("--store"),
        os("s3://lm-vm/site"),
        os("--s3-endpoint"),
        os(&g.endpoint),
        os("--s3-region"),
        os(livemount_tests::garage::REGION),
        os("--s3-credentials"),
        creds.as_os_str(),
    ];
    let mut args = vec![os("backup"), fx.image.as_os_str()];
    args.extend_from_slice(&s3);
    args.extend([os("--name"), os("web01")]);
    let b = lm(&args, Duration::from_secs(300));
    assert_eq!(b.code, Some(0), "backup into the bucket: {}", b.stderr);
    let t = tmp("s3");
    let ov = t.path().join("s3.overlay");
    let mut margs: Vec<&std::ffi::OsStr> = s3.to_vec();
    margs.extend([os("web01"), os("--overlay"), ov.as_os_str()]);
    let m = mount(&margs, &t.path().join("m.log"));
    let want = fs::read(&fx.image).unwrap();
    let got = fs::read(&m.dev).unwrap();
    assert_eq!(got.len() as u64, want.len().next_multiple_of(512) as u64);
    assert!(
        got[..want.len()] == want[..],
        "the device differs from the image"
    );
    let lease = m.status()["config"]["lease"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(lease.starts_with("leases/mount-"), "no lease: {lease:?}");
    let mem = &m.status()["memory"];
    assert!(mem["rss_bytes"].as_u64().unwrap_or(0) > 0, "{mem}");
    assert!(mem["overlay_map_bytes"].as_u64().unwrap_or(0) > 0, "{mem}");
    let req = &m.status()["store_requests"];
    assert!(req["gets"].as_u64().unwrap_or(0) > 0, "{req}");
    let mnt = t.path().join("mnt");
    let fsm = FsMount::mount(&m.dev, &mnt, "rw");
    let data = pattern(77, 3 * MIB as usize + 5);
    write_file(&mnt.join("written-over-s3.bin"), &data);
    tool("sync", &[], Duration::from_secs(60));
    fsm.umount();
    fsck_clean(&m.dev);
    let fsm = FsMount::mount(&m.dev, &mnt, "ro");
    assert!(fs::read(mnt.join("written-over-s3.bin")).unwrap() == data);
    fsm.umount();
    m.unmount();
    // The bucket holds no lease of the unmounted device.
    let backend = livemount_store::backend::s3::S3Backend::open(
        "s3://lm-vm/site",
        &livemount_store::backend::s3::S3Options {
            endpoint: Some(g.endpoint.clone()),
            region: Some(livemount_tests::garage::REGION.into()),
            credentials_file: Some(creds.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    use livemount_store::backend::Backend;
    assert!(backend.list("leases/").unwrap().is_empty());
}

/// 16. A 4 TiB thin snapshot (a few scattered MiB of data) mounted as a real ublk
///     device: reads and writes at both ends and in the middle, fsync, an
///     acknowledged unflushed write, SIGKILL + `--recover`, commit; the daemon's
///     memory beyond what its read cache holds stays under 64 MiB and its /run
///     mirror under 16 MiB throughout (a device-sized sector map was 1 GiB, twice).
#[test]
fn ublk_4_tib_thin_snapshot_memory_follows_writes() {
    if !have_ublk("ublk_4_tib_thin_snapshot_memory_follows_writes") {
        return;
    }
    let _t = Timer::start("ublk_4_tib_thin_snapshot_memory_follows_writes");
    const SIZE: u64 = 4 << 40;
    let t = tmp("4tib");
    let (img, store, ov) = (
        t.path().join("thin.img"),
        t.path().join("store"),
        t.path().join("thin.overlay"),
    );
    // 8 extents of 1 MiB spread over the disk, the first and last at its ends.
    let spots: Vec<u64> = (0..8u64)
        .map(|i| (i * (SIZE / 7)).min(SIZE - MIB) / MIB * MIB)
        .collect();
    {
        let f = fs::File::create(&img).unwrap();
        f.set_len(SIZE).unwrap();
        for (i, &at) in spots.iter().enumerate() {
            f.write_all_at(&pattern(i as u64 + 40, MIB as usize), at)
                .unwrap();
        }
    }
    lm(
        &[
            os("backup"),
            os("--store"),
            store.as_os_str(),
            os("--name"),
            os("thin"),
            img.as_os_str(),
        ],
        Duration::from_secs(600),
    )
    .ok();
    let args = [
        os("--store"),
        store.as_os_str(),
        os("thin"),
        os("--overlay"),
        ov.as_os_str(),
        os("--cache-mem"),
        os("32M"),
    ];
    let m = mount(&args, &t.path().join("m1.log"));
    let check_memory = |m: &Mount, when: &str| {
        let st = m.status();
        let mem = &st["memory"];
        let rss = mem["rss_bytes"].as_u64().unwrap_or(u64::MAX);
        let cached = st["cache"]["mem_bytes"].as_u64().unwrap_or(0);
        assert!(
            rss.saturating_sub(cached) <= 64 * MIB,
            "{when}: RSS {rss} with {cached} cached: {mem}"
        );
        assert!(
            mem["mirror_bytes"].as_u64().unwrap_or(u64::MAX) <= 16 * MIB,
            "{when}: {mem}"
        );
        assert!(
            mem["overlay_map_bytes"].as_u64().unwrap_or(u64::MAX) <= 4 * MIB,
            "{when}: {mem}"
        );
    };
    check_memory(&m, "before writes");
    let dev = open_direct(&m.dev, true).unwrap();
    assert_eq!(
        fs::metadata(&img).unwrap().len(),
        SIZE,
        "image size changed"
    );
    for (i, &at) in spots.iter().enumerate() {
        assert!(
            read_direct(&dev, at, MIB as usize).unwrap() == pattern(i as u64 + 40, MIB as usize),
            "extent {i} at {at} differs"
        );
    }
    assert!(read_direct(&dev, SIZE / 3 / MIB * MIB + MIB, 65536)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    // Writes at both ends and in the middle, flushed; one more acknowledged only.
    let writes = [(0u64, 7u64), (SIZE / 2 + 4096, 8), (SIZE - 65536, 9)];
    for &(at, seed) in &writes {
        write_direct(&dev, at, &pattern(seed, 65536)).unwrap();
    }
    dev.sync_all().unwrap();
    let unflushed = (SIZE / 4 + 8192, 10u64);
    write_direct(&dev, unflushed.0, &pattern(unflushed.1, 4096)).unwrap();
    check_memory(&m, "after writes");
    drop(dev);
    sigkill_daemon(&m);
    let rec = try_mount(&[os("--recover"), os(&m.dev)], &t.path().join("m2.log"));
    assert_eq!(rec.code, Some(0), "recovery failed: {}", rec.stderr);
    let m2 = Mount::from_output(&rec.stdout, &t.path().join("m2.log"));
    std::mem::forget(m);
    check_memory(&m2, "after recovery");
    let dev = open_direct(&m2.dev, false).unwrap();
    for &(at, seed) in &writes {
        assert!(
            read_direct(&dev, at, 65536).unwrap() == pattern(seed, 65536),
            "write at {at} lost"
        );
    }
    assert!(
        read_direct(&dev, unflushed.0, 4096).unwrap() == pattern(unflushed.1, 4096),
        "acknowledged write lost across the kill"
    );
    assert!(
        read_direct(&dev, spots[3], MIB as usize).unwrap() == pattern(43, MIB as usize),
        "snapshot data differs after recovery"
    );
    drop(dev);
    m2.unmount();
    // Commit: only the written chunks are read; the new snapshot shows the writes.
    let c = lm(
        &[
            os("commit"),
            os("--store"),
            store.as_os_str(),
            ov.as_os_str(),
            os("--name"),
            os("thin-kept"),
            os("--json"),
        ],
        Duration::from_secs(600),
    );
    c.ok();
    let r: serde_json::Value = serde_json::from_str(&c.stdout).unwrap();
    assert!(
        r["bytes_read"].as_u64().unwrap_or(u64::MAX) <= 4 * MIB,
        "commit read {}",
        r["bytes_read"]
    );
    let kept = t.path().join("kept.overlay");
    let m3 = mount(
        &[
            os("--store"),
            store.as_os_str(),
            os("thin-kept"),
            os("--overlay"),
            kept.as_os_str(),
        ],
        &t.path().join("m3.log"),
    );
    let dev = open_direct(&m3.dev, false).unwrap();
    for &(at, seed) in writes.iter().chain([&unflushed]) {
        let len = if at == unflushed.0 { 4096 } else { 65536 };
        assert!(
            read_direct(&dev, at, len).unwrap() == pattern(seed, len),
            "committed snapshot lacks the write at {at}"
        );
    }
    assert!(
        read_direct(&dev, spots[5], MIB as usize).unwrap() == pattern(45, MIB as usize),
        "committed snapshot lost base data"
    );
    drop(dev);
    m3.unmount();
}

/// 17. `livemount migrate` of a real ublk device under a write+flush load: the
///     daemon is SIGKILLed three times during the copy and recovered each time;
///     when migrated, TARGET holds the snapshot and every flushed write, the store
///     is removed and the device keeps reading and writing (from TARGET alone).
#[test]
fn ublk_migrate_under_writes_survives_kills_and_outlives_the_store() {
    if !have_ublk("ublk_migrate_under_writes_survives_kills_and_outlives_the_store") {
        return;
    }
    let _t = Timer::start("ublk_migrate_under_writes_survives_kills_and_outlives_the_store");
    let fx = fixture();
    let t = tmp("migrate");
    let store = t.path().join("store");
    copy_store(fx, &store);
    let (ov, target) = (t.path().join("ov"), t.path().join("vm.raw"));
    let args = [
        os("--store"),
        store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
        os("--cache-mem"),
        os("16M"),
    ];
    let mut m = mount(&args, &t.path().join("m0.log"));
    let (stop, progress) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let w = start_writer(&m.dev, stop.clone(), progress.clone(), ledger.clone());
    wait_progress(&progress, &ledger, 10, "before the migration");
    // Bad input first: the overlay itself, an existing file.
    let e = lm(
        &[os("migrate"), os(&m.dev), os("--to"), ov.as_os_str()],
        Duration::from_secs(30),
    );
    e.one_line_error(&["overlay"]);
    let keep = t.path().join("keep.raw");
    fs::write(&keep, b"keep").unwrap();
    lm(
        &[os("migrate"), os(&m.dev), os("--to"), keep.as_os_str()],
        Duration::from_secs(30),
    )
    .one_line_error(&["exists"]);
    assert_eq!(fs::read(&keep).unwrap(), b"keep");
    lm(
        &[
            os("migrate"),
            os(&m.dev),
            os("--to"),
            target.as_os_str(),
            os("--rate"),
            os("4M"),
        ],
        Duration::from_secs(30),
    )
    .ok();
    let migration = |m: &Mount| m.status()["migration"].clone();
    for k in 1..=3 {
        std::thread::sleep(Duration::from_millis(2500));
        let before = migration(&m);
        assert_eq!(before["state"], "copying", "kill {k}: {before}");
        sigkill_daemon(&m);
        let log = t.path().join(format!("m{k}.log"));
        let rec = try_mount(&[os("--recover"), os(&m.dev)], &log);
        assert_eq!(rec.code, Some(0), "recovery {k} failed: {}", rec.stderr);
        let m2 = Mount::from_output(&rec.stdout, &log);
        std::mem::forget(std::mem::replace(&mut m, m2));
        let after = migration(&m);
        assert!(
            after["state"] == "copying" || after["state"] == "migrated",
            "kill {k}: the migration did not continue: {after}"
        );
        wait_progress(
            &progress,
            &ledger,
            progress.load(Ordering::SeqCst) + 3,
            "after recovery",
        );
    }
    let t0 = Instant::now();
    while migration(&m)["state"] != "migrated" {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "not migrated: {}",
            migration(&m)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let l = ledger.lock().unwrap();
    assert!(l.error.is_none(), "writer: {:?}", l.error);
    // TARGET: the snapshot outside the slots, every flushed slot write inside.
    let image = fs::read(&fx.image).unwrap();
    let tgt = fs::read(&target).unwrap();
    assert_eq!(tgt.len() as u64, image.len().next_multiple_of(512) as u64);
    assert!(tgt[..40 * MIB as usize] == image[..40 * MIB as usize]);
    assert!(tgt[60 * MIB as usize..image.len()] == image[60 * MIB as usize..]);
    for (&slot, &gen) in &l.flushed {
        let at = slot_offset(slot) as usize;
        assert!(
            tgt[at..at + SLOT_LEN] == slot_data(slot, gen)[..],
            "slot {slot}: flushed generation {gen} is not in TARGET"
        );
    }
    drop(l);
    // The store goes away: reads and writes go on, from TARGET.
    fs::rename(&store, t.path().join("store.gone")).unwrap();
    let errors = scan(
        &m.dev,
        image.len().next_multiple_of(512) as u64,
        Duration::from_secs(120),
    );
    assert!(
        errors.is_empty(),
        "reads failed without the store: {errors:?}"
    );
    let f = open_direct(&m.dev, true).unwrap();
    write_direct(&f, VOLATILE_AT, &pattern(99, 65536)).unwrap();
    f.sync_data().unwrap();
    drop(f);
    m.unmount();
    let tgt = fs::read(&target).unwrap();
    assert!(tgt[VOLATILE_AT as usize..VOLATILE_AT as usize + 65536] == pattern(99, 65536)[..]);
    assert!(
        !Path::new(&format!("{}.lmmig", target.display())).exists(),
        "the progress map outlived a completed migration"
    );
}

/// 18. Migrate while the VM's file system is busy: ext4 mounted on the live mount,
///     fio random writes with crc32c verification into a file on it, new files
///     written; when migrated (page cache dropped) every file and fio's data read
///     back from TARGET, the file system is clean, and after the unmount TARGET
///     alone is a clean ext4 holding the new files (read with debugfs).
#[test]
fn ublk_migrate_a_busy_ext4_with_fio_verify() {
    if !have_ublk("ublk_migrate_a_busy_ext4_with_fio_verify") {
        return;
    }
    let _t = Timer::start("ublk_migrate_a_busy_ext4_with_fio_verify");
    let fx = fixture();
    let t = tmp("migrate-ext4");
    let (ov, target) = (t.path().join("ov"), t.path().join("vm.raw"));
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
        os("--cache-mem"),
        os("16M"),
    ];
    let m = mount(&args, &t.path().join("m1.log"));
    let mnt = t.path().join("mnt");
    let fsm = FsMount::mount(&m.dev, &mnt, "rw");
    lm(
        &[
            os("migrate"),
            os(&m.dev),
            os("--to"),
            target.as_os_str(),
            os("--rate"),
            os("2M"),
        ],
        Duration::from_secs(30),
    )
    .ok();
    let fio_file = mnt.join("fio.dat");
    let fio_args = |extra: &str| {
        let mut v: Vec<String> = [
            "--name=lmmigrate",
            "--ioengine=libaio",
            "--direct=1",
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
            "--size=8M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randrepeat=1",
            "--output-format=terse",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.push(format!("--filename={}", fio_file.display()));
        v.extend(extra.split_whitespace().map(String::from));
        v
    };
    let run_fio = |extra: &str| {
        let a = fio_args(extra);
        let a: Vec<&std::ffi::OsStr> = a.iter().map(os).collect();
        tool("fio", &a, Duration::from_secs(180));
    };
    run_fio("--verify_backlog=64");
    let new_dir = mnt.join("new");
    fs::create_dir(&new_dir).unwrap();
    let big = pattern(5, 5 * MIB as usize + 77);
    write_file(&new_dir.join("big.bin"), &big);
    for i in 0..20u64 {
        write_file(
            &new_dir.join(format!("small-{i}")),
            &pattern(200 + i, 3000 + i as usize),
        );
    }
    tool("sync", &[], Duration::from_secs(60));
    let during = m.status()["migration"].clone();
    assert_eq!(
        during["state"], "copying",
        "the copy ended before the writes: {during}"
    );
    let t0 = Instant::now();
    while m.status()["migration"]["state"] != "migrated" {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{}",
            m.status()["migration"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Everything now comes from TARGET: drop the page cache and read it all back.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    run_fio("--verify_only");
    assert!(fs::read(new_dir.join("big.bin")).unwrap() == big);
    for i in 0..20u64 {
        assert!(
            fs::read(new_dir.join(format!("small-{i}"))).unwrap()
                == pattern(200 + i, 3000 + i as usize)
        );
    }
    let want = checksums(&fx.tree);
    let got = checksums(&mnt);
    for (p, s) in &want {
        assert_eq!(
            got.get(p),
            Some(s),
            "{} differs after the migration",
            p.display()
        );
    }
    fsm.umount();
    fsck_clean(&m.dev);
    m.unmount();
    // TARGET alone: a clean ext4 that holds the new file.
    fsck_clean(&target.display().to_string());
    let dumped = t.path().join("big.out");
    tool(
        "debugfs",
        &[
            os("-R"),
            os(&format!("dump /new/big.bin {}", dumped.display())),
            target.as_os_str(),
        ],
        Duration::from_secs(60),
    );
    assert!(
        fs::read(&dumped).unwrap() == big,
        "TARGET lacks the file written during the migration"
    );
    fx.assert_store_untouched();
}

/// 19. Migrate to a block device (a loop device over a file): one too small is
///     refused with a clear error; one large enough receives the disk (its progress
///     map beside the overlay), and `migrate --wait` returns when it is complete.
#[test]
fn ublk_migrate_to_a_block_device() {
    if !have_ublk("ublk_migrate_to_a_block_device") {
        return;
    }
    let _t = Timer::start("ublk_migrate_to_a_block_device");
    let fx = fixture();
    let t = tmp("migrate-blk");
    let ov = t.path().join("ov");
    tool("modprobe", &[os("loop")], Duration::from_secs(30));
    let dev_size = fx.image_size.next_multiple_of(512);
    let losetup = |file: &Path, size: u64| {
        let f = fs::File::create(file).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        tool(
            "losetup",
            &[os("--find"), os("--show"), file.as_os_str()],
            Duration::from_secs(30),
        )
        .trim()
        .to_string()
    };
    let small = losetup(&t.path().join("small.img"), dev_size - 1024 * 1024);
    let big = losetup(&t.path().join("big.img"), dev_size + 1024 * 1024);
    let detach = |d: &str| {
        let _ = try_run_bounded(
            Path::new("losetup"),
            &[os("-d"), os(d)],
            Duration::from_secs(30),
        );
    };
    let m = mount(
        &[
            os("--store"),
            fx.store.as_os_str(),
            os(&fx.snap),
            os("--overlay"),
            ov.as_os_str(),
        ],
        &t.path().join("m.log"),
    );
    lm(
        &[os("migrate"), os(&m.dev), os("--to"), os(&small)],
        Duration::from_secs(30),
    )
    .one_line_error(&["too small"]);
    let w = lm(
        &[
            os("migrate"),
            os(&m.dev),
            os("--to"),
            os(&big),
            os("--wait"),
        ],
        Duration::from_secs(300),
    );
    w.ok();
    assert!(w.stdout.contains("migrated to"), "{}", w.stdout);
    assert!(
        ov.with_extension("lmmig").exists(),
        "a block device's progress map lives beside the overlay"
    );
    let image = fs::read(&fx.image).unwrap();
    let f = fs::File::open(&big).unwrap();
    let mut got = vec![0u8; image.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == image, "the block device differs from the snapshot");
    m.unmount();
    assert!(
        !ov.with_extension("lmmig").exists(),
        "progress map left behind"
    );
    detach(&small);
    detach(&big);
    fx.assert_store_untouched();
}

/// A running `livemount serve` (killed if the test fails).
struct ServeChild(std::process::Child);

impl ServeChild {
    fn start(args: &[&std::ffi::OsStr], sock: &Path) -> ServeChild {
        let c = std::process::Command::new(bin())
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn livemount serve");
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(60), "serve not ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        ServeChild(c)
    }

    /// SIGTERM (every completed write flushed) and a clean exit.
    fn stop(mut self) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let st = self.0.wait().unwrap();
        assert!(st.success(), "serve exited {st}");
        std::mem::forget(self);
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kernel's own NBD client (`nbd-client`, the VM kernel's `nbd` module) on an
/// export of `livemount serve`, as on a hypervisor host without ublk: the original
/// files read back, then mkfs.ext4, mount, write, fsync, umount, disconnect; a
/// restarted server on the same overlay; reconnected, e2fsck is clean and every
/// file written reads back. The store is untouched.
#[test]
fn ublk_vm_kernel_nbd_client_ext4_across_a_server_restart() {
    let name = "ublk_vm_kernel_nbd_client_ext4_across_a_server_restart";
    if !have_ublk(name) {
        return;
    }
    let _t = Timer::start(name);
    let fx = fixture();
    let t = tmp("knbd");
    tool(
        "modprobe",
        &[os("nbd"), os("nbds_max=4")],
        Duration::from_secs(60),
    );
    let sock = t.path().join("nbd.sock");
    let ovl = t.path().join("ovl");
    let export = format!("knbd={}", fx.snap);
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os("--export"),
        os(&export),
        os("--overlay-dir"),
        ovl.as_os_str(),
    ];
    let dev = "/dev/nbd1";
    let attach = || {
        tool(
            "nbd-client",
            // 512-byte blocks (the default): the fixture's ext4 has 1 KiB blocks and
            // its size is not a multiple of 4 KiB.
            &[os("-unix"), sock.as_os_str(), os(dev), os("-N"), os("knbd")],
            Duration::from_secs(60),
        );
        // The size appears once the kernel has the connection.
        let t = Instant::now();
        while fs::read_to_string("/sys/block/nbd1/size")
            .map(|s| s.trim() == "0")
            .unwrap_or(true)
        {
            assert!(t.elapsed() < Duration::from_secs(30), "nbd1 has no size");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let detach = || {
        tool("nbd-client", &[os("-d"), os(dev)], Duration::from_secs(60));
    };
    let s = ServeChild::start(&args, &sock);
    attach();
    // The snapshot's ext4, as backed up.
    let mnt = t.path().join("mnt");
    let fsm = FsMount::mount(dev, &mnt, "ro");
    assert_eq!(
        checksums(&mnt),
        checksums(&fx.tree),
        "the snapshot's files over NBD"
    );
    fsm.umount();
    tool(
        "mkfs.ext4",
        &[os("-q"), os("-F"), os(dev)],
        Duration::from_secs(120),
    );
    let fsm = FsMount::mount(dev, &mnt, "rw");
    let big = pattern(77, 9 * MIB as usize + 321);
    write_file(&mnt.join("big.bin"), &big);
    for i in 0..20u64 {
        write_file(
            &mnt.join(format!("f{i}")),
            &pattern(200 + i, 1000 * i as usize + 1),
        );
    }
    let want = checksums(&mnt);
    fsm.umount();
    detach();
    s.stop();
    // A restarted server on the same overlay: everything is there, fsck clean.
    let s = ServeChild::start(&args, &sock);
    attach();
    fsck_clean(dev);
    let fsm = FsMount::mount(dev, &mnt, "ro");
    assert_eq!(checksums(&mnt), want, "files after a server restart");
    fsm.umount();
    detach();
    s.stop();
    fx.assert_store_untouched();
}

/// A VM test running `$body` (skipped on a host without ublk, timed).
macro_rules! power_cut_test {
    ($(#[$doc:meta])* $name:ident, $body:expr) => {
        $(#[$doc])*
        #[test]
        fn $name() {
            if !have_ublk(stringify!($name)) {
                return;
            }
            let _t = Timer::start(stringify!($name));
            $body;
        }
    };
}

/// Checks of [`ublk_power_cut_replay_overlay`] at every barrier (default: the marks
/// and about this many others, evenly spread).
const POWER_CUT_SAMPLE: usize = 10;

/// What had been acknowledged when a mark was logged.
struct Acked {
    mark: String,
    /// The overlay exists (the device was up) from this mark on.
    overlay: bool,
    /// The guest's ext4 exists (made and synced) from this mark on.
    guest_fs: bool,
    /// slot → the generation whose write + flush had completed.
    slots: HashMap<u64, u64>,
    /// Files f0..f{files} had been written and fsynced (file and directory).
    files: u64,
}

power_cut_test!(
    /// 15a. Power cut, replayed (dm-log-writes): the overlay lives on an ext4 on a
    ///      dm-log-writes device; on the live mount, an ext4 with fsynced files and raw
    ///      slots written + flushed, with a log mark after each acknowledgement. The
    ///      daemon is then SIGKILLed (no unmount: the power cut) and the log replayed
    ///      onto a fresh disk. At every mark and a spread of the other FLUSH/FUA points
    ///      (all of them with `LIVEMOUNT_POWER_CUT_ALL=1`), from that disk alone (no map
    ///      mirror: a reboot loses tmpfs): its ext4 is clean after journal recovery, a new
    ///      mount of the overlay succeeds, every slot and file acknowledged before the
    ///      last mark reads back (a slot may also show a later write), and the guest's
    ///      ext4 is clean after its own journal recovery.
    ublk_power_cut_replay_overlay,
    power_cut_replay_overlay(OuterFs::Ext4)
);

power_cut_test!(
    /// [`ublk_power_cut_replay_overlay`] with the overlay on an ext4 without a journal
    /// (the overlay's own fsyncs alone keep its file, data and map).
    ublk_power_cut_replay_overlay_ext4_nojournal,
    power_cut_replay_overlay(OuterFs::Ext4NoJournal)
);

fn power_cut_replay_overlay(outer_kind: OuterFs) {
    let fx = fixture();
    let t = tmp("powercut-ovl");
    let lw = dm::LogWrites::create(
        t.path(),
        &format!("lm-pc-ovl-{outer_kind:?}"),
        96 * MIB,
        1024 * MIB,
    );
    outer_kind.mkfs(&lw.dev);
    // mkfs is not atomic: states before this mark hold no file system yet.
    lw.mark("outer-fs");
    let outer = t.path().join("outer");
    let outer_fs = FsMount::mount(&lw.dev, &outer, "rw");
    let ov = outer.join("vm.overlay");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let m = mount(&args, &t.path().join("m.log"));
    let meta = fs::metadata(&ov).unwrap();
    let mirror =
        Path::new("/run/livemount").join(format!("overlay-{:x}-{}.map", meta.dev(), meta.ino()));
    let mut acked = vec![
        Acked {
            mark: "outer-fs".into(),
            overlay: false,
            guest_fs: false,
            slots: HashMap::new(),
            files: 0,
        },
        Acked {
            mark: "mounted".into(),
            overlay: true,
            guest_fs: false,
            slots: HashMap::new(),
            files: 0,
        },
    ];
    lw.mark("mounted");
    mkfs_first_32m(&m.dev);
    let guest = t.path().join("guest");
    let guest_fs = FsMount::mount(&m.dev, &guest, "rw");
    let dir = guest.join("d");
    fs::create_dir(&dir).unwrap();
    tool("sync", &[], Duration::from_secs(60));
    acked.push(Acked {
        mark: "guest-fs".into(),
        overlay: true,
        guest_fs: true,
        slots: HashMap::new(),
        files: 0,
    });
    lw.mark("guest-fs");
    let dev = open_direct(&m.dev, true).unwrap();
    let mut history: Vec<(u64, u64)> = Vec::new();
    let mut slots = HashMap::new();
    for i in 0..6u64 {
        for k in 0..3 {
            let gen = i * 3 + k + 1;
            let slot = gen * 7 % SLOTS;
            history.push((slot, gen));
            write_direct(&dev, slot_offset(slot), &slot_data(slot, gen)).unwrap();
            dev.sync_data().unwrap();
            slots.insert(slot, gen);
        }
        let p = dir.join(format!("f{i}"));
        let mut f = fs::File::create(&p).unwrap();
        std::io::Write::write_all(&mut f, &pattern(5000 + i, 40_000 + 4096 * i as usize)).unwrap();
        f.sync_all().unwrap();
        fs::File::open(&dir).unwrap().sync_all().unwrap();
        let mark = format!("acked-{i}");
        lw.mark(&mark);
        acked.push(Acked {
            mark,
            overlay: true,
            guest_fs: true,
            slots: slots.clone(),
            files: i + 1,
        });
    }
    drop(dev);
    // The power cut: the daemon dies with the guest's ext4 mounted; what the disk
    // under the overlay holds is all that is left.
    sigkill_daemon(&m);
    // Detaching the guest's ext4 writes its journal to the dead device, whose I/O
    // waits for a recovery: that umount finishes (with EIO) once `unmount` has
    // removed the device.
    let mut detach = std::process::Command::new("umount")
        .arg("-l")
        .arg(&guest)
        .spawn()
        .unwrap();
    std::mem::forget(guest_fs);
    lm(&[os("unmount"), os(&m.dev)], Duration::from_secs(60)).ok();
    wait_gone(&m.dev, m.id);
    std::mem::forget(m);
    bounded(
        "the guest's lazy umount",
        Duration::from_secs(60),
        move || detach.wait(),
    )
    .unwrap();
    let _ = fs::remove_file(&mirror);
    outer_fs.umount();
    let (log, size) = lw.remove();
    let mnt = t.path().join("check");
    let (barriers, checked, seen) = replay_power_cuts(
        &log,
        size,
        t.path(),
        POWER_CUT_SAMPLE,
        |what, mark, check_img| {
            let last = acked.iter().find(|a| a.mark == mark);
            assert!(last.is_some(), "unknown mark {mark:?} in the log");
            let what = format!("{outer_kind:?}: {what}");
            check_power_cut_state(fx, outer_kind, check_img, &mnt, last, &history, &what);
        },
    );
    assert!(
        acked.iter().all(|a| seen.contains(&a.mark)),
        "a mark is missing from the log: {seen:?}"
    );
    eprintln!(
        "power_cut_replay_overlay ({outer_kind:?}): {barriers} barriers in the log, {checked} states checked ({} marks)",
        acked.len()
    );
    fx.assert_store_untouched();
}

/// Replay the dm-log-writes log `log` of a `size`-byte disk onto a fresh file in
/// `dir`, and at every mark the test logged and at a spread of `sample` of the other
/// FLUSH/FUA points after the first mark (all of them with
/// `LIVEMOUNT_POWER_CUT_ALL=1`), copy the disk as it was then to `dir/check.img`
/// and call `check(what, last_mark, copy)`. Returns the barriers in the log, the states checked and
/// the marks seen.
#[track_caller]
fn replay_power_cuts(
    log: &Path,
    size: u64,
    dir: &Path,
    sample: usize,
    mut check: impl FnMut(&str, &str, &Path),
) -> (usize, usize, Vec<String>) {
    let copy = dir.join("check.img");
    use livemount_tests::logwrites::{Log, FUA};
    let mut log = Log::open(log).unwrap();
    let barriers = log.barriers().unwrap();
    let others = barriers.iter().filter(|e| e.mark.is_none()).count();
    let every = if std::env::var("LIVEMOUNT_POWER_CUT_ALL").is_ok_and(|v| v == "1") {
        1
    } else {
        others.div_ceil(sample).max(1)
    };
    let replay = dir.join("replay.img");
    let target = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&replay)
        .unwrap();
    target.set_len(size).unwrap();
    let (mut seen_other, mut checked) = (0usize, 0usize);
    let mut last: Option<String> = None;
    let mut seen = Vec::new();
    log.replay(&target, |e, target| {
        // The kernel logs its own mark when the target is removed.
        if let Some(name) = e.mark.as_ref().filter(|m| *m != "dm-log-writes-end") {
            last = Some(name.clone());
            seen.push(name.clone());
        } else {
            seen_other += 1;
            if last.is_none() || (seen_other - 1) % every != 0 {
                return Ok(true);
            }
        }
        let Some(mark) = &last else { return Ok(true) };
        target.sync_all()?;
        fs::copy(&replay, &copy)?;
        let kind = match &e.mark {
            Some(m) => format!("mark {m}"),
            None if e.flags & FUA != 0 => "FUA".into(),
            None => "FLUSH".into(),
        };
        let what = format!(
            "power cut at log entry {} ({kind}; after mark {mark:?})",
            e.index
        );
        check(&what, mark, &copy);
        checked += 1;
        Ok(true)
    })
    .unwrap();
    (barriers.len(), checked, seen)
}

/// `--store STORE SNAPSHOT --overlay OV`: a mount of the fixture's snapshot.
fn overlay_args<'a>(fx: &'a Fixture, ov: &'a Path) -> [&'a std::ffi::OsStr; 5] {
    [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ]
}

/// True if `got` is slot `slot`'s data of generation `gen` or of a later write of
/// it in `history` (a write after the acknowledged one may have landed too).
fn acked_slot_holds(got: &[u8], slot: u64, gen: u64, history: &[(u64, u64)]) -> bool {
    history
        .iter()
        .any(|&(s, g)| s == slot && g >= gen && got == &slot_data(slot, g)[..])
}

/// Mount `ov` over the fixture's snapshot, failing with `what` and the mount's
/// stderr if it does not come up.
#[track_caller]
fn mount_replayed_overlay(fx: &Fixture, ov: &Path, log: &Path, what: &str) -> Mount {
    let out = try_mount(&overlay_args(fx, ov), log);
    assert_eq!(
        out.code,
        Some(0),
        "{what}: mounting the overlay failed: {}",
        out.stderr
    );
    Mount::from_output(&out.stdout, log)
}

/// Every slot of `slots` on device `dev` holds its acknowledged generation (or a
/// later one).
#[track_caller]
fn assert_acked_slots(dev: &str, slots: &HashMap<u64, u64>, history: &[(u64, u64)], what: &str) {
    let f = open_direct(dev, false).unwrap();
    for (&slot, &gen) in slots {
        let got = read_direct(&f, slot_offset(slot), SLOT_LEN).unwrap();
        assert!(
            acked_slot_holds(&got, slot, gen, history),
            "{what}: slot {slot}: acknowledged generation {gen} lost"
        );
    }
}

/// One replayed disk: its ext4, the overlay on it, the guest's data and ext4.
#[track_caller]
fn check_power_cut_state(
    fx: &Fixture,
    outer_kind: OuterFs,
    img: &Path,
    mnt: &Path,
    acked: Option<&Acked>,
    history: &[(u64, u64)],
    what: &str,
) {
    let Some(a) = acked else { return };
    let lo = dm::Loop::attach(img);
    outer_kind.recover(&lo.dev, what);
    let fsm = FsMount::mount(&lo.dev, mnt, "rw");
    let ov = mnt.join("vm.overlay");
    if a.overlay {
        let m = mount_replayed_overlay(fx, &ov, &mnt.with_extension("log"), what);
        assert_acked_slots(&m.dev, &a.slots, history, what);
        if a.guest_fs {
            let gdir = mnt.with_extension("guest");
            let g = FsMount::mount(&m.dev, &gdir, "rw");
            for i in 0..a.files {
                let got = fs::read(gdir.join("d").join(format!("f{i}")))
                    .unwrap_or_else(|e| panic!("{what}: fsynced file f{i}: {e}"));
                assert!(
                    got == pattern(5000 + i, 40_000 + 4096 * i as usize),
                    "{what}: fsynced file f{i} differs"
                );
            }
            g.umount();
            fsck_clean(&m.dev);
        }
        m.unmount();
    }
    fsm.umount();
    outer_kind.check(&lo.dev, what);
}

power_cut_test!(
    /// 15b. Power cut, replayed, for backups (the VM for its dm-log-writes, not for
    ///      ublk): the store lives on a file system on a dm-log-writes device. A first backup;
    ///      then, at once, an incremental of that series and a backup of a second series
    ///      that shares most of its chunks (one backup reusing chunks the other has just
    ///      written); then `forget` of the first snapshot and `gc`. The log is replayed
    ///      onto a fresh disk, and at every mark and a spread of the other FLUSH/FUA
    ///      points (all of them with `LIVEMOUNT_POWER_CUT_ALL=1`), from that disk alone:
    ///      the file system is clean after its log recovery, `verify` of the whole store passes
    ///      (no index names a chunk that did not survive), and every snapshot whose
    ///      backup had returned before the last mark is listed (a forgotten one is not).
    ///
    ///      On ext4 and on btrfs: ext4's fsync commits its whole journal, so a missing
    ///      fsync of a chunk's directory does not show there (seen: every state passed
    ///      with the chunk-directory syncs removed); btrfs logs only the fsynced inode,
    ///      which exposes it.
    ublk_power_cut_replay_backup_ext4,
    power_cut_replay_backup(OuterFs::Ext4)
);

power_cut_test!(
    /// [`ublk_power_cut_replay_backup_ext4`] with the store on an ext4 without a
    /// journal, where only the store's own fsyncs order its metadata.
    ublk_power_cut_replay_backup_ext4_nojournal,
    power_cut_replay_backup(OuterFs::Ext4NoJournal)
);

power_cut_test!(
    /// [`ublk_power_cut_replay_backup_ext4`] with the store on btrfs.
    ublk_power_cut_replay_backup_btrfs,
    power_cut_replay_backup(OuterFs::Btrfs)
);

/// The file system under a power-cut test's store.
#[derive(Clone, Copy, Debug)]
enum OuterFs {
    Ext4,
    /// ext4 without a journal: nothing orders metadata writes but the fsyncs.
    Ext4NoJournal,
    Btrfs,
}

impl OuterFs {
    #[track_caller]
    fn mkfs(self, dev: &str) {
        match self {
            OuterFs::Ext4 => tool(
                "mkfs.ext4",
                &[os("-q"), os("-F"), os(dev)],
                Duration::from_secs(120),
            ),
            OuterFs::Ext4NoJournal => tool(
                "mkfs.ext4",
                &[os("-q"), os("-F"), os("-O"), os("^has_journal"), os(dev)],
                Duration::from_secs(120),
            ),
            OuterFs::Btrfs => {
                tool("modprobe", &[os("btrfs")], Duration::from_secs(60));
                tool(
                    "mkfs.btrfs",
                    &[os("-q"), os("-f"), os(dev)],
                    Duration::from_secs(120),
                )
            }
        };
    }

    /// What the boot after a power cut does before mounting: without a journal,
    /// e2fsck repairs (files whose directory entry was not durable end up in
    /// lost+found, where the store does not look for them).
    #[track_caller]
    fn recover(self, dev: &str, what: &str) {
        if let OuterFs::Ext4NoJournal = self {
            let out = run_bounded(
                Path::new("e2fsck"),
                &[os("-fy"), os(dev)],
                Duration::from_secs(120),
            );
            assert!(
                matches!(out.code, Some(0 | 1)),
                "{what}: e2fsck -fy {dev} could not repair it: {}{}",
                out.stdout,
                out.stderr
            );
        }
    }

    /// The unmounted file system is consistent.
    #[track_caller]
    fn check(self, dev: &str, what: &str) {
        match self {
            OuterFs::Ext4 | OuterFs::Ext4NoJournal => fsck_clean(dev),
            OuterFs::Btrfs => {
                let out = run_bounded(
                    Path::new("btrfs"),
                    &[os("check"), os("--readonly"), os(dev)],
                    Duration::from_secs(120),
                );
                assert_eq!(
                    out.code,
                    Some(0),
                    "{what}: btrfs check --readonly {dev}: {}{}",
                    out.stdout,
                    out.stderr
                );
            }
        }
    }
}

fn power_cut_replay_backup(outer_kind: OuterFs) {
    let t = tmp("powercut-bk");
    // Three 12 MiB images: a, a changed in two chunks, a's first 8 MiB with 4 new.
    let a = pattern(71, 12 * MIB as usize);
    let mut a2 = a.clone();
    a2[3 * MIB as usize..3 * MIB as usize + 4096].fill(0x5a);
    a2[9 * MIB as usize + 77..9 * MIB as usize + 9000].fill(0xa5);
    let mut b = a[..8 * MIB as usize].to_vec();
    b.extend(pattern(72, 4 * MIB as usize));
    let imgs = [("a", &a), ("a2", &a2), ("b", &b)].map(|(n, d)| {
        let p = t.path().join(format!("{n}.img"));
        fs::write(&p, d).unwrap();
        p
    });
    let lw = dm::LogWrites::create(
        t.path(),
        &format!("lm-pc-bk-{outer_kind:?}"),
        256 * MIB,
        1024 * MIB,
    );
    outer_kind.mkfs(&lw.dev);
    lw.mark("outer-fs");
    let outer = t.path().join("outer");
    let outer_fs = FsMount::mount(&lw.dev, &outer, "rw");
    let store = outer.join("store");
    let backup = |img: &Path, series: &str| backup(&store, img, series);
    // mark → (snapshots that must be listed, snapshots that must not).
    let mut marks: Vec<(String, Vec<String>, Vec<String>)> =
        vec![("outer-fs".into(), vec![], vec![])];
    let first = backup(&imgs[0], "a");
    lw.mark("first");
    marks.push(("first".into(), vec![first.clone()], vec![]));
    // Snapshot names have a one-second resolution.
    std::thread::sleep(Duration::from_millis(1100));
    let (second, other) = std::thread::scope(|s| {
        let x = s.spawn(|| backup(&imgs[1], "a"));
        let y = s.spawn(|| backup(&imgs[2], "b"));
        (x.join().unwrap(), y.join().unwrap())
    });
    lw.mark("concurrent");
    // From here on the forget below may already have removed the first snapshot.
    marks.push((
        "concurrent".into(),
        vec![second.clone(), other.clone()],
        vec![],
    ));
    lm(
        &[os("forget"), os("--store"), store.as_os_str(), os(&first)],
        Duration::from_secs(60),
    )
    .ok();
    lw.mark("forgotten");
    marks.push((
        "forgotten".into(),
        vec![second.clone(), other.clone()],
        vec![first.clone()],
    ));
    lm(
        &[os("gc"), os("--store"), store.as_os_str()],
        Duration::from_secs(120),
    )
    .ok();
    lw.mark("gc");
    marks.push((
        "gc".into(),
        vec![second.clone(), other.clone()],
        vec![first.clone()],
    ));
    outer_fs.umount();
    let (log, size) = lw.remove();
    let mnt = t.path().join("check");
    let (barriers, checked, seen) = replay_power_cuts(
        &log,
        size,
        t.path(),
        2 * POWER_CUT_SAMPLE,
        |what, mark, check_img| {
            let Some((_, present, absent)) = marks.iter().find(|m| m.0 == mark) else {
                panic!("unknown mark {mark:?} in the log");
            };
            let what = format!("{outer_kind:?}: {what}");
            let lo = dm::Loop::attach(check_img);
            outer_kind.recover(&lo.dev, &what);
            let fsm = FsMount::mount(&lo.dev, &mnt, "rw");
            let store = mnt.join("store");
            if present.is_empty() && !store.join("livemount-store.json").exists() {
                // Before the first backup made the store.
            } else {
                let v = lm(
                    &[os("verify"), os("--store"), store.as_os_str(), os("--json")],
                    Duration::from_secs(300),
                );
                assert_eq!(
                    v.code,
                    Some(0),
                    "{what}: verify failed: {}{}",
                    v.stdout,
                    v.stderr
                );
                let listed = lm(
                    &[os("list"), os("--store"), store.as_os_str(), os("--json")],
                    Duration::from_secs(60),
                );
                let l: serde_json::Value = serde_json::from_str(&listed.ok().stdout).unwrap();
                let names: Vec<&str> = l
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|s| s["snapshot"].as_str())
                    .collect();
                for p in present {
                    assert!(
                        names.contains(&p.as_str()),
                        "{what}: {p} is not listed: {names:?}"
                    );
                }
                for a in absent {
                    assert!(
                        !names.contains(&a.as_str()),
                        "{what}: forgotten {a} is listed"
                    );
                }
            }
            fsm.umount();
            outer_kind.check(&lo.dev, &what);
        },
    );
    assert!(
        marks.iter().all(|m| seen.contains(&m.0)),
        "a mark is missing from the log: {seen:?}"
    );
    eprintln!(
        "power_cut_replay_backup ({outer_kind:?}): {barriers} barriers in the log, {checked} states checked ({} marks)",
        marks.len()
    );
}

/// 15c. A disk that fails under the overlay (dm `error` target, then back to
///      `linear`): the guest's flush gets EIO, never success; `status` says the
///      overlay failed; it stays failed when the disk comes back (a failed fdatasync
///      may have dropped pages: no later flush may make map bits durable over them);
///      writes after it fail, reads of unwritten ranges still work, the daemon stays
///      up and unmounts. After fsck of the disk, a new mount shows every write that
///      was flushed before the failure.
#[test]
fn ublk_overlay_on_a_failing_disk() {
    if !have_ublk("ublk_overlay_on_a_failing_disk") {
        return;
    }
    let _t = Timer::start("ublk_overlay_on_a_failing_disk");
    let fx = fixture();
    let t = tmp("faildisk");
    let disk = dm::Switchable::create(t.path(), "lm-faildisk", 96 * MIB);
    OuterFs::Ext4.mkfs(&disk.dev);
    let outer = t.path().join("outer");
    let outer_fs = FsMount::mount(&disk.dev, &outer, "rw");
    let ov = outer.join("vm.overlay");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let m = mount(&args, &t.path().join("m.log"));
    let f = open_direct(&m.dev, true).unwrap();
    write_direct(&f, slot_offset(1), &slot_data(1, 1)).unwrap();
    f.sync_data().unwrap();
    assert_eq!(m.status()["overlay_state"], "ok");

    disk.fail(true);
    let flushed = write_direct(&f, slot_offset(2), &slot_data(2, 2)).and_then(|_| f.sync_data());
    assert!(
        flushed.is_err(),
        "a write + flush succeeded on a disk that fails every I/O"
    );
    wait_overlay_state(&m, "failed");
    disk.fail(false);
    let again = write_direct(&f, slot_offset(3), &slot_data(3, 3)).and_then(|_| f.sync_data());
    assert!(
        again.is_err(),
        "a write + flush succeeded after an earlier flush had failed"
    );
    assert!(
        read_direct(&f, slot_offset(1), SLOT_LEN).is_err(),
        "a written range was served after the overlay failed"
    );
    // Far below the slots: never written, the snapshot's bytes.
    let base = read_direct(&f, 0, 4096).expect("an unwritten range fails after the overlay failed");
    assert_eq!(base, fs::read(&fx.image).unwrap()[..4096]);
    drop(f);
    let text = lm(&[os("status"), os(&m.dev)], Duration::from_secs(20));
    assert!(
        text.stdout.contains("overlay: FAILED"),
        "status does not say the overlay failed:\n{}",
        text.stdout
    );
    let prom = lm(&[os("status"), os("--prometheus")], Duration::from_secs(20));
    assert!(
        prom.stdout.contains(&format!(
            "livemount_overlay_failed{{device=\"{}\"}} 1",
            m.dev
        )),
        "{}",
        prom.stdout
    );
    assert!(alive(m.pid()), "the daemon died after the failed flush");
    let (dev, id) = (m.dev.clone(), m.id);
    let _ = try_run_bounded(&bin(), &[os("unmount"), os(&dev)], Duration::from_secs(60));
    wait_gone(&dev, id);
    std::mem::forget(m);
    outer_fs.umount();
    OuterFs::Ext4NoJournal.recover(&disk.dev, "after the failure");
    let outer_fs = FsMount::mount(&disk.dev, &outer, "rw");
    let m = mount(&args, &t.path().join("m2.log"));
    let f = open_direct(&m.dev, false).unwrap();
    assert!(
        read_direct(&f, slot_offset(1), SLOT_LEN).unwrap() == slot_data(1, 1),
        "the write flushed before the failure is lost"
    );
    drop(f);
    m.unmount();
    outer_fs.umount();
    fx.assert_store_untouched();
}

/// Wait (bounded) until the status file shows the overlay in `state` (the daemon
/// rewrites it every second).
#[track_caller]
fn wait_overlay_state(m: &Mount, state: &str) {
    let start = Instant::now();
    loop {
        let got = m.status()["overlay_state"].clone();
        if got == state {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "overlay state {got} after 15 s, expected {state}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 15d. The overlay's file system fills up (ENOSPC): the write that does not fit
///      fails (ENOSPC), the daemon names the overlay and the error in its log and keeps
///      serving; flushes of what was written still succeed; after unmount, a new
///      mount shows every flushed write.
#[test]
fn ublk_overlay_enospc() {
    if !have_ublk("ublk_overlay_enospc") {
        return;
    }
    let _t = Timer::start("ublk_overlay_enospc");
    let fx = fixture();
    let t = tmp("enospc");
    let img = t.path().join("small.img");
    fs::File::create(&img).unwrap().set_len(24 * MIB).unwrap();
    let lo = dm::Loop::attach(&img);
    OuterFs::Ext4.mkfs(&lo.dev);
    let outer = t.path().join("outer");
    let outer_fs = FsMount::mount(&lo.dev, &outer, "rw");
    let ov = outer.join("vm.overlay");
    let args = [
        os("--store"),
        fx.store.as_os_str(),
        os(&fx.snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let log = t.path().join("m.log");
    let m = mount(&args, &log);
    let f = open_direct(&m.dev, true).unwrap();
    let mut flushed = 0u64;
    let mut failed = None;
    for i in 0..64u64 {
        let r =
            write_direct(&f, i * MIB, &pattern(900 + i, MIB as usize)).and_then(|_| f.sync_data());
        match r {
            Ok(()) => flushed = i + 1,
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("64 MiB fitted into an overlay on a 24 MiB file system");
    assert!(flushed >= 4, "only {flushed} MiB fitted");
    // The daemon answers ENOSPC and the kernel passes it on (BLK_STS_NOSPC).
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    assert!(alive(m.pid()), "the daemon died on ENOSPC");
    let text = m.log_text();
    assert!(
        text.contains("No space left on device") && text.contains("vm.overlay"),
        "the daemon's log does not name the overlay and ENOSPC:\n{text}"
    );
    f.sync_data().expect("a flush after ENOSPC failed");
    assert!(
        read_direct(&f, 0, MIB as usize).unwrap() == pattern(900, MIB as usize),
        "the first flushed write does not read back"
    );
    drop(f);
    m.unmount();
    let m = mount(&args, &t.path().join("m2.log"));
    let f = open_direct(&m.dev, false).unwrap();
    for i in 0..flushed {
        assert!(
            read_direct(&f, i * MIB, MIB as usize).unwrap() == pattern(900 + i, MIB as usize),
            "flushed MiB {i} lost after ENOSPC"
        );
    }
    drop(f);
    m.unmount();
    outer_fs.umount();
    fx.assert_store_untouched();
}

/// 15e. /run/livemount on a 1 MiB tmpfs, a 16 GiB thin snapshot: the map mirror
///      outgrows it as the guest writes across the disk; the daemon warns, `status`
///      shows synchronous writes, and a write acknowledged without a flush survives a
///      SIGKILL and `mount --recover` (it was made durable before it completed).
#[test]
fn ublk_run_dir_on_a_1_mib_tmpfs() {
    if !have_ublk("ublk_run_dir_on_a_1_mib_tmpfs") {
        return;
    }
    let _t = Timer::start("ublk_run_dir_on_a_1_mib_tmpfs");
    let t = tmp("smallrun");
    const SIZE: u64 = 16 << 30;
    let img = t.path().join("thin.img");
    let file = fs::File::create(&img).unwrap();
    file.set_len(SIZE).unwrap();
    file.write_all_at(&pattern(3, MIB as usize), 0).unwrap();
    drop(file);
    let store = t.path().join("store");
    let snap = backup(&store, &img, "thin");
    fs::remove_file(&img).unwrap();
    let run = Path::new("/run/livemount");
    fs::create_dir_all(run).unwrap();
    tool(
        "mount",
        &[
            os("-t"),
            os("tmpfs"),
            os("-o"),
            os("size=1M,mode=0700"),
            os("tmpfs"),
            run.as_os_str(),
        ],
        Duration::from_secs(30),
    );
    let _small = FsMount {
        dir: run.to_path_buf(),
        mounted: true,
    };
    let ov = t.path().join("thin.overlay");
    let args = [
        os("--store"),
        store.as_os_str(),
        os(&snap),
        os("--overlay"),
        ov.as_os_str(),
    ];
    let log = t.path().join("m.log");
    let m = mount(&args, &log);
    assert_eq!(m.status()["overlay_state"], "ok");
    let f = open_direct(&m.dev, true).unwrap();
    // One 4 KiB write per 16 MiB (one map page each): 2 MiB of mirror pages.
    for i in 0..512u64 {
        write_direct(&f, i * 16 * MIB + 8192, &pattern(7000 + i, 4096)).unwrap();
    }
    let run_df = tool(
        "sh",
        &[os("-c"), os("df -k /run/livemount; ls -las /run/livemount")],
        Duration::from_secs(20),
    );
    assert!(
        m.log_text().contains("WARNING: no map mirror"),
        "no warning in the log:\n{}\n{run_df}",
        m.log_text()
    );
    wait_overlay_state(&m, "synchronous");
    let prom = lm(&[os("status"), os("--prometheus")], Duration::from_secs(20));
    assert!(
        prom.stdout.contains(&format!(
            "livemount_overlay_synchronous{{device=\"{}\"}} 1",
            m.dev
        )),
        "{}",
        prom.stdout
    );
    let last = pattern(8000, 4096);
    write_direct(&f, SIZE - 4096, &last).unwrap();
    drop(f);
    sigkill_daemon(&m);
    let rlog = t.path().join("recover.log");
    let rec = try_mount(&[os("--recover"), os(&m.dev)], &rlog);
    assert_eq!(rec.code, Some(0), "mount --recover failed: {}", rec.stderr);
    let m2 = Mount::from_output(&rec.stdout, &rlog);
    std::mem::forget(m);
    let f = open_direct(&m2.dev, false).unwrap();
    assert!(
        read_direct(&f, SIZE - 4096, 4096).unwrap() == last,
        "a write acknowledged without a flush was lost with the mirror gone"
    );
    for i in [0u64, 100, 511] {
        assert!(
            read_direct(&f, i * 16 * MIB + 8192, 4096).unwrap() == pattern(7000 + i, 4096),
            "write {i} lost"
        );
    }
    drop(f);
    m2.unmount();
}

/// 19b. The disk under a completed migration's TARGET fails (a dm `error` target,
///      then `linear` again): the guest's flush gets EIO, and from then on every
///      request does, also once the disk is back (a failed fdatasync may have
///      dropped pages the kernel had accepted, and TARGET is the only copy);
///      `status` says the migration failed; the daemon stays up and unmounts.
#[test]
fn ublk_migrated_disk_that_fails_stays_failed() {
    if !have_ublk("ublk_migrated_disk_that_fails_stays_failed") {
        return;
    }
    let _t = Timer::start("ublk_migrated_disk_that_fails_stays_failed");
    let fx = fixture();
    let t = tmp("migfail");
    let disk = dm::Switchable::create(t.path(), "lm-migfail", 72 * MIB);
    let ov = t.path().join("ov");
    let m = mount(&overlay_args(fx, &ov), &t.path().join("m.log"));
    lm(
        &[
            os("migrate"),
            os(&m.dev),
            os("--to"),
            os(&disk.dev),
            os("--wait"),
        ],
        Duration::from_secs(300),
    )
    .ok();
    let f = open_direct(&m.dev, true).unwrap();
    write_direct(&f, slot_offset(1), &slot_data(1, 1)).unwrap();
    f.sync_data().unwrap();
    assert_eq!(m.status()["migration"]["state"], "migrated");

    disk.fail(true);
    let flushed = write_direct(&f, slot_offset(2), &slot_data(2, 2)).and_then(|_| f.sync_data());
    assert!(
        flushed.is_err(),
        "a write + flush succeeded on a migrated disk that fails every I/O"
    );
    disk.fail(false);
    let again = write_direct(&f, slot_offset(3), &slot_data(3, 3)).and_then(|_| f.sync_data());
    assert!(
        again.is_err(),
        "a write + flush succeeded after an earlier flush of the migrated disk had failed"
    );
    assert!(
        read_direct(&f, slot_offset(1), SLOT_LEN).is_err(),
        "a read was served after a flush of the migrated disk failed"
    );
    drop(f);
    let start = Instant::now();
    loop {
        let mig = m.status()["migration"].clone();
        if mig["state"] == "failed" {
            assert!(
                mig["error"].as_str().is_some_and(|e| e.contains("flush")),
                "{mig}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "status does not say the migration failed: {mig}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(alive(m.pid()), "the daemon died after the failed flush");
    let (dev, id) = (m.dev.clone(), m.id);
    let _ = try_run_bounded(&bin(), &[os("unmount"), os(&dev)], Duration::from_secs(60));
    wait_gone(&dev, id);
    std::mem::forget(m);
    fx.assert_store_untouched();
}

/// What had been acknowledged when a mark of the migration's power-cut log was
/// logged.
struct MigAcked {
    mark: String,
    /// The overlay exists (the device was up) from this mark on.
    overlay: bool,
    /// `migrate --wait` had returned: the migration was reported complete.
    migrated: bool,
    /// slot → the generation whose write + flush had completed.
    slots: HashMap<u64, u64>,
}

power_cut_test!(
    /// 19c. Power cut during and after a migration, replayed (dm-log-writes): the
    ///      overlay, TARGET and its progress map on an ext4 on a dm-log-writes
    ///      device; slots written + flushed before, during (the copy held to 8 MiB/s)
    ///      and after the migration, a mark after each acknowledgement and after
    ///      `migrate --wait` returned. At every mark and a spread of the other
    ///      FLUSH/FUA points, from the replayed disk alone: a map that says complete
    ///      has TARGET equal to the snapshot plus every acknowledged write (never
    ///      done early), a migration reported complete has such a map, and until
    ///      then a new mount of the overlay has every acknowledged write.
    ublk_power_cut_replay_migration,
    power_cut_replay_migration()
);

fn power_cut_replay_migration() {
    let fx = fixture();
    let t = tmp("powercut-mig");
    let lw = dm::LogWrites::create(t.path(), "lm-pc-mig", 128 * MIB, 1024 * MIB);
    OuterFs::Ext4.mkfs(&lw.dev);
    lw.mark("outer-fs");
    let outer = t.path().join("outer");
    let outer_fs = FsMount::mount(&lw.dev, &outer, "rw");
    let (ov, target) = (outer.join("vm.overlay"), outer.join("vm.raw"));
    let m = mount(&overlay_args(fx, &ov), &t.path().join("m.log"));
    let meta = fs::metadata(&ov).unwrap();
    let mirror =
        Path::new("/run/livemount").join(format!("overlay-{:x}-{}.map", meta.dev(), meta.ino()));
    let mut acked = vec![MigAcked {
        mark: "outer-fs".into(),
        overlay: false,
        migrated: false,
        slots: HashMap::new(),
    }];
    let dev = open_direct(&m.dev, true).unwrap();
    let (mut history, mut slots) = (Vec::new(), HashMap::new());
    let mut gen = 0u64;
    let mut step = |acked: &mut Vec<MigAcked>, name: String, migrated: bool, writes: u32| {
        for _ in 0..writes {
            gen += 1;
            let slot = gen * 7 % SLOTS;
            history.push((slot, gen));
            write_direct(&dev, slot_offset(slot), &slot_data(slot, gen)).unwrap();
            dev.sync_data().unwrap();
            slots.insert(slot, gen);
        }
        lw.mark(&name);
        acked.push(MigAcked {
            mark: name,
            overlay: true,
            migrated,
            slots: slots.clone(),
        });
    };
    step(&mut acked, "before".into(), false, 2);
    lm(
        &[
            os("migrate"),
            os(&m.dev),
            os("--to"),
            target.as_os_str(),
            os("--rate"),
            os("8M"),
        ],
        Duration::from_secs(30),
    )
    .ok();
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(700));
        step(&mut acked, format!("copying-{i}"), false, 2);
    }
    lm(
        &[os("migrate"), os(&m.dev), os("--wait")],
        Duration::from_secs(300),
    )
    .ok();
    step(&mut acked, "migrated".into(), true, 0);
    for i in 0..3 {
        step(&mut acked, format!("after-{i}"), true, 2);
    }
    drop(dev);
    // The power cut: TARGET, its map and the overlay are what the disk holds.
    sigkill_daemon(&m);
    lm(&[os("unmount"), os(&m.dev)], Duration::from_secs(60)).ok();
    wait_gone(&m.dev, m.id);
    std::mem::forget(m);
    let _ = fs::remove_file(&mirror);
    outer_fs.umount();
    let (log, size) = lw.remove();
    let mnt = t.path().join("check");
    let image = fs::read(&fx.image).unwrap();
    let (mut complete_states, mut copying_states) = (0, 0);
    let (barriers, checked, seen) = replay_power_cuts(
        &log,
        size,
        t.path(),
        POWER_CUT_SAMPLE,
        |what, mark, img| {
            let a = acked.iter().find(|a| a.mark == mark);
            let a = a.unwrap_or_else(|| panic!("unknown mark {mark:?} in the log"));
            let lo = dm::Loop::attach(img);
            OuterFs::Ext4.recover(&lo.dev, what);
            let fsm = FsMount::mount(&lo.dev, &mnt, "rw");
            let (ov, target) = (mnt.join("vm.overlay"), mnt.join("vm.raw"));
            let done = livemount::block::migrate::completed(&mnt.join("vm.raw.lmmig")).is_some();
            assert!(
                done || !a.migrated,
                "{what}: the migration was reported complete, but the map on disk does not say so"
            );
            if done {
                complete_states += 1;
                let tgt = fs::read(&target).unwrap();
                assert_eq!(tgt.len(), image.len().next_multiple_of(512), "{what}");
                let (lo_end, hi) = (40 * MIB as usize, 60 * MIB as usize);
                assert!(
                    tgt[..lo_end] == image[..lo_end] && tgt[hi..image.len()] == image[hi..],
                    "{what}: the map says complete, but TARGET differs from the snapshot"
                );
                for (&slot, &gen) in &a.slots {
                    let at = slot_offset(slot) as usize;
                    assert!(
                        acked_slot_holds(&tgt[at..at + SLOT_LEN], slot, gen, &history),
                        "{what}: the map says complete, but TARGET lacks slot {slot} generation {gen}"
                    );
                }
            } else if a.mark.starts_with("copying-") {
                copying_states += 1;
            }
            // Until the map on disk says complete, the overlay has every
            // acknowledged write (after completion writes go to TARGET alone, and
            // the complete map is durable before the first of them).
            if a.overlay && !done {
                let m = mount_replayed_overlay(fx, &ov, &mnt.with_extension("log"), what);
                assert_acked_slots(&m.dev, &a.slots, &history, what);
                m.unmount();
            }
            fsm.umount();
            OuterFs::Ext4.check(&lo.dev, what);
        },
    );
    assert!(
        acked.iter().all(|a| seen.contains(&a.mark)),
        "a mark is missing from the log: {seen:?}"
    );
    eprintln!(
        "power_cut_replay_migration: {barriers} barriers in the log, {checked} states checked ({} marks; {complete_states} with a complete map, {copying_states} mid-copy)",
        acked.len()
    );
    assert!(
        complete_states > 0 && copying_states > 0,
        "states with a complete map and states mid-copy are checked"
    );
    fx.assert_store_untouched();
}
