//! `qemu-executor policy new`: the crate it creates builds natively and as
//! wasm, passes its own tests, and its component passes its CASES.toml
//! through `qemu-executor policy test`, as created.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qemu_executor_tests::executor_bin;
use qemu_executor_tests::output::text;
use qemu_executor_tests::proc::GroupChild;

/// Runs a command in its own process group, killed if it outlives `limit`.
fn run(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = GroupChild::spawn(cmd).expect("spawn");
    let status = child.wait_timeout(limit).unwrap();
    assert!(status.is_some(), "did not finish within {limit:?}");
    child.wait_with_output().unwrap()
}

fn executor(cache: &Path) -> Command {
    let mut cmd = Command::new(executor_bin());
    cmd.arg("--cache-dir").arg(cache).env("RUST_LOG", "warn");
    cmd
}

/// A target directory of its own for the nested builds, next to the one
/// this test was built in (`<target>/<profile>/deps/<test>`): kept between
/// runs so that the dependencies build once, and apart from the outer
/// build's lock.
fn nested_target() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test binary sits in <target>/<profile>/deps");
    target.join("policy-new-e2e")
}

/// `cargo` as the outer build ran it, in the new crate, with its own target
/// directory.
fn cargo(krate: &Path, args: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(args)
        .current_dir(krate)
        .env("CARGO_TARGET_DIR", nested_target())
        // The outer build's settings are not the new crate's.
        .env_remove("CARGO_MANIFEST_DIR")
        .env_remove("CARGO_PKG_NAME")
        .env_remove("RUSTC_WRAPPER");
    // A first build compiles serde and wit-bindgen for two targets.
    run(cmd, Duration::from_secs(900))
}

#[test]
fn a_new_policy_builds_and_passes_its_tests_natively_and_as_wasm() {
    let dir = tempfile::tempdir().unwrap();
    // An enclosing Cargo workspace that does not list the crate: without a
    // [workspace] of its own, Cargo would refuse to build it.
    std::fs::write(dir.path().join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    let cache = dir.path().join("cache");

    let mut cmd = executor(&cache);
    cmd.args(["policy", "new", "memory-cap", "--dir"])
        .arg(dir.path().join("policies"));
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Created policy crate memory-cap"),
        "{}",
        text(&out)
    );
    let krate = dir.path().join("policies/memory-cap");
    for file in [
        "Cargo.toml",
        "Cargo.lock",
        "src/lib.rs",
        "CASES.toml",
        "README.md",
    ] {
        assert!(krate.join(file).exists(), "{file} missing");
    }

    let out = cargo(&krate, &["test"]);
    assert!(out.status.success(), "cargo test:\n{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("test tests::cases ... ok"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("test result: ok. 3 passed"),
        "{}",
        text(&out)
    );

    let out = cargo(&krate, &["build", "--release", "--target", "wasm32-wasip2"]);
    assert!(out.status.success(), "cargo build:\n{}", text(&out));
    let wasm = nested_target().join("wasm32-wasip2/release/memory_cap.wasm");
    assert!(wasm.exists(), "{} missing", wasm.display());

    let mut cmd = executor(&cache);
    cmd.args(["policy", "test"])
        .arg(&wasm)
        .arg(krate.join("CASES.toml"));
    let out = run(cmd, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().last(),
        Some("5 passed, 0 failed"),
        "{}",
        text(&out)
    );

    let mut cmd = executor(&cache);
    cmd.args(["policy", "inspect"]).arg(&wasm);
    let out = run(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("name      memory-cap\n"), "{}", text(&out));
    assert!(stdout.contains("rewrites  no\n"), "{}", text(&out));
}

#[test]
fn bad_names_existing_directories_and_wrong_sdks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let new = |args: &[&str]| {
        let mut cmd = executor(&cache);
        cmd.args(["policy", "new"])
            .args(args)
            .arg("--dir")
            .arg(dir.path());
        run(cmd, Duration::from_secs(60))
    };
    let refused = |out: &Output, needle: &str| {
        assert_eq!(out.status.code(), Some(2), "{}", text(out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{}",
            text(out)
        );
    };

    refused(&new(&["../escape"]), "may only hold lower-case letters");
    refused(&new(&["Caps"]), "may only hold lower-case letters");
    refused(&new(&["fn"]), "is a Rust keyword");
    assert!(!dir.path().parent().unwrap().join("escape").exists());

    std::fs::create_dir(dir.path().join("taken")).unwrap();
    std::fs::write(dir.path().join("taken/notes.txt"), "mine").unwrap();
    refused(&new(&["taken"]), "already exists");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("taken/notes.txt")).unwrap(),
        "mine"
    );

    refused(
        &new(&["ok-name", "--sdk", "/nonexistent/policy-sdk"]),
        "--sdk /nonexistent/policy-sdk",
    );
    let executor_crate = Path::new(env!("CARGO_MANIFEST_DIR")).join("../executor");
    let sdk_arg = executor_crate.to_str().unwrap();
    refused(
        &new(&["ok-name", "--sdk", sdk_arg]),
        "is not the policy-sdk crate",
    );
    assert!(!dir.path().join("ok-name").exists());

    // --sdk given explicitly, to the very SDK: accepted, and written as an
    // absolute path.
    let sdk = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-sdk");
    let out = new(&["explicit", "--sdk", sdk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let manifest = std::fs::read_to_string(dir.path().join("explicit/Cargo.toml")).unwrap();
    let canonical = sdk.canonicalize().unwrap();
    assert!(
        manifest.contains(&format!("path = \"{}\"", canonical.display())),
        "{manifest}"
    );
}
