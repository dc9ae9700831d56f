//! Changed-block incrementals through the CLI: from a ranges file, and from a real
//! qemu dirty bitmap exported by `qemu-nbd --bitmap` (read with libnbd's nbdinfo).
//! Each gives exactly the index a full backup of the same data gives; bad ranges, a
//! missing base and a bitmap of another disk are one-line errors.

#[path = "common/store.rs"]
mod helpers;

use helpers::*;
use livemount_store::{Access, Store};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

/// `livemount backup IMG --store STORE --name vm EXTRA…`.
fn backup_vm(img: &Path, store: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "backup".to_string(),
        img.display().to_string(),
        "--store".into(),
        store.display().to_string(),
        "--name".into(),
        "vm".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    lm(&args)
}

fn backup_json(img: &Path, store: &Path, extra: &[&str]) -> serde_json::Value {
    let mut e = vec!["--json"];
    e.extend_from_slice(extra);
    backup_vm(img, store, &e).json()
}

/// The chunk list of the latest snapshot of series vm.
fn chunks(store: &Path) -> Vec<livemount_store::format::index::ChunkRef> {
    let st = Store::open(store, Access::ReadOnly).unwrap();
    st.load_index(&st.resolve("vm").unwrap())
        .unwrap()
        .chunks
        .iter()
        .copied()
        .collect()
}

/// v1, and v2 = v1 with `changes` (offset, length) overwritten.
fn images(dir: &Path, changes: &[(usize, usize)]) -> (std::path::PathBuf, std::path::PathBuf) {
    let v1 = compressible_image(16, 21);
    let mut v2 = v1.clone();
    for (i, &(off, len)) in changes.iter().enumerate() {
        v2[off..off + len].fill(0xa0 + i as u8);
    }
    let (p1, p2) = (dir.join("v1.img"), dir.join("v2.img"));
    std::fs::write(&p1, &v1).unwrap();
    std::fs::write(&p2, &v2).unwrap();
    (p1, p2)
}

#[test]
fn a_ranges_file_incremental_equals_a_full_backup() {
    let t = tempfile::tempdir().unwrap();
    let changes = [
        (MIB + 100, 5000),
        (7 * MIB, 2 * MIB + 3),
        (16 * MIB - 10, 10),
    ];
    let (v1, v2) = images(t.path(), &changes);
    let (inc, full) = (t.path().join("inc"), t.path().join("full"));
    backup_json(&v1, &inc, &[]);
    backup_json(&v1, &full, &[]);
    let ranges = t.path().join("changed.txt");
    let text: String = std::iter::once("# offset length\n".to_string())
        .chain(changes.iter().map(|(o, l)| format!("{o} {l}\n")))
        .collect();
    std::fs::write(&ranges, text).unwrap();
    let r = backup_json(&v2, &inc, &["--changed", ranges.to_str().unwrap()]);
    // Chunks 1, 7, 8, 9 and 15 were read; the other 11 came from the previous index.
    assert_eq!(r["bytes_read"], 5 * MIB as u64, "{r}");
    assert_eq!(r["bytes_unchanged"], 11 * MIB as u64, "{r}");
    backup_json(&v2, &full, &[]);
    assert_eq!(chunks(&inc), chunks(&full));
    assert_verifies(&inc);
    let out = t.path().join("out.img");
    lm([
        "restore",
        "--store",
        inc.to_str().unwrap(),
        "vm",
        out.to_str().unwrap(),
    ])
    .ok();
    assert_same_content(&out, &v2);
}

#[test]
fn bad_ranges_and_a_missing_base_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let (v1, _) = images(t.path(), &[]);
    let store = t.path().join("s");
    let ranges = t.path().join("r.txt");
    let run = |text: &str, store: &Path| {
        std::fs::write(&ranges, text).unwrap();
        backup_vm(&v1, store, &["--changed", ranges.to_str().unwrap()])
    };
    // No previous snapshot: an error, and no store left behind.
    run("0 4096\n", &store).error(&["needs a previous snapshot of series vm"]);
    backup_json(&v1, &store, &[]);
    run("0 99999999999\n", &store).error(&["r.txt:1", "ends past the image"]);
    run("8192 10\n0 10\n", &store).error(&["r.txt:2", "out of order"]);
    run("0 100\n50 100\n", &store).error(&["overlaps"]);
    run("0 x\n", &store).error(&["not a number"]);
    // Another chunk size than the base: not comparable chunk by chunk.
    std::fs::write(&ranges, "0 10\n").unwrap();
    backup_vm(
        &v1,
        &store,
        &[
            "--chunk-size",
            "256K",
            "--changed",
            ranges.to_str().unwrap(),
        ],
    )
    .error(&["cannot build on", "chunks of"]);
    assert_eq!(
        list_names(&store).len(),
        1,
        "a refused backup added a snapshot"
    );
    // A base that is not the latest snapshot of the series: refused.
    backup_json(&v1, &store, &[]);
    let names = list_names(&store);
    std::fs::write(&ranges, "0 10\n").unwrap();
    let r = ranges.to_str().unwrap();
    backup_vm(&v1, &store, &["--changed", r, "--changed-base", &names[0]]).error(&[
        "--changed-base",
        "latest snapshot of vm is",
        &names[1],
    ]);
    backup_vm(&v1, &store, &["--changed-base", &names[1]])
        .error(&["--changed-base needs --changed or --changed-from"]);
    backup_vm(&v1, &store, &["--changed", r, "--changed-base", &names[1]]).ok();
    assert_eq!(list_names(&store).len(), 3);
}

fn tool(prog: &str, args: &[&str]) {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    sh(prog, &args);
}

/// `qemu-nbd` serving `qcow2` read-only with its bitmap `bm0` on `sock`.
struct QemuNbd(std::process::Child);

impl QemuNbd {
    fn start(qcow2: &Path, sock: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["--read-only", "--persistent", "--bitmap=bm0", "-f", "qcow2"])
            .arg(format!("--socket={}", sock.display()))
            .arg(qcow2)
            .stdin(Stdio::null())
            .spawn()
            .expect("qemu-nbd (qemu-utils)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_qemu_dirty_bitmap_incremental_equals_a_full_backup() {
    let t = tempfile::tempdir().unwrap();
    let (v1, _) = images(t.path(), &[]);
    let qcow2 = t.path().join("disk.qcow2");
    let q = |p: &Path| p.to_str().unwrap().to_string();
    tool(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &q(&v1), &q(&qcow2)],
    );
    let (inc, full) = (t.path().join("inc"), t.path().join("full"));
    backup_json(&v1, &inc, &[]);
    backup_json(&v1, &full, &[]);
    // The guest writes after the backup; qemu records them in the bitmap.
    tool("qemu-img", &["bitmap", "--add", &q(&qcow2), "bm0"]);
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 3M 64k",
            "-c",
            "write -P 0x33 12345678 1000",
            &q(&qcow2),
        ],
    );
    let v2 = t.path().join("v2.img");
    tool(
        "qemu-img",
        &["convert", "-f", "qcow2", "-O", "raw", &q(&qcow2), &q(&v2)],
    );
    let sock = t.path().join("nbd.sock");
    let _server = QemuNbd::start(&qcow2, &sock);
    let spec = format!("nbd+unix:///?socket={}#bm0", sock.display());
    let r = backup_json(&v2, &inc, &["--changed-from", &spec]);
    assert_eq!(r["bytes_read"], 2 * MIB as u64, "two chunks changed: {r}");
    backup_json(&v2, &full, &[]);
    assert_eq!(chunks(&inc), chunks(&full));
    // A bitmap of another disk (another size) is refused.
    let small = t.path().join("small.img");
    std::fs::write(&small, vec![1u8; 4 * MIB]).unwrap();
    backup_vm(&small, &t.path().join("other"), &["--changed-from", &spec])
        .error(&["not a bitmap of this disk"]);
    // A bitmap name the export does not have.
    let bad = format!("nbd+unix:///?socket={}#nope", sock.display());
    backup_vm(&v2, &inc, &["--changed-from", &bad]).error(&["--changed-from"]);
}
