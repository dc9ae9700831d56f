//! The store on a real S3 server started by each test on loopback: a single-node
//! Garage, or Ceph's radosgw with `LIVEMOUNT_S3_ENGINE=rgw` (`cargo xtask test` runs
//! these tests against both; tests/src/s3server.rs). Every command
//! against the bucket, the leases that replace flock between hosts, the errors a
//! user meets (wrong credentials, missing bucket, server down, damaged objects),
//! and an NBD export of a snapshot in the bucket, read byte-exact by qemu's tools,
//! through a server outage and back.

#[path = "common/store.rs"]
mod helpers;

use helpers::*;
use livemount_store::backend::s3::{S3Backend, S3Options};
use livemount_store::backend::{chunk_key, Backend, Put, PutMode, ReadClass};
use livemount_store::{Access, Store, StoreLocation};
use livemount_tests::garage::{garage_bin, Garage};
use livemount_tests::httpfault::{FaultPlan, FaultProxy};
use livemount_tests::s3server::{Engine, S3Server};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A started server with bucket `bucket`, or a reported skip.
fn server(test: &str, bucket: &str) -> Option<S3Server> {
    let engine = Engine::from_env();
    if let Some(why) = engine.missing() {
        livemount_tests::skip(test, livemount_tests::Tier::Machine, why);
        return None;
    }
    let g = S3Server::start(engine);
    g.bucket(bucket);
    Some(g)
}

/// `livemount ARGS…` with the server's endpoint and credentials in the environment.
fn lm_s3(g: &S3Server, args: &[&OsStr]) -> Run {
    let args: Vec<OsString> = args.iter().map(|a| a.to_os_string()).collect();
    let mut c = cmd(&args);
    g.env(&mut c);
    let r = run_cmd(c, &args);
    // Whatever happened, the secret never shows.
    assert!(
        !r.stdout.contains(&g.secret) && !r.stderr.contains(&g.secret),
        "{}: secret printed",
        r.what
    );
    r
}

fn os<const N: usize>(a: [&str; N]) -> Vec<&OsStr> {
    a.into_iter().map(OsStr::new).collect()
}

/// `livemount backup SOURCE --store URL --name vm --json`.
fn backup_s3(g: &S3Server, source: impl AsRef<OsStr>, url: &str) -> serde_json::Value {
    lm_s3(
        g,
        &[
            OsStr::new("backup"),
            source.as_ref(),
            "--store".as_ref(),
            url.as_ref(),
            "--name".as_ref(),
            "vm".as_ref(),
            "--json".as_ref(),
        ],
    )
    .json()
}

/// How the library reaches `g`: a credentials file, not the environment (tests
/// run in parallel threads, each with a server and key of its own).
fn options(g: &S3Server) -> S3Options {
    S3Options {
        credentials_file: Some(g.credentials_file()),
        endpoint: Some(g.endpoint.clone()),
        region: Some(g.region().into()),
        io_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

/// The library's view of the bucket (for damaging objects and holding leases).
fn backend(g: &S3Server, url: &str) -> Arc<dyn Backend> {
    Arc::new(S3Backend::open(url, &options(g)).unwrap())
}

/// A `mib` MiB image (of `seed`) in `dir`, backed up into `url` as series vm:
/// the image's path, its bytes and the backup's snapshot.
fn backed_up(
    g: &S3Server,
    dir: &Path,
    url: &str,
    mib: usize,
    seed: u64,
) -> (PathBuf, Vec<u8>, String) {
    let img = dir.join("img");
    let data = compressible_image(mib, seed);
    std::fs::write(&img, &data).unwrap();
    let r = backup_s3(g, img.as_os_str(), url);
    let snap = r["snapshot"].as_str().unwrap().to_string();
    (img, data, snap)
}

#[test]
fn every_store_command_works_on_a_bucket() {
    let Some(g) = server("every_store_command_works_on_a_bucket", "lm-cycle") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-cycle/site-a";
    let v1 = compressible_image(6, 1);
    let mut v2 = v1.clone();
    v2[3 << 20..(3 << 20) + 4096].fill(0x5a);
    let (i1, i2) = (t.path().join("v1"), t.path().join("v2"));
    std::fs::write(&i1, &v1).unwrap();
    std::fs::write(&i2, &v2).unwrap();
    let p = |x: &Path| x.as_os_str().to_os_string();

    let r = backup_s3(&g, p(&i1), url);
    assert!(r["chunks_new"].as_u64().unwrap() >= 5, "{r}");
    // An incremental: one chunk changed; the others come from the previous index.
    let r2 = backup_s3(&g, p(&i2), url);
    assert_eq!(r2["chunks_new"], 1, "{r2}");
    // A third right away (same second, same data): a snapshot of its own, not a
    // replacement of the second (Garage ignores If-None-Match, radosgw honours it;
    // the commit lease keeps names unique either way).
    let r3 = backup_s3(&g, p(&i2), url);
    assert_eq!(r3["chunks_new"], 0, "{r3}");
    assert_ne!(r2["snapshot"], r3["snapshot"]);
    let list = lm_s3(&g, &os(["list", "--store", url, "--json"])).json();
    let names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["snapshot"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3, "{list}");
    assert_eq!(names[1], r2["snapshot"].as_str().unwrap());

    let v = lm_s3(&g, &os(["verify", "--store", url, "--json"])).json();
    assert_eq!(v["bad_chunks"].as_array().unwrap().len(), 0, "{v}");
    for (snap, want) in [(&names[0], &v1), (&names[1], &v2)] {
        let out = t.path().join("restored");
        let _ = std::fs::remove_file(&out);
        lm_s3(
            &g,
            &[
                OsStr::new("restore"),
                "--store".as_ref(),
                url.as_ref(),
                snap.as_ref(),
                &p(&out),
            ],
        )
        .ok();
        assert!(
            std::fs::read(&out).unwrap() == **want,
            "{snap} restored differently"
        );
    }
    let info = lm_s3(&g, &os(["info", "--store", url, &names[0], "--json"])).json();
    assert_eq!(info["chunks_missing"], 0, "{info}");

    // A profile attached to the series lives in the bucket too.
    let prof = t.path().join("p.json");
    use livemount_store::format::profile::{Extent, Profile, Source};
    let mut profile = Profile::new(v1.len() as u64, 4096, Source::default());
    profile.extents = vec![Extent {
        offset: 0,
        length: 65536,
        first_access_ns: 0,
        count: 1,
        runs: 1,
    }];
    profile.save(&prof).unwrap();
    lm_s3(
        &g,
        &[
            OsStr::new("profile"),
            "attach".as_ref(),
            "--store".as_ref(),
            url.as_ref(),
            "vm".as_ref(),
            &p(&prof),
        ],
    )
    .ok();
    let pl = lm_s3(&g, &os(["profile", "list", "--store", url, "--json"])).json();
    assert_eq!(pl[0]["series"], "vm", "{pl}");

    // forget + gc: the first snapshot's unique chunk goes, the rest stays readable.
    lm_s3(&g, &os(["forget", "--store", url, &names[0]])).ok();
    let gc = lm_s3(&g, &os(["gc", "--store", url, "--json"])).json();
    assert_eq!(gc["chunks_removed"], 1, "{gc}");
    let v = lm_s3(&g, &os(["verify", "--store", url, "--json"])).json();
    assert_eq!(v["bad_chunks"].as_array().unwrap().len(), 0, "{v}");
    // Nothing of ours is left in leases/ once every command is done.
    let b = backend(&g, url);
    assert!(b.list("leases/").unwrap().is_empty());
}

/// A conditional create (`If-None-Match: *`) of a key that exists: radosgw refuses
/// it (the back end reports `Put::Existed` and the object keeps its bytes); Garage
/// 2.5 ignores the header and replaces the object, which is why snapshot names are
/// taken under a commit lease (docs/format.md). Pinned per engine, so a server that
/// changes its behaviour shows up here.
#[test]
fn a_conditional_create_of_an_existing_key_is_refused_where_the_server_honours_it() {
    let Some(g) = server(
        "a_conditional_create_of_an_existing_key_is_refused_where_the_server_honours_it",
        "lm-cond",
    ) else {
        return;
    };
    let b = backend(&g, "s3://lm-cond/c");
    assert_eq!(
        b.put("probe", b"first", PutMode::Create).unwrap(),
        Put::Written
    );
    let second = b.put("probe", b"second", PutMode::Create).unwrap();
    let now = b.get("probe", 1 << 10, ReadClass::Demand).unwrap().unwrap();
    match g.engine() {
        Engine::Rgw => {
            assert_eq!(second, Put::Existed, "radosgw replaced an existing key");
            assert_eq!(now, b"first");
        }
        Engine::Garage => {
            assert_eq!(second, Put::Written, "Garage now honours If-None-Match");
            assert_eq!(now, b"second");
        }
    }
}

#[test]
fn leases_keep_gc_and_forget_off_what_others_use() {
    let Some(g) = server("leases_keep_gc_and_forget_off_what_others_use", "lm-lease") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-lease/x";
    let (_, _, snap) = backed_up(&g, t.path(), url, 2, 3);
    let b = backend(&g, url);
    // A backup in progress on "another host": gc refuses, naming it.
    let writer = Store::open_backend(b.clone(), Access::Write).unwrap();
    lm_s3(&g, &os(["gc", "--store", url])).error(&["busy", "backup"]);
    drop(writer);
    // A mount whose daemon was killed: its lease stays, forget refuses.
    let st = Store::open_backend(b.clone(), Access::ReadOnly).unwrap();
    let lease = st.lease_mount(&st.resolve(&snap).unwrap(), None).unwrap();
    let key = lease.key().to_string();
    lease.keep();
    lm_s3(&g, &os(["forget", "--store", url, &snap])).error(&[&snap, "mounted"]);
    lm_s3(&g, &os(["gc", "--store", url])).ok();
    lm_s3(&g, &os(["verify", "--store", url])).ok();
    livemount_store::lease::Lease::remove(&*b, &key).unwrap();
    lm_s3(&g, &os(["forget", "--store", url, &snap])).ok();
}

#[test]
fn bad_credentials_missing_buckets_a_dead_server_and_damaged_objects() {
    let Some(mut g) = server(
        "bad_credentials_missing_buckets_a_dead_server_and_damaged_objects",
        "lm-errors",
    ) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-errors/x";
    let (img, _, snap) = backed_up(&g, t.path(), url, 3, 5);

    // Wrong secret: access denied, naming the object and endpoint, no secret shown.
    let args = os(["list", "--store", url]);
    let argv: Vec<OsString> = args.iter().map(|a| a.to_os_string()).collect();
    let mut c = cmd(&argv);
    g.env(&mut c).env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    run_cmd(c, &argv).error(&["access denied", "s3://lm-errors/x", &g.endpoint]);
    // The key from a 0600 credentials file named on the command line instead.
    let mut with_file = argv.clone();
    with_file.push("--s3-credentials".into());
    with_file.push(g.credentials_file().into_os_string());
    let mut c = cmd(&with_file);
    g.env(&mut c)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY");
    run_cmd(c, &with_file).ok();
    // No credentials at all.
    let mut c = cmd(&argv);
    g.env(&mut c)
        .env_remove("AWS_ACCESS_KEY_ID")
        .env("HOME", t.path());
    run_cmd(c, &argv).error(&["no S3 credentials"]);
    // A bucket that does not exist.
    lm_s3(&g, &os(["list", "--store", "s3://lm-nothere/x"]))
        .error(&["no such bucket", "lm-nothere"]);

    // A chunk object replaced by other bytes, and one deleted: verify names both,
    // restore fails naming the chunk and never writes wrong bytes silently.
    let b = backend(&g, url);
    let st = Store::open_backend(b.clone(), Access::ReadOnly).unwrap();
    let ids = st
        .load_index(&st.resolve(&snap).unwrap())
        .unwrap()
        .stored_ids();
    drop(st);
    b.put(&chunk_key(&ids[0]), b"not a chunk", PutMode::Overwrite)
        .unwrap();
    b.delete(&chunk_key(&ids[1])).unwrap();
    let (v, code) = {
        let r = lm_s3(&g, &os(["verify", "--store", url, "--json"]));
        (
            serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap(),
            r.code,
        )
    };
    assert_eq!(code, Some(3), "{v}");
    let bad: Vec<String> = v["bad_chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect();
    assert!(
        bad.contains(&ids[0].to_hex()) && bad.contains(&ids[1].to_hex()),
        "{v}"
    );
    let out = t.path().join("out");
    lm_s3(
        &g,
        &[
            OsStr::new("restore"),
            "--store".as_ref(),
            url.as_ref(),
            snap.as_ref(),
            out.as_os_str(),
        ],
    )
    .error(&["chunk"]);
    // verify --repair moves the damaged one aside and marks both: the next backup
    // of the data uploads them again (it would otherwise trust the previous index),
    // and the store verifies clean.
    let r = lm_s3(&g, &os(["verify", "--store", url, "--repair"]));
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    let again = backup_s3(&g, img.as_os_str(), url);
    assert_eq!(again["chunks_new"], 2, "{again}");
    lm_s3(&g, &os(["verify", "--store", url])).ok();

    // The server goes away: a bounded, clear failure; back again: works.
    g.kill();
    let start = Instant::now();
    lm_s3(&g, &os(["list", "--store", url, "--s3-timeout", "3s"]))
        .error(&["cannot reach the server", &g.endpoint]);
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "took {:?}",
        start.elapsed()
    );
    g.restart();
    lm_s3(&g, &os(["list", "--store", url])).ok();
}

/// Read `len` bytes at `offset` of NBD `uri` with qemu-io, as a file.
fn nbd_read(uri: &str, offset: u64, len: u64, out: &Path) -> (bool, String) {
    let o = Command::new("nbdcopy")
        .args([uri, &out.display().to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("nbdcopy (cargo xtask setup installs libnbd-bin)");
    let _ = (offset, len);
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn an_nbd_export_of_a_bucket_snapshot_is_byte_exact_and_survives_an_outage() {
    let Some(mut g) = server(
        "an_nbd_export_of_a_bucket_snapshot_is_byte_exact_and_survives_an_outage",
        "lm-nbd",
    ) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-nbd/x";
    let (_, data, _) = backed_up(&g, t.path(), url, 8, 9);
    let sock = t.path().join("nbd.sock");
    let child = serve_s3(
        &g,
        &sock,
        &os([
            "--store",
            url,
            "--export",
            "vm",
            "--read-only",
            "--s3-timeout",
            "3s",
        ]),
    );
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());

    // The store goes away before anything was read: reads fail (EIO), boundedly.
    g.kill();
    let start = Instant::now();
    let out = t.path().join("copy");
    let (ok, text) = nbd_read(&uri, 0, 0, &out);
    assert!(!ok, "a read with the store down succeeded: {text}");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    // Back again: the same export reads every byte exactly.
    g.restart();
    let (ok, text) = nbd_read(&uri, 0, 0, &out);
    assert!(ok, "{text}");
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), data.len().next_multiple_of(512));
    assert!(
        got[..data.len()] == data[..],
        "NBD read differs from the image"
    );
    // The server's status shows its requests to the store (the status writer
    // refreshes the file every second or so).
    let status = format!("/run/livemount/serve-{}.json", child.0.id());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let gets = std::fs::read(&status)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["exports"][0]["store_requests"]["gets"].as_u64())
            .unwrap_or(0);
        if gets > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no store requests in {status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A clean stop removes the export's lease from the bucket.
    let b = backend(&g, url);
    assert_eq!(b.list("leases/").unwrap().len(), 1);
    let mut child = child;
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    assert!(child.0.wait().unwrap().success());
    assert!(
        b.list("leases/").unwrap().is_empty(),
        "lease left after a clean stop"
    );
}

/// A child killed when dropped (a failing test leaves no server behind).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `livemount serve ARGS… --socket SOCK` against `g`, once its socket exists.
fn serve_s3(g: &S3Server, sock: &Path, args: &[&OsStr]) -> Killed {
    serve_s3_logged(g, sock, args, None)
}

/// [`serve_s3`] with the server's stderr in `log` (else the test's).
fn serve_s3_logged(g: &S3Server, sock: &Path, args: &[&OsStr], log: Option<&Path>) -> Killed {
    let mut argv: Vec<OsString> = vec!["serve".into()];
    argv.extend(args.iter().map(|a| a.to_os_string()));
    argv.push("--socket".into());
    argv.push(sock.as_os_str().to_os_string());
    let mut c = cmd(&argv);
    let stderr = match log {
        Some(l) => Stdio::from(std::fs::File::create(l).unwrap()),
        None => Stdio::inherit(),
    };
    g.env(&mut c).stdout(Stdio::null()).stderr(stderr);
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "serve did not start");
        assert!(child.try_wait().unwrap().is_none(), "serve exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    Killed(child)
}

#[test]
fn two_servers_share_one_host_cache_and_its_budget() {
    let Some(g) = server(
        "two_servers_share_one_host_cache_and_its_budget",
        "lm-shared",
    ) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-shared/x";
    // A template and a clone with a small change (one 1 MiB chunk of 24): two VMs.
    let a = compressible_image(24, 11);
    let mut b = a.clone();
    b[5 << 20..(5 << 20) + 8192].fill(0xee);
    let (ia, ib) = (t.path().join("a"), t.path().join("b"));
    std::fs::write(&ia, &a).unwrap();
    std::fs::write(&ib, &b).unwrap();
    let sa = backup_s3(&g, ia.as_os_str(), url)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    let sb = backup_s3(&g, ib.as_os_str(), url)["snapshot"]
        .as_str()
        .unwrap()
        .to_string();
    // Every byte from the store is counted on its way through a (zero-delay) proxy.
    let upstream = g.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = livemount_tests::netem::DelayProxy::start(upstream, Duration::ZERO, None);
    let cache = t.path().join("cache");
    let budget = 64u64 << 20;
    let start = |name: &str, snap: &str| {
        let sock = t.path().join(format!("{name}.sock"));
        let export = format!("{name}={snap}");
        let purl = proxy.url();
        let child = serve_s3(
            &g,
            &sock,
            &os([
                "--store",
                url,
                "--s3-endpoint",
                &purl,
                "--export",
                &export,
                "--read-only",
                "--cache-dir",
                cache.to_str().unwrap(),
                "--cache-size",
                "64M",
            ]),
        );
        (
            child,
            format!("nbd+unix:///{name}?socket={}", sock.display()),
        )
    };
    let read_all = |uri: &str, want: &[u8]| {
        let out = t.path().join("copy");
        let _ = std::fs::remove_file(&out);
        let (ok, text) = nbd_read(uri, 0, 0, &out);
        assert!(ok, "{text}");
        assert!(
            std::fs::read(&out).unwrap()[..want.len()] == *want,
            "{uri} read wrong bytes"
        );
    };
    let (ca, ua) = start("a", &sa);
    let d0 = proxy.bytes().1;
    read_all(&ua, &a);
    let first = proxy.bytes().1 - d0;
    // A second process, another snapshot of the same template: its reads are hits
    // in the first one's chunks, only the changed chunk comes from the store.
    let (cb, ub) = start("b", &sb);
    let d1 = proxy.bytes().1;
    read_all(&ub, &b);
    let second = proxy.bytes().1 - d1;
    assert!(first > 1 << 20, "the first read fetched only {first} bytes");
    assert!(
        second * 10 <= first,
        "the second server fetched {second} bytes, the first {first}"
    );
    let on_disk: u64 = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().len() == 64)
        .map(|e| {
            use std::os::unix::fs::MetadataExt;
            e.metadata().unwrap().blocks() * 512
        })
        .sum();
    assert!(
        on_disk > 0 && on_disk <= budget,
        "{on_disk} bytes in the cache"
    );
    drop((ca, cb));
}

#[test]
fn a_store_location_round_trips_without_secrets() {
    let loc = StoreLocation::parse(
        "s3://bucket/p",
        S3Options {
            endpoint: Some("http://127.0.0.1:1".into()),
            ..Default::default()
        },
    );
    let text = serde_json::to_string(&loc).unwrap();
    assert!(!text.to_lowercase().contains("secret"), "{text}");
    assert_eq!(serde_json::from_str::<StoreLocation>(&text).unwrap(), loc);
}

/// `commit` into a bucket: a mount's overlay (written through the block stack over
/// the bucket) and its base become a new snapshot there, deduplicated, restored
/// byte-exact.
#[test]
fn commit_of_an_overlay_lands_in_the_bucket() {
    let Some(g) = server("commit_of_an_overlay_lands_in_the_bucket", "lm-commit") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-commit/x";
    let (_, mut data, _) = backed_up(&g, t.path(), url, 6, 13);
    let overlay = t.path().join("vm.overlay");
    let location = StoreLocation::S3 {
        url: url.into(),
        options: options(&g),
    };
    let mut config =
        livemount::config::MountConfig::new(location, "vm".into(), Some(overlay.clone()));
    config.cache_mem = 4 << 20;
    {
        let m = livemount::stack::Stack::open(&config).unwrap();
        m.top.write_at(8192, &[0x42; 4096]).unwrap();
        m.top.write_at(4 << 20, &[0x17; 512]).unwrap();
        m.top.flush().unwrap();
        m.release_lease();
    }
    data[8192..8192 + 4096].fill(0x42);
    data[4 << 20..(4 << 20) + 512].fill(0x17);
    let r = lm_s3(
        &g,
        &[
            OsStr::new("commit"),
            "--store".as_ref(),
            url.as_ref(),
            overlay.as_os_str(),
            "--name".as_ref(),
            "vm-kept".as_ref(),
            "--json".as_ref(),
        ],
    )
    .json();
    assert_eq!(
        r["chunks_new"], 2,
        "only the two written chunks are new: {r}"
    );
    let out = t.path().join("out");
    lm_s3(
        &g,
        &[
            OsStr::new("restore"),
            "--store".as_ref(),
            url.as_ref(),
            "vm-kept".as_ref(),
            out.as_os_str(),
        ],
    )
    .ok();
    assert!(
        std::fs::read(&out).unwrap() == data,
        "the committed snapshot differs"
    );
    assert!(backend(&g, url).list("leases/").unwrap().is_empty());
}

/// Faults a healthy local server never gives, through a fault proxy
/// (`livemount_tests::httpfault`): with every 3rd GET throttled (503 SlowDown) and
/// every 4th body cut off half way, `verify` and `restore` of the bucket and an NBD
/// export of a snapshot read every byte exactly (the client backs off and retries;
/// a cut body is resumed or fetched again, and every chunk is verified either way).
/// Throttled for good, a read fails (EIO) within the configured time, and the
/// server's log says the store throttles and names the object.
#[test]
fn throttling_and_cut_off_bodies_are_retried_never_wrong_bytes() {
    let name = "throttling_and_cut_off_bodies_are_retried_never_wrong_bytes";
    let Some(g) = server(name, "lm-faults") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-faults/f";
    let (_, data, snap) = backed_up(&g, t.path(), url, 8, 21);
    let upstream = g.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start(
        upstream,
        FaultPlan {
            slow_down_every: 3,
            truncate_every: 4,
            ..Default::default()
        },
    );
    let purl = proxy.url();
    lm_s3(&g, &os(["verify", "--store", url, "--s3-endpoint", &purl])).ok();
    let out = t.path().join("restored");
    lm_s3(
        &g,
        &[
            OsStr::new("restore"),
            "--store".as_ref(),
            url.as_ref(),
            "--s3-endpoint".as_ref(),
            purl.as_ref(),
            snap.as_ref(),
            out.as_os_str(),
        ],
    )
    .ok();
    assert!(std::fs::read(&out).unwrap() == data, "restored differently");
    let sock = t.path().join("nbd.sock");
    let child = serve_s3(
        &g,
        &sock,
        &os([
            "--store",
            url,
            "--s3-endpoint",
            &purl,
            "--export",
            "vm",
            "--read-only",
            "--s3-timeout",
            "20s",
        ]),
    );
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let copy = t.path().join("copy");
    let (ok, text) = nbd_read(&uri, 0, 0, &copy);
    assert!(ok, "{text}");
    let got = std::fs::read(&copy).unwrap();
    assert!(
        got[..data.len()] == data[..],
        "NBD read differs from the image"
    );
    drop(child);
    let c = proxy.counts();
    assert!(
        c.slowed > 0 && c.truncated > 0,
        "no fault was injected: {c:?}"
    );

    // Throttled for good (once a fresh server has its index): bounded, and said
    // plainly.
    proxy.set_plan(FaultPlan::default());
    let log = t.path().join("serve.log");
    let sock = t.path().join("nbd2.sock");
    let child = serve_s3_logged(
        &g,
        &sock,
        &os([
            "--store",
            url,
            "--s3-endpoint",
            &purl,
            "--export",
            "vm",
            "--read-only",
            "--s3-timeout",
            "3s",
        ]),
        Some(&log),
    );
    proxy.set_plan(FaultPlan {
        slow_down_every: 1,
        truncate_every: 0,
        ..Default::default()
    });
    let start = Instant::now();
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let (ok, text) = nbd_read(&uri, 0, 0, &copy);
    assert!(
        !ok,
        "a read succeeded while every GET was throttled: {text}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
    drop(child);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("throttling") && said.contains("lm-faults") && !said.contains(&g.secret),
        "the log does not say the store throttles, naming the bucket:\n{said}"
    );
}

/// Backups, forget and gc from separate processes, at the same time, while an NBD
/// export of a snapshot that shares most chunks with them is read again and again
/// (a 1 MiB memory cache and no disk cache: every pass reads the bucket). gc and a
/// backup never run at once (one of them is refused as busy and tried again); gc
/// never deletes a chunk the export or a backup needs: every pass of the export
/// reads every byte exactly, every backup that returned is restorable, and the
/// bucket verifies at the end.
#[test]
fn concurrent_backups_gc_and_a_mount_never_lose_a_referenced_chunk() {
    let name = "concurrent_backups_gc_and_a_mount_never_lose_a_referenced_chunk";
    let Some(g) = server(name, "lm-busy") else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-busy/x";
    let (_, base, snap) = backed_up(&g, t.path(), url, 6, 31);
    let sock = t.path().join("nbd.sock");
    let export = format!("vm={snap}");
    let child = serve_s3(
        &g,
        &sock,
        &os([
            "--store",
            url,
            "--export",
            &export,
            "--read-only",
            "--cache-mem",
            "1M",
        ]),
    );
    let uri = format!("nbd+unix:///vm?socket={}", sock.display());
    let stop = std::sync::atomic::AtomicBool::new(false);
    let backup_of = |i: u64| -> Vec<u8> {
        // The mounted image with a few MiB changed: most chunks are shared.
        let mut d = base.clone();
        let at = ((i as usize * 1_300_000) % (d.len() - 70_000)) & !4095;
        d[at..at + 65536].fill(i as u8 | 1);
        d
    };
    // Whatever ends the backup thread (done, or a panic) ends the other loops too.
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let busy_retry = |r: &Run| {
        assert!(r.stderr.contains("busy"), "{}: {}", r.what, r.stderr);
        assert!(
            Instant::now() < deadline,
            "{}: still busy after 5 minutes",
            r.what
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let (backups, gcs, passes) = std::thread::scope(|s| {
        let backups = s.spawn(|| {
            let _stop = StopOnDrop(&stop);
            let mut done = Vec::new();
            for i in 0..6u64 {
                let img = t.path().join(format!("b{i}.img"));
                std::fs::write(&img, backup_of(i)).unwrap();
                let args: Vec<OsString> = ["backup", img.to_str().unwrap(), "--store", url]
                    .iter()
                    .map(OsString::from)
                    .chain(["--name", "churn", "--json"].iter().map(OsString::from))
                    .collect();
                loop {
                    let r = lm_s3(
                        &g,
                        &args.iter().map(OsString::as_os_str).collect::<Vec<_>>(),
                    );
                    if r.code == Some(0) {
                        let v = r.json();
                        done.push((i, v["snapshot"].as_str().unwrap().to_string()));
                        break;
                    }
                    busy_retry(&r);
                }
                // The older churn snapshots go; their own chunks become garbage.
                if done.len() > 2 {
                    let (_, old) = done.remove(0);
                    loop {
                        let r = lm_s3(&g, &os(["forget", "--store", url, &old]));
                        if r.code == Some(0) {
                            break;
                        }
                        busy_retry(&r);
                    }
                }
            }
            done
        });
        let gcs = s.spawn(|| {
            let mut ok = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) || ok == 0 {
                let r = lm_s3(&g, &os(["gc", "--store", url]));
                if r.code == Some(0) {
                    ok += 1;
                } else {
                    busy_retry(&r);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        let mut passes = 0;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) || passes == 0 {
            let out = t.path().join("pass");
            let (ok, text) = nbd_read(&uri, 0, 0, &out);
            assert!(ok, "pass {passes}: {text}");
            let got = std::fs::read(&out).unwrap();
            assert!(
                got[..base.len()] == base[..],
                "pass {passes}: the export read wrong bytes"
            );
            passes += 1;
        }
        (backups.join().unwrap(), gcs.join().unwrap(), passes)
    });
    drop(child);
    eprintln!(
        "{name}: {} backups kept, {gcs} gc runs, {passes} passes of the export",
        backups.len()
    );
    assert!(gcs > 0);
    lm_s3(&g, &os(["verify", "--store", url])).ok();
    for (i, snap) in &backups {
        let out = t.path().join("restored");
        let _ = std::fs::remove_file(&out);
        lm_s3(
            &g,
            &[
                OsStr::new("restore"),
                "--store".as_ref(),
                url.as_ref(),
                snap.as_ref(),
                out.as_os_str(),
            ],
        )
        .ok();
        assert!(
            std::fs::read(&out).unwrap() == backup_of(*i),
            "{snap} restored differently"
        );
    }
}

/// Where real backups live: a 3-node cluster with every object on every node.
/// With one node down, backups, verify and restore still work (quorum 2 of 3);
/// with two down a restore fails (bounded: `--s3-timeout 5s` per request) naming
/// the bucket, never leaving a file that claims to be complete; with a node back,
/// it works again.
#[test]
fn a_three_node_cluster_keeps_serving_with_a_node_down() {
    let test = "a_three_node_cluster_keeps_serving_with_a_node_down";
    let Some(bin) = garage_bin() else {
        livemount_tests::skip(
            test,
            livemount_tests::Tier::Machine,
            "no garage binary: run `cargo xtask setup` (it builds Garage into .cache/tools)",
        );
        return;
    };
    let mut nodes: Vec<S3Server> = Garage::cluster(&bin, 3)
        .into_iter()
        .map(S3Server::from)
        .collect();
    nodes[0].bucket("lm-cluster");
    let t = tempfile::tempdir().unwrap();
    let url = "s3://lm-cluster/site";
    let (_, data, snap) = backed_up(&nodes[0], t.path(), url, 6, 11);
    nodes[2].kill();
    let out = t.path().join("restored");
    let restore = |g: &S3Server| {
        let _ = std::fs::remove_file(&out);
        let args = [
            OsStr::new("restore"),
            OsStr::new("--store"),
            OsStr::new(url),
            OsStr::new("--s3-timeout"),
            OsStr::new("5s"),
            OsStr::new(&snap),
            out.as_os_str(),
        ];
        lm_s3(g, &args)
    };
    restore(&nodes[0]).ok();
    assert!(
        std::fs::read(&out).unwrap() == data,
        "restored with a node down"
    );
    lm_s3(&nodes[0], &os(["verify", "--store", url])).ok();
    let mut v2 = data.clone();
    v2[1 << 20..(1 << 20) + 4096].fill(0xa5);
    let img2 = t.path().join("v2");
    std::fs::write(&img2, &v2).unwrap();
    let r = backup_s3(&nodes[0], img2.as_os_str(), url);
    assert_eq!(r["chunks_new"], 1, "an incremental with a node down: {r}");

    nodes[1].kill();
    let started = Instant::now();
    let r = restore(&nodes[0]);
    assert_ne!(
        r.code,
        Some(0),
        "a restore with two of three nodes down succeeded"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the failure took {:?}",
        started.elapsed()
    );
    assert!(r.stderr.contains("lm-cluster"), "{}", r.stderr);
    assert!(
        std::fs::read(&out).map_or(true, |b| b != data),
        "a failed restore left a file claiming to be complete"
    );
    nodes[1].restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = restore(&nodes[0]);
        if r.code == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no restore after the node came back: {}",
            r.stderr
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(
        std::fs::read(&out).unwrap() == data,
        "restored after the node came back"
    );
}

/// Virtual-host style (`--s3-virtual-host`): requests go to BUCKET.ENDPOINT-HOST.
/// That name does not resolve here, so the client reaches the server (Garage's
/// root domain `.s3.garage.localhost`, radosgw's `rgw dns name`) as its HTTP proxy (HTTP_PROXY, honoured by the client
/// like any proxy an operator sets): the request line names the virtual host and
/// the server routes by it. Backup, verify and restore work that way.
#[test]
fn virtual_host_style_requests_name_the_bucket_in_the_host() {
    let Some(g) = server(
        "virtual_host_style_requests_name_the_bucket_in_the_host",
        "lm-vh",
    ) else {
        return;
    };
    let port = g.endpoint.rsplit(':').next().unwrap().to_string();
    let endpoint = format!("http://{}:{port}", g.vhost_domain());
    let t = tempfile::tempdir().unwrap();
    let data = compressible_image(4, 5);
    let img = t.path().join("img");
    std::fs::write(&img, &data).unwrap();
    let url = "s3://lm-vh/vhost";
    let vh = |args: &[&OsStr]| {
        let mut all: Vec<OsString> = args.iter().map(|a| a.to_os_string()).collect();
        all.extend(["--s3-virtual-host", "--s3-endpoint", &endpoint].map(OsString::from));
        let mut c = cmd(&all);
        g.env(&mut c)
            .env("HTTP_PROXY", &g.endpoint)
            .env_remove("NO_PROXY");
        run_cmd(c, &all)
    };
    let r = vh(&os([
        "backup",
        img.to_str().unwrap(),
        "--store",
        url,
        "--name",
        "vm",
        "--json",
    ]));
    let snap = r.ok().json()["snapshot"].as_str().unwrap().to_string();
    vh(&os(["verify", "--store", url])).ok();
    let out = t.path().join("restored");
    vh(&[
        OsStr::new("restore"),
        OsStr::new("--store"),
        OsStr::new(url),
        OsStr::new(&snap),
        out.as_os_str(),
    ])
    .ok();
    assert!(std::fs::read(&out).unwrap() == data);
    // The objects are in bucket lm-vh under the prefix (path style sees them).
    let b = backend(&g, url);
    assert!(
        !b.list("chunks/").unwrap().is_empty(),
        "no chunks under s3://lm-vh/vhost"
    );
}

/// A GET stuck at the store (the proxy holds every 4th for 3 s) is hedged once it
/// is slower than the recent p95: a second request answers, byte-exact, long before
/// the stuck one would have.
#[test]
fn a_stuck_get_is_hedged_and_answered_by_the_second_request() {
    let Some(g) = server(
        "a_stuck_get_is_hedged_and_answered_by_the_second_request",
        "lm-hedge",
    ) else {
        return;
    };
    let upstream = g.endpoint.trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start(upstream, FaultPlan::default());
    let mut o = options(&g);
    o.endpoint = Some(proxy.url());
    let b = S3Backend::open("s3://lm-hedge/h", &o).unwrap();
    let body = |i: usize| -> Vec<u8> { (0..20_000).map(|j| ((i * 31 + j) % 251) as u8).collect() };
    for i in 0..24 {
        b.put(&format!("objects/{i}"), &body(i), PutMode::Overwrite)
            .unwrap();
    }
    let get = |i: usize| {
        b.get(
            &format!("objects/{i}"),
            1 << 20,
            livemount_store::backend::ReadClass::Demand,
        )
        .unwrap()
        .unwrap()
    };
    // Enough answers for a p95 to hedge by.
    for i in 0..24 {
        assert!(get(i) == body(i));
    }
    let stall = Duration::from_secs(3);
    proxy.set_plan(FaultPlan {
        stall_every: 4,
        stall,
        ..Default::default()
    });
    for i in 0..24 {
        let t = Instant::now();
        assert!(get(i) == body(i), "object {i}");
        assert!(
            t.elapsed() < stall,
            "GET {i} waited for the stuck request ({:?})",
            t.elapsed()
        );
    }
    let stalled = proxy.counts().stalled;
    let r = b.requests().unwrap();
    assert!(stalled >= 5, "{stalled} GETs held");
    assert!(
        r.hedged >= stalled,
        "{} hedged, {stalled} held: {r:?}",
        r.hedged
    );
}
