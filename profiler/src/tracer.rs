//! Loading the eBPF programs, configuring them from tracefs, and draining events.

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use livemount_ebpf_abi::{
    BlockOffsets, Config, Event, FilemapOffsets, InodeKey, CONFIG_MAP, COUNTERS_MAP, COUNTER_LOST,
    COUNTER_READ_ERRORS, COUNTER_SEEN, DEVICES_MAP, EVENTS_MAP, INODES_MAP, PROG_BIO_QUEUE,
    PROG_FILEMAP_GET_PAGES, PROG_RQ_ISSUE,
};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The eBPF object built by build.rs (aya-build) from `ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/livemount-ebpf"));

/// Errors setting up or running the tracer.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// tracefs is not mounted and could not be mounted.
    #[error("tracefs not available at /sys/kernel/tracing ({0}); mount it with `mount -t tracefs nodev /sys/kernel/tracing`")]
    NoTracefs(String),
    /// A tracepoint format file could not be read or lacks a field.
    #[error("{}: {msg}", path.display())]
    Format {
        /// The format file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// aya failed to load the object or a map.
    #[error("loading the eBPF object: {0}")]
    Load(String),
    /// aya failed to load (verifier) or attach a program.
    #[error("eBPF program {prog}: {msg}")]
    Program {
        /// Program name.
        prog: &'static str,
        /// Error with its causes.
        msg: String,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {msg}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Error text.
        msg: String,
    },
    /// poll(2) on the ring buffer failed.
    #[error("polling the ring buffer: {0}")]
    Poll(std::io::Error),
}

/// Which programs to attach and what to let through.
#[derive(Clone, Debug, Default)]
pub struct TracerConfig {
    /// Kernel dev_t values of traced disks (block programs).
    pub devices: Vec<u32>,
    /// Files traced in page-cache mode.
    pub inodes: Vec<InodeKey>,
    /// Only this process (tgid), 0 for all.
    pub tgid: u32,
    /// Only this cgroup v2 id, 0 for all.
    pub cgroup_id: u64,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
}

/// Counter totals over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Events submitted to the ring buffer.
    pub seen: u64,
    /// Events dropped because the ring buffer was full.
    pub lost: u64,
    /// Failed field reads (should stay 0).
    pub read_errors: u64,
}

/// A loaded and attached tracer.
pub struct Tracer {
    // Keeps programs and links alive; dropping it detaches everything.
    _ebpf: Ebpf,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, u64>,
    /// Names of the attached tracepoints, for the source field of profiles.
    pub attached: Vec<&'static str>,
}

impl Tracer {
    /// Load the object, fill the maps and attach the programs `cfg` needs: the
    /// block program (`block_bio_queue` when a task filter is set, because
    /// requests are issued by other tasks than the submitter, else
    /// `block_rq_issue`) when devices are traced, the page-cache program when
    /// inodes are.
    pub fn start(cfg: &TracerConfig) -> Result<Tracer, TracerError> {
        let tracefs = tracefs()?;
        let block_prog = if cfg.tgid != 0 || cfg.cgroup_id != 0 {
            PROG_BIO_QUEUE
        } else {
            PROG_RQ_ISSUE
        };
        let mut config = Config {
            tgid: cfg.tgid,
            cgroup_id: cfg.cgroup_id,
            ..Default::default()
        };
        if !cfg.devices.is_empty() {
            let off = block_offsets(&tracefs, block_prog)?;
            if block_prog == PROG_RQ_ISSUE {
                config.rq_issue = off;
            } else {
                config.bio_queue = off;
            }
        }
        if !cfg.inodes.is_empty() {
            config.filemap = filemap_offsets(&tracefs)?;
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(EVENTS_MAP, cfg.ring_bytes)
            .load(OBJECT)
            .map_err(|e| TracerError::Load(chain(&e)))?;
        {
            let mut m: Array<_, Config> = Array::try_from(map_mut(&mut ebpf, CONFIG_MAP)?)
                .map_err(|e| map_err(CONFIG_MAP, &e))?;
            m.set(0, config, 0).map_err(|e| map_err(CONFIG_MAP, &e))?;
        }
        {
            let mut m: HashMap<_, u32, u32> = HashMap::try_from(map_mut(&mut ebpf, DEVICES_MAP)?)
                .map_err(|e| map_err(DEVICES_MAP, &e))?;
            for (i, dev) in cfg.devices.iter().enumerate() {
                m.insert(dev, i as u32, 0)
                    .map_err(|e| map_err(DEVICES_MAP, &e))?;
            }
        }
        {
            let mut m: HashMap<_, InodeKey, u32> =
                HashMap::try_from(map_mut(&mut ebpf, INODES_MAP)?)
                    .map_err(|e| map_err(INODES_MAP, &e))?;
            for (i, key) in cfg.inodes.iter().enumerate() {
                m.insert(key, i as u32, 0)
                    .map_err(|e| map_err(INODES_MAP, &e))?;
            }
        }
        let mut attached = Vec::new();
        if !cfg.devices.is_empty() {
            attach(&mut ebpf, block_prog, "block")?;
            attached.push(block_prog);
        }
        if !cfg.inodes.is_empty() {
            attach(&mut ebpf, PROG_FILEMAP_GET_PAGES, "filemap")?;
            attached.push(PROG_FILEMAP_GET_PAGES);
        }
        let ring = RingBuf::try_from(
            ebpf.take_map(EVENTS_MAP)
                .ok_or_else(|| TracerError::Load(format!("map {EVENTS_MAP} missing")))?,
        )
        .map_err(|e| map_err(EVENTS_MAP, &e))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(COUNTERS_MAP)
                .ok_or_else(|| TracerError::Load(format!("map {COUNTERS_MAP} missing")))?,
        )
        .map_err(|e| map_err(COUNTERS_MAP, &e))?;
        Ok(Tracer {
            _ebpf: ebpf,
            ring,
            counters,
            attached,
        })
    }

    /// Wait up to `timeout` for events, then hand every available one to `f`.
    /// Returns how many were drained.
    pub fn poll(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(&Event),
    ) -> Result<usize, TracerError> {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            // A signal (Ctrl-C) interrupts poll; the caller checks its flag.
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(TracerError::Poll(err));
            }
        }
        Ok(self.drain(&mut f))
    }

    /// Hand every event currently in the ring buffer to `f`.
    pub fn drain(&mut self, f: &mut impl FnMut(&Event)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if item.len() >= std::mem::size_of::<Event>() {
                // SAFETY: the kernel program writes exactly one `Event` per record;
                // read_unaligned because ring records are only 8-byte aligned by
                // contract, and `Event` is plain integers (any bit pattern is valid).
                let ev = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const Event) };
                f(&ev);
                n += 1;
            }
        }
        n
    }

    /// Sum the per-CPU counters.
    pub fn counters(&self) -> Result<Counters, TracerError> {
        let get = |i: u32| -> Result<u64, TracerError> {
            let v = self
                .counters
                .get(&i, 0)
                .map_err(|e| map_err(COUNTERS_MAP, &e))?;
            Ok(v.iter().sum())
        };
        Ok(Counters {
            seen: get(COUNTER_SEEN)?,
            lost: get(COUNTER_LOST)?,
            read_errors: get(COUNTER_READ_ERRORS)?,
        })
    }
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, TracerError> {
    ebpf.map_mut(name)
        .ok_or_else(|| TracerError::Load(format!("map {name} missing from the object")))
}

fn map_err(map: &'static str, e: &dyn std::error::Error) -> TracerError {
    TracerError::Map { map, msg: chain(e) }
}

fn attach(ebpf: &mut Ebpf, prog: &'static str, category: &str) -> Result<(), TracerError> {
    let perr = |e: &dyn std::error::Error| TracerError::Program {
        prog,
        msg: chain(e),
    };
    let p: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| TracerError::Load(format!("program {prog} missing from the object")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| perr(&e))?;
    p.load().map_err(|e| perr(&e))?;
    p.attach(category, prog).map_err(|e| perr(&e))?;
    Ok(())
}

/// An error and its sources on one line (the verifier log is multi-line: keep
/// only its last lines, where the reason is).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() > 4 {
        lines[lines.len() - 4..].join(" | ")
    } else {
        lines.join(" | ")
    }
}

/// The tracefs mount point, mounting it at /sys/kernel/tracing when missing.
fn tracefs() -> Result<PathBuf, TracerError> {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(p).join("events").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: all pointers are valid NUL-terminated strings; data is unused.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracerError::NoTracefs(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(PathBuf::from("/sys/kernel/tracing"))
}

/// A field of a tracepoint format file: (offset, size).
pub fn field(format: &str, name: &str) -> Option<(u16, u16)> {
    for line in format.lines() {
        let line = line.trim();
        let Some(decl) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = decl.split(';');
        let decl = parts.next()?.trim();
        // "char rwbs[10]" -> "rwbs"
        let ident = decl.rsplit(' ').next()?.split('[').next()?;
        if ident != name {
            continue;
        }
        let mut offset = None;
        let mut size = None;
        for p in parts {
            let p = p.trim();
            if let Some(v) = p.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = p.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        return Some((offset?, size?));
    }
    None
}

fn read_format(tracefs: &Path, category: &str, tp: &str) -> Result<(PathBuf, String), TracerError> {
    let path = tracefs
        .join("events")
        .join(category)
        .join(tp)
        .join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| TracerError::Format {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    Ok((path, text))
}

/// Look up `name` and check its size is one of `sizes`.
fn need(path: &Path, text: &str, name: &str, sizes: &[u16]) -> Result<u16, TracerError> {
    match field(text, name) {
        Some((off, size)) if sizes.contains(&size) => Ok(off),
        Some((_, size)) => Err(TracerError::Format {
            path: path.to_owned(),
            msg: format!("field {name} has size {size}, expected one of {sizes:?}"),
        }),
        None => Err(TracerError::Format {
            path: path.to_owned(),
            msg: format!("no field {name}"),
        }),
    }
}

/// Offsets for `block:<tp>` (rq_issue or bio_queue) from its format file.
pub fn block_offsets(tracefs: &Path, tp: &str) -> Result<BlockOffsets, TracerError> {
    let (path, text) = read_format(tracefs, "block", tp)?;
    Ok(BlockOffsets {
        dev: need(&path, &text, "dev", &[4])?,
        sector: need(&path, &text, "sector", &[8])?,
        nr_sector: need(&path, &text, "nr_sector", &[4])?,
        // The program reads 8 bytes; kernels have had 8 and 10.
        rwbs: need(&path, &text, "rwbs", &[8, 10, 12, 16])?,
    })
}

/// Offsets for `filemap:mm_filemap_get_pages`.
pub fn filemap_offsets(tracefs: &Path) -> Result<FilemapOffsets, TracerError> {
    let (path, text) = read_format(tracefs, "filemap", PROG_FILEMAP_GET_PAGES)?;
    Ok(FilemapOffsets {
        ino: need(&path, &text, "i_ino", &[8])?,
        dev: need(&path, &text, "s_dev", &[4])?,
        index: need(&path, &text, "index", &[8])?,
        last_index: need(&path, &text, "last_index", &[8])?,
    })
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const RQ_ISSUE_6_18: &str = "name: block_rq_issue
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;
\tfield:unsigned short ioprio;\toffset:32;\tsize:2;\tsigned:0;
\tfield:char rwbs[10];\toffset:34;\tsize:10;\tsigned:0;
";

    // Older kernels (before ioprio, with rwbs[8]).
    const RQ_ISSUE_5_4: &str = "\tfield:dev_t dev;\toffset:8;\tsize:4;\tsigned:0;
\tfield:sector_t sector;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned int nr_sector;\toffset:24;\tsize:4;\tsigned:0;
\tfield:unsigned int bytes;\toffset:28;\tsize:4;\tsigned:0;
\tfield:char rwbs[8];\toffset:32;\tsize:8;\tsigned:0;
";

    #[test]
    fn parses_format_files_of_two_kernels() {
        assert_eq!(field(RQ_ISSUE_6_18, "rwbs"), Some((34, 10)));
        assert_eq!(field(RQ_ISSUE_6_18, "sector"), Some((16, 8)));
        assert_eq!(field(RQ_ISSUE_5_4, "rwbs"), Some((32, 8)));
        assert_eq!(field(RQ_ISSUE_5_4, "ioprio"), None);
        let p = Path::new("f");
        assert!(need(p, RQ_ISSUE_6_18, "dev", &[8]).is_err());
    }
}
