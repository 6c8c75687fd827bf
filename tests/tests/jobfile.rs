//! The scheduler's job files through the real binary: both generations of
//! the qemu driver's documentation examples converted to task files and
//! run against the test guest under TCG (the image served by a real HTTP
//! server), and broken or unsupported jobs refused with their lines.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::output::{stderr, stdout};
use qemu_executor_tests::proc::wait_until;

/// Generous: the guest boots in about 12 s under TCG, slower while
/// another test boots its own.
const BOOT: Duration = Duration::from_secs(180);

fn example_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/jobs")
        .join(name)
}

fn example(name: &str) -> String {
    std::fs::read_to_string(example_path(name)).expect("example job")
}

/// The example with its documentation values replaced by this test's:
/// each must be there exactly once, so a changed example fails loudly.
fn with(text: &str, replacements: &[(&str, &str)]) -> String {
    let mut out = text.to_string();
    for (from, to) in replacements {
        assert_eq!(out.matches(from).count(), 1, "{from:?} in\n{out}");
        out = out.replace(from, to);
    }
    out
}

/// `convert` succeeds, and its output converted again (now as a task
/// file) gives the same task back.
fn convert_round_trip(sandbox: &Sandbox, job: &Path) -> String {
    let out = sandbox.run(&["convert", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let toml = stdout(&out);
    let file = sandbox.write("converted.toml", &toml);
    let again = sandbox.run(&["convert", file.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let body = |text: &str| {
        text.lines()
            .skip_while(|l| l.starts_with('#') || l.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(body(&stdout(&again)), body(&toml));
    toml
}

/// qemu's command line, from the `started: qemu pid N` line.
fn qemu_argv(started: &str) -> Vec<String> {
    let pid: u32 = started
        .trim_start_matches("started: qemu pid ")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a pid");
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .expect("qemu is running")
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn value_after<'a>(argv: &'a [String], flag: &str) -> &'a str {
    argv.iter()
        .skip_while(|a| *a != flag)
        .nth(1)
        .unwrap_or_else(|| panic!("{flag} in {argv:?}"))
}

#[test]
fn original_generation_converts_runs_and_quits_on_sigterm() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let port = free_port();
    let bare_md5 = md5_of(&guest.cooperative)
        .trim_start_matches("md5:")
        .to_string();
    let url = server.url("guest.iso");
    let text = with(
        &example("original.nomad"),
        &[
            ("http://www.example.com/artifacts/linux-0.1.iso", &url),
            ("a5e836985934c3392cbbd9b643e5c1f7", &bare_md5),
            ("accelerator  = \"kvm\"", "accelerator  = \"tcg\""),
            ("\"8080\"", &format!("\"{port}\"")),
        ],
    );
    let job = sandbox.write("web.nomad", &text);

    let toml = convert_round_trip(&sandbox, &job);
    for line in [
        "name = \"linux\"".to_string(),
        format!("image_source = \"{url}\""),
        format!("checksum = \"md5:{bare_md5}\""),
        "kill_timeout_s = 5".into(),
        "graceful_shutdown = false".into(),
        "memory_mb = 512".into(),
        format!("host = {port}"),
        "guest = 8081".into(),
        "check = \"none\"".into(),
    ] {
        assert!(toml.lines().any(|l| l == line), "{line:?} in\n{toml}");
    }
    assert!(
        toml.contains("#   line 8: job.datacenters: ignored"),
        "{toml}"
    );

    let mut run = sandbox.spawn(&["run", job.to_str().unwrap()]);
    // No service check: like the scheduler, the executor calls the task
    // ready once qemu runs; the guest answers when it has booted.
    run.wait_for_line("ready after", BOOT)
        .unwrap_or_else(|| panic!("never ready:\n{}", run.stderr()));
    let page = wait_until(BOOT, || {
        http_get(port, "/").filter(|p| p.contains("second port"))
    })
    .unwrap_or_else(|| panic!("the guest's port 8081 never answered:\n{}", run.stderr()));
    assert!(page.starts_with("HTTP/1."), "{page}");
    assert!(
        run.stdout_seen.iter().any(|l| l == "accelerator: tcg"),
        "{:?}",
        run.stdout_seen
    );
    assert!(run.stderr().contains("job.region"), "warnings are logged");

    // The original driver had no graceful shutdown: qemu is told to quit,
    // the guest never sees a power button.
    let (code, stdout, _) = run.terminate();
    assert_eq!(code, 0, "{stdout:?}");
    assert!(
        stdout.iter().any(|l| l == "ended: stopped: qemu quit"),
        "{stdout:?}"
    );
    assert!(!sandbox.serial_logs().contains("power button"));
    sandbox.assert_no_qemu();
}

#[test]
fn todays_generation_converts_runs_and_powers_off_on_sigterm() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let (ssh, http) = (free_port(), free_port());
    let url = server.url("guest.iso");
    let checksum = md5_of(&guest.cooperative);
    let text = with(
        &example("today.nomad"),
        &[
            ("https://internal.file.server/linux.img", &url),
            ("md5:df6a4178aec9fbdc1d6d7e3634d1bc33", &checksum),
            ("accelerator       = \"kvm\"", "accelerator       = \"tcg\""),
            ("static = 2222", &format!("static = {ssh}")),
            ("static = 8080", &format!("static = {http}")),
            // The documentation's flags are not for this guest (and
            // -nodefconfig left qemu long ago); one the operator allows.
            (
                "[\"-nodefaults\", \"-nodefconfig\"]",
                "[\"-rtc\", \"base=utc\"]",
            ),
        ],
    );
    let job = sandbox.write("web.hcl", &text);
    let config = sandbox.write(
        "executor.toml",
        "[args]\nenabled = true\n\n[args.allow]\n\"-rtc\" = [\"base\"]\n",
    );

    let toml = convert_round_trip(&sandbox, &job);
    for line in [
        "name = \"virtual\"".to_string(),
        format!("image_source = \"{url}\""),
        format!("checksum = \"{checksum}\""),
        "kill_timeout_s = 30".into(),
        "graceful_shutdown = true".into(),
        "memory_mb = 1024".into(),
        "cpus = 2".into(),
        format!("host = {http}"),
        "check = \"http\"".into(),
        "mode = \"delay\"".into(),
    ] {
        assert!(toml.lines().any(|l| l == line), "{line:?} in\n{toml}");
    }

    let mut run = sandbox.spawn(&[
        "--config",
        config.to_str().unwrap(),
        "run",
        job.to_str().unwrap(),
    ]);
    let started = run
        .wait_for_line("started: qemu pid ", BOOT)
        .unwrap_or_else(|| panic!("qemu never started:\n{}", run.stderr()));
    let argv = qemu_argv(&started);
    assert_eq!(value_after(&argv, "-rtc"), "base=utc", "{argv:?}");
    assert_eq!(value_after(&argv, "-smp"), "2", "{argv:?}");
    assert_eq!(value_after(&argv, "-m"), "1024", "{argv:?}");
    // The service's http check is the readiness check of its port.
    let ready = run
        .wait_for_line(&format!("ready: tcp 127.0.0.1:{http}"), BOOT)
        .unwrap_or_else(|| panic!("never ready:\n{}", run.stderr()));
    assert_eq!(ready, format!("ready: tcp 127.0.0.1:{http} -> guest 8080"));
    let page = http_get(http, "/").expect("the guest answers through the forward");
    assert!(page.contains("qemu-executor test guest"), "{page}");

    let (code, stdout, _) = run.terminate();
    assert_eq!(code, 0, "{stdout:?}");
    assert!(
        stdout
            .iter()
            .any(|l| l == "ended: stopped: the guest powered off on the ACPI power button"),
        "{stdout:?}"
    );
    assert!(
        sandbox
            .serial_logs()
            .contains("qe-guest: power button, powering off")
    );
    sandbox.assert_no_qemu();
}

#[test]
fn args_obey_the_operators_allowlist() {
    let sandbox = Sandbox::new();
    // The documentation's args, on a host that allows none: refused
    // before anything is fetched (the source does not even resolve).
    let job = sandbox.write("web.nomad", &example("today.nomad"));
    let out = sandbox.run(&["run", job.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("args: passthrough is disabled on this host"),
        "{}",
        stderr(&out)
    );
    assert!(!stdout(&out).contains("started:"));
    sandbox.assert_no_qemu();
}

#[test]
fn broken_and_unsupported_jobs_are_refused_with_their_lines() {
    let sandbox = Sandbox::new();
    for verb in ["convert", "run"] {
        let malformed = example_path("malformed.nomad");
        let out = sandbox.run(&[verb, malformed.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{verb}");
        assert!(
            stderr(&out).contains("caused by: Malformed HCL at line 7, column "),
            "{verb}: {}",
            stderr(&out)
        );

        let unsupported = example_path("unsupported.nomad");
        let out = sandbox.run(&[verb, unsupported.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{verb}");
        let err = stderr(&out);
        for expected in [
            "caused by: 4 problems:",
            "    line 8: network.port \"ssh\": has no static number: dynamic ports are not supported here",
            "    line 22: template: not supported: templates are rendered by the scheduler",
            "    line 29: config.guest_agent: not supported: there is no guest agent channel here",
            "    line 30: config.emulator: \"qemu-system-aarch64\" is not supported: only qemu-system-x86_64 runs here",
        ] {
            assert!(err.contains(expected), "{verb}: {expected:?} in\n{err}");
        }
        assert!(stdout(&out).is_empty(), "{verb}: {}", stdout(&out));
    }
    sandbox.assert_no_qemu();
}

#[test]
fn a_job_with_several_qemu_tasks_needs_one_named() {
    let sandbox = Sandbox::new();
    let job = example_path("two-vms.nomad");
    let job = job.to_str().unwrap();
    let out = sandbox.run(&["convert", job]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "Job \"pair\" has 2 qemu tasks (front/vm, back/vm): choose one with --task NAME"
        ),
        "{}",
        stderr(&out)
    );
    let out = sandbox.run(&["convert", job, "--task", "back/vm"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("image_source = \"http://www.example.com/artifacts/back.iso\""));
    let out = sandbox.run(&["convert", job, "--task", "proxy"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("has no qemu task \"proxy\" (its qemu tasks: front/vm, back/vm)"),
        "{}",
        stderr(&out)
    );
    // --task picks a job's task; a task file has only one.
    let task = sandbox.write(
        "t.toml",
        &stdout(&sandbox.run(&["convert", job, "--task", "front/vm"])),
    );
    let out = sandbox.run(&["run", task.to_str().unwrap(), "--task", "vm"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is a task file"), "{}", stderr(&out));
}
