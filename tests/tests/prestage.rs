//! Pre-staging through the library (no ublk needed): exactly the planned frames are
//! staged, demand reads are not held up by a busy prefetcher, foreign profiles are
//! refused, and a learned profile covers what the same "boot" reads next time.

use livemount::block::prestage::{plan, PrestageWindow};
use livemount::block::BlockDevice;
use livemount::config::MountConfig;
use livemount::stack::Stack;
use livemount_store::format::profile::{Extent, Profile, Source};
use livemount_store::ops::backup::{backup, BackupOptions};
use livemount_store::progress::NoProgress;
use livemount_store::store::{Access, Store};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

const SIZE: usize = 16 << 20;

/// A 16 MiB image: compressible non-zero data except for an all-zero 1 MiB chunk.
fn make_store(dir: &Path) -> PathBuf {
    let mut x: u64 = 88172645463325252;
    let data: Vec<u8> = (0..SIZE)
        .map(|i| {
            if (5 << 20..6 << 20).contains(&i) {
                0
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefgh"[(x % 8) as usize]
            }
        })
        .collect();
    let src = dir.join("disk.img");
    std::fs::write(&src, &data).unwrap();
    let store = dir.join("store");
    let st = Store::open(&store, Access::Write).unwrap();
    let opts = BackupOptions {
        series: "vm".into(),
        chunk_size: None,
        level: 1,
        threads: 2,
    };
    backup(&st, &src, &opts, &NoProgress).unwrap();
    store
}

fn profile(extents: &[(u64, u64, u64)]) -> Profile {
    let mut p = Profile::new(SIZE as u64, 4096, Source::default());
    p.extents = extents
        .iter()
        .map(|&(offset, length, t)| Extent {
            offset,
            length,
            first_access_ns: t,
            count: 1,
            runs: 1,
        })
        .collect();
    p.sort_access_order();
    p
}

fn mount(store: &Path, profile_file: Option<&Path>, latency_ms: Option<f64>) -> Stack {
    let mut c = MountConfig::new(store.into(), "vm".into(), None);
    c.cache_mem = 64 << 20;
    c.profile = profile_file.map(Path::to_path_buf);
    c.store_latency_ms = latency_ms;
    Stack::open(&c).unwrap()
}

#[test]
fn stages_exactly_the_planned_frames() {
    let d = tempfile::tempdir().unwrap();
    let store = make_store(d.path());
    // Frames: chunk 0 frame 0; chunk 2 frames 1-2; chunk 5 is all zeros (skipped).
    let p = profile(&[
        (0, 4096, 0),
        ((2 << 20) + 65536, 98_304, 1000),
        ((5 << 20) + 8192, 4096, 2000),
    ]);
    let pf = d.path().join("p.json");
    p.save(&pf).unwrap();
    let m = mount(&store, Some(&pf), None);
    let pre = m.prestager.as_ref().expect("a profile gives a prestager");
    pre.stage_before_ready(PrestageWindow::All);
    let r = pre.progress.report();
    assert_eq!(r.steps_total, 2);
    assert_eq!(r.steps_done, 2);
    assert_eq!(r.planned_bytes, 3 * 65536);
    assert_eq!(r.staged_bytes, 3 * 65536);
    let c = m.cache.report();
    assert_eq!(
        c.decoded_bytes,
        3 * 65536,
        "exactly the named frames are decoded"
    );
    assert_eq!(c.mem_bytes, 3 * 65536);
    // Header+table of each of the 2 chunks, plus one range read per step.
    assert_eq!(c.store_reads, 4);
    // The boot's reads of those bytes now need no store access and count as saved.
    let mut buf = vec![0u8; 4096];
    assert!(m.top.read_cached(0, &mut buf));
    m.top
        .read_at((2 << 20) + 65536, &mut vec![0u8; 65536])
        .unwrap();
    let c2 = m.cache.report();
    assert_eq!(c2.store_reads, 4);
    assert!(c2.prestage_saved_reads >= 2, "{c2:?}");
}

#[test]
fn demand_reads_complete_while_prefetcher_is_busy() {
    let d = tempfile::tempdir().unwrap();
    let store = make_store(d.path());
    // Every frame of the disk, in order: 240 steps of 20 ms each on a slow store.
    let exts: Vec<(u64, u64, u64)> = (0..16u64).map(|c| (c << 20, 1 << 20, c * 1000)).collect();
    let pf = d.path().join("p.json");
    profile(&exts).save(&pf).unwrap();
    let m = mount(&store, Some(&pf), Some(20.0));
    let pre = m.prestager.clone().unwrap();
    let bg = std::thread::spawn(move || pre.continue_in_background());
    std::thread::sleep(std::time::Duration::from_millis(50));
    // A demand read at the end of the disk, which the prefetcher reaches last.
    let mut buf = vec![0u8; 4096];
    m.top.read_at((15 << 20) + 12288, &mut buf).unwrap();
    let after_demand = m.prestager.as_ref().unwrap().progress.report();
    assert!(
        !after_demand.finished,
        "the demand read waited for pre-staging to finish"
    );
    assert!(after_demand.steps_done < after_demand.steps_total);
    bg.join().unwrap();
    assert!(m
        .prestager
        .as_ref()
        .unwrap()
        .progress
        .finished
        .load(Relaxed));
}

#[test]
fn profile_of_another_disk_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let store = make_store(d.path());
    let mut p = profile(&[(0, 4096, 0)]);
    p.disk_size = (SIZE as u64) * 2;
    let pf = d.path().join("other.json");
    p.save(&pf).unwrap();
    let mut c = MountConfig::new(store.as_path().into(), "vm".into(), None);
    c.profile = Some(pf);
    let e = Stack::open(&c).err().expect("must refuse").to_string();
    assert!(e.contains("another disk"), "{e}");
    let st = Store::open(&store, Access::ReadOnly).unwrap();
    let idx = st.load_index(&st.resolve("vm").unwrap()).unwrap();
    assert!(plan(&idx, &p).is_err());
}

/// A "boot": scattered reads in a fixed order, some repeated.
fn boot(backend: &dyn BlockDevice) {
    let mut buf = vec![0u8; 16384];
    for i in 0..200u64 {
        let off = (i * 7919 * 4096) % (SIZE as u64 - 16384);
        let off = off - off % 4096;
        if !backend.read_cached(off, &mut buf) {
            backend.read_at(off, &mut buf).unwrap();
        }
    }
}

#[test]
fn learned_profile_covers_the_next_boot() {
    let d = tempfile::tempdir().unwrap();
    let store = make_store(d.path());
    let learned = d.path().join("learned.json");
    {
        let mut c = MountConfig::new(store.as_path().into(), "vm".into(), None);
        c.record_profile = Some(learned.clone());
        let m = Stack::open(&c).unwrap();
        m.recorder.as_ref().unwrap().restart_recording();
        boot(m.top.as_ref());
        m.recorder
            .as_ref()
            .unwrap()
            .learned_profile("test")
            .unwrap()
            .save(&learned)
            .unwrap();
    }
    let p = Profile::load(&learned).unwrap();
    assert!(p.working_set_bytes() > 0);
    let m = mount(&store, Some(&learned), None);
    m.prestager
        .as_ref()
        .unwrap()
        .stage_before_ready(PrestageWindow::All);
    let before = m.cache.report();
    boot(m.top.as_ref());
    let after = m.cache.report();
    let misses = after.mem_misses - before.mem_misses;
    let hits = after.mem_hits - before.mem_hits;
    let coverage = hits as f64 / (hits + misses) as f64;
    assert!(
        coverage >= 0.95,
        "pre-staging from the learned profile covered {coverage:.3} of the boot's frame reads"
    );
    assert_eq!(
        after.store_reads, before.store_reads,
        "the boot needed no store reads"
    );
}

/// A daemon that dies keeps what its periodic writes saved, and a recovered one
/// (`mount --recover`) continues that profile: the first daemon's reads, then its own.
#[test]
fn a_recovered_daemon_continues_the_learned_profile() {
    let d = tempfile::tempdir().unwrap();
    let store = make_store(d.path());
    let learned = d.path().join("learned.json");
    let mut c = MountConfig::new(store.as_path().into(), "vm".into(), None);
    c.record_profile = Some(learned.clone());
    let mut buf = vec![0u8; 16384];
    let first = {
        let m = Stack::open(&c).unwrap();
        m.recorder.as_ref().unwrap().restart_recording();
        for off in [0u64, 1 << 20] {
            m.top.read_at(off, &mut buf).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // What the periodic writer does; the daemon then "dies" without a final write.
        m.recorder
            .as_ref()
            .unwrap()
            .save_learned_profile("test", &learned)
            .unwrap();
        Profile::load(&learned).unwrap()
    };
    assert_eq!(first.extents.len(), 2);
    let m = Stack::open(&c).unwrap();
    assert!(m.recorder.as_ref().unwrap().resume_recording(&first));
    m.recorder.as_ref().unwrap().restart_recording();
    m.top.read_at(3 << 20, &mut buf).unwrap();
    m.recorder
        .as_ref()
        .unwrap()
        .save_learned_profile("test", &learned)
        .unwrap();
    let p = Profile::load(&learned).unwrap();
    let order: Vec<(u64, u64)> = p
        .extents_in_access_order()
        .map(|e| (e.offset, e.length))
        .collect();
    assert_eq!(order, vec![(0, 16384), (1 << 20, 16384), (3 << 20, 16384)]);
    let last = p.extents_in_access_order().last().unwrap();
    assert!(
        last.first_access_ns >= first.stats.duration_ns,
        "the recovered daemon's reads come after the first daemon's"
    );
    assert!(p.stats.duration_ns >= first.stats.duration_ns);
    // A profile of another disk is not continued.
    let mut other = first.clone();
    other.disk_size += 1 << 20;
    assert!(!m.recorder.as_ref().unwrap().resume_recording(&other));
}

/// `status` reports where a mount's memory goes: the overlay map (one bit per
/// sector) and its mirror, the index, the cache budget, the daemon's RSS.
#[test]
fn a_mount_reports_its_memory() {
    let t = tempfile::tempdir().unwrap();
    let store = make_store(t.path());
    let mut c = MountConfig::new(
        store.as_path().into(),
        "vm".into(),
        Some(t.path().join("ov")),
    );
    c.cache_mem = 8 << 20;
    c.prestage = "none".into();
    let stack = Stack::open(&c).unwrap();
    let m = livemount::daemon::status::MemoryReport::of(&stack);
    // Before any write the sector map is page pointers only (no bitmap of the
    // device), and the index at most one run per chunk.
    let full_map = SIZE as u64 / 512 / 8;
    assert!(
        m.overlay_map_bytes > 0 && m.overlay_map_bytes < full_map / 64,
        "{m:?}"
    );
    let run = 4 + std::mem::size_of::<livemount_store::format::index::ChunkRef>() as u64;
    assert!(m.index_bytes > 0 && m.index_bytes <= 2 * 16 * run, "{m:?}");
    assert_eq!(m.cache_mem_budget, 8 << 20);
    assert!(m.rss_bytes > 0);
    // The mirror exists on /run (as root: its header at least), or there is none
    // and writes are synchronous.
    let o = stack.overlay.as_ref().unwrap();
    assert!(
        m.mirror_bytes == 0 && o.synchronous_writes() || m.mirror_bytes >= 4096,
        "{m:?}"
    );
}
