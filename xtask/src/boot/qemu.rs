//! One qemu boot of the Debian image (on the host, or as the ublk test VM with the
//! boot initramfs), with its console captured line by line and a wall-clock limit.
//!
//! `crate::vm::run_in_vm` cannot be used for the timed boots: there PID 1 is the
//! test VM's own stage-2 shell, which runs a script and powers off, so nothing can
//! switch_root into the Debian's systemd. Here the initramfs is ours
//! (`init.sh`) and it does exactly that.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// A qemu TCG boot of the backports kernel with the boot initramfs.
#[derive(Clone, Debug)]
pub struct Qemu {
    /// What the boot is, for messages.
    pub label: String,
    /// The kernel (PVH vmlinux when it exists, else the bzImage).
    pub kernel: PathBuf,
    /// The boot initramfs.
    pub initrd: PathBuf,
    /// Extra kernel command line (after the console/quiet defaults).
    pub append: String,
    /// Disks, 9p shares, ...
    pub args: Vec<String>,
    pub cpus: u32,
    pub memory_mb: u32,
    pub timeout: Duration,
    /// Copy the console to stderr as it arrives.
    pub stream: bool,
}

/// What a boot printed.
#[derive(Clone, Debug, Default)]
pub struct Console {
    /// Console lines (qemu's own stderr prefixed `qemu: `), LF line ends.
    pub log: String,
    /// qemu start to qemu exit.
    pub elapsed: Duration,
    /// qemu was killed at the time limit.
    pub timed_out: bool,
    /// qemu's exit status (None when killed).
    pub status: Option<ExitStatus>,
}

/// A `@@LMBOOT…` console line: its step and `key=value` fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Marker {
    pub step: String,
    pub fields: BTreeMap<String, String>,
}

impl Marker {
    /// The `uptime=` field in seconds.
    pub fn uptime(&self) -> Option<f64> {
        self.fields.get("uptime")?.parse().ok()
    }
}

impl Console {
    /// Every `@@LMBOOT <step> k=v…` and `@@LMBOOT-MARKER <step> k=v…` line, in order.
    pub fn markers(&self) -> Vec<Marker> {
        self.log.lines().filter_map(parse_marker).collect()
    }

    /// The first marker of `step`.
    pub fn marker(&self, step: &str) -> Option<Marker> {
        self.markers().into_iter().find(|m| m.step == step)
    }

    /// An `@@LMBOOT-ERROR` line, if the initramfs gave up.
    pub fn error(&self) -> Option<String> {
        self.log
            .lines()
            .find_map(|l| l.split("@@LMBOOT-ERROR ").nth(1))
            .map(|s| s.trim().to_owned())
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Parse one console line into a [`Marker`].
pub fn parse_marker(line: &str) -> Option<Marker> {
    let rest = line
        .split_once("@@LMBOOT-MARKER ")
        .or_else(|| line.split_once("@@LMBOOT "))?
        .1;
    let mut words = rest.split_whitespace();
    let step = words.next()?.to_owned();
    let fields = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some(Marker { step, fields })
}

/// The PVH vmlinux next to `vmlinuz` when setup unpacked it, else `vmlinuz`.
pub fn boot_kernel(vmlinuz: &Path, kver: &str) -> PathBuf {
    let pvh = vmlinuz.with_file_name(format!("vmlinux-{kver}"));
    let force_bz = std::env::var("LIVEMOUNT_VM_BZIMAGE").is_ok_and(|v| v == "1");
    if pvh.exists() && !force_bz {
        pvh
    } else {
        vmlinuz.to_path_buf()
    }
}

impl Qemu {
    /// The qemu command line (also used to print the smoke test's command).
    pub fn command_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-M",
            "q35",
            "-serial",
            "stdio",
        ]
        .map(String::from)
        .to_vec();
        a.extend([
            "-smp".into(),
            self.cpus.to_string(),
            "-m".into(),
            format!("{}M", self.memory_mb),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            format!(
                "console=ttyS0 panic=-1 rdinit=/init mitigations=off quiet {}",
                self.append
            )
            .trim_end()
            .to_owned(),
        ]);
        a.extend(self.args.iter().cloned());
        a
    }

    /// Boot; `on_line` sees every console line as it arrives (with the time since
    /// qemu started). Fails only when qemu cannot start.
    pub fn run(&self, mut on_line: impl FnMut(&str, Duration)) -> Result<Console> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(self.command_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.stream {
            eprintln!("boot: {} (qemu TCG, {} vCPU)", self.label, self.cpus);
        }
        let start = Instant::now();
        let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
        let (tx, rx) = mpsc::channel::<String>();
        let mut readers = Vec::new();
        for (pipe, prefix) in [
            (
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                "",
            ),
            (
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn Read + Send>),
                "qemu: ",
            ),
        ] {
            let tx = tx.clone();
            readers.push(thread::spawn(move || {
                let Some(pipe) = pipe else { return };
                let mut r = BufReader::new(pipe);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            buf.retain(|b| *b != b'\r');
                            let line = String::from_utf8_lossy(&buf);
                            let line = line.trim_end_matches('\n');
                            if tx.send(format!("{prefix}{line}")).is_err() {
                                break;
                            }
                        }
                    }
                }
            }));
        }
        drop(tx);
        let mut con = Console::default();
        let mut status = None;
        let mut timed_out = false;
        loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    if self.stream {
                        let mut e = std::io::stderr().lock();
                        let _ = writeln!(e, "{line}");
                    }
                    on_line(&line, start.elapsed());
                    con.log.push_str(&line);
                    con.log.push('\n');
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    if status.is_none() {
                        status = child.wait().ok();
                    }
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if status.is_none() {
                if let Some(st) = child.try_wait()? {
                    status = Some(st);
                } else if start.elapsed() > self.timeout {
                    let _ = child.kill();
                    let _ = child.wait();
                    timed_out = true;
                }
            }
        }
        for r in readers {
            let _ = r.join();
        }
        con.elapsed = start.elapsed();
        con.timed_out = timed_out;
        con.status = if timed_out { None } else { status };
        Ok(con)
    }
}

/// Fail with the console's tail when a boot did not reach `step`.
pub fn require_marker(con: &Console, step: &str, what: &str) -> Result<Marker> {
    if let Some(m) = con.marker(step) {
        return Ok(m);
    }
    let why = if let Some(e) = con.error() {
        format!("the initramfs gave up: {e}")
    } else if con.timed_out {
        format!("no `{step}` marker within the time limit; qemu killed")
    } else {
        format!("qemu exited ({:?}) without a `{step}` marker", con.status)
    };
    bail!("{what}: {why}; last console lines:\n{}", con.tail(40))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let m = parse_marker("[  1.0] @@LMBOOT switch-root uptime=3.21 dev=/dev/vda").unwrap();
        assert_eq!(m.step, "switch-root");
        assert_eq!(m.uptime(), Some(3.21));
        assert_eq!(m.fields["dev"], "/dev/vda");
        let m = parse_marker("@@LMBOOT-MARKER multi-user uptime=9.50 root=/dev/ublkb0").unwrap();
        assert_eq!(m.step, "multi-user");
        assert_eq!(m.fields["root"], "/dev/ublkb0");
        assert!(parse_marker("@@LMBOOT-ERROR x").is_none());
        assert!(parse_marker("plain line").is_none());
    }
}
