//! Table-driven cases for policies, from a `CASES.toml` that both a
//! policy's own native `cargo test` ([`assert_cases`]) and
//! `qemu-executor policy test P.wasm CASES.toml` (against the built
//! component) run, with the same report lines.
//!
//! # The format
//!
//! ```toml
//! # Optional: merged under every case, key by key.
//! [defaults]
//! task = { host_port = 20080, guest_port = 80 }        # task-file fields
//! facts = { "driver.qemu.kvm" = "usable" }             # fingerprint attributes
//! settings = { min = 20000, max = 30000 }               # or a JSON string
//!
//! [[case]]
//! name = "inside the range"
//! expect = "accept"
//!
//! [[case]]
//! name = "below the range is clamped"
//! task = { host_port = 80 }
//! settings = { mode = "clamp" }
//! expect = "rewrite"           # accept | reject | rewrite | bad-settings | fault
//! reason_contains = "20000"            # optional: the reason (or settings error)
//! fields = { "ports[0].host" = 20000 } # optional: the task afterwards
//!
//! [[case]]
//! name = "min above max is refused when loading"
//! settings = { min = 3, max = 2 }
//! expect = "bad-settings"
//! ```
//!
//! - `task` holds task-file fields (as in a task `.toml`: `host_port`,
//!   `[[ports]]`, `memory_mb`, ...), merged over `[defaults].task`, merged
//!   over a base of `name = "case"`, `image_source =
//!   "https://images.example.org/guest.qcow2"` and a sha256 checksum of
//!   zeros. The result goes through the executor's own defaults and
//!   validation ([`crate::taskfile`]); a case whose task is invalid fails.
//! - `facts` holds fingerprint attributes (`driver.qemu.kvm`, `host.cpus`,
//!   ...), merged over `[defaults].facts`, merged over [`default_facts`].
//! - `settings` is a table (merged over `[defaults].settings` when both are
//!   tables) or a JSON string (used as is); default `{}`.
//! - `fields` maps a path in the task's JSON form (`memory_mb`,
//!   `ports[0].host`, `checksum`, `accelerator`) to its expected value after
//!   the decision (for `accept`, the task as given).

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{Decision, HostFacts, KvmStatus, Policy, Task};

/// Why a cases file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CasesError(pub String);

impl fmt::Display for CasesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CasesError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    Accept,
    Reject,
    Rewrite,
    /// The policy refuses the case's settings when it is loaded.
    BadSettings,
    /// The policy fails (trap, limit, output the host refuses); for tests
    /// of the sandbox itself.
    Fault,
}

impl Expect {
    pub fn as_str(self) -> &'static str {
        match self {
            Expect::Accept => "accept",
            Expect::Reject => "reject",
            Expect::Rewrite => "rewrite",
            Expect::BadSettings => "bad-settings",
            Expect::Fault => "fault",
        }
    }
}

/// One case, with defaults merged and the task converted.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub name: String,
    pub task: Task,
    pub facts: HostFacts,
    /// JSON text, as the host hands it to the policy.
    pub settings: String,
    pub expect: Expect,
    pub reason_contains: Option<String>,
    /// Expected values in the resulting task, by path.
    pub fields: Vec<(String, Value)>,
}

/// What evaluating a case gave, natively or through the executor.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accept {
        task: Task,
    },
    Reject {
        reason: String,
    },
    Rewrite {
        task: Task,
        reason: String,
    },
    BadSettings {
        message: String,
    },
    /// The policy failed (trap, limit, output the host refused).
    Fault {
        message: String,
    },
}

impl Outcome {
    fn kind(&self) -> &'static str {
        match self {
            Outcome::Accept { .. } => "accept",
            Outcome::Reject { .. } => "reject",
            Outcome::Rewrite { .. } => "rewrite",
            Outcome::BadSettings { .. } => "bad-settings",
            Outcome::Fault { .. } => "fault",
        }
    }

    fn reason(&self) -> Option<&str> {
        match self {
            Outcome::Accept { .. } => None,
            Outcome::Reject { reason } | Outcome::Rewrite { reason, .. } => Some(reason),
            Outcome::BadSettings { message } | Outcome::Fault { message } => Some(message),
        }
    }
}

/// The facts a case sees unless it says otherwise: a host with qemu 8.2.2,
/// usable KVM, 4 cpus and 16 GiB.
pub fn default_facts() -> HostFacts {
    HostFacts {
        qemu_found: true,
        qemu_version: Some("8.2.2".into()),
        accelerators: vec!["kvm".into(), "tcg".into()],
        kvm: KvmStatus::Usable,
        host_cpus: 4,
        host_memory_mb: 16 * 1024,
    }
}

/// A task for a policy's own unit tests, from task-file fields (as in a
/// task `.toml`) merged over the base every case starts from (`name =
/// "case"`, an `image_source` and a sha256 checksum of zeros), with the
/// executor's defaults and validation applied. Panics, saying why, when the
/// fields do not make a valid task.
///
/// ```
/// let task = policy_sdk::testing::task("memory_mb = 8192\nhost_port = 8080\nguest_port = 80");
/// assert_eq!(task.memory_mb, 8192);
/// assert_eq!(task.ports[0].host, 8080);
/// ```
pub fn task(fields: &str) -> Task {
    let table: toml::Table =
        toml::from_str(fields).unwrap_or_else(|e| panic!("task fields are not TOML: {e}"));
    let file: crate::taskfile::TaskFile = toml::Value::Table(merge(base_task(), &table))
        .try_into()
        .unwrap_or_else(|e| panic!("task fields: {e}"));
    file.into_task()
        .unwrap_or_else(|e| panic!("task is invalid: {e}"))
}

fn base_task() -> toml::Table {
    let mut base = toml::Table::new();
    base.insert("name".into(), "case".into());
    base.insert(
        "image_source".into(),
        "https://images.example.org/guest.qcow2".into(),
    );
    base.insert(
        "checksum".into(),
        format!("sha256:{}", "0".repeat(64)).into(),
    );
    base
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasesFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    case: Vec<RawCase>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Defaults {
    #[serde(default)]
    task: toml::Table,
    #[serde(default)]
    facts: toml::Table,
    #[serde(default)]
    settings: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    task: toml::Table,
    #[serde(default)]
    facts: toml::Table,
    #[serde(default)]
    settings: Option<toml::Value>,
    expect: Expect,
    #[serde(default)]
    reason_contains: Option<String>,
    #[serde(default)]
    fields: toml::Table,
}

/// Reads a cases file.
pub fn load_cases(path: impl AsRef<Path>) -> Result<Vec<Case>, CasesError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CasesError(format!("Cannot read {}: {e}", path.display())))?;
    parse_cases(&text).map_err(|e| CasesError(format!("{}: {e}", path.display())))
}

/// Parses the text of a cases file.
pub fn parse_cases(text: &str) -> Result<Vec<Case>, CasesError> {
    let file: CasesFile =
        toml::from_str(text).map_err(|e| CasesError(format!("Not a valid cases file: {e}")))?;
    if file.case.is_empty() {
        return Err(CasesError("No [[case]] in the file".into()));
    }
    let base_task = base_task();
    let base_facts = match serde_json::to_value(default_facts()) {
        Ok(Value::Object(map)) => map,
        _ => unreachable!("HostFacts serializes to an object"),
    };

    file.case
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            let err = |msg: String| CasesError(format!("case {} ({:?}): {msg}", i + 1, raw.name));
            let task_table = merge(merge(base_task.clone(), &file.defaults.task), &raw.task);
            let task_file: crate::taskfile::TaskFile = toml::Value::Table(task_table)
                .try_into()
                .map_err(|e| err(format!("task: {e}")))?;
            let task = task_file
                .into_task()
                .map_err(|e| err(format!("task is invalid: {e}")))?;

            let mut facts = base_facts.clone();
            for table in [&file.defaults.facts, &raw.facts] {
                for (k, v) in table {
                    facts.insert(k.clone(), to_json(v).map_err(&err)?);
                }
            }
            let facts: HostFacts = serde_json::from_value(Value::Object(facts))
                .map_err(|e| err(format!("facts: {e}")))?;

            let settings = settings_json(file.defaults.settings.as_ref(), raw.settings.as_ref())
                .map_err(&err)?;
            let fields = raw
                .fields
                .iter()
                .map(|(k, v)| Ok((k.clone(), to_json(v)?)))
                .collect::<Result<Vec<_>, String>>()
                .map_err(&err)?;
            Ok(Case {
                name: raw.name,
                task,
                facts,
                settings,
                expect: raw.expect,
                reason_contains: raw.reason_contains,
                fields,
            })
        })
        .collect()
}

fn merge(mut base: toml::Table, over: &toml::Table) -> toml::Table {
    for (k, v) in over {
        base.insert(k.clone(), v.clone());
    }
    base
}

fn to_json(v: &toml::Value) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("{v} has no JSON form: {e}"))
}

fn settings_json(
    defaults: Option<&toml::Value>,
    case: Option<&toml::Value>,
) -> Result<String, String> {
    let as_json = |v: &toml::Value| match v {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Table(_) => serde_json::to_string(v).map_err(|e| e.to_string()),
        other => Err(format!(
            "settings must be a table or a JSON string, not {}",
            other.type_str()
        )),
    };
    match (defaults, case) {
        (Some(toml::Value::Table(d)), Some(toml::Value::Table(c))) => {
            as_json(&toml::Value::Table(merge(d.clone(), c)))
        }
        (_, Some(c)) => as_json(c),
        (Some(d), None) => as_json(d),
        (None, None) => Ok("{}".to_string()),
    }
}

/// Whether `outcome` is what `case` expects; the error says what differs.
pub fn check(case: &Case, outcome: &Outcome) -> Result<(), String> {
    if outcome.kind() != case.expect.as_str() {
        return Err(match outcome.reason() {
            Some(reason) => format!(
                "expected {}, got {}: {reason}",
                case.expect.as_str(),
                outcome.kind()
            ),
            None => format!("expected {}, got {}", case.expect.as_str(), outcome.kind()),
        });
    }
    if let Some(needle) = &case.reason_contains {
        let reason = outcome.reason().unwrap_or("");
        if !reason.contains(needle.as_str()) {
            return Err(format!("reason {reason:?} does not contain {needle:?}"));
        }
    }
    if case.fields.is_empty() {
        return Ok(());
    }
    let task = match outcome {
        Outcome::Accept { task } | Outcome::Rewrite { task, .. } => task,
        _ => return Err("fields are only checked after accept or rewrite".into()),
    };
    let json = serde_json::to_value(task).map_err(|e| e.to_string())?;
    for (path, expected) in &case.fields {
        match lookup(&json, path) {
            Some(actual) if actual == expected => {}
            Some(actual) => return Err(format!("{path} is {actual}, expected {expected}")),
            None => return Err(format!("{path} is absent, expected {expected}")),
        }
    }
    Ok(())
}

/// The value at `ports[0].host`-style paths.
pub fn lookup<'v>(value: &'v Value, path: &str) -> Option<&'v Value> {
    let mut current = value;
    for segment in path.split('.') {
        let (key, mut rest) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        if !key.is_empty() {
            current = current.get(key)?;
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let end = stripped.find(']')?;
            current = current.get(stripped[..end].parse::<usize>().ok()?)?;
            rest = &stripped[end + 1..];
        }
    }
    Some(current)
}

/// Evaluates a case natively, the way the executor would: settings checked
/// first, a rewrite from a policy that does not declare rewrites is a fault,
/// and a rewritten task must be valid.
pub fn run_case<P: Policy>(case: &Case) -> Outcome {
    if let Err(message) = crate::check_settings::<P>(&case.settings) {
        return Outcome::BadSettings { message };
    }
    match crate::evaluate::<P>(&case.task, &case.facts, &case.settings) {
        Decision::Accept => Outcome::Accept {
            task: case.task.clone(),
        },
        Decision::Reject { reason } => Outcome::Reject { reason },
        Decision::Rewrite { task, reason } => {
            if !P::REWRITES {
                return Outcome::Fault {
                    message: "rewrote the task although its metadata says it does not rewrite"
                        .into(),
                };
            }
            match crate::taskfile::validate(&task) {
                Ok(()) => Outcome::Rewrite {
                    task: *task,
                    reason,
                },
                Err(problems) => Outcome::Reject {
                    reason: format!("its rewrite is not a valid task: {problems}"),
                },
            }
        }
    }
}

/// One report line: `ok    name` or `FAIL  name: what differs`.
pub fn report_line(case: &Case, result: &Result<(), String>) -> String {
    match result {
        Ok(()) => format!("ok    {}", case.name),
        Err(why) => format!("FAIL  {}: {why}", case.name),
    }
}

/// The closing line: `N passed, N failed`.
pub fn summary_line(passed: usize, failed: usize) -> String {
    format!("{passed} passed, {failed} failed")
}

/// Runs every case of a cases file natively, prints one line per case and
/// the summary, and panics if any case failed. For a policy's `cargo test`:
///
/// ```ignore
/// #[test]
/// fn cases() {
///     policy_sdk::testing::assert_cases::<MyPolicy>(concat!(env!("CARGO_MANIFEST_DIR"), "/CASES.toml"));
/// }
/// ```
pub fn assert_cases<P: Policy>(path: impl AsRef<Path>) {
    let cases = load_cases(path).unwrap_or_else(|e| panic!("{e}"));
    let mut failed = 0;
    for case in &cases {
        let result = check(case, &run_case::<P>(case));
        failed += usize::from(result.is_err());
        println!("{}", report_line(case, &result));
    }
    println!("{}", summary_line(cases.len() - failed, failed));
    assert_eq!(failed, 0, "{failed} of {} cases failed", cases.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    const CASES: &str = r#"
[defaults]
task = { host_port = 20080, guest_port = 80 }
settings = { min = 20000 }

[[case]]
name = "plain"
expect = "accept"
fields = { "ports[0].host" = 20080, memory_mb = 512 }

[[case]]
name = "merged"
task = { memory_mb = 1024, accelerator = "kvm" }
facts = { "driver.qemu.kvm" = "unusable: no vmx", "host.cpus" = 2 }
settings = { max = 30000 }
expect = "rewrite"
reason_contains = "tcg"

[[case]]
name = "json settings"
settings = '{"min": 1}'
expect = "bad-settings"
"#;

    #[test]
    fn defaults_merge_under_cases() {
        let cases = parse_cases(CASES).unwrap();
        assert_eq!(cases.len(), 3);
        assert_eq!(cases[0].task.name, "case");
        assert_eq!(cases[0].task.ports[0].host, 20080);
        assert_eq!(cases[0].facts, default_facts());
        assert_eq!(cases[1].task.memory_mb, 1024);
        assert_eq!(cases[1].facts.kvm, KvmStatus::Unusable("no vmx".into()));
        assert_eq!(cases[1].facts.host_cpus, 2);
        let settings: Value = serde_json::from_str(&cases[1].settings).unwrap();
        assert_eq!(settings, serde_json::json!({"min": 20000, "max": 30000}));
        assert_eq!(cases[2].settings, r#"{"min": 1}"#);
        assert_eq!(cases[2].expect, Expect::BadSettings);
    }

    #[test]
    fn checks_compare_kind_reason_and_fields() {
        let cases = parse_cases(CASES).unwrap();
        let accept = Outcome::Accept {
            task: cases[0].task.clone(),
        };
        assert_eq!(check(&cases[0], &accept), Ok(()));
        let mut other = cases[0].task.clone();
        other.memory_mb = 256;
        assert_eq!(
            check(&cases[0], &Outcome::Accept { task: other }),
            Err("memory_mb is 256, expected 512".into())
        );
        let reject = Outcome::Reject {
            reason: "no".into(),
        };
        assert_eq!(
            check(&cases[0], &reject),
            Err("expected accept, got reject: no".into())
        );
        let mut tcg = cases[1].task.clone();
        tcg.accelerator = crate::Accelerator::Tcg;
        let rewrite = Outcome::Rewrite {
            task: tcg,
            reason: "kvm unusable, using tcg".into(),
        };
        assert_eq!(check(&cases[1], &rewrite), Ok(()));
        let vague = Outcome::Rewrite {
            task: cases[1].task.clone(),
            reason: "changed".into(),
        };
        assert!(
            check(&cases[1], &vague)
                .unwrap_err()
                .contains("does not contain")
        );
    }

    #[test]
    fn broken_files_are_explained() {
        assert!(parse_cases("").unwrap_err().0.contains("No [[case]]"));
        let err = parse_cases("[[case]]\nname = \"x\"\nexpect = \"maybe\"\n").unwrap_err();
        assert!(err.0.contains("maybe"), "{err}");
        let err = parse_cases("[[case]]\nname = \"x\"\nexpect = \"accept\"\n").unwrap_err();
        assert!(err.0.contains("host_port"), "{err}");
        let err = parse_cases(
            "[[case]]\nname = \"x\"\nexpect = \"accept\"\ntask = { host_port = 1, guest_port = 2, memory = 3 }\n",
        )
        .unwrap_err();
        assert!(
            err.0.contains("case 1 (\"x\")") && err.0.contains("memory"),
            "{err}"
        );
    }

    #[test]
    fn paths_reach_into_lists() {
        let v = serde_json::json!({"ports": [{"host": 1}, {"host": 2}], "a": {"b": [[5]]}});
        assert_eq!(lookup(&v, "ports[1].host"), Some(&serde_json::json!(2)));
        assert_eq!(lookup(&v, "a.b[0][0]"), Some(&serde_json::json!(5)));
        assert_eq!(lookup(&v, "ports[2].host"), None);
        assert_eq!(lookup(&v, "nope"), None);
    }
}
