//! Mass recovery: eight VMs cloned from one template, each with a small change of
//! its own, backed up to a 3-node Garage cluster (replication factor 3) behind the
//! delay proxy of `livemount_tests::netem` (20 ms RTT, one 1 Gbit/s link for the
//! host), then mounted together and each replaying a boot-like read trace.
//!
//! A mount here is the block stack `livemount serve` builds per export
//! (`livemount::stack::Stack`: image → read cache → S3 store, its own S3 client and
//! memory tier), read through its top layer the way the NBD frontend reads it; the
//! eight share one host disk cache directory (`--cache-dir`), as the exports of one
//! media agent do. In the same run, on fresh caches each time: one VM alone (the
//! reference), the eight together sharing the host cache, and the eight with a
//! cache directory each (what sharing saves). Every byte read is compared with the
//! VM's image.
//!
//! `cargo xtask bench-mass` (or `cargo bench -p livemount-benches --bench mass`);
//! `LIVEMOUNT_BENCH_OUT=FILE` writes the report as JSON for xtask to render.

use livemount::config::MountConfig;
use livemount::stack::Stack;
use livemount_store::backend::s3::S3Options;
use livemount_store::backend::RequestReport;
use livemount_store::ops::backup::{backup, BackupOptions};
use livemount_store::progress::NoProgress;
use livemount_store::{Access, Store, StoreLocation};
use livemount_tests::garage::{garage_bin, Garage};
use livemount_tests::netem::DelayProxy;
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VMS: usize = 8;
const NODES: usize = 3;
const IMAGE_MIB: u64 = 512;
const MIB: u64 = 1 << 20;
/// The trace's hot regions (each read from its start, 512 KiB in 16 KiB reads).
const REGIONS: u64 = 48;
/// Each VM's own change: this many MiB at its own offset, read by its trace.
const CHANGE_MIB: u64 = 1;

fn lcg(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 33
}

/// A VM-disk-like template: mixed random and compressible MiBs, some zeros.
fn template(path: &Path) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; (IMAGE_MIB * MIB) as usize];
    for (i, chunk) in data.chunks_mut(MIB as usize).enumerate() {
        match i % 8 {
            0 => {}
            1..=3 => chunk.iter_mut().for_each(|b| *b = lcg(&mut x) as u8),
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = ((j / 64) as u8).wrapping_mul(i as u8 | 1);
                }
            }
        }
    }
    std::fs::write(path, data).expect("write template");
}

/// Where VM `k`'s own change is.
fn change_at(k: usize) -> u64 {
    (37 + 53 * k as u64) % (IMAGE_MIB - CHANGE_MIB) * MIB
}

/// VM `k`'s disk: the template with `CHANGE_MIB` of its own bytes.
fn clone_of(template: &Path, k: usize, path: &Path) {
    std::fs::copy(template, path).expect("copy template");
    let mut x = 0xdead_beef ^ (k as u64 + 1);
    let change: Vec<u8> = (0..CHANGE_MIB * MIB).map(|_| lcg(&mut x) as u8).collect();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(&change, change_at(k)))
        .expect("write the change");
}

/// VM `k`'s boot-like trace: the hot regions common to every clone (16 KiB reads
/// from each region's start, a few 4 KiB reads elsewhere in between), then its own
/// change.
fn trace(k: usize) -> Vec<(u64, usize)> {
    let mut x = 42u64;
    let mut t = Vec::new();
    for _ in 0..REGIONS {
        let start = (lcg(&mut x) % (IMAGE_MIB * MIB - MIB)) & !0xffff;
        for i in 0..32 {
            t.push((start + i * 16384, 16384));
        }
        t.push(((lcg(&mut x) % (IMAGE_MIB * MIB)) & !0xfff, 4096));
    }
    for i in 0..(CHANGE_MIB * MIB / 65536) {
        t.push((change_at(k) + i * 65536, 65536));
    }
    t
}

struct Run {
    seconds: f64,
    store_bytes: u64,
    requests: Vec<RequestReport>,
    fill_hits: u64,
    bytes_read: u64,
}

/// Mount `vms` (each with the cache directory `cache(k)`), replay their traces at
/// once, check every byte against the images.
fn replay(
    store: &StoreLocation,
    images: &[PathBuf],
    vms: &[usize],
    cache: &dyn Fn(usize) -> PathBuf,
) -> Run {
    let stacks: Vec<(usize, Stack)> = vms
        .iter()
        .map(|&k| {
            let mut c = MountConfig::new(store.clone(), format!("vm{k}"), None);
            c.cache_dir = Some(cache(k));
            c.cache_size = 4 << 30;
            (k, Stack::open(&c).expect("open the stack"))
        })
        .collect();
    let t = Instant::now();
    let bytes_read: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = stacks
            .iter()
            .map(|(k, st)| {
                let img = std::fs::File::open(&images[*k]).expect("image");
                s.spawn(move || {
                    let mut n = 0u64;
                    for (off, len) in trace(*k) {
                        let (mut got, mut want) = (vec![0u8; len], vec![0u8; len]);
                        st.top.read_at(off, &mut got).expect("read");
                        img.read_exact_at(&mut want, off).expect("image read");
                        assert!(got == want, "vm{k}: wrong bytes at {off}");
                        n += len as u64;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("replay")).sum()
    });
    let seconds = t.elapsed().as_secs_f64();
    let mut run = Run {
        seconds,
        store_bytes: 0,
        requests: Vec::new(),
        fill_hits: 0,
        bytes_read,
    };
    for (_, st) in &stacks {
        let c = st.image.cache().report();
        run.store_bytes += c.store_bytes;
        run.fill_hits += c.fill_hits;
        run.requests.extend(st.backend.requests());
        st.release_lease();
    }
    run
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let Some(bin) = garage_bin() else {
        eprintln!("no garage binary: run `cargo xtask setup`");
        std::process::exit(1);
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let tpl = dir.path().join("template");
    template(&tpl);
    let images: Vec<PathBuf> = (0..VMS)
        .map(|k| {
            let p = dir.path().join(format!("vm{k}.img"));
            clone_of(&tpl, k, &p);
            p
        })
        .collect();
    let cluster = Garage::cluster(&bin, NODES);
    let g = &cluster[0];
    g.bucket("lm-mass");
    let upstream = g
        .endpoint
        .trim_start_matches("http://")
        .parse()
        .expect("addr");
    let proxy = DelayProxy::start(upstream, Duration::from_millis(10), Some(125_000_000));
    let store = StoreLocation::S3 {
        url: "s3://lm-mass/store".into(),
        options: S3Options {
            endpoint: Some(proxy.url()),
            region: Some(livemount_tests::garage::REGION.into()),
            credentials_file: Some(g.credentials_file()),
            ..Default::default()
        },
    };
    let t = Instant::now();
    {
        let st = Store::open_at(&store, Access::Write).expect("open store");
        for (k, img) in images.iter().enumerate() {
            let opts = BackupOptions {
                series: format!("vm{k}"),
                chunk_size: None,
                level: 3,
                threads: st.io_threads(),
            };
            backup(&st, img, &opts, &NoProgress).expect("backup");
        }
    }
    let backup_s = t.elapsed().as_secs_f64();
    let caches = dir.path().join("caches");
    let alone = replay(&store, &images, &[0], &|_| caches.join("alone"));
    let all: Vec<usize> = (0..VMS).collect();
    let shared = replay(&store, &images, &all, &|_| caches.join("shared"));
    let separate = replay(&store, &images, &all, &|k| caches.join(format!("own{k}")));

    let mib = |b: u64| format!("{:.1} MiB", b as f64 / MIB as f64);
    let gets = |r: &Run| r.requests.iter().map(|q| q.gets).sum::<u64>();
    let hedged = |r: &Run| r.requests.iter().map(|q| q.hedged).sum::<u64>();
    let peak = |r: &Run| {
        r.requests
            .iter()
            .map(|q| q.peak_in_flight)
            .max()
            .unwrap_or(0)
    };
    let p = |r: &Run, f: fn(&RequestReport) -> f64| {
        let mut v: Vec<f64> = r.requests.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (
            v.get(v.len() / 2).copied().unwrap_or(0.0),
            v.last().copied().unwrap_or(0.0),
        )
    };
    let row = |name: &str, r: &Run| {
        let (p50, _) = p(r, |q| q.get_p50_ms);
        let (_, p99) = p(r, |q| q.get_p99_ms);
        json!([
            name,
            format!("{:.2}", r.seconds),
            format!("{:.2}", r.seconds / alone.seconds),
            mib(r.store_bytes),
            format!(
                "{:.2}",
                r.store_bytes as f64 / alone.store_bytes.max(1) as f64
            ),
            format!("{} ({} hedged)", gets(r), hedged(r)),
            r.fill_hits.to_string(),
            peak(r).to_string(),
            format!("{p50:.1}"),
            format!("{p99:.1}"),
            mib(r.bytes_read),
        ])
    };
    let report = json!({
        "bench": "bench-mass",
        "reproduce": "cargo xtask bench-mass",
        "tables": [{
            "title": format!(
                "{VMS} clones of a {IMAGE_MIB} MiB template ({CHANGE_MIB} MiB changed each) on a {NODES}-node Garage cluster \
                 (replication {NODES}) behind the delay proxy (20 ms RTT, 1 Gbit/s shared); each replays a boot-like trace \
                 ({} reads, {} of the template's hot regions + its own change) cold; commit {}:",
                trace(0).len(),
                mib(REGIONS * 512 * 1024),
                git_head()
            ),
            "columns": ["run", "time until all done (s)", "/ one alone", "fetched from the store",
                        "/ one alone (its working set)", "GETs", "fetches another mount filled",
                        "most GETs in flight (one mount)", "GET p50 ms (median of mounts)",
                        "GET p99 ms (worst mount)", "read by the VMs"],
            "rows": [
                row("one VM alone (reference)", &alone),
                row(&format!("{VMS} VMs together, one host cache"), &shared),
                row(&format!("{VMS} VMs together, a cache directory each"), &separate),
            ],
        }],
        "notes": [
            format!("Backups of the {VMS} clones into the cluster (the first stores the template's chunks, the others dedupe): {backup_s:.1} s."),
            format!("Targets: fetched ≤ 1.5 × one VM's working set; time until all are done ≤ 2 × one alone."),
        ],
    });
    let text = serde_json::to_string_pretty(&report).expect("json");
    match std::env::var_os("LIVEMOUNT_BENCH_OUT") {
        Some(out) => std::fs::write(&out, &text).expect("write the report"),
        None => println!("{text}"),
    }
    drop(cluster);
}

fn git_head() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
