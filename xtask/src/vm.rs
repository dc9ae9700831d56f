//! The ublk test VM: backports kernel, busybox initramfs, qemu runner.
//!
//! The host kernel has no ublk, so everything that needs `/dev/ublk-control` runs in
//! a qemu guest (TCG; KVM does not work on these machines) booting Debian's
//! bookworm-backports kernel, whose `ublk_drv` module is loaded before the script
//! runs. The guest sees the host root read-only (with a tmpfs overlay, so it can
//! write anywhere), a read-write results directory, and the repository at the
//! same path as on the host. See docs/testing-in-vm.md.
//!
//! - [`setup`]: install qemu & co, fetch the kernel, build the initramfs (idempotent).
//! - [`run_in_vm`]: boot, run a bash script, return exit code and console log.
//! - [`test`]: build the integration-test binaries and run them all in one boot.
//! - [`kernel_paths`]: the unpacked kernel, for benchmarks and the boot demo.

pub(crate) mod kit;
pub(crate) mod runner;

use crate::util::{root, sh_quote};
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

pub use kit::kernel_paths;
pub use runner::run_in_vm;

/// How to boot the VM for [`run_in_vm`].
///
/// The environment variables `LIVEMOUNT_VM_MEM` (MiB), `LIVEMOUNT_VM_CPUS`,
/// `LIVEMOUNT_VM_TIMEOUT` (seconds) and `LIVEMOUNT_VM_QUIET=1` override the
/// corresponding fields, so a human can adjust a run without code changes.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Guest memory in MiB (default 2048).
    pub memory_mb: u32,
    /// Virtual CPUs (default 2).
    pub cpus: u32,
    /// Wall-clock limit for one boot, script included; qemu is killed after it.
    pub timeout: Duration,
    /// Extra boots after a crashed or hung-at-boot guest (default 1).
    pub retries: u32,
    /// (host directory, absolute guest path) shared read-write, e.g. `/results`.
    pub results: Option<(PathBuf, String)>,
    /// Directory the script starts in (default: the repository root, same path as on the host).
    pub cwd: Option<PathBuf>,
    /// Host variables passed to the script: exact names, or prefixes ending in `*`.
    pub pass_env: Vec<String>,
    /// Variables set for the script (after `pass_env`, so they win).
    pub env: Vec<(String, String)>,
    /// Modules loaded with modprobe before the script (default `ublk_drv`).
    pub modprobe: Vec<String>,
    /// More qemu arguments (disks, devices) appended as they are.
    pub extra_qemu_args: Vec<String>,
    /// More kernel command-line arguments.
    pub kernel_args: Vec<String>,
    /// Copy the guest console to stderr as it arrives (default true).
    pub stream: bool,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            memory_mb: 2048,
            cpus: 2,
            timeout: Duration::from_secs(600),
            retries: 1,
            results: None,
            cwd: None,
            pass_env: [
                "RUST_BACKTRACE",
                "RUST_LIB_BACKTRACE",
                "RUST_LOG",
                "RUST_MIN_STACK",
                "LIVEMOUNT_*",
            ]
            .map(String::from)
            .to_vec(),
            env: Vec::new(),
            modprobe: vec!["ublk_drv".into()],
            extra_qemu_args: Vec::new(),
            kernel_args: Vec::new(),
            stream: true,
        }
    }
}

impl VmOptions {
    /// These options with the `LIVEMOUNT_VM_*` environment overrides applied.
    pub(crate) fn with_env_overrides(&self) -> Result<VmOptions> {
        fn num(name: &str) -> Result<Option<u64>> {
            match std::env::var(name) {
                Ok(v) if !v.is_empty() => {
                    Ok(Some(v.trim().parse().with_context(|| {
                        format!("{name}={v:?} is not a number")
                    })?))
                }
                _ => Ok(None),
            }
        }
        let mut o = self.clone();
        if let Some(m) = num("LIVEMOUNT_VM_MEM")? {
            o.memory_mb = u32::try_from(m)?;
        }
        if let Some(c) = num("LIVEMOUNT_VM_CPUS")? {
            o.cpus = u32::try_from(c)?;
        }
        if let Some(t) = num("LIVEMOUNT_VM_TIMEOUT")? {
            o.timeout = Duration::from_secs(t);
        }
        if std::env::var("LIVEMOUNT_VM_QUIET").is_ok_and(|v| v == "1") {
            o.stream = false;
        }
        Ok(o)
    }
}

/// What a [`run_in_vm`] boot produced.
#[derive(Clone, Debug)]
pub struct VmResult {
    /// The script's exit code.
    pub exit_code: i32,
    /// The guest console (kernel messages at warning level and up, init markers,
    /// the script's stdout and stderr), LF line ends, plus qemu's own stderr
    /// prefixed `qemu: `.
    pub log: String,
    /// The kernel log shows an Oops/panic/BUG (even after the retry).
    pub oops: bool,
    /// Boots it took (2 when the first one crashed).
    pub attempts: u32,
    /// From starting qemu to the script's first line.
    pub boot_time: Duration,
    /// The script alone.
    pub script_time: Duration,
    /// qemu start to qemu exit (last boot).
    pub total_time: Duration,
}

impl VmResult {
    /// The script exited 0 and the kernel did not crash.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.oops
    }
}

/// `LIVEMOUNT_SKIP_VM=1`: the machine cannot run the VM; say so visibly.
fn skip_vm(what: &str) -> bool {
    let skip = std::env::var("LIVEMOUNT_SKIP_VM").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("SKIP: {what} (LIVEMOUNT_SKIP_VM=1)");
    }
    skip
}

/// Install qemu, fetch the backports kernel, build the initramfs (idempotent).
pub fn setup() -> Result<()> {
    if skip_vm("VM test kit setup") {
        return Ok(());
    }
    kit::setup()
}

/// One integration-test executable cargo built.
struct TestBinary {
    name: String,
    exe: PathBuf,
    manifest_dir: PathBuf,
}

/// `cargo test --no-run --message-format=json -p livemount-tests` and its executables.
fn build_test_binaries() -> Result<Vec<TestBinary>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "test",
        "--no-run",
        "--message-format=json",
        "-p",
        "livemount-tests",
    ])
    .current_dir(root())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!("+ {cmd:?}");
    let mut child = cmd.spawn().context("starting cargo")?;
    let mut bins = Vec::new();
    let stdout = child.stdout.take().context("cargo stdout")?;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("?");
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        // Only the tests that need the guest kernel run there; the rest already ran on
        // the host (`cargo test --workspace`). LIVEMOUNT_VM_TESTS overrides the list.
        let wanted = std::env::var("LIVEMOUNT_VM_TESTS").unwrap_or_else(|_| "ublk".into());
        if !wanted.split(',').any(|w| w == target || w == "all") {
            continue;
        }
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or_default());
        bins.push(TestBinary {
            name: format!("{target} ({kind})"),
            exe: PathBuf::from(exe),
            manifest_dir: manifest.parent().map(PathBuf::from).unwrap_or_else(root),
        });
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("building the integration tests failed: {status}");
    }
    Ok(bins)
}

/// The guest script for [`test`]: smoke check, then every binary, one at a time.
fn test_script(bins: &[TestBinary], extra_args: &[String]) -> String {
    let mut s = String::from(
        r#"set -u
if [ ! -c /dev/ublk-control ]; then
    echo "vm-test: SMOKE FAIL: /dev/ublk-control does not exist after modprobe ublk_drv"
    ls -l /dev | grep -i ublk
    exit 97
fi
echo "vm-test: smoke ok: $(ls -l /dev/ublk-control)"
echo ok > /results/smoke
: > /results/summary.txt
fail=0
run_test() {
    echo "vm-test: ==== $1: $3"
    (cd "$2" && CARGO_MANIFEST_DIR="$2" "$3" --test-threads=1 "${@:4}")
    local rc=$?
    echo "$rc $1" >> /results/summary.txt
    [ "$rc" = 0 ] || fail=1
}
"#,
    );
    let extra: Vec<String> = extra_args.iter().map(|a| sh_quote(a)).collect();
    for b in bins {
        s.push_str(&format!(
            "run_test {} {} {} {}\n",
            sh_quote(&b.name),
            sh_quote(&b.manifest_dir.to_string_lossy()),
            sh_quote(&b.exe.to_string_lossy()),
            extra.join(" ")
        ));
    }
    s.push_str("exit $fail\n");
    s
}

/// `LIVEMOUNT_VM_RUN=<script file or command> cargo xtask vm-test`: run that in the
/// VM instead of the tests (results dir `results/vm-run` at `/results`).
fn run_adhoc(what: &str) -> Result<()> {
    let script = match fs::read_to_string(what) {
        Ok(s) => s,
        Err(_) => format!("{what}\n"),
    };
    let results = root().join("results/vm-run");
    let opts = VmOptions {
        results: Some((results.clone(), "/results".into())),
        env: vec![
            ("LIVEMOUNT_IN_VM".into(), "1".into()),
            ("LIVEMOUNT_RESULTS".into(), "/results".into()),
        ],
        ..VmOptions::default()
    };
    let r = run_in_vm(&script, &opts)?;
    eprintln!(
        "vm-run: exit {} (boot {:.1} s, script {:.1} s, total {:.1} s, {} boot(s)); results in {}",
        r.exit_code,
        r.boot_time.as_secs_f64(),
        r.script_time.as_secs_f64(),
        r.total_time.as_secs_f64(),
        r.attempts,
        results.display()
    );
    if !r.success() {
        bail!(
            "vm-run: the script failed (exit {}{})",
            r.exit_code,
            if r.oops { ", kernel Oops" } else { "" }
        );
    }
    Ok(())
}

/// The number of tests `bins` hold that `extra` selects (`--list --format terse`).
fn expected_tests(bins: &[TestBinary], extra: &[String]) -> Result<u64> {
    let mut n = 0;
    for b in bins {
        let out = Command::new(&b.exe)
            .args(["--list", "--format", "terse"])
            .args(extra.iter().filter(|a| *a != "--nocapture"))
            .current_dir(&b.manifest_dir)
            .output()
            .with_context(|| format!("listing the tests of {}", b.exe.display()))?;
        if !out.status.success() {
            bail!("{} --list failed: {}", b.exe.display(), out.status);
        }
        n += count_listed(&String::from_utf8_lossy(&out.stdout));
    }
    Ok(n)
}

/// Tests in libtest's terse list output (`name: test` lines).
fn count_listed(list: &str) -> u64 {
    list.lines().filter(|l| l.ends_with(": test")).count() as u64
}

/// Sum of the libtest "test result:" lines in a log: (passed, failed, ignored).
fn count_tests(log: &str) -> (u64, u64, u64) {
    let mut sum = (0, 0, 0);
    for line in log.lines() {
        let Some(rest) = line.split("test result: ").nth(1) else {
            continue;
        };
        for part in rest.split(';') {
            let mut w = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (w.next(), w.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => sum.0 += n,
                "failed" => sum.1 += n,
                "ignored" => sum.2 += n,
                _ => {}
            }
        }
    }
    sum
}

/// Build the integration tests on the host and run every binary inside one VM
/// boot (`LIVEMOUNT_IN_VM=1`, `--test-threads=1`); fail if any fails.
///
/// `LIVEMOUNT_VM_TEST_ARGS` adds arguments to every binary (a test-name filter,
/// `--nocapture`, ...).
pub fn test() -> Result<()> {
    if skip_vm("ublk tests in the VM") {
        bail!(
            "vm-test: the VM tier was skipped (LIVEMOUNT_SKIP_VM=1); a skipped tier is not a pass"
        );
    }
    if let Ok(what) = std::env::var("LIVEMOUNT_VM_RUN") {
        return run_adhoc(&what);
    }
    // Fail before the (long) build when the kit is missing.
    let (_, _, kver) = kernel_paths()?;
    let bins = build_test_binaries()?;
    // One directory per run: several people may run the VM tests in one tree at once.
    let results = root()
        .join("results/vm-test")
        .join(std::process::id().to_string());
    if results.exists() {
        fs::remove_dir_all(&results).with_context(|| format!("clearing {}", results.display()))?;
    }
    let extra: Vec<String> = std::env::var("LIVEMOUNT_VM_TEST_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    // How many tests must pass: libtest's own list, with the same arguments (a
    // filter that matches nothing must fail, not pass with zero tests).
    let expected = expected_tests(&bins, &extra)?;
    if expected == 0 {
        bail!("vm-test: no test matches (LIVEMOUNT_VM_TEST_ARGS={extra:?})");
    }
    eprintln!(
        "vm-test: {} test binaries, {expected} tests to run in the VM (kernel {kver})",
        bins.len()
    );
    let opts = VmOptions {
        timeout: Duration::from_secs(1800),
        results: Some((results.clone(), "/results".into())),
        env: vec![
            ("LIVEMOUNT_IN_VM".into(), "1".into()),
            ("LIVEMOUNT_RESULTS".into(), "/results".into()),
        ],
        ..VmOptions::default()
    };
    let r = run_in_vm(&test_script(&bins, &extra), &opts)?;
    if !results.join("smoke").exists() {
        bail!(
            "vm-test: guest smoke check failed: /dev/ublk-control does not exist after `modprobe ublk_drv` \
             (script exit {}); see the console log above",
            r.exit_code
        );
    }
    let summary = fs::read_to_string(results.join("summary.txt")).unwrap_or_default();
    let failed: Vec<&str> = summary
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(rc, _)| *rc != "0")
        .map(|(_, name)| name)
        .collect();
    let ran = summary.lines().count();
    let (passed, tfailed, ignored) = count_tests(&r.log);
    eprintln!(
        "vm-test: {ran} of {} binaries ran, {} failed; tests {passed} passed / {tfailed} failed / {ignored} ignored; \
         boot {:.1} s, tests {:.1} s, VM total {:.1} s",
        bins.len(),
        failed.len(),
        r.boot_time.as_secs_f64(),
        r.script_time.as_secs_f64(),
        r.total_time.as_secs_f64()
    );
    if r.attempts > 1 {
        eprintln!(
            "vm-test: note: {} boots: the guest kernel crashed before the tests started",
            r.attempts
        );
    }
    if passed + ignored != expected && failed.is_empty() && r.success() {
        eprintln!("vm-test: guest results kept in {}", results.display());
        bail!(
            "vm-test: {expected} tests should have run, {passed} passed and {ignored} were ignored"
        );
    }
    if r.success() && failed.is_empty() && ran == bins.len() {
        let _ = fs::remove_dir_all(&results);
        return Ok(());
    }
    eprintln!("vm-test: guest results kept in {}", results.display());
    if r.oops {
        bail!("vm-test: the guest kernel crashed (Oops/BUG in the console log above)");
    }
    if !failed.is_empty() {
        bail!(
            "vm-test: failing test binaries in the VM: {}",
            failed.join(", ")
        );
    }
    if r.exit_code != 0 || ran != bins.len() {
        bail!(
            "vm-test: the guest script exited {} after {ran} of {} binaries",
            r.exit_code,
            bins.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_listed_tests() {
        assert_eq!(
            count_listed("ublk_discard: test\nublk_read_only: test\nbench: benchmark\n"),
            2
        );
        assert_eq!(count_listed(""), 0);
    }

    #[test]
    fn counts_libtest_lines() {
        let log = "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n\
                   test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(count_tests(log), (4, 2, 1));
    }

    #[test]
    fn quotes() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
    }
}
