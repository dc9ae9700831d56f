//! Progress reporting for long operations: a bar with throughput and ETA on a
//! terminal, plain periodic lines otherwise (logs, CI), nothing in tests.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Something that shows how far an operation got, in bytes.
pub trait Progress: Sync {
    /// Bytes done so far increased by `n`.
    fn inc(&self, n: u64);
    /// The operation ended.
    fn finish(&self) {}
}

/// No progress output.
pub struct NoProgress;

impl Progress for NoProgress {
    fn inc(&self, _: u64) {}
}

/// Progress on stderr: an indicatif bar on a terminal, otherwise a line every 5 s.
pub struct StderrProgress {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    /// What is counted (None: bytes, shown in MiB).
    unit: Option<&'static str>,
    total: u64,
    done: AtomicU64,
    start: Instant,
    last_line: Mutex<Instant>,
}

impl StderrProgress {
    /// Progress of `what` over `total` bytes. `quiet` disables all output.
    pub fn boxed(what: &str, total: u64, quiet: bool) -> Box<dyn Progress> {
        Self::make(what, total, None, quiet)
    }

    /// Progress of `what` over `total` things counted in `unit` ("snapshots",
    /// "chunks"). `quiet` disables all output.
    pub fn counting(what: &str, total: u64, unit: &'static str, quiet: bool) -> Box<dyn Progress> {
        Self::make(what, total, Some(unit), quiet)
    }

    fn make(what: &str, total: u64, unit: Option<&'static str>, quiet: bool) -> Box<dyn Progress> {
        if quiet {
            return Box::new(NoProgress);
        }
        let template = match unit {
            None => {
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}".into()
            }
            Some(u) => format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {u} ETA {{eta}}"),
        };
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(&template)
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            bar
        });
        Box::new(StderrProgress {
            bar,
            what: what.to_string(),
            unit,
            total,
            done: AtomicU64::new(0),
            start: Instant::now(),
            last_line: Mutex::new(Instant::now()),
        })
    }
}

impl Progress for StderrProgress {
    fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        if let Some(bar) = &self.bar {
            bar.inc(n);
            return;
        }
        let Ok(mut last) = self.last_line.lock() else {
            return;
        };
        if last.elapsed() >= Duration::from_secs(5) {
            *last = Instant::now();
            let secs = self.start.elapsed().as_secs_f64().max(1e-9);
            let rate = done as f64 / secs;
            let eta = if rate > 0.0 {
                (self.total.saturating_sub(done)) as f64 / rate
            } else {
                0.0
            };
            if let Some(unit) = self.unit {
                eprintln!(
                    "{}: {done}/{} {unit} ({:.0}%), ETA {eta:.0} s",
                    self.what,
                    self.total,
                    100.0 * done as f64 / self.total.max(1) as f64
                );
                return;
            }
            eprintln!(
                "{}: {:.1}/{:.1} MiB ({:.0}%), {:.1} MiB/s, ETA {:.0} s",
                self.what,
                done as f64 / 1048576.0,
                self.total as f64 / 1048576.0,
                100.0 * done as f64 / self.total.max(1) as f64,
                rate / 1048576.0,
                eta
            );
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
