//! `show`: a summary of a profile and an SVG picture of its access pattern.

use livemount_store::format::profile::Profile;
use std::fmt::Write as _;

/// Human-readable summary (what `show` prints).
pub fn summary(p: &Profile) -> String {
    let ws = p.working_set_bytes();
    let mut s = String::new();
    let src = &p.source;
    let _ = writeln!(
        s,
        "profile of {} ({} run(s), tracer {})",
        src.device, src.runs, src.tracer
    );
    let _ = writeln!(s, "  host {}, kernel {}", src.host, src.kernel);
    let _ = writeln!(
        s,
        "  disk size        {} ({} bytes)",
        human(p.disk_size),
        p.disk_size
    );
    let _ = writeln!(s, "  block size       {} bytes", p.block_size);
    let _ = writeln!(s, "  bytes read       {} ({} bytes)", human(ws), ws);
    let _ = writeln!(s, "  extents          {}", p.extents.len());
    let share = if p.disk_size > 0 {
        ws as f64 * 100.0 / p.disk_size as f64
    } else {
        0.0
    };
    let _ = writeln!(s, "  share of disk    {share:.2}%");
    for (label, f) in [("50%", 0.5), ("90%", 0.9), ("100%", 1.0)] {
        let t = p
            .time_to_fraction(f)
            .map(|ns| format!("{:.3} s", ns as f64 / 1e9))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "  time to {label:<4}     {t}  (of the working set, first reads)"
        );
    }
    let reread: u64 = p
        .extents
        .iter()
        .filter(|e| e.count > u64::from(e.runs))
        .map(|e| e.length)
        .sum();
    let _ = writeln!(s, "  re-read bytes    {}", human(reread));
    let st = &p.stats;
    let _ = writeln!(
        s,
        "  events           {} seen, {} lost, {} outside the disk, over {:.3} s",
        st.events_seen,
        st.events_lost,
        st.events_outside,
        st.duration_ns as f64 / 1e9
    );
    if st.events_lost > 0 {
        let _ = writeln!(s, "  WARNING: events were lost; this profile is incomplete");
    }
    s
}

/// Bytes with a binary unit.
pub fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

const W: f64 = 960.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const PLOT_H: f64 = 380.0;
const STRIP_TOP: f64 = TOP + PLOT_H + 60.0;
const STRIP_H: f64 = 36.0;
const H: f64 = STRIP_TOP + STRIP_H + 50.0;
const BUCKETS: usize = 425;

/// Bytes read in each of the heat strip's `BUCKETS` slices of `bucket` bytes.
fn strip_fill(p: &Profile, bucket: f64) -> Vec<u64> {
    let mut filled = vec![0u64; BUCKETS];
    for e in &p.extents {
        let (mut a, b) = (e.offset as f64, e.end() as f64);
        while a < b {
            let i = ((a / bucket) as usize).min(BUCKETS - 1);
            let end = ((i + 1) as f64 * bucket).min(b);
            filled[i] += (end - a).max(0.0) as u64;
            if end <= a {
                break;
            }
            a = end;
        }
    }
    filled
}

/// An SVG: disk offset (y) against first-access time (x), one mark per extent
/// colored by access count, and below it a heat strip of the whole disk (share of
/// each slice that was read).
// One function (~120 lines) on purpose: every element is placed with the same plot
// geometry (margins, scales, time and disk ranges), which pieces would each recompute.
pub fn svg(p: &Profile) -> String {
    let pw = W - LEFT - RIGHT;
    let t_max = p
        .extents
        .iter()
        .map(|e| e.first_access_ns)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let disk = p.disk_size.max(1) as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let title = format!(
        "{} — {} read of {} ({} extents), 90% by {:.2} s",
        xml(&p.source.device),
        human(p.working_set_bytes()),
        human(p.disk_size),
        p.extents.len(),
        p.time_to_fraction(0.9).unwrap_or(0) as f64 / 1e9
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{title}</text>"#
    );
    // Plot frame, grid and axes.
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{PLOT_H}" fill="#fafafa" stroke="#444"/>"##
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let x = LEFT + f * pw;
        let y = TOP + f * PLOT_H;
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{:.2} s</text>"##,
            TOP + PLOT_H,
            TOP + PLOT_H + 16.0,
            f * t_max / 1e9
        );
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            human((f * disk) as u64)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time of first read</text>"#,
        LEFT + pw / 2.0,
        TOP + PLOT_H + 34.0
    );
    let _ = writeln!(
        s,
        r#"<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">disk offset</text>"#,
        TOP + PLOT_H / 2.0,
        TOP + PLOT_H / 2.0
    );
    let max_count = p.extents.iter().map(|e| e.count).max().unwrap_or(1).max(1) as f64;
    for e in &p.extents {
        let x = LEFT + e.first_access_ns as f64 / t_max * pw;
        let y = TOP + e.offset as f64 / disk * PLOT_H;
        let h = (e.length as f64 / disk * PLOT_H).max(1.5);
        let heat = (e.count as f64).ln() / max_count.ln().max(1e-9);
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{y:.2}" width="3" height="{h:.2}" fill="{}" fill-opacity="0.85"><title>{} +{} at {:.3} ms, x{}</title></rect>"#,
            x - 1.5,
            color(if max_count > 1.0 { heat } else { 0.0 }),
            e.offset,
            e.length,
            e.first_access_ns as f64 / 1e6,
            e.count
        );
    }
    // Heat strip: share of each disk slice that was read.
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{:.1}">disk heat strip: share of each {} slice read (0 → 100%)</text>"#,
        STRIP_TOP - 8.0,
        human(p.disk_size / BUCKETS as u64)
    );
    let bucket = disk / BUCKETS as f64;
    let filled = strip_fill(p, bucket);
    let bw = pw / BUCKETS as f64;
    for (i, f) in filled.iter().enumerate() {
        let share = (*f as f64 / bucket).min(1.0);
        let fill = if share == 0.0 {
            "#f0f0f0".to_owned()
        } else {
            color(share.sqrt())
        };
        let _ = writeln!(
            s,
            r#"<rect x="{:.2}" y="{STRIP_TOP}" width="{:.2}" height="{STRIP_H}" fill="{fill}"/>"#,
            LEFT + i as f64 * bw,
            bw + 0.05
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{STRIP_TOP}" width="{pw}" height="{STRIP_H}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="{:.1}">0</text><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
        STRIP_TOP + STRIP_H + 16.0,
        LEFT + pw,
        STRIP_TOP + STRIP_H + 16.0,
        human(p.disk_size)
    );
    let _ = writeln!(s, "</svg>");
    s
}

/// Blue (cold, 0.0) to red (hot, 1.0).
fn color(v: f64) -> String {
    let v = v.clamp(0.0, 1.0);
    let r = (40.0 + 215.0 * v) as u8;
    let g = (90.0 + 60.0 * (1.0 - (2.0 * v - 1.0).abs())) as u8;
    let b = (200.0 * (1.0 - v) + 30.0) as u8;
    format!("#{r:02x}{g:02x}{b:02x}")
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemount_store::format::profile::{Extent, Source};

    #[test]
    fn svg_has_one_mark_per_extent_and_a_strip() {
        let mut p = Profile::new(
            1 << 30,
            4096,
            Source {
                device: "a<b".into(),
                runs: 1,
                ..Default::default()
            },
        );
        p.extents = vec![
            Extent {
                offset: 0,
                length: 1 << 20,
                first_access_ns: 0,
                count: 1,
                runs: 1,
            },
            Extent {
                offset: 1 << 29,
                length: 4096,
                first_access_ns: 2_000_000_000,
                count: 5,
                runs: 1,
            },
        ];
        let svg = svg(&p);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<title>").count(), 2);
        assert!(svg.contains("a&lt;b"));
        assert!(svg.matches("<rect").count() > BUCKETS);
        let text = summary(&p);
        assert!(text.contains("extents          2"), "{text}");
    }
}
