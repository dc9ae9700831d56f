//! Chunk-store benchmarks: backup throughput on new and on fully deduplicated data,
//! restore throughput, the cost of one 4 KiB read from a compressed chunk, and (with
//! `cargo bench`, not in `cargo test`'s quick run) a chunk-size study on a real ext4
//! image and a modified copy, printed as a table.
//!
//! Reproduce: `cargo bench -p livemount-benches --bench store`.
//! The data is real: files from /usr/lib/x86_64-linux-gnu (binaries) and
//! /usr/share/doc (text), the mix a VM disk holds.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use livemount_store::backend::ChunkSource;
use livemount_store::format::chunk::{self, ChunkId, ChunkLayout};
use livemount_store::ops::backup::{backup, BackupOptions, BackupReport};
use livemount_store::ops::restore::restore;
use livemount_store::progress::NoProgress;
use livemount_store::store::{Access, Store, DEFAULT_CHUNK_SIZE, DEFAULT_FRAME_SIZE};
use livemount_store::workers::default_threads;
use std::fs;
use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Bytes of the throughput image (no zero chunks: all of it is hashed and compressed).
const IMAGE: usize = 32 * MIB;
const LEVEL: i32 = 3;

/// Regular files under `roots`, depth first in name order.
fn real_files(roots: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = roots.iter().rev().map(PathBuf::from).collect();
    while let Some(p) = stack.pop() {
        let Ok(m) = fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            let Ok(rd) = fs::read_dir(&p) else { continue };
            let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            v.sort();
            stack.extend(v.into_iter().rev());
        } else if m.is_file() && m.len() > 0 {
            out.push(p);
        }
    }
    out
}

/// About `len` bytes of real data: half shared-library binaries, half documentation.
fn real_data(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for (root, share) in [
        ("/usr/lib/x86_64-linux-gnu", len / 2),
        ("/usr/share/doc", len),
    ] {
        for f in real_files(&[root]) {
            if out.len() >= share {
                break;
            }
            if let Ok(b) = fs::read(&f) {
                out.extend_from_slice(&b[..b.len().min(share - out.len())]);
            }
        }
    }
    assert!(
        out.len() > len / 2,
        "not enough real files for the benchmark data"
    );
    // Top up by repeating with a stamp, should the machine hold few files.
    let mut i = 0u64;
    while out.len() < len {
        let n = (len - out.len()).min(MIB);
        let start = out.len() - n;
        let mut piece = out[start..start + n].to_vec();
        piece[..8].copy_from_slice(&i.to_le_bytes());
        out.extend_from_slice(&piece);
        i += 1;
    }
    out
}

fn opts(series: &str, chunk_size: Option<u32>) -> BackupOptions {
    BackupOptions {
        series: series.into(),
        chunk_size,
        level: LEVEL,
        threads: default_threads(),
    }
}

fn backup_and_restore(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("real.img");
    fs::write(&img, real_data(IMAGE)).unwrap();

    let mut g = c.benchmark_group("store");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6))
        .throughput(Throughput::Bytes(IMAGE as u64));

    // New data: every chunk hashed, compressed and written (with fsyncs) to an empty store.
    let n = AtomicU64::new(0);
    g.bench_function("backup/new_data", |b| {
        b.iter_batched(
            || {
                let root = dir
                    .path()
                    .join(format!("new{}", n.fetch_add(1, Ordering::Relaxed)));
                (Store::open(&root, Access::Write).unwrap(), root)
            },
            |(store, root)| {
                let r = backup(&store, &img, &opts("bench", None), &NoProgress).unwrap();
                assert_eq!(r.chunks_new as usize, IMAGE / MIB);
                drop(store);
                let _ = fs::remove_dir_all(root);
            },
            BatchSize::PerIteration,
        )
    });

    // Fully deduplicated: every chunk is already stored, so a backup only reads and
    // hashes (the re-backup of an unchanged disk).
    let store_dir = dir.path().join("store");
    let store = Store::open(&store_dir, Access::Write).unwrap();
    let first = backup(&store, &img, &opts("base", None), &NoProgress).unwrap();
    g.bench_function("backup/deduplicated", |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let r = backup(&store, &img, &opts(&format!("d{i}"), None), &NoProgress).unwrap();
            assert_eq!(r.chunks_new, 0);
        })
    });

    // Restore: read, verify and decompress every chunk, write a file.
    let snap = store.resolve("base").unwrap();
    assert_eq!(snap.to_string(), first.snapshot);
    let target = dir.path().join("restored.img");
    g.bench_function("restore", |b| {
        b.iter(|| {
            restore(&store, &snap, &target, true, default_threads(), &NoProgress).unwrap();
        })
    });
    g.finish();
}

fn read_4k(c: &mut Criterion) {
    // One 1 MiB chunk of real data, encoded as the store does.
    let data = real_data(MIB);
    let digest = chunk::digest(&data, DEFAULT_FRAME_SIZE);
    let mut z = zstd_compressor();
    let file = chunk::encode(&data, DEFAULT_FRAME_SIZE, &digest, &mut z).unwrap();
    let id = digest.id;
    // A 4 KiB read in the middle of a frame in the middle of the chunk.
    let at: u32 = 9 * DEFAULT_FRAME_SIZE + 12_288;
    let want = &data[at as usize..at as usize + 4096];

    let mut g = c.benchmark_group("read_4k");
    g.throughput(Throughput::Bytes(4096))
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    g.bench_function("in_memory/parse+decode", |b| {
        b.iter(|| {
            let got = read_in_memory(&id, black_box(&file), at);
            debug_assert_eq!(&got[..], want);
            got
        })
    });
    let layout = ChunkLayout::parse(&id, &file).unwrap();
    g.bench_function("in_memory/decode_only", |b| {
        b.iter(|| {
            let frames = layout.frames_for(at..at + 4096);
            let r = layout.file_range(frames.clone());
            let f = layout
                .decode_frames(frames, black_box(&file[r.start as usize..r.end as usize]))
                .unwrap();
            f.len()
        })
    });

    // Through the store's chunk source: two range reads (header and seek table, then
    // the frame) from a file in the page cache.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store"), Access::Write).unwrap();
    store.put_chunk(&id, file.clone()).unwrap();
    let src = store.chunks();
    assert_eq!(&read_from_source(src, &id, at)[..], want);
    g.bench_function("dir_source/read_range+decode", |b| {
        b.iter(|| read_from_source(src, black_box(&id), at))
    });
    g.finish();
}

fn zstd_compressor() -> zstd::bulk::Compressor<'static> {
    zstd::bulk::Compressor::new(LEVEL).unwrap()
}

/// A 4 KiB read at `at` of a chunk file held in memory: authenticate the header and
/// seek table, find the frame, decode and verify it, copy the 4 KiB out.
fn read_in_memory(id: &ChunkId, file: &[u8], at: u32) -> Vec<u8> {
    let layout = ChunkLayout::parse(id, file).unwrap();
    let frames = layout.frames_for(at..at + 4096);
    let first = frames.start;
    let r = layout.file_range(frames.clone());
    let decoded = layout
        .decode_frames(frames, &file[r.start as usize..r.end as usize])
        .unwrap();
    let off = (at - first as u32 * layout.frame_size) as usize;
    decoded[0][off..off + 4096].to_vec()
}

/// The same read through a [`ChunkSource`]: header and table first, then the frame.
fn read_from_source(src: &dyn ChunkSource, id: &ChunkId, at: u32) -> Vec<u8> {
    let prefix = src
        .read_range(
            id,
            0,
            ChunkLayout::prefix_len(DEFAULT_CHUNK_SIZE, DEFAULT_FRAME_SIZE),
        )
        .unwrap();
    let layout = ChunkLayout::parse(id, &prefix).unwrap();
    let frames = layout.frames_for(at..at + 4096);
    let first = frames.start;
    let r = layout.file_range(frames.clone());
    let stored = src
        .read_range(id, r.start, (r.end - r.start) as usize)
        .unwrap();
    let decoded = layout.decode_frames(frames, &stored).unwrap();
    let off = (at - first as u32 * layout.frame_size) as usize;
    decoded[0][off..off + 4096].to_vec()
}

fn run(prog: &str, args: &[&str], stdin: Option<&str>) {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    assert!(child.wait().unwrap().success(), "{prog} {args:?} failed");
}

/// Chunk-size study: a real ext4 image (96 MiB, ~40 MiB of files from /usr), then a
/// copy after a realistic change ("package upgrade": 40 files rewritten in place
/// with a few bytes changed or appended, 4 MiB of new files, 10 files deleted), backed
/// up one after the other at several chunk sizes.
fn chunk_size_study() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    let mut used = 0u64;
    let mut files = Vec::new();
    for (i, f) in real_files(&["/usr/share/doc", "/usr/lib/x86_64-linux-gnu"])
        .into_iter()
        .enumerate()
    {
        let len = fs::metadata(&f).map(|m| m.len()).unwrap_or(0);
        if len > 4 * MIB as u64 || used + len > 40 * MIB as u64 {
            continue;
        }
        let d = tree.join(format!("d{:02}", i % 32));
        fs::create_dir_all(&d).unwrap();
        let name = format!("f{i:05}");
        if fs::copy(&f, d.join(&name)).is_ok() {
            used += len;
            files.push((format!("/d{:02}/{name}", i % 32), d.join(&name)));
        }
    }
    let v1 = dir.path().join("v1.img");
    fs::File::create(&v1)
        .unwrap()
        .set_len(96 * MIB as u64)
        .unwrap();
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            tree.to_str().unwrap(),
            v1.to_str().unwrap(),
        ],
        None,
    );
    let v2 = dir.path().join("v2.img");
    fs::copy(&v1, &v2).unwrap();
    let mut script = String::new();
    let step = files.len() / 50;
    for (k, (inside, local)) in files.iter().step_by(step.max(1)).take(50).enumerate() {
        if k < 10 {
            script += &format!("rm {inside}\n");
            continue;
        }
        let mut b = fs::read(local).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0xff;
        b.extend_from_slice(b"upgraded\n");
        let edited = dir.path().join(format!("edit{k}"));
        fs::write(&edited, &b).unwrap();
        script += &format!("rm {inside}\nwrite {} {inside}\n", edited.display());
    }
    let new = dir.path().join("new.bin");
    fs::write(&new, real_data(4 * MIB).split_off(MIB)).unwrap();
    script += &format!("write {} /new.bin\n", new.display());
    run(
        "debugfs",
        &["-w", "-f", "-", v2.to_str().unwrap()],
        Some(&script),
    );

    println!();
    println!(
        "chunk-size study: ext4 image of 96 MiB with {:.1} MiB of real files, then a realistic change",
        used as f64 / MIB as f64
    );
    println!(
        "| chunk size | v1 stored MiB | v1 backup s | v2 new MiB | v2 stored MiB | v2 dedup ratio | store MiB (both) | chunk files | index bytes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for cs in [64u32 << 10, 256 << 10, 1 << 20, 4 << 20] {
        let root = dir.path().join(format!("store{cs}"));
        let store = Store::open(&root, Access::Write).unwrap();
        let t = Instant::now();
        let r1: BackupReport = backup(&store, &v1, &opts("vm", Some(cs)), &NoProgress).unwrap();
        let s1 = t.elapsed().as_secs_f64();
        let r2 = backup(&store, &v2, &opts("vm", Some(cs)), &NoProgress).unwrap();
        let files = store.all_chunks().unwrap();
        let total: u64 = files.iter().map(|(_, m)| m.size).sum();
        let index = fs::metadata(store.index_name(&store.resolve("vm").unwrap()))
            .unwrap()
            .len();
        println!(
            "| {} KiB | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {} | {} |",
            cs >> 10,
            r1.bytes_stored as f64 / MIB as f64,
            s1,
            r2.bytes_new as f64 / MIB as f64,
            r2.bytes_stored as f64 / MIB as f64,
            r2.dedup_ratio
                .map_or_else(|| "all reused".to_string(), |d| format!("{d:.1}x")),
            total as f64 / MIB as f64,
            files.len(),
            index
        );
    }
    println!();
}

fn study(_: &mut Criterion) {
    // Only under `cargo bench` (which passes --bench), not in `cargo test`'s quick run.
    if std::env::args().any(|a| a == "--bench") {
        chunk_size_study();
    }
}

criterion_group!(benches, backup_and_restore, read_4k, study);
criterion_main!(benches);
