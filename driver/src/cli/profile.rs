//! `livemount profile attach|list`: profiles attached to backup series.

use super::{mib, print_json, Outcome, OutputArgs, StoreArgs};
use livemount_store::format::profile::Profile;
use livemount_store::store::Access;
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;

/// `livemount profile …`.
#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Attach a profile to a series (replaces an earlier one).
    Attach {
        #[command(flatten)]
        store: StoreArgs,
        /// The series, e.g. web01.
        name: String,
        /// The profile file (from livemount-profiler or mount --record-profile).
        file: PathBuf,
    },
    /// List attached profiles.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
}

/// One row of `profile list`.
#[derive(Serialize)]
struct Row {
    series: String,
    #[serde(flatten)]
    what: RowKind,
}

#[derive(Serialize)]
#[serde(untagged)]
enum RowKind {
    Ok {
        working_set_bytes: u64,
        extents: usize,
        disk_size: u64,
        source: String,
        runs: u32,
    },
    Damaged {
        error: String,
    },
}

/// Run `livemount profile …`.
pub fn run(c: Cmd) -> Outcome {
    match c {
        Cmd::Attach { store, name, file } => attach(&store, &name, &file),
        Cmd::List { store, out } => list(&store, out),
    }
}

fn attach(store: &StoreArgs, name: &str, file: &std::path::Path) -> Outcome {
    let st = store.open(Access::Write)?;
    livemount_store::store::validate_series(name)?;
    let p = Profile::load(file)?;
    let snap = st.resolve(name)?;
    let size = st.load_index(&snap)?.image_size;
    if p.disk_size != size {
        anyhow::bail!(
            "profile {} is for a disk of {} bytes, series {name} has {size} bytes",
            file.display(),
            p.disk_size
        );
    }
    st.attach_profile(name, &p)?;
    println!(
        "attached {} to {name} ({:.1} MiB working set)",
        file.display(),
        mib(p.working_set_bytes())
    );
    Ok(ExitCode::SUCCESS)
}

fn list(store: &StoreArgs, out: OutputArgs) -> Outcome {
    let st = store.open(Access::ReadOnly)?;
    let mut rows = Vec::new();
    {
        for series in st.profiled_series()? {
            let what = match st.attached_profile(&series).and_then(|p| {
                p.ok_or_else(|| livemount_store::Error::Invalid("removed meanwhile".into()))
            }) {
                Ok(p) => RowKind::Ok {
                    working_set_bytes: p.working_set_bytes(),
                    extents: p.extents.len(),
                    disk_size: p.disk_size,
                    source: p.source.device.clone(),
                    runs: p.source.runs,
                },
                Err(err) => RowKind::Damaged {
                    error: err.to_string(),
                },
            };
            rows.push(Row { series, what });
        }
    }
    rows.sort_by(|a, b| a.series.cmp(&b.series));
    if out.json {
        print_json(&rows)?;
    } else if rows.is_empty() {
        println!("no profiles attached");
    } else {
        for r in rows {
            match r.what {
                RowKind::Ok {
                    working_set_bytes,
                    extents,
                    source,
                    runs,
                    ..
                } => println!(
                    "{:<24} {:>8.1} MiB working set, {extents} extents, from {source} ({runs} run(s))",
                    r.series,
                    mib(working_set_bytes)
                ),
                RowKind::Damaged { error } => println!("{:<24} DAMAGED: {error}", r.series),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
