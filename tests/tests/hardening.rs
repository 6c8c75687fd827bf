//! Hostile tasks, policies and settings against `run`, `fetch` and
//! `policy check` (issue 16): `file://` sources confined to the operator's
//! directories, a chain a later rewrite cannot slip through, control
//! characters refused in tasks and escaped in messages, time and output
//! bounds that hold, and a relative cache directory that works. The agent
//! and the Nomad plugin get the same tests in `hardening_fronts.rs`.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use qemu_executor_tests::executor::{Sandbox, free_port};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::output::{stderr, stdout, text};
use qemu_executor_tests::policy_wasm;

const WRONG: &str = "md5:00000000000000000000000000000000";
/// One quick try: these tests never need the network to work.
const FAST_FETCH: &str = "[fetch]\nmax_attempts = 1\nconnect_timeout_ms = 1000\n";

fn task(name: &str, source: &str, checksum: &str) -> String {
    format!(
        "name = \"{name}\"\nimage_source = \"{source}\"\nchecksum = \"{checksum}\"\n\
         host_port = {}\nguest_port = 8080\nmemory_mb = 256\nready_timeout_s = 170\n",
        20000 + free_port() % 10000
    )
}

fn run(sandbox: &Sandbox, task_toml: &str, extra: &[&str]) -> Output {
    let config = sandbox.write("executor.toml", FAST_FETCH);
    let path = sandbox.write("task.toml", task_toml);
    let mut args = vec!["--config", config.to_str().unwrap(), "run"];
    args.extend_from_slice(extra);
    args.push(path.to_str().unwrap());
    sandbox.run(&args)
}

fn cache_entries(sandbox: &Sandbox) -> Vec<String> {
    std::fs::read_dir(sandbox.cache_dir().join("images"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// Every byte a terminal could take for a command: C0 but for the line
/// feeds between lines, DEL, and the C1 controls.
fn assert_no_control(what: &str, out: &str) {
    let bad: Vec<char> = out
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect();
    assert!(bad.is_empty(), "{what} prints {bad:?} raw:\n{out}");
}

#[test]
fn run_reads_no_host_file_outside_the_allowed_directories() {
    let sandbox = Sandbox::new();
    let secret = sandbox.write("secret.img", "another tenant's disk");
    let secret_md5 = md5_of(&secret);
    let images = sandbox.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::os::unix::fs::symlink(&secret, images.join("link.img")).unwrap();
    let own = images.join("own.img");
    std::fs::write(&own, "the operator's image").unwrap();
    let allow = ["--allow-file-dir", images.to_str().unwrap()];
    let url = |p: &Path| format!("file://{}", p.display());
    let rewrite_to_secret = format!(
        "{}={{\"image_source\": \"{}\"}}",
        policy_wasm("rewriter").display(),
        url(&secret)
    );
    let cases: [(&str, String, Vec<&str>, &str); 6] = [
        (
            "the host's own secrets",
            "file:///etc/shadow".into(),
            vec![],
            "no directory is open to file:// sources",
        ),
        (
            "a file beside the allowed directory",
            url(&secret),
            allow.to_vec(),
            "outside the directories file:// sources may be read from",
        ),
        (
            "a symlink inside it",
            url(&images.join("link.img")),
            allow.to_vec(),
            "outside the directories",
        ),
        (
            "a climb out of it",
            format!("file://{}/../secret.img", images.display()),
            allow.to_vec(),
            "outside the directories",
        ),
        (
            "a file that does not exist outside",
            url(&sandbox.path().join("nothing.img")),
            allow.to_vec(),
            "outside the directories",
        ),
        (
            "a policy's rewrite",
            "http://127.0.0.1:9/guest.iso".into(),
            vec![
                "--allow-file-dir",
                images.to_str().unwrap(),
                "--policy",
                &rewrite_to_secret,
            ],
            "outside the directories",
        ),
    ];
    for (what, source, extra, expected) in cases {
        let out = run(&sandbox, &task("web", &source, WRONG), &extra);
        assert_eq!(out.status.code(), Some(4), "{what}: {}", text(&out));
        assert!(stderr(&out).contains(expected), "{what}: {}", text(&out));
        assert!(
            !text(&out).contains(secret_md5.trim_start_matches("md5:")),
            "{what}: the secret's digest is shown: {}",
            text(&out)
        );
        assert_eq!(cache_entries(&sandbox), Vec::<String>::new(), "{what}");
    }

    // Inside, a wrong checksum says so without the file's digest or size.
    let out = run(&sandbox, &task("web", &url(&own), WRONG), &allow);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "Checksum mismatch for {}: the file does not have {WRONG}",
            url(&own)
        )),
        "{err}"
    );
    assert!(
        !err.contains(md5_of(&own).trim_start_matches("md5:")),
        "{err}"
    );
    assert!(!err.contains("20 bytes"), "{err}");
}

#[test]
fn a_later_rewrite_cannot_undo_an_allowlist_in_run() {
    let sandbox = Sandbox::new();
    let allowlist = format!(
        "{}={{\"schemes\": [\"http\"], \"hosts\": [\"127.0.0.1\"], \"algorithms\": [\"md5\"]}}",
        policy_wasm("image-allowlist").display()
    );
    let ports = format!(
        "{}={{\"min\": 20000, \"max\": 30000}}",
        policy_wasm("port-range").display()
    );
    let undo = format!(
        "{}={{\"image_source\": \"http://169.254.169.254/latest/meta-data\", \"host_port\": 22, \"host_ip\": \"0.0.0.0\"}}",
        policy_wasm("rewriter").display()
    );
    let task = task("web", "http://127.0.0.1:9/guest.iso", WRONG);
    let out = run(
        &sandbox,
        &task,
        &[
            "--policy", &allowlist, "--policy", &ports, "--policy", &undo,
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let lines = stdout(&out);
    assert!(lines.contains("policy rewriter: rewrite"), "{lines}");
    assert!(
        lines.contains(
            "policy image-allowlist: reject (image_source \"http://169.254.169.254/latest/meta-data\""
        ),
        "{lines}"
    );
    assert!(
        stderr(&out).contains("Rejected by policy image-allowlist"),
        "{}",
        text(&out)
    );

    // Without the allowlist, port-range refuses port 22 in the next pass.
    let out = run(&sandbox, &task, &["--policy", &ports, "--policy", &undo]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        stderr(&out).contains("Rejected by policy port-range"),
        "{}",
        text(&out)
    );
}

#[test]
fn control_characters_are_refused_in_tasks_and_escaped_in_messages() {
    let sandbox = Sandbox::new();
    // TOML's escapes put a real newline, ESC and BEL into the fields.
    let toml = task("web", "http://127.0.0.1/x\\nHost: evil", WRONG)
        + "ready_serial = \"login:\\u001b[2J\\u0007\"\n";
    let out = run(&sandbox, &toml, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains(
            "image_source: \"http://127.0.0.1/x\\nHost: evil\" must not contain control characters"
        ),
        "{err}"
    );
    assert!(
        err.contains("ready_serial: must be one non-empty line without control characters"),
        "{err}"
    );
    assert_no_control("a refused task", &text(&out));

    // The operator's own URL on the command line: its fragment never
    // reaches the server, so the image downloads, and the mismatch names
    // the URL with its ESC and BEL escaped.
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let url = format!("{}#\u{1b}]0;owned\u{7}\u{1b}[2J", server.url("guest.iso"));
    let out = sandbox.run(&["fetch", &url, "--checksum", WRONG]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("#\\u{1b}]0;owned\\u{7}\\u{1b}[2J: expected md5:"),
        "{}",
        text(&out)
    );
    assert_no_control("a checksum mismatch", &text(&out));
}

/// `policy check` of the hostile policy in `mode`, with `extra` arguments.
fn check_hostile(settings: &str, extra: &[&str]) -> (Output, Duration) {
    let sandbox = Sandbox::new();
    let task = sandbox.write("task.toml", &task("web", "https://h/x.iso", WRONG));
    let wasm = policy_wasm("hostile");
    let mut args = vec![
        "policy",
        "check",
        "--policy",
        wasm.to_str().unwrap(),
        "--settings",
        settings,
        "--task",
        task.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let out = sandbox.run(&args);
    (out, started.elapsed())
}

fn elapsed_ms(out: &Output) -> u64 {
    let body: serde_json::Value = serde_json::from_str(&stdout(out)).unwrap();
    body["elapsed_us"].as_u64().expect("elapsed_us") / 1000
}

#[test]
fn a_long_list_is_refused_before_the_host_copies_it() {
    // A million empty strings: cheap for the policy to build (about half
    // its time limit), costly for a host that copies every entry first.
    let (out, _) = check_hostile(r#"{"mode": "long-list", "size": 1000000}"#, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        stderr(&out).contains("returned a task of 8000078 bytes or more (at most 65536)"),
        "{}",
        text(&out)
    );
    // The host used to spend about 400 ms copying the list first (750 to
    // 850 ms for two million); now the call ends within twice its limit.
    let ms = elapsed_ms(&out);
    assert!(ms < 350, "the decision took {ms} ms against 100 ms");
}

#[test]
fn memory_the_time_limit_cannot_bound_is_refused() {
    let (out, took) = check_hostile(
        r#"{"mode": "fill", "size": 2000}"#,
        &["--time-limit-ms", "100", "--memory-limit-mb", "2048"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out).contains(
            "memory limit of 2048 MiB needs a time limit of at least 2048 ms (1 MiB per ms)"
        ),
        "{}",
        text(&out)
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    // Within the bound, a fill of all of memory ends within about the limit
    // again: accepted, or stopped at the limit on a loaded host, the
    // decision comes within twice the limit (with room for a busy host).
    let (out, _) = check_hostile(
        r#"{"mode": "fill", "size": 96}"#,
        &["--time-limit-ms", "100", "--memory-limit-mb", "100"],
    );
    let timed_out = stderr(&out).contains("ran longer than its time limit of 100 ms");
    assert!(
        out.status.code() == Some(0) || (out.status.code() == Some(3) && timed_out),
        "{}",
        text(&out)
    );
    let ms = elapsed_ms(&out);
    assert!(ms < 400, "a fill of 96 MiB took {ms} ms");
}

#[test]
fn a_settings_error_is_cut_like_a_reason() {
    // Time and memory to spare for writing 20 MiB: the cut is what counts.
    let (out, _) = check_hostile(
        r#"{"mode": "huge-settings-error"}"#,
        &["--time-limit-ms", "2000", "--memory-limit-mb", "256"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let err = stderr(&out);
    assert!(err.len() < 8192, "{} bytes of error", err.len());
    assert!(
        err.contains("refused its settings: Bad settings for hostile: xxxx"),
        "{err}"
    );
    assert!(err.contains("[cut: 20971546 bytes in all]"), "{err}");
}

#[test]
fn a_module_of_another_signature_is_bad_input() {
    let sandbox = Sandbox::new();
    let task = sandbox.write("task.toml", &task("web", "https://h/x.iso", WRONG));
    let wasm = policy_wasm("wrong-signature");
    let out = sandbox.run(&[
        "policy",
        "check",
        "--policy",
        wasm.to_str().unwrap(),
        "--task",
        task.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        stderr(&out)
            .contains("its function evaluate does not have the type of policy contract 0.1.0"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_relative_cache_directory_is_resolved_at_start() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let toml = task("web", &server.url("guest.iso"), &md5_of(&guest.cooperative));
    let path = sandbox.write("task.toml", &toml);
    let mut cmd = sandbox.command(&["--cache-dir", "ca", "run", path.to_str().unwrap()]);
    cmd.current_dir(sandbox.path());
    let mut run = sandbox.spawn_command(cmd);
    let started = run.wait_for_line("started: qemu pid", Duration::from_secs(120));
    let (code, out, err) = run.terminate();
    assert!(started.is_some(), "exit {code}\n{out:?}\n{err}");
    assert!(
        out.iter()
            .any(|l| l.contains(&format!("{}/ca/images/md5-", sandbox.path().display()))),
        "{out:?}"
    );
    sandbox.assert_no_qemu();
}
