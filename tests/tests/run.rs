//! `qemu-executor run` end to end: the test guest served over HTTP by a
//! real server on loopback, booted by real qemu under TCG, answering
//! through the forwarded port, and stopped as an operator would.

use std::time::{Duration, Instant};

use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::policy_wasm;

/// Generous: the guest boots in about 12 s under TCG, slower while the
/// other test boots its own.
const BOOT: Duration = Duration::from_secs(180);

fn task_toml(name: &str, url: &str, checksum: &str, port: u16, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nimage_source = \"{url}\"\nchecksum = \"{checksum}\"\nhost_port = {port}\nguest_port = 8080\nmemory_mb = 256\nready_timeout_s = 170\n{extra}"
    )
}

#[test]
fn tcg_task_answers_then_powers_off_on_sigterm_and_a_second_run_uses_the_cache() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let checksum = md5_of(&guest.cooperative);
    let port = free_port();
    let task = sandbox.write(
        "web.toml",
        &task_toml(
            "web",
            &server.url("guest.iso"),
            &checksum,
            port,
            "accelerator = \"tcg\"\n",
        ),
    );

    for round in 1..=2 {
        let mut run = sandbox.spawn(&["run", task.to_str().unwrap()]);
        let ready = run
            .wait_for_line("ready: tcp", BOOT)
            .unwrap_or_else(|| panic!("round {round}: never ready:\n{}", run.stderr()));
        assert_eq!(ready, format!("ready: tcp 127.0.0.1:{port} -> guest 8080"));
        let page = http_get(port, "/").expect("the guest answers through the forward");
        assert!(page.contains("qemu-executor test guest"), "{page}");
        assert!(page.contains("cooperative"), "{page}");
        assert!(run.stdout_seen.iter().any(|l| l == "accelerator: tcg"));

        let stopped_at = Instant::now();
        let (code, stdout, stderr) = run.terminate();
        assert_eq!(code, 0, "graceful stop exits 0:\n{stdout:?}\n{stderr}");
        assert!(
            stdout
                .iter()
                .any(|l| l == "ended: stopped: the guest powered off on the ACPI power button"),
            "{stdout:?}"
        );
        assert!(stopped_at.elapsed() < Duration::from_secs(25));
        let image_line = stdout
            .iter()
            .find(|l| l.starts_with("image: "))
            .expect("image line");
        if round == 1 {
            assert!(image_line.contains("(downloaded"), "{image_line}");
        } else {
            assert!(image_line.contains("(cached"), "{image_line}");
        }
        sandbox.assert_no_qemu();
    }
    // The guest saw the button: the power-off came from inside, over ACPI.
    assert_eq!(
        sandbox
            .serial_logs()
            .matches("qe-guest: power button, powering off")
            .count(),
        2
    );
    assert_eq!(
        server.body_requests(),
        1,
        "the second run must not download the body again: {:?}",
        server.requests()
    );
}

#[test]
fn kvm_task_on_this_host_still_answers() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let checksum = md5_of(&guest.cooperative);
    let port = free_port();
    let task = sandbox.write(
        "kvm.toml",
        &task_toml(
            "kvm-web",
            &server.url("guest.iso"),
            &checksum,
            port,
            "accelerator = \"kvm\"\n",
        ),
    );
    let mut run = sandbox.spawn(&["run", task.to_str().unwrap()]);
    run.wait_for_line("ready: tcp", BOOT)
        .unwrap_or_else(|| panic!("never ready:\n{}", run.stderr()));
    let page = http_get(port, "/").expect("the guest answers through the forward");
    assert!(page.contains("qemu-executor test guest"), "{page}");
    let (code, stdout, _) = run.terminate();
    assert_eq!(code, 0, "{stdout:?}");
    sandbox.assert_no_qemu();

    let started: Vec<&String> = stdout
        .iter()
        .filter(|l| l.starts_with("started: "))
        .collect();
    let fell_back = stdout.iter().any(|l| l.contains("relaunching under tcg"));
    let facts = sandbox.run(&["fingerprint", "--json"]);
    let facts: serde_json::Value = serde_json::from_slice(&facts.stdout).expect("facts JSON");
    if fell_back {
        // This host's KVM lies: the guest failed under kvm, ran under tcg,
        // and the verdict is remembered.
        assert!(started[0].ends_with("under kvm"), "{started:?}");
        assert!(started[1].ends_with("under tcg"), "{started:?}");
        let kvm = facts["driver.qemu.kvm"].as_str().unwrap();
        assert!(kvm.starts_with("unusable: "), "{kvm}");

        // The next kvm task goes through accel-fallback, which now sees
        // the verdict in the host facts and rewrites the task before launch.
        let policy = policy_wasm("accel-fallback");
        let mut again = sandbox.spawn(&[
            "run",
            "--policy",
            policy.to_str().unwrap(),
            task.to_str().unwrap(),
        ]);
        let decision = again
            .wait_for_line("policy accel-fallback: ", BOOT)
            .expect("the policy's decision");
        assert!(
            decision.starts_with("policy accel-fallback: rewrite (KVM is unusable on this host: "),
            "{decision}"
        );
        let diff = again.wait_for_line("  ", BOOT).expect("the diff");
        assert_eq!(diff, "  accelerator: \"kvm\" -> \"tcg\"");
        let accel = again
            .wait_for_line("accelerator: ", BOOT)
            .expect("accelerator line");
        assert_eq!(accel, "accelerator: tcg");
        again
            .wait_for_line("ready: tcp", BOOT)
            .unwrap_or_else(|| panic!("never ready:\n{}", again.stderr()));
        let (code, stdout, _) = again.terminate();
        assert_eq!(code, 0);
        assert_eq!(
            stdout.iter().filter(|l| l.starts_with("started: ")).count(),
            1,
            "no second kvm attempt: {stdout:?}"
        );
    } else {
        // A host whose KVM works runs the guest under kvm directly.
        assert_eq!(started.len(), 1, "{stdout:?}");
        assert!(started[0].ends_with("under kvm"), "{started:?}");
        assert_eq!(facts["driver.qemu.kvm"], "usable");
    }
    sandbox.assert_no_qemu();
}

#[test]
fn stubborn_guest_is_killed_at_its_kill_timeout() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let port = free_port();
    let task = sandbox.write(
        "stubborn.toml",
        &task_toml(
            "stubborn",
            &server.url("guest-stubborn.iso"),
            &md5_of(&guest.stubborn),
            port,
            "kill_timeout_s = 3\n",
        ),
    );
    let mut run = sandbox.spawn(&["run", task.to_str().unwrap()]);
    run.wait_for_line("ready: tcp", BOOT)
        .unwrap_or_else(|| panic!("never ready:\n{}", run.stderr()));
    assert!(http_get(port, "/").unwrap().contains("stubborn"));
    let stopped_at = Instant::now();
    let (code, stdout, _) = run.terminate();
    let took = stopped_at.elapsed();
    assert_eq!(code, 6, "killed at the timeout exits 6: {stdout:?}");
    assert!(
        stdout.iter().any(
            |l| l == "ended: killed: the guest ignored the power button until the kill timeout"
        ),
        "{stdout:?}"
    );
    assert!(
        took >= Duration::from_secs(3),
        "waited the kill timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(20),
        "then stopped promptly: {took:?}"
    );
    assert!(!sandbox.serial_logs().contains("powering off"));
    sandbox.assert_no_qemu();
}

#[test]
fn wrong_checksum_is_refused_before_qemu_starts() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let wrong = "md5:0123456789abcdef0123456789abcdef";
    let task = sandbox.write(
        "bad.toml",
        &task_toml("bad", &server.url("guest.iso"), wrong, free_port(), ""),
    );
    let out = sandbox.run(&["run", task.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("expected {wrong}")), "{stderr}");
    assert!(
        stderr.contains(&format!("got {}", md5_of(&guest.cooperative))),
        "{stderr}"
    );
    assert!(!stdout.contains("started:"), "{stdout}");
    // Nothing in the cache: no entry, no partial download.
    for sub in ["images", "tmp"] {
        let dir = sandbox.cache_dir().join(sub);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
    let task_dirs: Vec<_> = std::fs::read_dir(sandbox.state_dir().join("tasks"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(task_dirs.len(), 1);
    assert!(
        !task_dirs[0].path().join("qemu.log").exists(),
        "qemu never ran"
    );
    sandbox.assert_no_qemu();
}

#[test]
fn commas_in_paths_and_names_cannot_add_qemu_options() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let checksum = md5_of(&guest.cooperative);

    // A name with a comma never gets that far.
    let named = sandbox.write(
        "named.toml",
        &task_toml(
            "web,file=/etc/shadow",
            &server.url("guest.iso"),
            &checksum,
            free_port(),
            "",
        ),
    );
    let out = sandbox.run(&["run", named.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("name: contains ','"));

    // A cache and state path with commas reach qemu escaped; allowed
    // passthrough arguments reach it as given, after our own options.
    let evil = sandbox.path().join("c,file=/etc/shadow,if=none");
    let config = sandbox.write(
        "executor.toml",
        "[args]\nenabled = true\n[args.allow]\n\"-smbios\" = [\"type\", \"serial\"]\n",
    );
    let task = sandbox.write(
        "comma.toml",
        &task_toml(
            "comma",
            &server.url("guest.iso"),
            &checksum,
            free_port(),
            "kill_timeout_s = 1\nargs = [\"-smbios\", \"type=1,serial=a,,b\"]\n",
        ),
    );
    let mut cmd_args = vec![
        "--config",
        config.to_str().unwrap(),
        "--cache-dir",
        evil.to_str().unwrap(),
    ];
    let state = evil.join("state");
    cmd_args.extend([
        "--state-dir",
        state.to_str().unwrap(),
        "run",
        task.to_str().unwrap(),
    ]);
    let mut run = sandbox.spawn(&cmd_args);
    let started = run
        .wait_for_line("started: qemu pid ", BOOT)
        .unwrap_or_else(|| panic!("qemu never started:\n{}", run.stderr()));
    let pid: u32 = started
        .trim_start_matches("started: qemu pid ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let argv: Vec<String> = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let escaped_root = evil.display().to_string().replace(',', ",,");
    let drive = argv
        .iter()
        .skip_while(|a| *a != "-drive")
        .nth(1)
        .expect("-drive value");
    assert!(
        drive.starts_with(&format!("file={escaped_root}/images/md5-")),
        "{drive}"
    );
    assert_eq!(
        argv.iter().filter(|a| *a == "-drive").count(),
        1,
        "{argv:?}"
    );
    let qmp = argv
        .iter()
        .find(|a| a.starts_with("socket,id=qmp0,path="))
        .expect("qmp chardev");
    assert!(qmp.contains(&escaped_root), "{qmp}");
    // Nothing but our own options: each -drive/-chardev value splits into
    // exactly the keys we wrote.
    for value in argv
        .iter()
        .filter(|a| a.starts_with("file=") || a.starts_with("socket,"))
    {
        let unescaped_commas = value.replace(",,", "").matches(',').count();
        let expected = if value.starts_with("file=") { 5 } else { 4 };
        assert_eq!(unescaped_commas, expected, "{value}");
    }
    assert_eq!(
        &argv[argv.len() - 3..argv.len() - 1],
        ["-smbios", "type=1,serial=a,,b"]
    );
    let _ = run.terminate();
    sandbox.assert_no_qemu();
}

#[test]
fn args_passthrough_cannot_reach_host_files() {
    let sandbox = Sandbox::new();
    let server = FileServer::start(sandbox.path()).unwrap();
    let run_with = |config: Option<&str>, args: &str| {
        let task = sandbox.write(
            "args.toml",
            &task_toml(
                "args",
                &server.url("guest.iso"),
                "md5:0123456789abcdef0123456789abcdef",
                free_port(),
                &format!("args = {args}\n"),
            ),
        );
        let mut cmd = vec![];
        let config_path;
        if let Some(text) = config {
            config_path = sandbox.write("executor.toml", text);
            cmd.extend(["--config", config_path.to_str().unwrap()]);
        }
        cmd.extend(["run", task.to_str().unwrap()]);
        let out = sandbox.run(&cmd);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // CVE-2021-43415's shape: -drive through the passthrough.
    let cve = r#"["-drive", "file=/etc/shadow"]"#;
    let (code, err) = run_with(None, cve);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("args: passthrough is disabled on this host"),
        "{err}"
    );

    let allow = "[args]\nenabled = true\n[args.allow]\n\"-smbios\" = [\"type\"]\n";
    let (code, err) = run_with(Some(allow), cve);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(r#"args[0]: "-drive" is not on the operator's allowlist"#),
        "{err}"
    );

    // An allowed flag whose value tries to carry a second option.
    let (code, err) = run_with(Some(allow), r#"["-smbios", "type=1,file=/etc/shadow"]"#);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(r#"uses "file", which is not allowed for it"#),
        "{err}"
    );
    // A value that is really a second flag.
    let (code, err) = run_with(Some(allow), r#"["-smbios", "-drive", "file=/etc/shadow"]"#);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("args[0]: -smbios needs a value"), "{err}");

    // An operator cannot allow -drive in the first place.
    let (code, err) = run_with(
        Some("[args]\nenabled = true\n[args.allow]\n\"-drive\" = [\"file\"]\n"),
        r#"["-drive", "file=/etc/shadow"]"#,
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("-drive can never be allowed"), "{err}");

    // Refused before anything was fetched or started.
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    sandbox.assert_no_qemu();
}
