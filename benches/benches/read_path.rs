//! The live mount's read path without the kernel: a 4 KiB read served from the memory
//! tier (the warm path on the ublk queue thread), a cold 4 KiB read (store read,
//! decode and verify of one 64 KiB frame), through `MountBackend` with an overlay,
//! and a cold sequential reader with and without sequential read-ahead.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use livemount::config::MountConfig;
use livemount::stack::Stack;
use livemount_store::ops::backup::{backup, BackupOptions};
use livemount_store::progress::NoProgress;
use livemount_store::store::{Access, Store};

const SIZE: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    let d = tempfile::tempdir().unwrap();
    let mut x: u64 = 0x2545F4914F6CDD1D;
    let data: Vec<u8> = (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"livemount read path "[(x % 20) as usize]
        })
        .collect();
    let src = d.path().join("img");
    std::fs::write(&src, &data).unwrap();
    let store = d.path().join("store");
    let st = Store::open(&store, Access::Write).unwrap();
    backup(
        &st,
        &src,
        &BackupOptions {
            series: "vm".into(),
            chunk_size: None,
            level: 3,
            threads: 2,
        },
        &NoProgress,
    )
    .unwrap();
    let mut cfg = MountConfig::new(
        store.as_path().into(),
        "vm".into(),
        Some(d.path().join("overlay")),
    );
    cfg.cache_mem = 256 << 20;
    let m = Stack::open(&cfg).unwrap();
    // Warm the memory tier (twice, so frames are in the protected segment).
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..2 {
        for off in (0..SIZE as u64).step_by(1 << 20) {
            m.top.read_at(off, &mut buf).unwrap();
        }
    }
    let mut g = c.benchmark_group("read_path");
    g.throughput(Throughput::Bytes(4096));
    let mut i = 0u64;
    let mut small = vec![0u8; 4096];
    g.bench_function("warm_4k_memory_hit", |b| {
        b.iter(|| {
            i = (i + 7919) % (SIZE as u64 / 4096);
            assert!(m.top.read_cached(i * 4096, &mut small));
        })
    });
    g.sample_size(20);
    // A fresh mount per read (empty caches), read-only: no overlay lock to share.
    let cold = MountConfig::new(store.as_path().into(), "vm".into(), None);
    g.bench_function("cold_4k_fetch_decode_verify", |b| {
        b.iter_batched(
            || Stack::open(&cold).unwrap(),
            |m2| {
                i = (i + 7919) % (SIZE as u64 / 4096);
                m2.top.read_at(i * 4096, &mut small).unwrap();
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();

    // A cold sequential reader at QD1 (512 KiB requests, as ublk splits them; tried
    // on the queue thread first, like the frontend), over the first 32 MiB of a
    // fresh mount: the local store, and one 5 ms away; sequential read-ahead off
    // (`--seq-readahead 0`) and at its default.
    let mut g = c.benchmark_group("sequential_32m_qd1");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(32 << 20));
    let mut req = vec![0u8; 512 << 10];
    for (store_name, latency) in [("local", None), ("5ms", Some(5.0))] {
        for (ra_name, window) in [("off", 0), ("readahead_16m", 16 << 20)] {
            let mut cfg = MountConfig::new(store.as_path().into(), "vm".into(), None);
            cfg.store_latency_ms = latency;
            cfg.seq_readahead = window;
            g.bench_function(format!("{store_name}_store_{ra_name}"), |b| {
                b.iter_batched(
                    || Stack::open(&cfg).unwrap(),
                    |m2| {
                        for off in (0..32u64 << 20).step_by(512 << 10) {
                            if !m2.top.read_cached(off, &mut req) {
                                m2.top.read_at(off, &mut req).unwrap();
                            }
                        }
                        m2
                    },
                    criterion::BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
