//! `qemu-executor policy check|test` as users run them: the real binary, the
//! real components built by `scripts/build-policies.sh`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use qemu_executor_tests::output::{sha256_of, stderr, stdout};
use qemu_executor_tests::proc::GroupChild;
use qemu_executor_tests::{executor_bin, policy_wasm};
use serde_json::Value;

const POLICIES: [&str; 4] = [
    "port-range",
    "accel-fallback",
    "resource-caps",
    "image-allowlist",
];

/// A scratch directory with a task, facts and a private cache.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("task.toml"),
            "name = \"web\"\nimage_source = \"https://images.example.org/guest.qcow2\"\n\
             checksum = \"md5:0123456789abcdef0123456789abcdef\"\naccelerator = \"kvm\"\n\
             host_port = 8080\nguest_port = 80\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("facts.json"),
            r#"{"driver.qemu": "1", "driver.qemu.version": "8.2.2",
                "driver.qemu.accelerators": ["tcg"], "driver.qemu.kvm": "absent",
                "host.cpus": 2, "host.memory_mb": 8192}"#,
        )
        .unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn executor(&self) -> Command {
        let mut cmd = Command::new(executor_bin());
        cmd.arg("--cache-dir").arg(self.path("cache"));
        cmd.env("RUST_LOG", "warn");
        cmd
    }

    fn check(&self, policy: &Path, settings: &str, extra: &[&str]) -> Output {
        let mut cmd = self.executor();
        cmd.args(["policy", "check", "--policy"])
            .arg(policy)
            .args(["--settings", settings, "--task"])
            .arg(self.path("task.toml"))
            .arg("--facts")
            .arg(self.path("facts.json"))
            .args(extra);
        run(cmd)
    }
}

/// Runs a command in its own process group, killed if it outlives a minute.
fn run(cmd: Command) -> Output {
    let mut child = GroupChild::spawn(piped(cmd)).expect("spawn qemu-executor");
    let status = child.wait_timeout(Duration::from_secs(60)).unwrap();
    assert!(status.is_some(), "qemu-executor did not finish within 60 s");
    child.wait_with_output().unwrap()
}

fn piped(mut cmd: Command) -> Command {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited, not killed")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            stdout(out),
            stderr(out)
        )
    })
}

fn cases_file(policy: &str) -> PathBuf {
    let dir = if policy.starts_with("hostile") {
        "tests/policies"
    } else {
        "policies"
    };
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(dir)
        .join(policy)
        .join("CASES.toml")
}

fn policy_test(scratch: &Scratch, policy: &str, cases: &Path) -> Output {
    let mut cmd = scratch.executor();
    cmd.args(["policy", "test"])
        .arg(policy_wasm(policy))
        .arg(cases);
    run(cmd)
}

#[test]
fn every_shipped_policy_passes_its_cases_as_wasm() {
    let scratch = Scratch::new();
    for policy in POLICIES {
        let out = policy_test(&scratch, policy, &cases_file(policy));
        let text = stdout(&out);
        assert_eq!(code(&out), 0, "{policy}:\n{text}\n{}", stderr(&out));
        let last = text.lines().last().unwrap_or_default();
        assert!(last.ends_with(" passed, 0 failed"), "{policy}: {last}");
        assert!(!text.contains("FAIL"), "{policy}:\n{text}");
    }
}

#[test]
fn policy_test_reports_each_failure_and_exits_non_zero() {
    let scratch = Scratch::new();
    let cases = scratch.path("CASES.toml");
    std::fs::write(
        &cases,
        "[defaults]\ntask = { host_port = 8080, guest_port = 80 }\n\
         [[case]]\nname = \"right\"\nexpect = \"reject\"\nsettings = { min = 20000 }\n\
         [[case]]\nname = \"wrong\"\nexpect = \"accept\"\nsettings = { min = 20000 }\n",
    )
    .unwrap();
    let out = policy_test(&scratch, "port-range", &cases);
    let text = stdout(&out);
    assert_eq!(code(&out), 1, "{text}");
    assert!(text.contains("ok    right"), "{text}");
    assert!(
        text.contains("FAIL  wrong: expected accept, got reject: ports[0].host 8080"),
        "{text}"
    );
    assert_eq!(text.lines().last(), Some("1 passed, 1 failed"));

    std::fs::write(&cases, "[[case]]\nname = 3\n").unwrap();
    let out = policy_test(&scratch, "port-range", &cases);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
}

#[test]
fn check_accept_and_rewrite_exit_zero_with_the_json_shape() {
    let scratch = Scratch::new();
    let out = scratch.check(&policy_wasm("port-range"), "{}", &[]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let body = json(&out);
    assert_eq!(body["decision"], "accept");
    assert_eq!(body["policy"], "port-range");
    assert_eq!(body["reason"], Value::Null);
    assert_eq!(body["task"]["ports"][0]["host"], 8080);
    assert_eq!(body["diff"], serde_json::json!([]));

    let out = scratch.check(
        &policy_wasm("port-range"),
        r#"{"min": 20000, "max": 30000, "mode": "clamp"}"#,
        &[],
    );
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let body = json(&out);
    assert_eq!(body["decision"], "rewrite");
    assert!(body["reason"].as_str().unwrap().contains("8080 -> 20000"));
    assert_eq!(body["task"]["ports"][0]["host"], 20000);
    assert_eq!(
        body["diff"],
        serde_json::json!([{"field": "ports[0].host", "before": 8080, "after": 20000}])
    );

    // This host has no KVM (facts.json): the kvm task becomes tcg.
    let out = scratch.check(&policy_wasm("accel-fallback"), "{}", &[]);
    let body = json(&out);
    assert_eq!(body["decision"], "rewrite");
    assert_eq!(body["task"]["accelerator"], "tcg");
    assert_eq!(body["diff"][0]["field"], "accelerator");
}

#[test]
fn check_reject_exits_one() {
    let scratch = Scratch::new();
    let settings_file = scratch.path("settings.json");
    std::fs::write(&settings_file, r#"{"min": 20000, "max": 30000}"#).unwrap();
    let at_file = format!("@{}", settings_file.display());
    let out = scratch.check(&policy_wasm("port-range"), &at_file, &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let body = json(&out);
    assert_eq!(body["decision"], "reject");
    assert_eq!(body["fault"], false);
    assert_eq!(
        body["reason"],
        "ports[0].host 8080 is outside the allowed range 20000-30000"
    );
    assert!(stderr(&out).contains("Rejected by policy port-range"));
}

#[test]
fn check_bad_input_exits_two() {
    let scratch = Scratch::new();
    let port_range = policy_wasm("port-range");

    // Settings the policy refuses: refused at load, naming the problem.
    let out = scratch.check(&port_range, r#"{"min": 30000, "max": 20000}"#, &[]);
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    assert!(err.contains("refused its settings"), "{err}");
    assert!(err.contains("greater than"), "{err}");
    assert!(out.stdout.is_empty());

    // Settings that are not JSON.
    let out = scratch.check(&port_range, "{min:", &[]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));

    // A module that is not a component.
    let bogus = scratch.path("bogus.wasm");
    std::fs::write(&bogus, b"\0asm not really").unwrap();
    let out = scratch.check(&bogus, "{}", &[]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("not a WebAssembly component"));

    // A missing task file.
    let mut cmd = scratch.executor();
    cmd.args(["policy", "check", "--policy"])
        .arg(&port_range)
        .args(["--task", "/nonexistent/task.toml", "--facts"])
        .arg(scratch.path("facts.json"));
    let out = run(cmd);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("Cannot read task file"));
}

#[test]
fn sha256_pin_mismatch_names_both_digests() {
    let scratch = Scratch::new();
    let module = policy_wasm("port-range");
    let wrong = "0".repeat(64);
    let out = scratch.check(&module, "{}", &["--sha256", &wrong]);
    assert_eq!(code(&out), 2);
    let err = stderr(&out);
    let actual = sha256_of(&module);
    assert!(err.contains(&format!("expected {wrong}")), "{err}");
    assert!(err.contains(&format!("got {actual}")), "{err}");

    let out = scratch.check(&module, "{}", &["--sha256", &actual.to_uppercase()]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn hostile_policies_fault_with_exit_three_within_their_limit() {
    let scratch = Scratch::new();
    let hostile = policy_wasm("hostile");
    let faults = [
        ("loop", "ran longer than its time limit of 100 ms"),
        ("alloc", "memory limit of 64 MiB"),
        ("panic", "hostile policy panics on purpose"),
        ("read-file", "cannot read a host file"),
        ("env", "no environment variables or arguments visible"),
        ("huge-reason", "reason of 1048576 bytes"),
        ("recurse", "trapped"),
        ("exit", "called exit"),
    ];
    for (mode, expected) in faults {
        let started = Instant::now();
        let out = scratch.check(&hostile, &format!(r#"{{"mode": "{mode}"}}"#), &[]);
        let took = started.elapsed();
        assert_eq!(code(&out), 3, "{mode}: {}", stderr(&out));
        let body = json(&out);
        assert_eq!(body["decision"], "reject", "{mode}");
        assert_eq!(body["fault"], true, "{mode}");
        assert_eq!(body["policy"], "hostile", "{mode}");
        let reason = body["reason"].as_str().unwrap();
        assert!(reason.contains(expected), "{mode}: {reason}");
        assert!(!reason.contains("LEAK"), "{mode}: {reason}");
        assert!(took < Duration::from_secs(10), "{mode} took {took:?}");
    }

    let out = scratch.check(&hostile, r#"{"mode": "invalid-task"}"#, &[]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let reason = json(&out)["reason"].as_str().unwrap().to_string();
    assert!(reason.contains("memory_mb: 0 is out of range"), "{reason}");

    let out = scratch.check(&policy_wasm("hostile-liar"), "{}", &[]);
    assert_eq!(code(&out), 3, "{}", stderr(&out));
    assert!(
        json(&out)["reason"]
            .as_str()
            .unwrap()
            .contains("says it does not rewrite")
    );
}

#[test]
fn hostile_cases_in_one_process_keep_serving() {
    let scratch = Scratch::new();
    let out = policy_test(&scratch, "hostile", &cases_file("hostile"));
    let text = stdout(&out);
    assert_eq!(code(&out), 0, "{text}\n{}", stderr(&out));
    assert!(text.contains("ok    still serving at the end"), "{text}");
    assert!(!text.contains("LEAK"), "{text}");
}
