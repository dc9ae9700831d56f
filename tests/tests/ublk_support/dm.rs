//! Device-mapper test devices (the VM kernel has the modules; the host has none):
//! a dm-log-writes device whose log is replayed by `livemount_tests::logwrites`,
//! and a disk that can be made to fail every I/O (the `error` target).

use super::{os, tool};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A loop device over `file`, detached on drop.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    #[track_caller]
    pub fn attach(file: &Path) -> Loop {
        // The VM's kernel has loop as a module (stage 2 loads only ublk_drv).
        tool("modprobe", &[os("loop")], Duration::from_secs(60));
        let dev = tool(
            "losetup",
            &[os("-f"), os("--show"), file.as_os_str()],
            Duration::from_secs(30),
        )
        .trim()
        .to_string();
        Loop { dev }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// `dmsetup create NAME` of a `log-writes` target over a data file and a log file
/// (both loop devices); removed on drop.
pub struct LogWrites {
    pub name: String,
    /// `/dev/dm-MINOR`.
    pub dev: String,
    /// The log's backing file (what the replay reads).
    pub log: PathBuf,
    /// Bytes of the data device.
    pub size: u64,
    active: bool,
    // Dropped after the target is removed (field order).
    _data: Loop,
    _log: Loop,
}

impl LogWrites {
    /// Sparse files `NAME.data` (`size` bytes) and `NAME.log` (`log_size`) in `dir`.
    #[track_caller]
    pub fn create(dir: &Path, name: &str, size: u64, log_size: u64) -> LogWrites {
        tool("modprobe", &[os("dm_log_writes")], Duration::from_secs(60));
        let data = dir.join(format!("{name}.data"));
        let log = dir.join(format!("{name}.log"));
        for (p, len) in [(&data, size), (&log, log_size)] {
            std::fs::File::create(p).unwrap().set_len(len).unwrap();
        }
        let (d, l) = (Loop::attach(&data), Loop::attach(&log));
        let table = format!("0 {} log-writes {} {}", size / 512, d.dev, l.dev);
        LogWrites {
            name: name.into(),
            dev: create(name, &table),
            log,
            size,
            active: true,
            _data: d,
            _log: l,
        }
    }

    /// Log a mark named `mark` (after everything already durable).
    #[track_caller]
    pub fn mark(&self, mark: &str) {
        tool(
            "dmsetup",
            &[os("message"), os(&self.name), os("0"), os("mark"), os(mark)],
            Duration::from_secs(30),
        );
    }

    /// Remove the target; its log is then complete: its file and the data size.
    #[track_caller]
    pub fn remove(mut self) -> (PathBuf, u64) {
        tool(
            "dmsetup",
            &[os("remove"), os("--noudevsync"), os(&self.name)],
            Duration::from_secs(60),
        );
        self.active = false;
        (self.log.clone(), self.size)
    }
}

impl Drop for LogWrites {
    fn drop(&mut self) {
        if self.active {
            remove_quietly(&self.name);
        }
    }
}

/// Best-effort removal on a test's way out (a lazily unmounted file system may
/// still hold the device for a moment): a few tries.
fn remove_quietly(name: &str) {
    for _ in 0..10 {
        let ok = Command::new("dmsetup")
            .args(["remove", "--noudevsync", "--force", name])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A `linear` device over a loop device that can be switched to the `error` target
/// and back (a disk that fails every I/O, then recovers); removed on drop.
pub struct Switchable {
    pub name: String,
    /// `/dev/dm-MINOR`.
    pub dev: String,
    sectors: u64,
    lower: Loop,
}

impl Switchable {
    /// A sparse file `NAME.data` of `size` bytes in `dir` behind it.
    #[track_caller]
    pub fn create(dir: &Path, name: &str, size: u64) -> Switchable {
        tool("modprobe", &[os("dm_mod")], Duration::from_secs(60));
        let data = dir.join(format!("{name}.data"));
        std::fs::File::create(&data).unwrap().set_len(size).unwrap();
        let lower = Loop::attach(&data);
        let sectors = size / 512;
        let table = format!("0 {sectors} linear {} 0", lower.dev);
        let dev = create(name, &table);
        Switchable {
            name: name.into(),
            dev,
            sectors,
            lower,
        }
    }

    /// Every I/O fails from now on (true) or reaches the disk again (false).
    #[track_caller]
    pub fn fail(&self, on: bool) {
        let table = if on {
            format!("0 {} error", self.sectors)
        } else {
            format!("0 {} linear {} 0", self.sectors, self.lower.dev)
        };
        for args in [
            // A failing disk cannot be flushed: suspend without flushing.
            vec![
                os("suspend"),
                os("--noflush"),
                os("--noudevsync"),
                os(&self.name),
            ],
            vec![os("load"), os(&self.name), os("--table"), os(&table)],
            vec![os("resume"), os("--noudevsync"), os(&self.name)],
        ] {
            tool("dmsetup", &args, Duration::from_secs(60));
        }
    }
}

impl Drop for Switchable {
    fn drop(&mut self) {
        remove_quietly(&self.name);
    }
}

/// `dmsetup create NAME` with `table`; its device node. No udev in the VM:
/// devtmpfs makes /dev/dm-MINOR, not /dev/mapper/NAME.
#[track_caller]
fn create(name: &str, table: &str) -> String {
    tool(
        "dmsetup",
        &[
            os("create"),
            os("--noudevsync"),
            os(name),
            os("--table"),
            os(table),
        ],
        Duration::from_secs(60),
    );
    format!("/dev/dm-{}", minor(name))
}

/// The minor number of device-mapper device `name`.
#[track_caller]
fn minor(name: &str) -> String {
    tool(
        "dmsetup",
        &[
            os("info"),
            os("-c"),
            os("--noheadings"),
            os("-o"),
            os("minor"),
            os(name),
        ],
        Duration::from_secs(30),
    )
    .trim()
    .to_string()
}
