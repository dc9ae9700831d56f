//! `livemount status`: the typed status files of live mounts, as text or JSON.

use super::{mib, print_json, Outcome, OutputArgs};
use crate::block::migrate::MigrationReport;
use crate::block::overlay::OverlayState;
use crate::block::prestage::PrestageReport;
use crate::cache::CacheReport;
use crate::daemon::status::{
    list_serve_status, list_status, read_status, MemoryReport, MountStatus, ServeStatus,
};
use crate::metrics::IoReport;
use livemount_store::backend::RequestReport;
use std::fmt;
use std::process::ExitCode;

/// Arguments of `livemount status`.
#[derive(clap::Args)]
pub struct Args {
    /// Only this device.
    device: Option<String>,
    /// With --json: the NBD servers (`livemount serve`) instead of the ublk mounts.
    #[arg(long, conflicts_with = "device")]
    nbd: bool,
    /// Every figure of mounts and NBD exports in Prometheus' text format (for a
    /// node-exporter textfile collector: `livemount status --prometheus > FILE`).
    #[arg(long, conflicts_with_all = ["device", "nbd"])]
    prometheus: bool,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount status`.
pub fn run(a: Args) -> Outcome {
    let all = match &a.device {
        Some(d) => vec![read_status(d)?],
        None => list_status(),
    };
    let servers = if a.device.is_none() {
        list_serve_status()
    } else {
        Vec::new()
    };
    if a.prometheus {
        print!("{}", prometheus(&all, &servers));
    } else if a.out.json && a.nbd {
        print_json(&servers)?;
    } else if a.out.json {
        print_json(&all)?;
    } else if all.is_empty() && servers.is_empty() {
        println!("no live mounts");
    } else {
        for s in &all {
            print!("{}", Text(s));
        }
        for s in &servers {
            print!("{}", ServeText(s));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The text form of one NBD server's status.
struct ServeText<'a>(&'a ServeStatus);

impl fmt::Display for ServeText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        writeln!(
            f,
            "nbd server pid {}, up {:.0} s, on {}",
            s.pid,
            s.uptime_s,
            s.socket
                .iter()
                .map(|p| p.display().to_string())
                .chain(s.tcp.iter().cloned())
                .collect::<Vec<_>>()
                .join(" ")
        )?;
        for e in &s.exports {
            writeln!(
                f,
                "  export {} snapshot {} ({:.1} MiB{}), overlay {:.1} MiB",
                e.name,
                e.snapshot,
                mib(e.size),
                if e.read_only { ", read-only" } else { "" },
                mib(e.overlay_bytes)
            )?;
            overlay_state(f, e.overlay_state)?;
            cache(f, &e.cache)?;
            io(f, &e.io)?;
            if let Some(r) = &e.store_requests {
                requests(f, r)?;
            }
            if let Some(m) = &e.memory {
                memory(f, m)?;
            }
            if let Some(m) = &e.migration {
                migration(f, m)?;
            }
        }
        Ok(())
    }
}

/// A line for an overlay that is not simply ok (synchronous or failed).
fn overlay_state(f: &mut fmt::Formatter<'_>, s: Option<OverlayState>) -> fmt::Result {
    match s {
        Some(s) if s != OverlayState::Ok => writeln!(f, "  overlay: {s}"),
        _ => Ok(()),
    }
}

/// An overlay's bytes and state, for the metrics.
type Overlay = (u64, Option<OverlayState>);

/// A metric: name, Prometheus type, help text, value.
type Metric = (
    &'static str,
    &'static str,
    &'static str,
    fn(&CacheReport, &IoReport, Overlay) -> f64,
);
/// Every metric: name, type, help, and its value for one mount or export.
const METRICS: [Metric; 13] = [
    (
        "livemount_reads_total",
        "counter",
        "Read requests.",
        |_, i, _| i.reads as f64,
    ),
    (
        "livemount_writes_total",
        "counter",
        "Write requests.",
        |_, i, _| i.writes as f64,
    ),
    (
        "livemount_flushes_total",
        "counter",
        "Flush requests (and FUA writes).",
        |_, i, _| i.flushes as f64,
    ),
    (
        "livemount_read_bytes_total",
        "counter",
        "Bytes read.",
        |_, i, _| i.read_bytes as f64,
    ),
    (
        "livemount_write_bytes_total",
        "counter",
        "Bytes written.",
        |_, i, _| i.write_bytes as f64,
    ),
    (
        "livemount_errors_total",
        "counter",
        "Requests completed with an error.",
        |_, i, _| i.errors as f64,
    ),
    (
        "livemount_read_p99_seconds",
        "gauge",
        "99th percentile read latency.",
        |_, i, _| i.read_p99_us / 1e6,
    ),
    (
        "livemount_cache_hit_ratio",
        "gauge",
        "Memory-tier hit rate.",
        |c, _, _| c.mem_hit_rate,
    ),
    (
        "livemount_store_bytes_total",
        "counter",
        "Compressed bytes fetched from the store.",
        |c, _, _| c.store_bytes as f64,
    ),
    (
        "livemount_corrupt_chunks_total",
        "counter",
        "Chunks that failed verification.",
        |c, _, _| c.corrupt_chunks as f64,
    ),
    (
        "livemount_overlay_bytes",
        "gauge",
        "Bytes held by the overlay.",
        |_, _, o| o.0 as f64,
    ),
    (
        "livemount_overlay_failed",
        "gauge",
        "1 when a flush of the overlay failed and it refuses I/O.",
        |_, _, o| f64::from(u8::from(o.1 == Some(OverlayState::Failed))),
    ),
    (
        "livemount_overlay_synchronous",
        "gauge",
        "1 when the overlay has no map mirror (/run full) and flushes every write.",
        |_, _, o| f64::from(u8::from(o.1 == Some(OverlayState::Synchronous))),
    ),
];

/// Prometheus text exposition of every mount and export.
fn prometheus(mounts: &[MountStatus], servers: &[ServeStatus]) -> String {
    // The overlay's figures: bytes held and its state.
    let ov = |bytes: u64, state: Option<OverlayState>| (bytes, state);
    let mut series: Vec<(String, &CacheReport, &IoReport, Overlay)> = Vec::new();
    for m in mounts {
        if let (Some(c), Some(i)) = (&m.cache, &m.io) {
            series.push((
                format!("device=\"{}\"", m.device),
                c,
                i,
                ov(m.overlay_bytes, m.overlay_state),
            ));
        }
    }
    for s in servers {
        for e in &s.exports {
            series.push((
                format!(
                    "export=\"{}\",pid=\"{}\"",
                    e.name.replace(['"', '\\', '\n'], "_"),
                    s.pid
                ),
                &e.cache,
                &e.io,
                ov(e.overlay_bytes, e.overlay_state),
            ));
        }
    }
    let mut out = String::new();
    for (name, kind, help, value) in METRICS {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, c, i, o) in &series {
            out.push_str(&format!("{name}{{{labels}}} {}\n", value(c, i, *o)));
        }
    }
    out
}

/// The text form of one mount's status.
struct Text<'a>(&'a MountStatus);

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        writeln!(
            f,
            "{} {} pid {} snapshot {} ({:.1} MiB), overlay {:.1} MiB{}",
            s.device,
            s.state,
            s.pid,
            s.config.snapshot,
            mib(s.size),
            mib(s.overlay_bytes),
            s.config
                .overlay
                .as_ref()
                .map(|p| format!(" in {}", p.display()))
                .unwrap_or_else(|| " (read-only)".into())
        )?;
        overlay_state(f, s.overlay_state)?;
        if let Some(c) = &s.cache {
            cache(f, c)?;
        }
        if let Some(p) = &s.prestage {
            prestage(f, p)?;
        }
        if let Some(io) = &s.io {
            self::io(f, io)?;
        }
        if let Some(r) = &s.store_requests {
            requests(f, r)?;
        }
        if let Some(m) = &s.memory {
            memory(f, m)?;
        }
        if let Some(m) = &s.migration {
            migration(f, m)?;
        }
        Ok(())
    }
}

fn migration(f: &mut fmt::Formatter<'_>, m: &MigrationReport) -> fmt::Result {
    writeln!(
        f,
        "  migration to {}: {}, {:.1}/{:.1} MiB, {} regions left, {:.1} MiB/s{}{}",
        m.target.display(),
        m.state,
        mib(m.copied_bytes),
        mib(m.total_bytes),
        m.regions_left,
        m.rate_bytes_s / 1048576.0,
        m.eta_s
            .map(|s| format!(", ETA {s:.0} s"))
            .unwrap_or_default(),
        m.error
            .as_deref()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    )
}

fn requests(f: &mut fmt::Formatter<'_>, r: &RequestReport) -> fmt::Result {
    writeln!(
        f,
        "  store: {} GETs ({} hedged), {:.1} MiB in, {} in flight (at most {}), GET p50 {:.1} ms, p99 {:.1} ms",
        r.gets,
        r.hedged,
        mib(r.bytes_in),
        r.in_flight,
        r.peak_in_flight,
        r.get_p50_ms,
        r.get_p99_ms
    )
}

fn memory(f: &mut fmt::Formatter<'_>, m: &MemoryReport) -> fmt::Result {
    writeln!(
        f,
        "  memory: RSS {:.1} MiB; overlay map {:.1} MiB, its mirror in /run {:.1} MiB, index {:.1} MiB; cache memory budget {:.1} MiB",
        mib(m.rss_bytes),
        mib(m.overlay_map_bytes),
        mib(m.mirror_bytes),
        mib(m.index_bytes),
        mib(m.cache_mem_budget)
    )
}

fn cache(f: &mut fmt::Formatter<'_>, c: &CacheReport) -> fmt::Result {
    writeln!(
        f,
        "  cache: hit rate {:.1}%, memory {:.1}/{:.1} MiB, disk {:.1}/{:.1} MiB ({} hits, {} filled by another mount), fetched {:.1} MiB in {} reads, decoded {:.1} MiB",
        100.0 * c.mem_hit_rate, mib(c.mem_bytes), mib(c.mem_budget), mib(c.disk_bytes),
        mib(c.disk_budget), c.disk_hits, c.fill_hits, mib(c.store_bytes), c.store_reads,
        mib(c.decoded_bytes)
    )?;
    let r = &c.readahead;
    let t = |v: Option<f64>| {
        v.map(|v| format!("{v:.2} ms"))
            .unwrap_or_else(|| "-".into())
    };
    writeln!(
        f,
        "  read-ahead: {}, {} whole-chunk and {} frame misses; store: chunk read {}, small read {}; decode {}/MiB; sequential read-ahead {}",
        r.mode,
        r.whole_chunk_misses, r.frame_misses, t(r.whole_chunk_ms), t(r.small_request_ms),
        t(r.decode_ms_per_mib),
        if r.store_latency_bound { "active (store latency-bound)" } else { "idle (store not latency-bound)" }
    )?;
    if c.seq_readahead_chunks > 0 {
        writeln!(
            f,
            "  sequential read-ahead: {} chunks, {} frames decoded ahead of the reader",
            c.seq_readahead_chunks, c.seq_readahead_frames
        )?;
    }
    Ok(())
}

fn prestage(f: &mut fmt::Formatter<'_>, p: &PrestageReport) -> fmt::Result {
    writeln!(
        f,
        "  prestage: {:.1} of {:.1} MiB ({:.0}%), {} of {} steps, {:.1} MiB fetched, {:.0} ms before ready{}",
        mib(p.staged_bytes), mib(p.planned_bytes), 100.0 * p.share, p.steps_done, p.steps_total,
        mib(p.fetched_bytes), p.ready_ms,
        if p.budget_reached { ", stopped at the cache budget" } else { "" }
    )
}

fn io(f: &mut fmt::Formatter<'_>, io: &IoReport) -> fmt::Result {
    writeln!(
        f,
        "  io: {} reads ({:.1} MiB, p50 {} us, p99 {} us), {} writes ({:.1} MiB), {} flushes, {} discards, {} errors",
        io.reads, mib(io.read_bytes), io.read_p50_us, io.read_p99_us, io.writes,
        mib(io.write_bytes), io.flushes, io.discards, io.errors
    )
}
