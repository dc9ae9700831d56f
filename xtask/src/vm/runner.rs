//! Boot the test VM once, run a script in it, collect exit code and console log.

use super::kit::{initramfs_path, kernel_paths, vm_dir, vmlinux_path};
use super::{VmOptions, VmResult};
use crate::util::{have, root, sh_quote};
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STAGE2_SCRIPT: &str = include_str!("stage2.sh");

/// Lines of the guest's kernel log that mean the kernel itself crashed (a kernel
/// general protection fault prints "Oops: general protection fault"; a user-space
/// one only "traps: ... general protection fault", which is not a kernel crash).
const OOPS_PATTERNS: &[&str] = &[
    "Oops:",
    "Kernel panic - not syncing",
    "BUG: unable to handle",
    "BUG: kernel NULL pointer",
    "kernel BUG at",
];

/// Console output seen so far, and when each step marker arrived.
#[derive(Default)]
struct Console {
    log: String,
    partial: String,
    steps: Vec<(Instant, String)>,
}

impl Console {
    fn push(&mut self, text: &str) {
        self.log.push_str(text);
        self.partial.push_str(text);
        while let Some(i) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=i).collect();
            if let Some(step) = line.trim_end().split("@@LMVM-STEP ").nth(1) {
                self.steps.push((Instant::now(), step.to_owned()));
            }
        }
    }

    fn last_step(&self) -> &str {
        self.steps
            .last()
            .map_or("kernel boot (no output from /init yet)", |(_, s)| {
                s.as_str()
            })
    }

    fn step_time(&self, name: &str) -> Option<Instant> {
        self.steps
            .iter()
            .find(|(_, s)| s.starts_with(name))
            .map(|(t, _)| *t)
    }
}

/// How one boot ended.
enum Attempt {
    Done(VmResult),
    /// Retry-worthy: crashed guest, missing exit status.
    Flaky(String),
}

/// Boot the VM, run `script` with bash in it, return its exit code and console log.
///
/// Retries once when the guest crashed (Oops, or powered off without an exit
/// status), or when it hung before the script started. A script that outlives
/// the timeout is not retried.
pub fn run_in_vm(script: &str, opts: &VmOptions) -> Result<VmResult> {
    let opts = &opts.with_env_overrides()?;
    let qemu = "qemu-system-x86_64";
    if !have(qemu) {
        bail!("{qemu} not found: run `cargo xtask setup` (as root) to install the VM test kit");
    }
    let (vmlinuz, modules, kver) = kernel_paths()?;
    // The uncompressed ELF boots straight into the kernel (PVH), a second faster.
    let pvh = vmlinux_path(&kver);
    let force_bzimage = std::env::var("LIVEMOUNT_VM_BZIMAGE").is_ok_and(|v| v == "1");
    let vmlinuz = if pvh.exists() && !force_bzimage {
        pvh
    } else {
        vmlinuz
    };
    let initrd = initramfs_path();
    if !initrd.exists() {
        bail!("{} missing: run `cargo xtask setup`", initrd.display());
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let run_dir = new_run_dir()?;
        let outcome = boot(script, opts, &run_dir, &vmlinuz, &modules, &kver, &initrd);
        let keep = std::env::var("LIVEMOUNT_VM_KEEP").is_ok_and(|v| v == "1");
        match outcome {
            Err(e) => {
                return Err(e.context(format!(
                    "VM run failed (run files in {})",
                    run_dir.display()
                )))
            }
            Ok(Attempt::Done(mut r)) => {
                // A crash before our script started (the emulated kernel booting) may
                // be retried; one while our code ran is a result, never retried.
                let script_started = r.log.contains("@@LMVM-STEP script");
                if r.oops && !script_started && attempt <= opts.retries {
                    eprintln!(
                        "vm: the guest kernel crashed (Oops; log in {}); retrying ({attempt} of {})",
                        run_dir.display(),
                        opts.retries
                    );
                    continue;
                }
                r.attempts = attempt;
                if r.oops || r.exit_code != 0 || keep {
                    eprintln!(
                        "vm: run files and console log kept in {}",
                        run_dir.display()
                    );
                } else {
                    let _ = fs::remove_dir_all(&run_dir);
                }
                return Ok(r);
            }
            Ok(Attempt::Flaky(why)) => {
                if attempt <= opts.retries {
                    eprintln!(
                        "vm: {why} (log in {}); retrying ({attempt} of {})",
                        run_dir.display(),
                        opts.retries
                    );
                    continue;
                }
                bail!(
                    "{why} (after {attempt} boot(s); console log in {})",
                    run_dir.display()
                )
            }
        }
    }
}

/// A fresh `.cache/vm/runs/<time>-<pid>-<n>` for one boot's control files.
fn new_run_dir() -> Result<PathBuf> {
    new_run_dir_in(&vm_dir().join("runs"))
}

/// A fresh `RUNS/<time>-<pid>-<n>` for one boot's control files (kept after a
/// failure or on request; kept ones older than three days are removed here).
pub(crate) fn new_run_dir_in(runs: &Path) -> Result<PathBuf> {
    if let Ok(entries) = fs::read_dir(runs) {
        let old = SystemTime::now() - Duration::from_secs(3 * 24 * 3600);
        for e in entries.flatten() {
            if e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < old)
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let dir = runs.join(format!(
        "{ms}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The environment the script gets: chosen host variables, then explicit ones.
fn script_env(opts: &VmOptions) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            opts.pass_env.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => k.starts_with(prefix),
                None => k == p,
            })
        })
        .collect();
    env.sort();
    for (k, v) in &opts.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    env.retain(|(k, _)| is_name(k));
    env
}

fn path_str(p: &Path) -> Result<&str> {
    let s = p
        .to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))?;
    if s.contains(|c: char| c.is_whitespace() || c == ',' || c == '\'' || c == '"') {
        bail!("the VM runner cannot share paths with spaces, commas or quotes: {s:?}");
    }
    Ok(s)
}

#[allow(clippy::too_many_arguments)]
fn boot(
    script: &str,
    opts: &VmOptions,
    run_dir: &Path,
    vmlinuz: &Path,
    modules: &Path,
    kver: &str,
    initrd: &Path,
) -> Result<Attempt> {
    let shell = std::env::var("LIVEMOUNT_VM_SHELL").is_ok_and(|v| v == "1");
    let nonce = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
            ^ u128::from(std::process::id())
    );
    let cwd = opts.cwd.clone().unwrap_or_else(root);
    let results_guest = match &opts.results {
        Some((host, guest)) => {
            fs::create_dir_all(host).with_context(|| format!("creating {}", host.display()))?;
            if !guest.starts_with('/') || guest == "/" {
                bail!("the guest results path must be absolute and not /: {guest:?}");
            }
            path_str(host)?;
            path_str(Path::new(guest))?;
            guest.as_str()
        }
        None => "",
    };
    let config = format!(
        "LM_KVER={}\nLM_MODULES={}\nLM_RESULTS={}\nLM_MODPROBE={}\nLM_CWD={}\nLM_NONCE={nonce}\nLM_SHELL={}\n\
         LM_ROOT_CACHE={}\nLM_REPO={}\n",
        sh_quote(kver),
        sh_quote(path_str(modules)?),
        sh_quote(results_guest),
        sh_quote(&opts.modprobe.join(" ")),
        sh_quote(path_str(&cwd)?),
        u8::from(shell),
        sh_quote(&std::env::var("LIVEMOUNT_VM_9P_CACHE").unwrap_or_else(|_| "loose".into())),
        sh_quote(path_str(&crate::util::root())?),
    );
    let mut env_sh = String::new();
    for (k, v) in script_env(opts) {
        env_sh.push_str(&format!("export {k}={}\n", sh_quote(&v)));
    }
    fs::write(run_dir.join("config.sh"), config)?;
    fs::write(run_dir.join("env.sh"), env_sh)?;
    fs::write(run_dir.join("script.sh"), script)?;
    fs::write(run_dir.join("stage2.sh"), STAGE2_SCRIPT)?;

    let verbose = std::env::var("LIVEMOUNT_VM_VERBOSE").is_ok_and(|v| v == "1");
    // mitigations=off: speculative-execution defences only cost time in a throwaway
    // test guest (retpolines are slow under TCG).
    let mut append = String::from("console=ttyS0 panic=-1 rdinit=/init mitigations=off");
    append.push_str(if verbose { " loglevel=7" } else { " quiet" });
    for a in &opts.kernel_args {
        append.push(' ');
        append.push_str(a);
    }
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-M", "q35"])
    .args([
        "-smp",
        &opts.cpus.to_string(),
        "-m",
        &format!("{}M", opts.memory_mb),
    ])
    .args(["-serial", "stdio"])
    .arg("-kernel")
    .arg(vmlinuz)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", &append]);
    let mut share = |id: &str, path: &Path, ro: bool| -> Result<()> {
        cmd.args([
            "-fsdev",
            &format!(
                "local,id={id},path={},security_model=none,multidevs=remap{}",
                path_str(path)?,
                if ro { ",readonly=on" } else { "" }
            ),
            "-device",
            &format!("virtio-9p-pci,fsdev={id},mount_tag={id}"),
        ]);
        Ok(())
    };
    share("hostroot", Path::new("/"), true)?;
    share("lmctl", run_dir, false)?;
    if let Some((host, _)) = &opts.results {
        share("lmresults", host, false)?;
    }
    cmd.args(&opts.extra_qemu_args);
    cmd.stdin(if shell {
        Stdio::inherit()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if opts.stream {
        eprintln!(
            "vm: booting {kver} ({} vCPU, {} MiB, TCG)",
            opts.cpus, opts.memory_mb
        );
    }

    let start = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let console = Arc::new(Mutex::new(Console::default()));
    let readers = [
        spawn_reader(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            &console,
            opts.stream,
            "",
        ),
        spawn_reader(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            &console,
            opts.stream,
            "qemu: ",
        ),
    ];
    let timeout = if shell { None } else { Some(opts.timeout) };
    let status = wait_with_timeout(&mut child, timeout)?;
    for r in readers {
        let _ = r.join();
    }
    let total = start.elapsed();
    let con = console
        .lock()
        .map_err(|_| anyhow::anyhow!("console reader panicked"))?;
    let log = con.log.clone();
    let _ = fs::write(run_dir.join("console.log"), &log);

    let Some(status) = status else {
        let step = con.last_step().to_owned();
        let msg = format!(
            "the VM hung: no exit after {} s, last step `{step}`; qemu killed",
            opts.timeout.as_secs()
        );
        // A hang inside the script is the script's; a hang before it is a flaky boot.
        if con.step_time("script").is_some() {
            bail!(
                "{msg} (console log in {})",
                run_dir.join("console.log").display()
            );
        }
        return Ok(Attempt::Flaky(msg));
    };
    if let Ok(err) = fs::read_to_string(run_dir.join("error")) {
        bail!("guest setup failed: {}", err.trim());
    }
    let oops = OOPS_PATTERNS.iter().any(|p| log.contains(p));
    let rc = fs::read_to_string(run_dir.join("rc"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    let Some(exit_code) = rc else {
        let msg = format!(
            "the guest powered off without an exit status (qemu {status}, last step `{}`{})",
            con.last_step(),
            if oops { ", kernel Oops in the log" } else { "" }
        );
        // Only a boot that never reached our script may be retried.
        if con.step_time("script").is_some() {
            bail!(
                "{msg} (console log in {})",
                run_dir.join("console.log").display()
            );
        }
        return Ok(Attempt::Flaky(msg));
    };
    let marker = log.contains(&format!("@@LMVM-EXIT {nonce} {exit_code}"));
    if !marker && opts.stream {
        eprintln!("vm: note: exit marker missing from the console (exit status read from the control share)");
    }
    let script_start = con.step_time("script");
    let script_end = con.step_time("script-exit");
    let boot_time = script_start.map_or(total, |t| t - start);
    let script_time = match (script_start, script_end) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::ZERO,
    };
    if opts.stream {
        eprintln!(
            "vm: script exited {exit_code}; boot {:.1} s, script {:.1} s, total {:.1} s{}",
            boot_time.as_secs_f64(),
            script_time.as_secs_f64(),
            total.as_secs_f64(),
            if oops { "; KERNEL OOPS in the log" } else { "" }
        );
    }
    Ok(Attempt::Done(VmResult {
        exit_code,
        log,
        oops,
        attempts: 1,
        boot_time,
        script_time,
        total_time: total,
    }))
}

/// Copy a qemu output pipe into the console log (and to stderr when streaming).
fn spawn_reader(
    pipe: Option<Box<dyn Read + Send>>,
    console: &Arc<Mutex<Console>>,
    stream: bool,
    prefix: &'static str,
) -> thread::JoinHandle<()> {
    let console = Arc::clone(console);
    thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut buf = [0u8; 8192];
        let mut at_line_start = true;
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            // Serial output arrives with CRLF; keep plain LF.
            let raw: Vec<u8> = buf[..n].iter().copied().filter(|b| *b != b'\r').collect();
            let mut text = String::from_utf8_lossy(&raw).into_owned();
            if !prefix.is_empty() {
                let mut t = String::new();
                for c in text.chars() {
                    if at_line_start {
                        t.push_str(prefix);
                    }
                    t.push(c);
                    at_line_start = c == '\n';
                }
                text = t;
            }
            if stream {
                let mut e = std::io::stderr().lock();
                let _ = e.write_all(text.as_bytes());
                let _ = e.flush();
            }
            if let Ok(mut c) = console.lock() {
                c.push(&text);
            }
        }
    })
}

/// Wait for qemu; kill it after `timeout` (then returns None).
fn wait_with_timeout(
    child: &mut Child,
    timeout: Option<Duration>,
) -> Result<Option<std::process::ExitStatus>> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if timeout.is_some_and(|t| start.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(50));
    }
}
