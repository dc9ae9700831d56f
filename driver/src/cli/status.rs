//! `livemount status`: the typed status files of live mounts, as text or JSON.

use super::{mib, print_json, Outcome, OutputArgs};
use crate::block::prestage::PrestageReport;
use crate::cache::CacheReport;
use crate::daemon::status::{list_status, read_status, MountStatus};
use crate::metrics::IoReport;
use std::fmt;
use std::process::ExitCode;

/// Arguments of `livemount status`.
#[derive(clap::Args)]
pub struct Args {
    /// Only this device.
    device: Option<String>,
    #[command(flatten)]
    out: OutputArgs,
}

/// Run `livemount status`.
pub fn run(a: Args) -> Outcome {
    let all = match &a.device {
        Some(d) => vec![read_status(d)?],
        None => list_status(),
    };
    if a.out.json {
        print_json(&all)?;
    } else if all.is_empty() {
        println!("no live mounts");
    } else {
        for s in &all {
            print!("{}", Text(s));
        }
    }
    Ok(ExitCode::SUCCESS)
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
        if let Some(c) = &s.cache {
            cache(f, c)?;
        }
        if let Some(p) = &s.prestage {
            prestage(f, p)?;
        }
        if let Some(io) = &s.io {
            self::io(f, io)?;
        }
        Ok(())
    }
}

fn cache(f: &mut fmt::Formatter<'_>, c: &CacheReport) -> fmt::Result {
    writeln!(
        f,
        "  cache: hit rate {:.1}%, memory {:.1}/{:.1} MiB, disk {:.1}/{:.1} MiB, fetched {:.1} MiB in {} reads, decoded {:.1} MiB",
        100.0 * c.mem_hit_rate, mib(c.mem_bytes), mib(c.mem_budget), mib(c.disk_bytes),
        mib(c.disk_budget), mib(c.store_bytes), c.store_reads, mib(c.decoded_bytes)
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
