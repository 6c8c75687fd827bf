//! The operator's policies in order: each sees the previous one's output,
//! the first reject stops the chain, and a rewritten task must pass the same
//! validation as a task file. As with admission control in Kubernetes, the
//! chain runs again while a pass changes the task, so that every policy
//! accepts the task as it will run.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use policy_sdk::{Decision, HostFacts, Task};
use serde::{Serialize, Serializer};

use super::diff::{FieldChange, diff};
use super::host::LoadedPolicy;
use super::{Fault, PolicyEngine, PolicyError, PolicySpec};

/// Loaded policies, ready to evaluate tasks. Cheap to clone.
#[derive(Clone)]
pub struct Chain {
    engine: PolicyEngine,
    policies: Arc<[LoadedPolicy]>,
}

/// What one loaded policy is, for logs and `policy inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyInfo {
    pub name: String,
    pub version: String,
    pub rewrites: bool,
    pub module: std::path::PathBuf,
    pub sha256: String,
}

/// How the chain decided about a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainOutcome {
    /// Every policy accepted; `task` carries the rewrites, if any.
    Accepted { task: Task, steps: Vec<Step> },
    /// `policy` rejected the task, or failed (`fault`: a trap, a limit, an
    /// output that makes no sense), which rejects it too.
    Rejected {
        policy: String,
        reason: String,
        fault: bool,
        steps: Vec<Step>,
    },
}

impl ChainOutcome {
    pub fn steps(&self) -> &[Step] {
        match self {
            ChainOutcome::Accepted { steps, .. } | ChainOutcome::Rejected { steps, .. } => steps,
        }
    }

    /// One line per field a policy changed, for `run` to print before
    /// launch: `accel-fallback: accelerator: "kvm" -> "tcg" (reason)`.
    pub fn diff_lines(&self) -> Vec<String> {
        self.steps()
            .iter()
            .flat_map(|step| {
                step.diff.iter().map(move |change| match &step.reason {
                    Some(reason) => format!("{}: {change} ({reason})", step.policy),
                    None => format!("{}: {change}", step.policy),
                })
            })
            .collect()
    }

    /// Whether some policy rewrote the task.
    pub fn rewritten(&self) -> bool {
        self.steps()
            .iter()
            .any(|s| s.decision == StepDecision::Rewrite)
    }
}

impl fmt::Display for ChainOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainOutcome::Accepted { steps, .. } => {
                let rewrites = steps
                    .iter()
                    .filter(|s| s.decision == StepDecision::Rewrite)
                    .count();
                write!(
                    f,
                    "Accepted by {} policies ({rewrites} rewrote it)",
                    steps.len()
                )
            }
            ChainOutcome::Rejected {
                policy,
                reason,
                fault: false,
                ..
            } => write!(f, "Rejected by policy {policy}: {reason}"),
            ChainOutcome::Rejected { policy, reason, .. } => {
                write!(
                    f,
                    "Policy {policy} failed, so the task is rejected: {reason}"
                )
            }
        }
    }
}

/// Full passes over the chain before a task that still changes is refused.
/// Two suffice for policies that each settle on their own output (a clamp,
/// a fallback); the third lets one rewrite follow from another's.
pub const MAX_PASSES: u32 = 3;

/// What one policy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    pub policy: String,
    /// The pass over the chain this step belongs to, from 1 (see
    /// [`MAX_PASSES`]).
    pub pass: u32,
    pub decision: StepDecision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The fields a rewrite changed (empty otherwise).
    pub diff: Vec<FieldChange>,
    #[serde(rename = "elapsed_us", serialize_with = "micros")]
    pub elapsed: Duration,
}

fn micros<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepDecision {
    Accept,
    Reject,
    Rewrite,
    /// The policy failed (see [`Fault`]); the task is rejected.
    Fault,
}

impl StepDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            StepDecision::Accept => "accept",
            StepDecision::Reject => "reject",
            StepDecision::Rewrite => "rewrite",
            StepDecision::Fault => "fault",
        }
    }
}

impl Chain {
    /// Loads the policies in order: reads each module (checking its sha256
    /// pin), compiles it or reads it back from the cache, reads its
    /// metadata and has it check its settings. Blocking: compiling a large
    /// component takes seconds; call it from a blocking thread.
    #[tracing::instrument(level = "debug", skip_all, fields(policies = specs.len()))]
    pub fn load(engine: &PolicyEngine, specs: &[PolicySpec]) -> Result<Chain, PolicyError> {
        let policies = specs
            .iter()
            .map(|spec| engine.load(spec))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Chain {
            engine: engine.clone(),
            policies: policies.into(),
        })
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    pub fn describe(&self) -> Vec<PolicyInfo> {
        self.policies
            .iter()
            .map(|p| PolicyInfo {
                name: p.name.clone(),
                version: p.metadata.version.clone(),
                rewrites: p.metadata.rewrites,
                module: p.path.clone(),
                sha256: p.sha256.clone(),
            })
            .collect()
    }

    /// Runs the chain on a blocking thread. Never fails: whatever goes
    /// wrong rejects the task with a reason.
    pub async fn evaluate(&self, task: Task, facts: &HostFacts) -> ChainOutcome {
        let permit = match self.engine.slots() {
            Some(slots) => slots.acquire_owned().await.ok(),
            None => None,
        };
        let current = Arc::new(AtomicUsize::new(0));
        let (chain, facts, at) = (self.clone(), facts.clone(), current.clone());
        let job = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            chain.run(task, &facts, &at)
        });
        // The epoch deadline stops any policy that runs wasm; this only
        // catches a call stuck in the host, which should never happen.
        let backstop = self.backstop();
        let policy_at = |i: usize| {
            self.policies
                .get(i)
                .map_or_else(|| "(chain)".to_string(), |p| p.name.clone())
        };
        match tokio::time::timeout(backstop, job).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(join)) => ChainOutcome::Rejected {
                policy: policy_at(current.load(Ordering::Acquire)),
                reason: format!("the evaluation thread failed: {join}"),
                fault: true,
                steps: Vec::new(),
            },
            Err(_) => {
                let policy = policy_at(current.load(Ordering::Acquire));
                let fault = Fault::Unresponsive { waited: backstop };
                tracing::error!(policy = %policy, %fault, "Policy evaluation stuck");
                ChainOutcome::Rejected {
                    policy,
                    reason: fault.to_string(),
                    fault: true,
                    steps: Vec::new(),
                }
            }
        }
    }

    /// Runs the chain on the current thread (what [`Chain::evaluate`] runs
    /// on a blocking thread; the benchmark calls it directly).
    pub fn evaluate_blocking(&self, task: Task, facts: &HostFacts) -> ChainOutcome {
        self.run(task, facts, &AtomicUsize::new(0))
    }

    /// How long [`Chain::evaluate`] waits before it answers that a policy
    /// is stuck: twice the longest a whole evaluation can take (every pass,
    /// each call within twice its time limit: see `docs/policies.md`),
    /// plus a second.
    pub fn backstop(&self) -> Duration {
        let total: Duration = self.policies.iter().map(|p| p.limits.time).sum();
        total * (4 * MAX_PASSES) + Duration::from_secs(1)
    }

    /// Runs the chain over the task until a whole pass leaves it as it is,
    /// at most [`MAX_PASSES`] times: the task is admitted only when every
    /// policy accepted it as it will run, so a later policy's rewrite
    /// cannot slip past an earlier policy's check. A confirming pass adds
    /// no steps; the steps of a pass that changed or rejected the task do.
    fn run(&self, mut task: Task, facts: &HostFacts, current: &AtomicUsize) -> ChainOutcome {
        let mut steps = Vec::with_capacity(self.policies.len());
        let mut last_rewriter = String::new();
        for pass in 1..=MAX_PASSES {
            let before = steps.len();
            let mut changed = false;
            for (i, policy) in self.policies.iter().enumerate() {
                current.store(i, Ordering::Release);
                let (step, verdict) = self.step(policy, pass, &task, facts);
                steps.push(step);
                match verdict {
                    Verdict::Accepted => {}
                    Verdict::Rewritten(rewritten) if *rewritten == task => {}
                    Verdict::Rewritten(rewritten) => {
                        changed = true;
                        last_rewriter.clone_from(&policy.name);
                        task = *rewritten;
                    }
                    Verdict::Refused { reason, fault } => {
                        return rejected(policy.name.clone(), reason, fault, steps);
                    }
                }
            }
            if !changed {
                if pass > 1 {
                    steps.truncate(before);
                }
                return ChainOutcome::Accepted { task, steps };
            }
        }
        let reason = format!(
            "the policies still rewrite the task after {MAX_PASSES} passes over the chain; \
             every policy must accept the task as it will run"
        );
        tracing::warn!(policy = %last_rewriter, task = %task.name, "Policy chain did not settle");
        rejected(last_rewriter, reason, false, steps)
    }

    /// One policy on the task: its step, and what it made of the task.
    fn step(
        &self,
        policy: &LoadedPolicy,
        pass: u32,
        task: &Task,
        facts: &HostFacts,
    ) -> (Step, Verdict) {
        let started = Instant::now();
        let result = policy.evaluate(task, facts);
        let elapsed = started.elapsed();
        let name = &policy.name;
        let mut step = Step {
            policy: name.clone(),
            pass,
            decision: StepDecision::Accept,
            reason: None,
            diff: Vec::new(),
            elapsed,
        };
        match result {
            Ok(Decision::Accept) => {
                tracing::debug!(policy = %name, task = %task.name, pass, elapsed_us = elapsed.as_micros() as u64, "Policy accepted");
                (step, Verdict::Accepted)
            }
            Ok(Decision::Reject { reason }) => {
                let reason = given_reason(&reason);
                tracing::info!(policy = %name, task = %task.name, pass, reason = %reason, "Policy rejected the task");
                step.decision = StepDecision::Reject;
                step.reason = Some(reason.clone());
                (
                    step,
                    Verdict::Refused {
                        reason,
                        fault: false,
                    },
                )
            }
            Ok(Decision::Rewrite {
                task: rewritten,
                reason,
            }) => {
                let reason = given_reason(&reason);
                step.diff = diff(task, &rewritten);
                if step.diff.is_empty() && pass > 1 {
                    // A rewrite to the same task accepts it as it is.
                    return (step, Verdict::Accepted);
                }
                step.decision = StepDecision::Rewrite;
                step.reason = Some(reason.clone());
                for change in &step.diff {
                    tracing::info!(policy = %name, task = %task.name, pass, change = %change, reason = %reason, "Policy rewrote the task");
                }
                if let Err(problems) = policy_sdk::taskfile::validate(&rewritten) {
                    let reason = format!("its rewrite is not a valid task: {problems}");
                    tracing::warn!(policy = %name, task = %task.name, reason = %reason, "Policy produced an invalid task");
                    return (
                        step,
                        Verdict::Refused {
                            reason,
                            fault: false,
                        },
                    );
                }
                (step, Verdict::Rewritten(rewritten))
            }
            Err(fault) => {
                tracing::warn!(policy = %name, task = %task.name, %fault, "Policy failed; rejecting the task");
                step.decision = StepDecision::Fault;
                step.reason = Some(fault.to_string());
                (
                    step,
                    Verdict::Refused {
                        reason: fault.to_string(),
                        fault: true,
                    },
                )
            }
        }
    }
}

/// What one policy made of the task.
enum Verdict {
    Accepted,
    Rewritten(Box<Task>),
    /// Rejected, or the policy failed (`fault`).
    Refused {
        reason: String,
        fault: bool,
    },
}

fn rejected(policy: String, reason: String, fault: bool, steps: Vec<Step>) -> ChainOutcome {
    ChainOutcome::Rejected {
        policy,
        reason,
        fault,
        steps,
    }
}

fn given_reason(reason: &str) -> String {
    let line = one_line(reason);
    if line.is_empty() {
        "(no reason given)".to_string()
    } else {
        line
    }
}

/// Text from a policy made safe for one log line or terminal line: lines
/// joined with " / ", other control characters escaped, and Rust's
/// "run with RUST_BACKTRACE" hint dropped.
pub(crate) fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
    {
        if !out.is_empty() {
            out.push_str(" / ");
        }
        out.push_str(&crate::text::printable(line));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_flattens_and_escapes() {
        assert_eq!(
            one_line(
                "thread '<unnamed>' panicked at src/lib.rs:3:5:\nboom\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
            ),
            "thread '<unnamed>' panicked at src/lib.rs:3:5: / boom"
        );
        assert_eq!(one_line("a\u{1b}[31mred"), "a\\u{1b}[31mred");
        assert_eq!(given_reason("  \n "), "(no reason given)");
    }

    #[test]
    fn diff_lines_name_policy_and_reason() {
        let outcome = ChainOutcome::Accepted {
            task: serde_json::from_value(serde_json::json!({
                "name": "web", "image_source": "http://h/x.iso",
                "checksum": "md5:0123456789abcdef0123456789abcdef", "accelerator": "tcg",
                "kvm_fallback": true, "ports": [], "memory_mb": 512, "cpus": 1,
                "kill_timeout_s": 30, "ready_timeout_s": 300, "machine_type": "pc",
                "drive_interface": "ide", "graceful_shutdown": true,
                "restart": {"attempts": 2, "interval_s": 1800, "delay_s": 15, "mode": "fail"}
            }))
            .unwrap(),
            steps: vec![Step {
                policy: "accel-fallback".into(),
                pass: 1,
                decision: StepDecision::Rewrite,
                reason: Some("no KVM".into()),
                diff: vec![FieldChange {
                    field: "accelerator".into(),
                    before: Some("kvm".into()),
                    after: Some("tcg".into()),
                }],
                elapsed: Duration::from_micros(40),
            }],
        };
        assert!(outcome.rewritten());
        assert_eq!(
            outcome.diff_lines(),
            ["accel-fallback: accelerator: \"kvm\" -> \"tcg\" (no KVM)"]
        );
    }

    #[test]
    fn outcome_messages_name_the_policy() {
        let rejected = ChainOutcome::Rejected {
            policy: "port-range".into(),
            reason: "ports[0].host 80 is outside 20000-30000".into(),
            fault: false,
            steps: Vec::new(),
        };
        assert_eq!(
            rejected.to_string(),
            "Rejected by policy port-range: ports[0].host 80 is outside 20000-30000"
        );
        let fault = ChainOutcome::Rejected {
            policy: "hostile".into(),
            reason: "ran longer than its time limit of 100 ms".into(),
            fault: true,
            steps: Vec::new(),
        };
        assert_eq!(
            fault.to_string(),
            "Policy hostile failed, so the task is rejected: ran longer than its time limit of 100 ms"
        );
    }
}
