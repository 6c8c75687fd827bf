//! The policy contract from other languages than Rust: `accel-fallback`
//! written in Python (componentize-py) and `port-range` in JavaScript
//! (componentize-js), each held to the very CASES.toml of its Rust twin
//! through `qemu-executor policy test`, under the executor's default limits.
//!
//! The components are built by `scripts/build-foreign-policies.sh`
//! (tests/run.sh does it); a missing one fails the test, saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qemu_executor_tests::output::text;
use qemu_executor_tests::proc::GroupChild;
use qemu_executor_tests::{executor_bin, foreign_policy_wasm};
use serde_json::Value;

/// Runs the executor in its own process group with a private cache. The
/// first load compiles a component of 10 to 20 MB: tens of seconds in a
/// debug build.
fn executor(cache: &Path, args: &[&str], extra: &[&Path]) -> Output {
    let mut cmd = Command::new(executor_bin());
    cmd.arg("--cache-dir")
        .arg(cache)
        .args(args)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = GroupChild::spawn(cmd).expect("spawn qemu-executor");
    let status = child.wait_timeout(Duration::from_secs(300)).unwrap();
    assert!(
        status.is_some(),
        "qemu-executor did not finish within 300 s"
    );
    child.wait_with_output().unwrap()
}

fn rust_cases(policy: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../policies")
        .join(policy)
        .join("CASES.toml")
}

/// `policy test` on the foreign component with its Rust twin's cases: every
/// case passes. Then `policy inspect` (from the now warm cache): the same
/// metadata as the Rust policy and every import granted.
fn passes_the_rust_cases(file: &str, twin: &str) {
    let wasm = foreign_policy_wasm(file);
    let cases = rust_cases(twin);
    let count = policy_sdk::testing::load_cases(&cases).unwrap().len();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");

    let out = executor(&cache, &["policy", "test"], &[&wasm, &cases]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok    ")).count(),
        count,
        "{}",
        text(&out)
    );
    assert_eq!(
        stdout.lines().last(),
        Some(format!("{count} passed, 0 failed").as_str()),
        "{}",
        text(&out)
    );

    let out = executor(&cache, &["policy", "inspect", "--json"], &[&wasm]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let body: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(body["metadata"]["name"], twin, "{body:#}");
    assert_eq!(body["metadata"]["rewrites"], true, "{body:#}");
    assert_eq!(body["contract"], "0.1.0", "{body:#}");
    assert_eq!(body["loadable"], true, "{body:#}");
    let imports = body["imports"].as_array().unwrap();
    assert!(!imports.is_empty(), "{body:#}");
    for import in imports {
        assert_eq!(import["refused"], Value::Null, "{import}");
        let name = import["name"].as_str().unwrap();
        assert!(!name.starts_with("wasi:http/"), "{name}");
    }
}

#[test]
fn accel_fallback_in_python_passes_the_rust_cases() {
    passes_the_rust_cases("accel_fallback_py.wasm", "accel-fallback");
}

#[test]
fn port_range_in_javascript_passes_the_rust_cases() {
    passes_the_rust_cases("port_range_js.wasm", "port-range");
}
