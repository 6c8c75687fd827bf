//! `qemu-executor cache ls [--json]` and `qemu-executor cache gc
//! [--max-size SIZE]`.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use qemu_executor::cache::{EntryInfo, GcReport};
use qemu_executor::units::{ByteSize, format_rfc3339, format_size};
use serde_json::json;

use super::GlobalOpts;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List cached images: checksum, size, last use, tasks using it.
    Ls {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Evict least recently used images down to a size (never one in use),
    /// and clean up dead leases and abandoned partial downloads.
    Gc {
        /// Target total size, like 10G or 500M (binary units). Without it
        /// nothing is evicted, only cleaned up.
        #[arg(long)]
        max_size: Option<ByteSize>,
        /// Print what was done as one JSON object.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: CacheArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let cache = super::open_cache(global)?;
    match args.command {
        CacheCommand::Ls { json } => {
            let entries = tokio::task::spawn_blocking(move || cache.list()).await??;
            if json {
                let list: Vec<_> = entries.iter().map(entry_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", table(&entries));
            }
        }
        CacheCommand::Gc { max_size, json } => {
            let report =
                tokio::task::spawn_blocking(move || cache.gc(max_size.map(|s| s.0))).await??;
            if json {
                println!("{}", serde_json::to_string_pretty(&report_json(&report))?);
            } else {
                print!("{}", summary(&report));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn entry_json(e: &EntryInfo) -> serde_json::Value {
    json!({
        "checksum": e.checksum.to_string(),
        "path": e.path,
        "size": e.size,
        "last_used": format_rfc3339(e.last_used),
        "last_used_unix": e.last_used,
        "tasks": e.holders,
    })
}

fn report_json(r: &GcReport) -> serde_json::Value {
    json!({
        "max_size": r.max_size,
        "total_before": r.total_before,
        "total_after": r.total_after,
        "reached": r.reached(),
        "evicted": r.evicted.iter().map(entry_json).collect::<Vec<_>>(),
        "kept_in_use": r.kept_in_use.iter().map(entry_json).collect::<Vec<_>>(),
        "stale_leases_removed": r.stale_leases_removed,
        "temps_removed": r.temps_removed,
    })
}

fn table(entries: &[EntryInfo]) -> String {
    let width = entries
        .iter()
        .map(|e| e.checksum.to_string().len())
        .max()
        .unwrap_or(0)
        .max("CHECKSUM".len());
    let mut out = format!(
        "{:<width$}  {:>10}  {:<20}  TASKS\n",
        "CHECKSUM", "SIZE", "LAST USED"
    );
    for e in entries {
        let tasks = if e.holders.is_empty() {
            "-".to_string()
        } else {
            e.holders.join(",")
        };
        out.push_str(&format!(
            "{:<width$}  {:>10}  {:<20}  {tasks}\n",
            e.checksum.to_string(),
            format_size(e.size),
            format_rfc3339(e.last_used),
        ));
    }
    out
}

fn summary(r: &GcReport) -> String {
    let mut out = String::new();
    for e in &r.evicted {
        out.push_str(&format!(
            "evicted {} ({})\n",
            e.checksum,
            format_size(e.size)
        ));
    }
    for e in &r.kept_in_use {
        out.push_str(&format!(
            "kept {} ({}): in use by {}\n",
            e.checksum,
            format_size(e.size),
            if e.holders.is_empty() {
                "a task being set up".to_string()
            } else {
                e.holders.join(",")
            }
        ));
    }
    if r.stale_leases_removed > 0 {
        out.push_str(&format!(
            "removed {} dead lease(s)\n",
            r.stale_leases_removed
        ));
    }
    if r.temps_removed > 0 {
        out.push_str(&format!(
            "removed {} abandoned partial download(s)\n",
            r.temps_removed
        ));
    }
    out.push_str(&format!(
        "cache size: {} -> {}",
        format_size(r.total_before),
        format_size(r.total_after)
    ));
    match r.max_size {
        Some(max) if r.reached() => out.push_str(&format!(" (limit {})\n", format_size(max))),
        Some(max) => out.push_str(&format!(
            " (limit {}): cannot get under the limit, {} image(s) in use\n",
            format_size(max),
            r.kept_in_use.len()
        )),
        None => out.push('\n'),
    }
    out
}
