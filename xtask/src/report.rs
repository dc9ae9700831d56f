//! Benchmark results. Every benchmark hands its figures to a [`Report`]: tables of
//! measured values (already reduced: medians, ratios), one-line notes of measured
//! facts that fit no table, and the command that reproduces them. `save` writes the
//! report as JSON (`results/NAME.json`, the record) and renders it as markdown
//! (`results/NAME.md`) with [`render`], the one place that formats tables;
//! `cargo xtask render results/NAME.json` renders a saved report again. What a
//! figure means (the model behind it) is written once, in docs/performance.md, not
//! in the benchmarks' code.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One benchmark run's results.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// The benchmark's name (`bench-nbd`): the results files are named after it.
    pub bench: String,
    /// The command that reproduces the figures.
    pub reproduce: String,
    /// The tables, in order.
    pub tables: Vec<Table>,
    /// Measured facts that fit no table, one line each.
    pub notes: Vec<String>,
}

/// A table: a title, column headings and rows of cells.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Table {
    /// One line above the table.
    pub title: String,
    /// Column headings.
    pub columns: Vec<String>,
    /// Rows, each as long as `columns`.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Table {
        Table {
            title: title.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Append a row.
    pub fn row<S: ToString>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows
            .push(cells.into_iter().map(|c| c.to_string()).collect());
    }
}

impl Report {
    /// An empty report of `bench`.
    pub fn new(bench: &str, reproduce: impl Into<String>) -> Report {
        Report {
            bench: bench.to_string(),
            reproduce: reproduce.into(),
            ..Default::default()
        }
    }

    /// Add a note.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    /// Write `dir/BENCH.json` and `dir/BENCH.md`; print the markdown; return its path.
    pub fn save_in(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let json = dir.join(format!("{}.json", self.bench));
        std::fs::write(&json, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        let md = dir.join(format!("{}.md", self.bench));
        let text = render(self);
        std::fs::write(&md, &text).with_context(|| format!("writing {}", md.display()))?;
        println!("\n{text}");
        eprintln!(
            "{}: results in {} (tables in {})",
            self.bench,
            json.display(),
            md.display()
        );
        Ok(md)
    }

    /// [`Report::save_in`] the project's `results/`.
    pub fn save(&self) -> Result<PathBuf> {
        self.save_in(&crate::util::root().join("results"))
    }
}

/// A cell that reads as a figure: right-aligned.
fn numeric(cell: &str) -> bool {
    let c = cell.trim_start_matches(['~', '≤', '≥', '-', '+']);
    c.starts_with(|ch: char| ch.is_ascii_digit()) || c == "n/a" || c == "–" || c.is_empty()
}

/// `r` as markdown: the tables, then the notes, then how to reproduce.
pub fn render(r: &Report) -> String {
    let mut s = format!("# {}\n", r.bench);
    for t in &r.tables {
        let _ = writeln!(s, "\n{}\n", t.title);
        let _ = writeln!(s, "| {} |", t.columns.join(" | "));
        let align: Vec<&str> = (0..t.columns.len())
            .map(|i| {
                let figures = t
                    .rows
                    .iter()
                    .all(|row| row.get(i).is_none_or(|c| numeric(c)));
                if i > 0 && figures {
                    "---:"
                } else {
                    "---"
                }
            })
            .collect();
        let _ = writeln!(s, "|{}|", align.join("|"));
        for row in &t.rows {
            // A cell's own `|` would end it; a short row is padded, never cut.
            let mut cells: Vec<String> = row
                .iter()
                .map(|c| c.replace('|', "\\|").replace('\n', " "))
                .collect();
            if cells.len() < t.columns.len() {
                cells.resize(t.columns.len(), String::new());
            }
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
    }
    if !r.notes.is_empty() {
        s.push('\n');
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    let _ = writeln!(s, "\nReproduce: `{}`", r.reproduce);
    s
}

/// Run the criterion-free benchmark `benches/benches/NAME.rs`, which writes its
/// report as JSON to `$LIVEMOUNT_BENCH_OUT`; save and render it.
pub fn run_bench(name: &str) -> Result<()> {
    let out = tempfile::NamedTempFile::new()?;
    let st = std::process::Command::new("cargo")
        .args(["bench", "-p", "livemount-benches", "--bench", name])
        .env("LIVEMOUNT_BENCH_OUT", out.path())
        .current_dir(crate::util::root())
        .status()?;
    anyhow::ensure!(st.success(), "benchmark {name} failed: {st}");
    let text = std::fs::read_to_string(out.path())?;
    let r: Report =
        serde_json::from_str(&text).with_context(|| format!("benchmark {name} wrote no report"))?;
    r.save()?;
    Ok(())
}

/// `cargo xtask render FILE.json`: print a saved report as markdown.
pub fn render_file(path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let r: Report = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a benchmark report", path.display()))?;
    print!("{}", render(&r));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report::new("bench-x", "cargo xtask bench-x");
        let mut t = Table::new("Medians of 3 rounds:", &["job", "what", "IOPS", "ratio"]);
        t.row(["rr4k", "random 4 KiB", "12345", "1.02"]);
        t.row(["seq", "sequential", "n/a", "–"]);
        r.tables.push(t);
        r.note("host load 1.2");
        r
    }

    #[test]
    fn figures_are_right_aligned_and_text_is_not() {
        let md = render(&sample());
        assert!(
            md.contains("| job | what | IOPS | ratio |\n|---|---|---:|---:|\n"),
            "{md}"
        );
        assert!(
            md.contains("| rr4k | random 4 KiB | 12345 | 1.02 |\n"),
            "{md}"
        );
        assert!(md.contains("- host load 1.2\n"), "{md}");
        assert!(md.ends_with("Reproduce: `cargo xtask bench-x`\n"), "{md}");
    }

    #[test]
    fn a_saved_report_reads_back_and_renders_the_same() {
        let d = tempfile::tempdir().unwrap();
        let r = sample();
        let md = r.save_in(d.path()).unwrap();
        let back: Report =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("bench-x.json")).unwrap())
                .unwrap();
        assert_eq!(back, r);
        assert_eq!(std::fs::read_to_string(md).unwrap(), render(&back));
    }

    #[test]
    fn short_rows_are_padded_and_not_a_report_is_an_error() {
        let mut r = Report::new("b", "c");
        let mut t = Table::new("t", &["a", "b", "c"]);
        t.row(["1"]);
        t.row(["a|b", "2", "3", "4"]);
        r.tables.push(t);
        let md = render(&r);
        assert!(md.contains("| 1 |  |  |\n"), "{md}");
        assert!(md.contains("| a\\|b | 2 | 3 | 4 |\n"), "{md}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.json");
        std::fs::write(&f, "{\"nope\": 1}").unwrap();
        let e = render_file(&f).unwrap_err();
        assert!(
            format!("{e:#}").contains("is not a benchmark report"),
            "{e:#}"
        );
    }
}
