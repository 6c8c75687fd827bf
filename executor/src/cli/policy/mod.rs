//! `qemu-executor policy check|test|inspect|new`: run a policy component
//! outside of a launch, with exactly the engine, limits and chain code `run`
//! uses; say what a module is; start a new policy crate.

mod inspect;
mod new;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use policy_sdk::testing::{self, Outcome};
use policy_sdk::{HostFacts, Task};
use qemu_executor::launch::Exit;
use qemu_executor::policy::config::LimitsConfig;
use qemu_executor::policy::{
    self, Chain, ChainOutcome, Limits, PolicyEngine, PolicyError, PolicySpec,
};
use serde_json::json;

use super::GlobalOpts;

/// The task was accepted (possibly rewritten).
const EXIT_ACCEPT: Exit = Exit::SUCCESS;
/// The task was rejected.
const EXIT_REJECT: Exit = Exit::POLICY_REJECTED;
/// The policy, task, facts, settings or cases could not be used.
const EXIT_BAD_INPUT: Exit = Exit::INVALID;
/// The policy failed: trap, timeout, limit, output that makes no sense.
const EXIT_FAULT: Exit = Exit::POLICY_FAULT;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Run one policy on one task and print the decision as JSON. Exit 0
    /// accept or rewrite, 1 reject, 2 bad input, 3 policy fault.
    Check(CheckArgs),
    /// Run a table of cases (CASES.toml) against a policy component; one
    /// line per case, then `N passed, N failed`.
    Test(TestArgs),
    /// Say what a policy component is: metadata, contract version, size,
    /// sha256 and imports, and whether this executor would load it. Exit 0
    /// if it would, 2 if not, 3 if the policy failed when asked for its
    /// metadata.
    Inspect(inspect::InspectArgs),
    /// Create a Rust policy crate, ready to build and test, from the SDK.
    New(new::NewArgs),
}

/// The limits a policy runs under, as `limits = { time_ms, memory_mb }` of
/// a `[[policy]]` entry in executor.toml; the defaults are `run`'s.
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Wall-clock limit of each call into the policy, in milliseconds
    /// [default: 100].
    #[arg(long, value_name = "MS")]
    pub time_limit_ms: Option<u64>,
    /// Memory limit of the policy, in MiB [default: 64].
    #[arg(long, value_name = "MIB")]
    pub memory_limit_mb: Option<u64>,
}

impl LimitArgs {
    pub fn limits(&self) -> Limits {
        LimitsConfig {
            time_ms: self.time_limit_ms,
            memory_mb: self.memory_limit_mb,
        }
        .resolve()
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The policy component (.wasm).
    #[arg(long)]
    pub policy: PathBuf,
    /// Settings as JSON, or @FILE to read them from a file; default {}.
    #[arg(long)]
    pub settings: Option<String>,
    /// Task file (.toml or .json).
    #[arg(long)]
    pub task: PathBuf,
    /// Host facts as `qemu-executor fingerprint --json` prints them.
    #[arg(long)]
    pub facts: Option<PathBuf>,
    /// Refuse the module unless its bytes have this sha256 (as the
    /// `sha256` pin of a `[[policy]]` entry does).
    #[arg(long)]
    pub sha256: Option<String>,
    #[command(flatten)]
    pub limits: LimitArgs,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The policy component (.wasm).
    pub policy: PathBuf,
    /// The cases file.
    pub cases: PathBuf,
    #[command(flatten)]
    pub limits: LimitArgs,
}

pub async fn run(args: PolicyArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    match args.command {
        PolicyCommand::Check(args) => check(args, global).await,
        PolicyCommand::Test(args) => test(args, global).await,
        PolicyCommand::Inspect(args) => inspect::run(args, global).await,
        PolicyCommand::New(args) => new::run(args),
    }
}

async fn check(args: CheckArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    // Without --facts, the policy sees this very host, as `run` would.
    let live_facts = match args.facts {
        Some(_) => None,
        None => Some(
            super::probe(global, &super::load_config(global)?)
                .host_facts()
                .await,
        ),
    };
    let inputs = (|| -> anyhow::Result<(Task, HostFacts, String)> {
        let task = qemu_executor::task::load(&args.task)?;
        let facts = match &args.facts {
            Some(path) => read_facts(path)?,
            None => live_facts.clone().expect("probed when --facts is absent"),
        };
        let settings = read_settings(args.settings.as_deref())?;
        Ok((task, facts, settings))
    })();
    let (task, facts, settings) = match inputs {
        Ok(inputs) => inputs,
        Err(err) => return Ok(report_error(&err, EXIT_BAD_INPUT)),
    };
    let engine = engine(global)?;
    let mut spec = PolicySpec::new(&args.policy).with_settings(settings);
    spec.sha256 = args.sha256;
    spec.limits = args.limits.limits();
    let chain = match load(&engine, spec).await? {
        Ok(chain) => chain,
        Err(err) => {
            let code = if err.is_fault() {
                EXIT_FAULT
            } else {
                EXIT_BAD_INPUT
            };
            return Ok(report_error(&anyhow::Error::new(err), code));
        }
    };
    let outcome = chain.evaluate(task.clone(), &facts).await;
    let step = outcome.steps().last();
    let elapsed_us = step.map_or(0, |s| s.elapsed.as_micros() as u64);
    let (body, code) = match &outcome {
        ChainOutcome::Accepted { task, steps } => {
            let rewrite = steps
                .iter()
                .find(|s| s.decision == policy::StepDecision::Rewrite);
            let diff: Vec<_> = steps.iter().flat_map(|s| s.diff.clone()).collect();
            (
                json!({
                    "decision": if rewrite.is_some() { "rewrite" } else { "accept" },
                    "policy": chain.describe()[0].name,
                    "reason": rewrite.and_then(|s| s.reason.clone()),
                    "task": task,
                    "diff": diff,
                    "elapsed_us": elapsed_us,
                }),
                EXIT_ACCEPT,
            )
        }
        ChainOutcome::Rejected {
            policy,
            reason,
            fault,
            steps,
        } => {
            let diff: Vec<_> = steps.iter().flat_map(|s| s.diff.clone()).collect();
            (
                json!({
                    "decision": "reject",
                    "policy": policy,
                    "reason": reason,
                    "fault": fault,
                    "task": task,
                    "diff": diff,
                    "elapsed_us": elapsed_us,
                }),
                if *fault { EXIT_FAULT } else { EXIT_REJECT },
            )
        }
    };
    println!("{}", serde_json::to_string_pretty(&body)?);
    if let ChainOutcome::Rejected { .. } = outcome {
        eprintln!("{}", qemu_executor::text::Printable(&outcome.to_string()));
    }
    Ok(ExitCode::from(code))
}

async fn test(args: TestArgs, global: &GlobalOpts) -> anyhow::Result<ExitCode> {
    let cases = match testing::load_cases(&args.cases) {
        Ok(cases) => cases,
        Err(err) => return Ok(report_error(&anyhow::Error::new(err), EXIT_BAD_INPUT)),
    };
    let engine = engine(global)?;
    // One load per distinct settings: loading is where settings are checked.
    let mut chains: HashMap<String, Result<Chain, String>> = HashMap::new();
    let (mut passed, mut failed) = (0, 0);
    for case in &cases {
        if !chains.contains_key(&case.settings) {
            let mut spec = PolicySpec::new(&args.policy).with_settings(case.settings.clone());
            spec.limits = args.limits.limits();
            let loaded = match load(&engine, spec).await? {
                Ok(chain) => Ok(chain),
                Err(PolicyError::BadSettings { message, .. }) => Err(message),
                Err(err) => {
                    let code = if err.is_fault() {
                        EXIT_FAULT
                    } else {
                        EXIT_BAD_INPUT
                    };
                    return Ok(report_error(&anyhow::Error::new(err), code));
                }
            };
            chains.insert(case.settings.clone(), loaded);
        }
        let outcome = match &chains[&case.settings] {
            Err(message) => Outcome::BadSettings {
                message: message.clone(),
            },
            Ok(chain) => to_outcome(chain.evaluate(case.task.clone(), &case.facts).await),
        };
        let result = testing::check(case, &outcome);
        if result.is_ok() {
            passed += 1;
        } else {
            failed += 1;
        }
        println!("{}", testing::report_line(case, &result));
    }
    println!("{}", testing::summary_line(passed, failed));
    Ok(ExitCode::from(if failed == 0 {
        EXIT_ACCEPT
    } else {
        EXIT_REJECT
    }))
}

fn to_outcome(outcome: ChainOutcome) -> Outcome {
    match outcome {
        ChainOutcome::Accepted { task, steps } => {
            let reasons: Vec<String> = steps.into_iter().filter_map(|s| s.reason).collect();
            if reasons.is_empty() {
                Outcome::Accept { task }
            } else {
                Outcome::Rewrite {
                    task,
                    reason: reasons.join("; "),
                }
            }
        }
        ChainOutcome::Rejected {
            reason,
            fault: false,
            ..
        } => Outcome::Reject { reason },
        ChainOutcome::Rejected { reason, .. } => Outcome::Fault { message: reason },
    }
}

/// Loads a one-policy chain on a blocking thread (compiling may take a
/// while). The outer error is a failure of the thread itself.
async fn load(
    engine: &PolicyEngine,
    spec: PolicySpec,
) -> anyhow::Result<Result<Chain, PolicyError>> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || Chain::load(&engine, &[spec]))
        .await
        .context("Policy loading thread failed")
}

pub(super) fn engine(global: &GlobalOpts) -> anyhow::Result<PolicyEngine> {
    Ok(PolicyEngine::new(&policy::artifact_dir(
        &global.cache_dir(),
    ))?)
}

fn read_facts(path: &Path) -> anyhow::Result<HostFacts> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("Cannot read facts file {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("Facts file {} is not fingerprint JSON", path.display()))
}

/// `--settings`: JSON text, or `@FILE`; must at least be JSON.
fn read_settings(arg: Option<&str>) -> anyhow::Result<String> {
    let text = match arg {
        None => return Ok("{}".to_string()),
        Some(arg) => match arg.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .with_context(|| format!("Cannot read settings file {path}"))?,
            None => arg.to_string(),
        },
    };
    serde_json::from_str::<serde_json::Value>(&text).context("--settings is not valid JSON")?;
    Ok(text)
}

pub(super) fn report_error(err: &anyhow::Error, code: Exit) -> ExitCode {
    super::print_error(err.as_ref());
    code.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_text_or_file() {
        assert_eq!(read_settings(None).unwrap(), "{}");
        assert_eq!(read_settings(Some(r#"{"a":1}"#)).unwrap(), r#"{"a":1}"#);
        assert!(read_settings(Some("{a")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.json");
        std::fs::write(&file, r#"{"min": 2}"#).unwrap();
        let arg = format!("@{}", file.display());
        assert_eq!(read_settings(Some(&arg)).unwrap(), r#"{"min": 2}"#);
        assert!(read_settings(Some("@/nonexistent/s.json")).is_err());
    }

    #[test]
    fn outcomes_map_to_case_outcomes() {
        let rejected = |fault| ChainOutcome::Rejected {
            policy: "p".into(),
            reason: "why".into(),
            fault,
            steps: Vec::new(),
        };
        assert_eq!(
            to_outcome(rejected(false)),
            Outcome::Reject {
                reason: "why".into()
            }
        );
        assert_eq!(
            to_outcome(rejected(true)),
            Outcome::Fault {
                message: "why".into()
            }
        );
    }
}
