//! The store on an object store vs a local directory, in one run: backup (first and
//! unchanged re-backup) and full restore of the same image, into a directory and
//! into a single-node Garage reached through the delay proxy of
//! `livemount_tests::netem` (default 10 ms each way = 20 ms RTT, 1 Gbit/s per
//! direction). Writes its report (rates and ratios to the local store) as JSON to
//! `$LIVEMOUNT_BENCH_OUT` for xtask to render, or prints it.
//!
//! `cargo bench -p livemount-benches --bench s3` (or `cargo xtask bench-s3`);
//! `LIVEMOUNT_BENCH_S3_MIB` (default 256) sets the image size, `…_RTT_MS` the RTT.

use livemount_store::backend::s3::S3Options;
use livemount_store::ops::backup::{backup, BackupOptions, BackupReport};
use livemount_store::ops::restore::restore;
use livemount_store::progress::NoProgress;
use livemount_store::{Access, Store, StoreLocation};
use livemount_tests::netem::DelayProxy;
use livemount_tests::s3server::{Engine, S3Server};
use std::path::Path;
use std::time::{Duration, Instant};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A VM-disk-like image: mixed compressible and random regions, some zeros.
fn image(path: &Path, mib: u64) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut data = vec![0u8; (mib << 20) as usize];
    for (i, chunk) in data.chunks_mut(1 << 20).enumerate() {
        match i % 8 {
            0 => {} // zeros
            1..=4 => {
                for b in chunk.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
            }
            _ => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = ((j / 64) as u8).wrapping_mul(i as u8 | 1);
                }
            }
        }
    }
    std::fs::write(path, data).expect("write image");
}

struct Figures {
    first: f64,
    again: f64,
    restore: f64,
}

fn run(loc: &StoreLocation, img: &Path, out: &Path) -> Figures {
    let st = Store::open_at(loc, Access::Write).expect("open store");
    let opts = BackupOptions {
        series: "vm".into(),
        chunk_size: None,
        level: 3,
        threads: st.io_threads(),
    };
    let timed = |f: &dyn Fn() -> BackupReport| {
        let t = Instant::now();
        let r = f();
        (t.elapsed().as_secs_f64(), r)
    };
    let (first, r1) = timed(&|| backup(&st, img, &opts, &NoProgress).expect("backup"));
    let (again, r2) = timed(&|| backup(&st, img, &opts, &NoProgress).expect("re-backup"));
    assert_eq!(r2.chunks_new, 0);
    drop(st);
    let st = Store::open_at(loc, Access::ReadOnly).expect("open store");
    let snap = st.resolve(&r1.snapshot).expect("snapshot");
    let _ = std::fs::remove_file(out);
    let t = Instant::now();
    restore(&st, &snap, out, false, st.io_threads(), &NoProgress).expect("restore");
    let restore_s = t.elapsed().as_secs_f64();
    let mib = r1.image_size as f64 / (1 << 20) as f64;
    Figures {
        first: mib / first,
        again: mib / again,
        restore: mib / restore_s,
    }
}

fn main() {
    // `cargo test --benches` runs bench binaries with no arguments but `--bench`
    // absent; only measure when asked to.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let engines = [Engine::Garage, Engine::Rgw];
    for e in engines {
        if let Some(why) = e.missing() {
            eprintln!("bench-s3: {why}");
            std::process::exit(1);
        }
    }
    let mib = env_u64("LIVEMOUNT_BENCH_S3_MIB", 256);
    let rtt = env_u64("LIVEMOUNT_BENCH_S3_RTT_MS", 20);
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("img");
    image(&img, mib);
    let local = StoreLocation::Dir {
        path: dir.path().join("store"),
    };
    let out = dir.path().join("restored");
    let l = run(&local, &img, &out);
    let cell = |v: f64, local: f64| format!("{v:.0} ({:.2}×)", v / local);
    let row = |name: &str, f: &Figures| {
        serde_json::json!([
            name,
            cell(f.first, l.first),
            cell(f.again, l.again),
            cell(f.restore, l.restore)
        ])
    };
    let mut rows = vec![row("local directory", &l)];
    let mut notes = Vec::new();
    for engine in engines {
        let g = S3Server::start(engine);
        g.bucket("lm-bench");
        let s3 = |url: &str, endpoint: String| StoreLocation::S3 {
            url: url.into(),
            options: S3Options {
                endpoint: Some(endpoint),
                region: Some(g.region().into()),
                credentials_file: Some(g.credentials_file()),
                ..Default::default()
            },
        };
        let name = engine.name();
        let direct = run(&s3("s3://lm-bench/direct", g.endpoint.clone()), &img, &out);
        rows.push(row(&format!("{name}, loopback"), &direct));
        let upstream = g
            .endpoint
            .trim_start_matches("http://")
            .parse()
            .expect("addr");
        for (gbit, prefix) in [(1u64, "remote"), (10, "remote10")] {
            let proxy = DelayProxy::start(
                upstream,
                Duration::from_millis(rtt / 2),
                Some(gbit * 125_000_000),
            );
            let url = format!("s3://lm-bench/{prefix}");
            let f = run(&s3(&url, proxy.url()), &img, &out);
            rows.push(row(
                &format!("{name}, {rtt} ms RTT, {gbit} Gbit/s (proxy)"),
                &f,
            ));
            let (up, down) = proxy.bytes();
            notes.push(format!(
                "{name} at {gbit} Gbit/s: {:.1} MiB up, {:.1} MiB down through the proxy.",
                up as f64 / 1048576.0,
                down as f64 / 1048576.0
            ));
        }
    }
    let report = serde_json::json!({
        "bench": "bench-s3",
        "reproduce": "cargo xtask bench-s3",
        "tables": [{
            "title": format!(
                "{mib} MiB image, {} cores; MiB/s (ratio to the local directory store):",
                livemount_store::workers::default_threads()
            ),
            "columns": ["store", "first backup", "unchanged re-backup", "restore"],
            "rows": rows,
        }],
        "notes": notes,
    });
    let text = serde_json::to_string_pretty(&report).expect("json");
    match std::env::var_os("LIVEMOUNT_BENCH_OUT") {
        Some(out) => std::fs::write(&out, &text).expect("write the report"),
        None => println!("{text}"),
    }
}
