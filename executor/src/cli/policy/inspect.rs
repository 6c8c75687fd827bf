//! `qemu-executor policy inspect P.wasm [--json]`: what a module is and
//! whether this executor would load it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use qemu_executor::policy::{Inspection, PolicyError};

use super::{EXIT_ACCEPT, EXIT_BAD_INPUT, EXIT_FAULT, LimitArgs, engine, report_error};
use crate::cli::GlobalOpts;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The policy component (.wasm).
    pub policy: PathBuf,
    /// Print one JSON object instead of lines for people.
    #[arg(long)]
    pub json: bool,
    /// Limits of the call that reads the metadata.
    #[command(flatten)]
    pub limits: LimitArgs,
}

pub async fn run(args: InspectArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let engine = engine(global)?;
    let (path, limits) = (args.policy.clone(), args.limits.limits());
    // Compiling a large component takes seconds: off the async threads.
    let inspected: Result<Inspection, PolicyError> =
        tokio::task::spawn_blocking(move || engine.inspect(&path, limits))
            .await
            .context("Policy inspection thread failed")?;
    let inspection = match inspected {
        Ok(inspection) => inspection,
        Err(err) => return Ok(report_error(&anyhow::Error::new(err), EXIT_BAD_INPUT)),
    };
    let problems = inspection.problems();
    if args.json {
        let mut body = serde_json::to_value(&inspection)?;
        body["loadable"] = problems.is_empty().into();
        body["problems"] = problems.clone().into();
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        print!("{}", render(&inspection, &problems));
    }
    let code = if problems.is_empty() {
        EXIT_ACCEPT
    } else if inspection.metadata_fault && problems.len() == 1 {
        EXIT_FAULT
    } else {
        EXIT_BAD_INPUT
    };
    Ok(ExitCode::from(code))
}

/// The report for people: one `key  value` line per fact, one line per
/// import, then the verdict.
fn render(i: &Inspection, problems: &[String]) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        let _ = writeln!(out, "{key:<10}{value}");
    };
    line("module", &i.module.display().to_string());
    line(
        "size",
        &format!("{} bytes ({})", i.size, human_size(i.size)),
    );
    line("sha256", &i.sha256);
    match &i.metadata {
        Some(m) => {
            line("name", &m.name);
            line("version", &m.version);
            line("rewrites", if m.rewrites { "yes" } else { "no" });
        }
        None => line("metadata", "(not read)"),
    }
    let contract = match &i.contract {
        None => "none: it does not export the evaluator interface".to_string(),
        Some(found) => format!(
            "{} ({}, this executor speaks {})",
            if found.is_empty() {
                "(unversioned)"
            } else {
                found
            },
            if i.contract_supported() {
                "supported"
            } else {
                "NOT SUPPORTED"
            },
            i.supported_contract
        ),
    };
    line("contract", &contract);
    let refused = i.refused_imports().count();
    let summary = match (i.imports.len(), refused) {
        (0, _) => "none".to_string(),
        (n, 0) => format!("{n}, all granted"),
        (n, r) => format!("{n}, {r} NOT GRANTED"),
    };
    line("imports", &summary);
    let width = i.imports.iter().map(|im| im.name.len()).max().unwrap_or(0);
    for import in &i.imports {
        let _ = match &import.refused {
            None => writeln!(out, "  {}", import.name),
            Some(why) => writeln!(
                out,
                "  {:<width$}  NOT GRANTED ({why})",
                import.name,
                width = width
            ),
        };
    }
    if problems.is_empty() {
        out.push_str("This executor would load it.\n");
    } else {
        out.push_str("This executor would refuse it:\n");
        for problem in problems {
            let _ = writeln!(out, "  - {problem}.");
        }
    }
    out
}

fn human_size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else {
        format!("{:.1} KiB", b / KIB)
    }
}

#[cfg(test)]
mod tests {
    use qemu_executor::policy::Import;

    use super::*;

    fn inspection() -> Inspection {
        Inspection {
            module: "/p/port_range.wasm".into(),
            size: 52 * 1024,
            sha256: "ab".repeat(32),
            contract: Some("0.1.0".into()),
            supported_contract: "0.1.0",
            metadata: Some(policy_sdk::Metadata {
                name: "port-range".into(),
                version: "0.1.0".into(),
                rewrites: true,
            }),
            metadata_problem: None,
            metadata_fault: false,
            imports: vec![
                Import {
                    name: "wasi:io/streams@0.2.6".into(),
                    kind: "instance",
                    refused: None,
                },
                Import {
                    name: "wasi:http/types@0.2.3".into(),
                    kind: "instance",
                    refused: Some("not provided".into()),
                },
            ],
        }
    }

    #[test]
    fn report_names_what_would_stop_the_load() {
        let i = inspection();
        let text = render(&i, &i.problems());
        assert!(
            text.contains("size      53248 bytes (52.0 KiB)\n"),
            "{text}"
        );
        assert!(text.contains("rewrites  yes\n"), "{text}");
        assert!(
            text.contains("contract  0.1.0 (supported, this executor speaks 0.1.0)\n"),
            "{text}"
        );
        assert!(text.contains("imports   2, 1 NOT GRANTED\n"), "{text}");
        assert!(text.contains("  wasi:io/streams@0.2.6\n"), "{text}");
        assert!(
            text.contains("  wasi:http/types@0.2.3  NOT GRANTED (not provided)\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "This executor would refuse it:\n  - It imports instance `wasi:http/types@0.2.3`, which this executor does not grant.\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human_size(18_835_745), "18.0 MiB");
        assert_eq!(human_size(512), "0.5 KiB");
    }
}
