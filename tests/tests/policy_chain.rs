//! The policy chain in-process, as `run` and the agent use it: one engine,
//! several chains, hostile policies next to well-behaved ones.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use policy_sdk::testing::default_facts;
use policy_sdk::{Accelerator, HostFacts, KvmStatus, Task};
use qemu_executor::policy::{
    Chain, ChainOutcome, Limits, PolicyEngine, PolicyError, PolicySpec, StepDecision,
};
use qemu_executor_tests::policy_wasm;

fn task() -> Task {
    let file = qemu_executor::task::parse_toml(
        "name = \"web\"\nimage_source = \"https://images.example.org/guest.qcow2\"\n\
         checksum = \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n\
         accelerator = \"kvm\"\nhost_port = 8080\nguest_port = 80\nmemory_mb = 4096\n",
    )
    .unwrap();
    file.into_task().unwrap()
}

fn no_kvm() -> HostFacts {
    HostFacts {
        kvm: KvmStatus::Unusable("emulation failure".into()),
        ..default_facts()
    }
}

fn spec(policy: &str, settings: &str) -> PolicySpec {
    PolicySpec::new(policy_wasm(policy)).with_settings(settings)
}

fn hostile(mode: &str) -> PolicySpec {
    spec("hostile", &format!(r#"{{"mode":"{mode}"}}"#))
}

struct Setup {
    _dir: tempfile::TempDir,
    artifacts: PathBuf,
    engine: PolicyEngine,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = dir.path().join("policy-artifacts");
    let engine = PolicyEngine::new(&artifacts).unwrap();
    Setup {
        _dir: dir,
        artifacts,
        engine,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn chain_runs_in_order_and_each_policy_sees_the_previous_output() {
    let s = setup();
    let chain = Chain::load(
        &s.engine,
        &[
            spec("accel-fallback", "{}"),
            spec("port-range", r#"{"min":20000,"max":30000,"mode":"clamp"}"#),
            spec("resource-caps", r#"{"max_memory_mb":2048,"mode":"clamp"}"#),
            spec("image-allowlist", "{}"),
        ],
    )
    .unwrap();
    let names: Vec<String> = chain.describe().into_iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "accel-fallback",
            "port-range",
            "resource-caps",
            "image-allowlist"
        ]
    );
    let outcome = runtime().block_on(chain.evaluate(task(), &no_kvm()));
    let ChainOutcome::Accepted { task: out, steps } = outcome else {
        panic!("expected acceptance, got {outcome:?}");
    };
    assert_eq!(out.accelerator, Accelerator::Tcg);
    assert_eq!(out.ports[0].host, 20000);
    assert_eq!(out.memory_mb, 2048);
    let decisions: Vec<StepDecision> = steps.iter().map(|s| s.decision).collect();
    use StepDecision::*;
    assert_eq!(decisions, [Rewrite, Rewrite, Rewrite, Accept]);
    let diffs: Vec<String> = steps
        .iter()
        .flat_map(|s| s.diff.iter().map(ToString::to_string))
        .collect();
    assert_eq!(
        diffs,
        [
            "accelerator: \"kvm\" -> \"tcg\"",
            "ports[0].host: 8080 -> 20000",
            "memory_mb: 4096 -> 2048"
        ]
    );
}

#[test]
fn first_reject_stops_the_chain() {
    let s = setup();
    let chain = Chain::load(
        &s.engine,
        &[spec("port-range", r#"{"min":20000}"#), hostile("loop")],
    )
    .unwrap();
    let started = Instant::now();
    let outcome = chain.evaluate_blocking(task(), &default_facts());
    assert!(
        started.elapsed() < Duration::from_millis(90),
        "the loop never ran"
    );
    let ChainOutcome::Rejected {
        policy,
        fault,
        steps,
        ..
    } = outcome
    else {
        panic!("expected a reject");
    };
    assert_eq!(
        (policy.as_str(), fault, steps.len()),
        ("port-range", false, 1)
    );
}

#[test]
fn hostile_policies_fail_closed_and_the_engine_keeps_serving() {
    let s = setup();
    let rt = runtime();
    let good = Chain::load(&s.engine, &[spec("port-range", "{}")]).unwrap();
    let modes = [
        ("loop", "time limit"),
        ("alloc", "memory limit"),
        ("panic", "panics on purpose"),
        ("read-file", "cannot read a host file"),
        ("env", "no environment"),
        ("huge-reason", "reason of 1048576 bytes"),
        ("recurse", "trapped"),
        ("exit", "called exit"),
    ];
    for (mode, expected) in modes {
        let chain = Chain::load(&s.engine, &[hostile(mode)]).unwrap();
        for round in 0..2 {
            let started = Instant::now();
            let outcome = rt.block_on(chain.evaluate(task(), &default_facts()));
            let took = started.elapsed();
            let ChainOutcome::Rejected {
                policy,
                reason,
                fault,
                ..
            } = &outcome
            else {
                panic!("{mode}: expected a fault, got {outcome:?}");
            };
            assert_eq!((policy.as_str(), *fault), ("hostile", true), "{mode}");
            assert!(reason.contains(expected), "{mode}: {reason}");
            assert!(
                took < Duration::from_secs(2),
                "{mode} round {round}: {took:?}"
            );
            let after = rt.block_on(good.evaluate(task(), &default_facts()));
            assert!(
                matches!(after, ChainOutcome::Accepted { .. }),
                "after {mode}: {after:?}"
            );
        }
    }
}

#[test]
fn a_sleeping_policy_does_not_hold_the_thread() {
    let s = setup();
    let chain = Chain::load(&s.engine, &[hostile("sleep")]).unwrap();
    let started = Instant::now();
    let outcome = chain.evaluate_blocking(task(), &default_facts());
    assert!(
        matches!(outcome, ChainOutcome::Accepted { .. }),
        "{outcome:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn evaluations_are_deterministic_and_isolated() {
    let s = setup();
    let random = Chain::load(&s.engine, &[hostile("random")]).unwrap();
    let reason = |outcome: ChainOutcome| match outcome {
        ChainOutcome::Rejected { reason, .. } => reason,
        other => panic!("{other:?}"),
    };
    let first = reason(random.evaluate_blocking(task(), &default_facts()));
    let second = reason(random.evaluate_blocking(task(), &default_facts()));
    assert_eq!(first, second, "a fresh store each time, from the same seed");
    let clock = Chain::load(&s.engine, &[hostile("clock")]).unwrap();
    assert_eq!(
        reason(clock.evaluate_blocking(task(), &default_facts())),
        "clock 1704067200"
    );
}

#[test]
fn an_invalid_rewrite_is_rejected_naming_the_policy() {
    let s = setup();
    let chain = Chain::load(&s.engine, &[hostile("invalid-task")]).unwrap();
    let outcome = chain.evaluate_blocking(task(), &default_facts());
    let ChainOutcome::Rejected {
        policy,
        reason,
        fault,
        steps,
    } = outcome
    else {
        panic!("expected a reject");
    };
    assert_eq!((policy.as_str(), fault), ("hostile", false));
    assert!(reason.contains("memory_mb: 0 is out of range"), "{reason}");
    assert_eq!(steps[0].diff[0].to_string(), "memory_mb: 4096 -> 0");
}

#[test]
fn an_undeclared_rewrite_is_a_fault() {
    let s = setup();
    let chain = Chain::load(&s.engine, &[spec("hostile-liar", "{}")]).unwrap();
    let outcome = chain.evaluate_blocking(task(), &default_facts());
    assert!(
        matches!(&outcome, ChainOutcome::Rejected { fault: true, reason, .. } if reason.contains("does not rewrite")),
        "{outcome:?}"
    );
}

#[test]
fn bad_settings_are_refused_at_load() {
    let s = setup();
    let err = Chain::load(
        &s.engine,
        &[
            spec("accel-fallback", "{}"),
            spec("port-range", r#"{"min": 2000, "max": 1000}"#),
        ],
    )
    .err()
    .expect("refused");
    let PolicyError::BadSettings { name, message, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(name, "port-range");
    assert!(
        message.contains("min (2000) is greater than max (1000)"),
        "{message}"
    );
    assert!(err.to_string().starts_with("Policy port-range ("), "{err}");
}

#[test]
fn sha256_pin_mismatch_names_both_digests() {
    let s = setup();
    let mut pinned = spec("port-range", "{}");
    pinned.sha256 = Some("ab".repeat(32));
    let err = Chain::load(&s.engine, &[pinned]).err().expect("refused");
    let PolicyError::PinMismatch {
        expected, actual, ..
    } = &err
    else {
        panic!("{err}");
    };
    let message = err.to_string();
    assert!(message.contains(expected.as_str()) && message.contains(actual.as_str()));
    assert_eq!(expected, &"ab".repeat(32));
}

#[test]
fn per_policy_limits_apply() {
    let s = setup();
    let mut quick = hostile("loop");
    quick.limits = Limits::with_time(Duration::from_millis(20));
    let chain = Chain::load(&s.engine, &[quick]).unwrap();
    let started = Instant::now();
    let outcome = chain.evaluate_blocking(task(), &default_facts());
    let took = started.elapsed();
    assert!(
        matches!(&outcome, ChainOutcome::Rejected { reason, .. } if reason.contains("20 ms")),
        "{outcome:?}"
    );
    assert!(took < Duration::from_millis(80), "{took:?}");

    let mut small = spec("port-range", "{}");
    small.limits.memory = 1 << 20;
    let err = Chain::load(&s.engine, &[small]).err().expect("too small");
    assert!(err.to_string().contains("memory limit"), "{err}");
}

#[test]
fn compiled_policies_are_cached_by_digest() {
    let s = setup();
    Chain::load(&s.engine, &[spec("port-range", "{}")]).unwrap();
    let artifacts: Vec<_> = std::fs::read_dir(&s.artifacts)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert!(artifacts[0].ends_with(".cwasm"));

    // A second engine (a new process) reads it back instead of compiling.
    let again = PolicyEngine::new(&s.artifacts).unwrap();
    let started = Instant::now();
    Chain::load(&again, &[spec("port-range", "{}")]).unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));

    // A corrupt artifact is compiled again, not trusted.
    let path = s.artifacts.join(&artifacts[0]);
    std::fs::write(&path, b"garbage").unwrap();
    let third = PolicyEngine::new(&s.artifacts).unwrap();
    Chain::load(&third, &[spec("port-range", "{}")]).unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() > 1000);
}

#[test]
fn non_components_are_refused_clearly() {
    let s = setup();
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"not wasm at all").unwrap();
    let err = Chain::load(&s.engine, &[PolicySpec::new(&bogus)])
        .err()
        .expect("refused");
    assert!(matches!(err, PolicyError::Compile { .. }), "{err}");
    let missing = Chain::load(&s.engine, &[PolicySpec::new(dir.path().join("none.wasm"))])
        .err()
        .expect("refused");
    assert!(matches!(missing, PolicyError::Read { .. }), "{missing}");
}

#[test]
fn a_later_rewrite_cannot_undo_an_earlier_check() {
    let s = setup();
    let chain = Chain::load(
        &s.engine,
        &[
            spec(
                "image-allowlist",
                r#"{"hosts": ["images.example.org"], "algorithms": ["sha256"]}"#,
            ),
            spec(
                "rewriter",
                r#"{"image_source": "https://169.254.169.254/latest/meta-data"}"#,
            ),
        ],
    )
    .unwrap();
    let outcome = chain.evaluate_blocking(task(), &default_facts());
    let ChainOutcome::Rejected {
        policy,
        fault,
        steps,
        ..
    } = &outcome
    else {
        panic!("the rewrite slipped past the allowlist: {outcome:?}");
    };
    assert_eq!((policy.as_str(), *fault), ("image-allowlist", false));
    let trail: Vec<(&str, u32, StepDecision)> = steps
        .iter()
        .map(|s| (s.policy.as_str(), s.pass, s.decision))
        .collect();
    use StepDecision::*;
    assert_eq!(
        trail,
        [
            ("image-allowlist", 1, Accept),
            ("rewriter", 1, Rewrite),
            ("image-allowlist", 2, Reject)
        ]
    );
}

#[test]
fn rewrites_that_settle_are_admitted_and_a_tug_of_war_is_not() {
    let s = setup();
    // The clamp and the rewriter agree once the port is in range: the
    // second pass only confirms, and adds no steps.
    let settles = Chain::load(
        &s.engine,
        &[
            spec("port-range", r#"{"min":20000,"max":30000,"mode":"clamp"}"#),
            spec("rewriter", r#"{"host_port": 25000}"#),
        ],
    )
    .unwrap();
    let outcome = settles.evaluate_blocking(task(), &default_facts());
    let ChainOutcome::Accepted { task: out, steps } = &outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(out.ports[0].host, 25000);
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert!(steps.iter().all(|s| s.pass == 1));

    // Each undoes the other: rejected after the last pass.
    let fights = Chain::load(
        &s.engine,
        &[
            spec("port-range", r#"{"min":20000,"max":30000,"mode":"clamp"}"#),
            spec("rewriter", r#"{"host_port": 40000}"#),
        ],
    )
    .unwrap();
    let outcome = fights.evaluate_blocking(task(), &default_facts());
    let ChainOutcome::Rejected {
        policy,
        reason,
        steps,
        ..
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(policy, "rewriter");
    assert!(
        reason.contains(&format!(
            "still rewrite the task after {} passes",
            qemu_executor::policy::MAX_PASSES
        )),
        "{reason}"
    );
    assert_eq!(steps.len(), 6, "{steps:?}");
}
