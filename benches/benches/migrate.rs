//! Live migration against `restore`, in one run, natively through the library (the
//! copy does not involve a frontend): a 256 MiB VM-like image in a local store.
//!
//! - **Throughput**: `restore` of the snapshot to a file (+ fsync) vs `migrate` of an
//!   idle mount of it to a file (from `migrate` until TARGET holds everything and is
//!   synced), three interleaved rounds, medians; ratio restore time / migrate time.
//! - **Guest latency**: 4 KiB random reads through the mount's top layer on one
//!   thread (fresh mount, 16 MiB memory tier: mostly misses, i.e. the VM waiting for
//!   the store), p50/p99 without a migration and with one running (unlimited rate),
//!   three interleaved rounds pooled.
//!
//! `cargo bench -p livemount-benches --bench migrate`;
//! `LIVEMOUNT_BENCH_MIGRATE_MIB` (default 256) sets the image size.

use livemount::config::MountConfig;
use livemount::stack::Stack;
use livemount_store::ops::backup::{backup, BackupOptions};
use livemount_store::ops::restore::restore;
use livemount_store::progress::NoProgress;
use livemount_store::{Access, Store};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

/// A VM-disk-like image: 1/8 zeros, 1/2 random, 3/8 compressible.
fn image(path: &Path, mib: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut data = vec![0u8; (mib << 20) as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        match i % 8 {
            0 => {}
            1..=4 => rng.fill(chunk),
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = ((j / 64) as u8).wrapping_mul(i as u8 | 1);
                }
            }
        }
    }
    std::fs::write(path, data).expect("write image");
}

fn mount(dir: &Path, round: usize) -> Stack {
    let mut c = MountConfig::new(
        dir.join("store").as_path().into(),
        "vm".into(),
        Some(dir.join(format!("ov{round}"))),
    );
    c.cache_mem = 16 << 20;
    c.prestage = "none".into();
    Stack::open(&c).expect("mount")
}

fn wait_migrated(stack: &Stack) {
    loop {
        let r = stack.migrating.report().expect("migration");
        assert_ne!(r.state, "failed", "{r:?}");
        if r.state == "migrated" {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// 4 KiB random reads on one thread for `secs`: sorted latencies in µs.
fn random_reads(stack: &Stack, size: u64, secs: f64, stop_early: &dyn Fn() -> bool) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut buf = vec![0u8; 4096];
    let mut lat = Vec::new();
    let t = Instant::now();
    while t.elapsed().as_secs_f64() < secs && !stop_early() {
        let at = rng.gen_range(0..size / 4096) * 4096;
        let s = Instant::now();
        stack.top.read_at(at, &mut buf).expect("read");
        lat.push(s.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    lat
}

fn pct(v: &[f64], p: f64) -> f64 {
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: u64 = std::env::var("LIVEMOUNT_BENCH_MIGRATE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let src = dir.path().join("disk.img");
    image(&src, mib);
    {
        let st = Store::open(dir.path().join("store"), Access::Write).expect("store");
        let opts = BackupOptions {
            series: "vm".into(),
            chunk_size: None,
            level: 3,
            threads: 2,
        };
        backup(&st, &src, &opts, &NoProgress).expect("backup");
    }
    let size = mib << 20;
    let (mut restores, mut migrates) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let out = dir.path().join("restored.raw");
        let _ = std::fs::remove_file(&out);
        let st = Store::open(dir.path().join("store"), Access::ReadOnly).expect("store");
        let snap = st.resolve("vm").expect("snapshot");
        let t = Instant::now();
        restore(&st, &snap, &out, false, 2, &NoProgress).expect("restore");
        restores.push(t.elapsed().as_secs_f64());
        let stack = mount(dir.path(), round);
        let target = dir.path().join(format!("migrated{round}.raw"));
        let t = Instant::now();
        stack.migrate(&target, 0).expect("migrate");
        wait_migrated(&stack);
        stack.top.flush().expect("flush");
        migrates.push(t.elapsed().as_secs_f64());
        assert!(std::fs::read(&target).unwrap() == std::fs::read(&out).unwrap());
        let _ = std::fs::remove_file(&target);
    }
    let (r, m) = (median(restores), median(migrates));
    // Guest latency: a fresh mount each, without and with a migration, three
    // interleaved rounds (a migration lasts ~2 s: one round is a small sample).
    let (mut quiet, mut busy, mut copied) = (Vec::new(), Vec::new(), 0u64);
    for round in 0..3 {
        let stack = mount(dir.path(), 10 + 2 * round);
        quiet.extend(random_reads(&stack, size, 2.0, &|| false));
        drop(stack);
        let stack = mount(dir.path(), 11 + 2 * round);
        let target = dir.path().join(format!("busy{round}.raw"));
        stack.migrate(&target, 0).expect("migrate");
        busy.extend(random_reads(&stack, size, 5.0, &|| {
            stack
                .migrating
                .report()
                .is_some_and(|r| r.state == "migrated")
        }));
        copied += stack.migrating.report().expect("migration").copied_bytes;
        drop(stack);
        let _ = std::fs::remove_file(&target);
    }
    quiet.sort_by(f64::total_cmp);
    busy.sort_by(f64::total_cmp);
    println!(
        "(the migrations copied {:.0} of {} MiB while the reads ran)",
        copied as f64 / 1048576.0,
        3 * mib
    );
    println!("\n{mib} MiB image, local store, 1 MiB chunks (median of 3 rounds):\n");
    println!("| figure | migrate | restore (reference) | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| copy of an idle mount | {:.2} s ({:.0} MiB/s) | {:.2} s ({:.0} MiB/s) | {:.2}× | ≥ 0.8× |",
        m,
        mib as f64 / m,
        r,
        mib as f64 / r,
        r / m
    );
    println!("\n| 4 KiB random reads (one thread) | reads | p50 | p99 |\n|---|---|---|---|");
    println!(
        "| without a migration | {} | {:.0} µs | {:.0} µs |",
        quiet.len(),
        pct(&quiet, 0.5),
        pct(&quiet, 0.99)
    );
    println!(
        "| during a migration | {} | {:.0} µs | {:.0} µs (×{:.2}; target ≤ 1.5) |",
        busy.len(),
        pct(&busy, 0.5),
        pct(&busy, 0.99),
        pct(&busy, 0.99) / pct(&quiet, 0.99).max(1e-9)
    );
}
