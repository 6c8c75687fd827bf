//! What stops a module from loading, said before and at load: `policy
//! inspect`, a contract version the executor does not speak, an import it
//! does not grant, a sha256 pin in executor.toml that the bytes do not
//! match; and the per-policy limits given on the command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use qemu_executor::policy::{Chain, PolicyEngine, PolicyError, PolicySpec};
use qemu_executor_tests::output::{sha256_of, stderr, stdout, text};
use qemu_executor_tests::proc::GroupChild;
use qemu_executor_tests::{executor_bin, policy_wasm};
use serde_json::Value;

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("task.toml"),
            "name = \"web\"\nimage_source = \"http://127.0.0.1:9/guest.iso\"\n\
             checksum = \"md5:0123456789abcdef0123456789abcdef\"\n\
             host_port = 28080\nguest_port = 80\n",
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

    /// The executor with this scratch's cache and state; `args` may hold
    /// paths.
    fn executor(&self, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        let mut cmd = Command::new(executor_bin());
        cmd.arg("--cache-dir")
            .arg(self.path("cache"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .args(args.iter().map(|a| a.as_ref()))
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = GroupChild::spawn(cmd).expect("spawn qemu-executor");
        let status = child.wait_timeout(Duration::from_secs(120)).unwrap();
        assert!(
            status.is_some(),
            "qemu-executor did not finish within 120 s"
        );
        child.wait_with_output().unwrap()
    }

    fn check(&self, policy: &Path, extra: &[&str]) -> Output {
        let (task, facts) = (self.path("task.toml"), self.path("facts.json"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"policy", &"check", &"--policy", &policy, &"--task", &task];
        args.extend([&"--facts" as &dyn AsRef<std::ffi::OsStr>, &facts]);
        args.extend(extra.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        self.executor(&args)
    }

    fn inspect(&self, policy: &Path, json: bool) -> Output {
        if json {
            self.executor(&[&"policy", &"inspect", &policy, &"--json"])
        } else {
            self.executor(&[&"policy", &"inspect", &policy])
        }
    }
}

#[test]
fn inspect_describes_a_loadable_policy() {
    let scratch = Scratch::new();
    let wasm = policy_wasm("port-range");
    let out = scratch.inspect(&wasm, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let report = stdout(&out);
    let size = std::fs::metadata(&wasm).unwrap().len();
    for line in [
        format!("module    {}", wasm.display()),
        format!("size      {size} bytes ("),
        format!("sha256    {}", sha256_of(&wasm)),
        "name      port-range".to_string(),
        "version   0.1.0".to_string(),
        "rewrites  yes".to_string(),
        "contract  0.1.0 (supported, this executor speaks 0.1.0)".to_string(),
        "  qemu-executor:policy/types@0.1.0".to_string(),
        "This executor would load it.".to_string(),
    ] {
        assert!(report.contains(&line), "no {line:?} in\n{report}");
    }
    assert!(report.contains(", all granted\n"), "{report}");
    assert!(!report.contains("NOT GRANTED"), "{report}");

    let out = scratch.inspect(&policy_wasm("accel-fallback"), true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["metadata"]["name"], "accel-fallback");
    assert_eq!(body["metadata"]["rewrites"], true);
    assert_eq!(body["supported_contract"], "0.1.0");
    assert_eq!(body["loadable"], true);
    assert_eq!(body["problems"], serde_json::json!([]));
    assert!(body["imports"].as_array().unwrap().iter().any(|i| {
        i["name"]
            .as_str()
            .unwrap()
            .starts_with("wasi:cli/stderr@0.2")
    }));
}

#[test]
fn an_ungranted_import_is_named_before_and_at_load() {
    let scratch = Scratch::new();
    let greedy = policy_wasm("greedy-imports");
    let out = scratch.inspect(&greedy, false);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let report = stdout(&out);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("  greedy:policy/network ") && l.contains(" NOT GRANTED (")),
        "{report}"
    );
    assert!(report.contains(", 1 NOT GRANTED\n"), "{report}");
    // The policy can still say what it is: the ungranted import is only
    // stood in for while its metadata is read.
    assert!(report.contains("name      greedy-imports"), "{report}");
    assert!(
        report.ends_with(
            "This executor would refuse it:\n  - It imports instance `greedy:policy/network`, \
             which this executor does not grant.\n"
        ),
        "{report}"
    );

    let out = scratch.inspect(&greedy, true);
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["loadable"], false);
    let refused: Vec<&str> = body["imports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| !i["refused"].is_null())
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(refused, ["greedy:policy/network"]);

    let out = scratch.check(&greedy, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("needs imports this executor does not grant"),
        "{err}"
    );
    assert!(err.contains("`greedy:policy/network`"), "{err}");
}

#[test]
fn a_module_of_another_contract_version_is_refused_naming_both() {
    let scratch = Scratch::new();
    let future = policy_wasm("future-contract");
    let out = scratch.check(&future, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{} speaks policy contract 0.2.0, this executor speaks 0.1.0",
            future.display()
        )),
        "{}",
        text(&out)
    );

    let out = scratch.inspect(&future, false);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let report = stdout(&out);
    assert!(
        report.contains("contract  0.2.0 (NOT SUPPORTED, this executor speaks 0.1.0)"),
        "{report}"
    );
    assert!(
        report.contains("  - It speaks policy contract 0.2.0, this executor speaks 0.1.0.\n"),
        "{report}"
    );

    // The same refusal in-process, as `run` and the agent load chains.
    let engine = PolicyEngine::new(&scratch.path("artifacts")).unwrap();
    let err = Chain::load(&engine, &[PolicySpec::new(&future)])
        .err()
        .expect("refused");
    let PolicyError::ContractVersion {
        found, supported, ..
    } = &err
    else {
        panic!("expected ContractVersion, got {err:?}");
    };
    assert_eq!((found.as_str(), supported.as_str()), ("0.2.0", "0.1.0"));
}

#[test]
fn inspect_refuses_what_is_not_a_component() {
    let scratch = Scratch::new();
    let bogus = scratch.path("bogus.wasm");
    std::fs::write(&bogus, b"\0asm not really").unwrap();
    let out = scratch.inspect(&bogus, false);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("is not a WebAssembly component"),
        "{}",
        text(&out)
    );
    let out = scratch.inspect(&scratch.path("missing.wasm"), false);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("Cannot read policy module"),
        "{}",
        text(&out)
    );
}

#[test]
fn limits_given_on_the_command_line_are_the_ones_enforced() {
    let scratch = Scratch::new();
    let hostile = policy_wasm("hostile");
    let reason = |out: &Output| -> String {
        let body: Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)));
        body["reason"].as_str().unwrap().to_string()
    };

    let out = scratch.check(
        &hostile,
        &["--settings", r#"{"mode": "loop"}"#, "--time-limit-ms", "20"],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        reason(&out).contains("ran longer than its time limit of 20 ms"),
        "{}",
        text(&out)
    );

    let out = scratch.check(
        &hostile,
        &[
            "--settings",
            r#"{"mode": "alloc"}"#,
            "--memory-limit-mb",
            "16",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        reason(&out).contains("memory limit of 16 MiB"),
        "{}",
        text(&out)
    );

    // Out of range, as in executor.toml: refused before anything runs.
    let out = scratch.check(&hostile, &["--time-limit-ms", "0"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains("Bad limits") && stderr(&out).contains("time limit"),
        "{}",
        text(&out)
    );
    let out = scratch.executor(&[
        &"policy",
        &"test",
        &policy_wasm("port-range"),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/port-range/CASES.toml"),
        &"--memory-limit-mb",
        &"100000",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr(&out).contains("memory limit"), "{}", text(&out));
}

#[test]
fn run_refuses_a_policy_whose_bytes_do_not_match_its_pin_in_executor_toml() {
    let scratch = Scratch::new();
    let module = policy_wasm("port-range");
    let actual = sha256_of(&module);
    let wrong = "0".repeat(64);
    let config = scratch.path("executor.toml");
    std::fs::write(
        &config,
        format!(
            "[[policy]]\nmodule = {:?}\nsha256 = \"{wrong}\"\nsettings = {{ min = 20000 }}\n",
            module.display().to_string()
        ),
    )
    .unwrap();
    let task = scratch.path("task.toml");
    let out = scratch.executor(&[&"--config", &config, &"run", &task]);
    // The operator's configuration is input: invalid input exits 2.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} does not match its sha256 pin: expected {wrong}, got {actual}",
            module.display()
        )),
        "{}",
        text(&out)
    );
    // Refused at load: nothing fetched, nothing launched.
    assert!(!stdout(&out).contains("started:"), "{}", text(&out));
    assert!(!err.contains("127.0.0.1:9"), "{}", text(&out));
}
