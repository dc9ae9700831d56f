//! `livemount commit` through the library (no ublk needed): base snapshot + overlay
//! writes become a new snapshot that restores to exactly what the device showed.

use livemount::config::MountConfig;
use livemount::stack::commit;
use livemount::stack::Stack;
use livemount_store::ops::backup::{backup, BackupOptions};
use livemount_store::ops::restore::restore;
use livemount_store::progress::NoProgress;
use livemount_store::store::{Access, Store};

fn image(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..len)
        .map(|i| {
            if (i / 65536) % 3 == 0 {
                0
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 7) as u8
            }
        })
        .collect()
}

#[test]
fn commit_keeps_overlay_writes_and_dedups() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("disk.img");
    // Not a multiple of 512: the committed image keeps the exact size.
    let mut data = image(5 * 1024 * 1024 + 1000);
    std::fs::write(&src, &data).unwrap();
    let store_dir = d.path().join("store");
    let opts = |s: &str| BackupOptions {
        series: s.into(),
        chunk_size: None,
        level: 3,
        threads: 2,
    };
    {
        let store = Store::open(&store_dir, Access::Write).unwrap();
        backup(&store, &src, &opts("vm"), &NoProgress).unwrap();
    }
    let overlay = d.path().join("overlay");
    let mut config = MountConfig::new(
        store_dir.as_path().into(),
        "vm".into(),
        Some(overlay.clone()),
    );
    config.cache_mem = 1 << 20;
    {
        let m = Stack::open(&config).unwrap();
        // A second user of the overlay is refused while this one holds it.
        let e = Stack::open(&config)
            .err()
            .expect("second open must fail")
            .to_string();
        assert!(e.contains("in use"), "{e}");
        m.top.write_at(4096, &[0xab; 8192]).unwrap();
        m.top.write_at(3 * 1024 * 1024, &[0xcd; 512]).unwrap();
        m.top.discard(1024 * 1024 + 65536, 65536).unwrap();
        m.top.flush().unwrap();
        data[4096..4096 + 8192].fill(0xab);
        data[3 * 1024 * 1024..3 * 1024 * 1024 + 512].fill(0xcd);
        data[1024 * 1024 + 65536..1024 * 1024 + 131072].fill(0);
        let mut shown = vec![0u8; 5 * 1024 * 1024 + 1024];
        m.top.read_at(0, &mut shown).unwrap();
        assert_eq!(&shown[..data.len()], &data[..]);
    }
    let r = commit(
        &store_dir.as_path().into(),
        &overlay,
        &opts("vm-kept"),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(r.image_size, data.len() as u64);
    // Only the three changed chunks are new; the rest deduplicate against the base.
    assert!(r.chunks_new <= 3, "{r:?}");
    assert!(r.chunks_reused >= 1, "{r:?}");
    // And only the chunks the overlay wrote (0, 1 and 3 of 1 MiB) were read: the
    // others are the base's entries, taken without reading.
    assert_eq!(r.bytes_read, 3 << 20, "{r:?}");
    assert_eq!(r.bytes_unchanged, (2 << 20) + 1000, "{r:?}");
    let store = Store::open(&store_dir, Access::ReadOnly).unwrap();
    let snap = store.resolve("vm-kept").unwrap();
    let out = d.path().join("out.img");
    restore(&store, &snap, &out, false, 2, &NoProgress).unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // The base snapshot is untouched.
    let base = store.resolve("vm").unwrap();
    let out2 = d.path().join("base.img");
    restore(&store, &base, &out2, false, 2, &NoProgress).unwrap();
    assert_eq!(std::fs::read(&out2).unwrap(), image(5 * 1024 * 1024 + 1000));
}

#[test]
fn overlay_of_another_snapshot_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let store_dir = d.path().join("store");
    let store = Store::open(&store_dir, Access::Write).unwrap();
    for (name, seed) in [("a", 1u8), ("b", 2u8)] {
        let src = d.path().join(name);
        std::fs::write(&src, vec![seed; 1 << 20]).unwrap();
        backup(
            &store,
            &src,
            &BackupOptions {
                series: name.into(),
                chunk_size: None,
                level: 1,
                threads: 1,
            },
            &NoProgress,
        )
        .unwrap();
    }
    let overlay = d.path().join("ov");
    let mut config = MountConfig::new(store_dir.as_path().into(), "a".into(), Some(overlay));
    config.cache_mem = 1 << 20;
    drop(Stack::open(&config).unwrap());
    config.snapshot = "b".into();
    let e = Stack::open(&config).err().expect("must refuse").to_string();
    assert!(e.contains("belongs to snapshot a@"), "{e}");
}

/// A commit costs what the VM wrote, not the size of the disk: a 4 TiB thin
/// snapshot with one write at its end is committed by reading one chunk.
#[test]
fn commit_of_a_4_tib_overlay_reads_only_written_chunks() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("thin.img");
    let size = 4u64 << 40;
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &image(3 << 20), size / 2).unwrap();
    }
    let store_dir = d.path().join("store");
    let opts = |s: &str| BackupOptions {
        series: s.into(),
        chunk_size: None,
        level: 1,
        threads: 2,
    };
    backup(
        &Store::open(&store_dir, Access::Write).unwrap(),
        &src,
        &opts("thin"),
        &NoProgress,
    )
    .unwrap();
    let overlay = d.path().join("overlay");
    let mut config = MountConfig::new(
        store_dir.as_path().into(),
        "thin".into(),
        Some(overlay.clone()),
    );
    config.cache_mem = 1 << 20;
    config.prestage = "none".into();
    {
        let m = Stack::open(&config).unwrap();
        m.top.write_at(size - 4096, &[0x5a; 4096]).unwrap();
        m.top.flush().unwrap();
    }
    let r = commit(
        &store_dir.as_path().into(),
        &overlay,
        &opts("thin-kept"),
        &NoProgress,
    )
    .unwrap();
    assert_eq!(r.image_size, size);
    assert_eq!(r.bytes_read, 1 << 20, "{r:?}");
    assert_eq!(r.chunks_new, 1, "{r:?}");
    assert_eq!(r.chunks_reused, 3, "{r:?}");
    // The new snapshot shows the write and the base's data.
    let store = Store::open(&store_dir, Access::ReadOnly).unwrap();
    let idx = store
        .load_index(&store.resolve("thin-kept").unwrap())
        .unwrap();
    let base = store.load_index(&store.resolve("thin").unwrap()).unwrap();
    assert!(idx.chunks.runs().count() <= 6, "{:?}", idx.chunks);
    let last = idx.chunks.len() - 1;
    assert_ne!(idx.chunks[last], base.chunks[last]);
    for i in [0, idx.chunks.len() / 2, idx.chunks.len() / 2 + 2] {
        assert_eq!(idx.chunks[i], base.chunks[i], "chunk {i}");
    }
}
