//! `qemu-executor agent` end to end: the real agent on a Unix socket,
//! real qemu under TCG booting the test guest served over HTTP, the real
//! client verbs and hand-written HTTP requests.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use qemu_executor_tests::agent::{AgentUnderTest, Reaper, cgroup_parent, request, test_user};
use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::policy_wasm;
use qemu_executor_tests::proc::wait_until;

/// Generous: a guest boots in about 11 s of one core under TCG, and here
/// three boot at once on a shared machine.
const BOOT: Duration = Duration::from_secs(300);
const POWER_OFF_LINE: &str = "qe-guest: power button, powering off";

fn task_toml(name: &str, url: &str, checksum: &str, port: u16, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nimage_source = \"{url}\"\nchecksum = \"{checksum}\"\nhost_port = {port}\nguest_port = 8080\nmemory_mb = 256\naccelerator = \"tcg\"\nready_timeout_s = 280\nkill_timeout_s = 60\n{extra}"
    )
}

fn kill(pid: u64, signal: Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap();
}

fn pid_of(status: &serde_json::Value) -> u64 {
    status["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid: {status:#}"))
}

fn wait_exit(agent: &mut AgentUnderTest) -> i32 {
    let status = agent
        .run
        .child
        .wait_timeout(Duration::from_secs(120))
        .unwrap()
        .unwrap_or_else(|| panic!("the agent did not exit:\n{}", agent.run.stderr()));
    std::os::unix::process::ExitStatusExt::into_raw(status)
}

fn serial_log(status: &serde_json::Value) -> String {
    let dir = status["dir"].as_str().unwrap();
    std::fs::read_to_string(std::path::Path::new(dir).join("serial.log")).unwrap_or_default()
}

/// Method, path, Content-Type, body, expected status, expected message.
type BadRequest<'a> = (&'a str, &'a str, Option<&'a str>, &'a [u8], u16, &'a str);

#[test]
fn bad_requests_get_their_4xx_and_the_agent_keeps_serving() {
    let sandbox = Sandbox::new();
    let parent = cgroup_parent("api");
    let reaper = Reaper::new(&sandbox, &parent);
    let server = FileServer::start(sandbox.path()).unwrap();
    let config = sandbox.write(
        "executor.toml",
        &format!("[agent]\ncgroup_parent = \"{parent}\"\n"),
    );
    let mut agent = AgentUnderTest::start(&sandbox, &config, &[]);
    let health = agent.get("/v1/health").unwrap().json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["isolation"]["cgroup"]["active"], true, "{health:#}");
    // As root with no user configured, the agent says qemu runs as root.
    assert_eq!(health["isolation"]["user"]["active"], false);
    assert!(
        health["isolation"]["user"]["detail"]
            .as_str()
            .unwrap()
            .contains("qemu runs as root"),
        "{health:#}"
    );

    let invalid = task_toml(
        "bad",
        &server.url("x.iso"),
        &format!("md5:{}", "0".repeat(32)),
        free_port(),
        "[restart]\ninterval_s = 0\n",
    );
    let huge = vec![b' '; 2 << 20];
    let cases: Vec<BadRequest> = vec![
        (
            "POST",
            "/v1/tasks",
            Some("application/json"),
            b"{\"name\": ",
            400,
            "Malformed JSON task",
        ),
        (
            "POST",
            "/v1/tasks",
            Some("application/toml"),
            b"name = ",
            400,
            "Malformed TOML task",
        ),
        (
            "POST",
            "/v1/tasks",
            Some("application/yaml"),
            b"name: x",
            415,
            "Unsupported Content-Type",
        ),
        (
            "POST",
            "/v1/tasks",
            Some("application/json"),
            &huge,
            413,
            "exceeds 1048576 bytes",
        ),
        (
            "POST",
            "/v1/tasks",
            Some("application/toml"),
            invalid.as_bytes(),
            422,
            "restart.interval_s",
        ),
        (
            "GET",
            "/v1/tasks/no-such-task",
            None,
            b"",
            404,
            "No task no-such-task",
        ),
        (
            "POST",
            "/v1/tasks/no-such-task/stop",
            None,
            b"",
            404,
            "No task no-such-task",
        ),
        (
            "GET",
            "/v1/tasks/no-such-task/logs",
            None,
            b"",
            404,
            "No task no-such-task",
        ),
        (
            "DELETE",
            "/v1/tasks",
            None,
            b"",
            405,
            "DELETE is not allowed on /v1/tasks",
        ),
        (
            "GET",
            "/v2/everything",
            None,
            b"",
            404,
            "No such endpoint: GET /v2/everything",
        ),
    ];
    for (method, path, content_type, body, status, message) in cases {
        let a = request(&agent.socket, method, path, content_type, body).unwrap();
        assert_eq!(a.status, status, "{method} {path}: {}", a.body);
        assert_eq!(a.header("content-type"), Some("application/json"));
        let error = a.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(message), "{method} {path}: {error}");
        if status == 405 {
            assert_eq!(a.header("allow"), Some("GET, POST"));
        }
        if status == 422 {
            assert_eq!(a.json()["fields"][0]["field"], "restart.interval_s");
        }
        // The next good request is served.
        assert_eq!(agent.get("/v1/tasks").unwrap().status, 200);
    }

    // A valid task through the client verb, found through the environment
    // variable; its image does not exist, so it fails, saying why.
    let task = sandbox.write(
        "missing.toml",
        &task_toml(
            "missing",
            &server.url("missing.iso"),
            &format!("md5:{}", "0".repeat(32)),
            free_port(),
            "",
        ),
    );
    let out = sandbox
        .command(&["submit", task.to_str().unwrap()])
        .env("QEMU_EXECUTOR_SOCKET", &agent.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(id.starts_with("missing-"), "{id}");
    let status = agent.wait_state(&id, "failed", Duration::from_secs(60));
    let reason = status["exit"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("Cannot fetch the image") && reason.contains("404"),
        "{reason}"
    );
    let a = agent.post(&format!("/v1/tasks/{id}/stop"), "application/json", b"{");
    assert_eq!(a.status, 400, "{}", a.body);
    let a = agent.post(&format!("/v1/tasks/{id}/stop"), "application/json", b"{}");
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("already ended (failed)")
    );

    let ls = sandbox
        .command(&["ls", "--socket", agent.socket.to_str().unwrap()])
        .output()
        .unwrap();
    let ls = String::from_utf8(ls.stdout).unwrap();
    assert!(
        ls.lines()
            .any(|l| l.starts_with(&id) && l.contains("failed")),
        "{ls}"
    );

    let metrics = agent.get("/metrics").unwrap();
    assert_eq!(metrics.status, 200);
    for line in [
        "qemu_executor_tasks{state=\"failed\"} 1",
        "qemu_executor_policy_evaluations_total 1",
        "qemu_executor_policy_evaluation_seconds_count 1",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line} in\n{}",
            metrics.body
        );
    }

    // Only the socket's owner may connect: another user is refused even
    // where the directory lets it reach the socket.
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let curl = |as_nobody: bool| {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                "--",
                "curl",
            ]);
            c
        } else {
            Command::new("curl")
        };
        // -v: curl says why it could not connect only there.
        cmd.args(["-v", "-sS", "--unix-socket", agent.socket.to_str().unwrap()])
            .arg("http://agent/v1/health")
            .output()
            .unwrap()
    };
    let denied = curl(true);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    let denied = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(qemu_executor_tests::executor_bin())
        .args(["ls", "--socket", agent.socket.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        stderr.contains("permission denied: the socket belongs to the agent's user"),
        "{stderr}"
    );
    let allowed = curl(false);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert!(String::from_utf8_lossy(&allowed.stdout).contains("\"status\": \"ok\""));

    // SIGTERM: the agent stops listening and exits cleanly.
    agent.run.child.signal(Signal::SIGTERM);
    assert_eq!(wait_exit(&mut agent), 0, "{}", agent.run.stderr());
    assert!(!agent.socket.exists(), "the socket outlived the agent");
    drop(reaper);
}

#[test]
fn three_vms_survive_a_sigkill_of_the_agent_and_stop_gracefully_through_the_next() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let parent = cgroup_parent("three");
    let reaper = Reaper::new(&sandbox, &parent);
    let user = test_user();
    let config = sandbox.write(
        "executor.toml",
        &format!(
            "[agent]\nuser = \"{user}\"\ncgroup_parent = \"{parent}\"\n\n[[policy]]\nmodule = \"{}\"\nsettings = {{ max_memory_mb = 256, mode = \"clamp\" }}\n",
            policy_wasm("resource-caps").display()
        ),
    );
    let mut agent = AgentUnderTest::start(&sandbox, &config, &[]);
    let checksum = md5_of(&guest.cooperative);
    let ports = [free_port(), free_port(), free_port()];
    let ids: Vec<String> = ["web-a", "web-b", "web-c"]
        .iter()
        .zip(ports)
        .map(|(name, port)| {
            let toml = task_toml(name, &server.url("guest.iso"), &checksum, port, "");
            // web-a asks for more memory than the policy allows.
            if *name == "web-a" {
                agent.submit_toml(&toml.replace("memory_mb = 256", "memory_mb = 320"))
            } else {
                agent.submit_toml(&toml)
            }
        })
        .collect();

    let mut pids = Vec::new();
    for (id, port) in ids.iter().zip(ports) {
        let status = agent.wait_state(id, "ready", BOOT);
        let page = http_get(port, "/").expect("the guest answers through its own port");
        assert!(page.contains("qemu-executor test guest"), "{page}");
        pids.push(pid_of(&status));
    }
    assert_eq!(
        server.body_requests(),
        1,
        "one download for three tasks: {:?}",
        server.requests()
    );
    let iso_size = std::fs::metadata(&guest.cooperative).unwrap().len();
    let metrics = agent.get("/metrics").unwrap().body;
    for line in [
        "qemu_executor_fetches_total 3".to_string(),
        "qemu_executor_cache_hits_total 2".to_string(),
        format!("qemu_executor_fetch_bytes_total {iso_size}"),
        "qemu_executor_policy_evaluations_total 3".to_string(),
        "qemu_executor_tasks{state=\"ready\"} 3".to_string(),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    // What status says about web-a: the policy's rewrite, the accelerator,
    // the usage, and the isolation, checked against the kernel's view.
    let a = agent.status(&ids[0]);
    assert_eq!(a["policies"][0]["policy"], "resource-caps");
    assert_eq!(a["policies"][0]["decision"], "rewrite");
    assert_eq!(a["policies"][0]["diff"][0]["field"], "memory_mb");
    assert_eq!(a["task"]["memory_mb"], 256);
    assert_eq!(a["submitted"]["memory_mb"], 320);
    assert_eq!(a["accelerator"]["used"], "tcg");
    assert!(
        a["usage"]["rss_bytes"].as_u64().unwrap() > 10 << 20,
        "{a:#}"
    );
    assert_eq!(a["ports"][0]["host"], ports[0]);
    for mechanism in ["cgroup", "user", "chroot", "mount_namespace", "sandbox"] {
        assert_eq!(
            a["isolation"][mechanism]["active"], true,
            "{mechanism}: {a:#}"
        );
    }
    let pid = pids[0];
    let memory_cg = a["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .find(|p| p.contains("/memory/"))
        .expect("a memory cgroup (v1 on this host)");
    assert_eq!(
        std::fs::read_to_string(format!("{memory_cg}/memory.limit_in_bytes"))
            .unwrap()
            .trim(),
        ((256u64 + 384) << 20).to_string()
    );
    let procs = std::fs::read_to_string(format!("{memory_cg}/cgroup.procs")).unwrap();
    assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = String::from_utf8(
        Command::new("id")
            .args(["-u", user])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == uid.trim()),
        "{uid_line}"
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        std::path::PathBuf::from(a["dir"].as_str().unwrap())
    );
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
        std::fs::read_link("/proc/self/ns/mnt").unwrap()
    );
    let serial = agent
        .get(&format!("/v1/tasks/{}/logs?serial=true", ids[0]))
        .unwrap();
    assert!(serial.body.contains("qe-guest: ready"), "{}", serial.body);

    // SIGKILL: the VMs run on without their agent.
    agent.run.child.signal(Signal::SIGKILL);
    wait_exit(&mut agent);
    for port in ports {
        assert!(http_get(port, "/").is_some_and(|p| p.contains("test guest")));
    }

    // The next agent re-identifies each VM and reconnects to it.
    let mut agent = AgentUnderTest::start(&sandbox, &config, &[]);
    wait_until(Duration::from_secs(30), || {
        (agent.get("/v1/health").unwrap().json()["recovering"] == 0).then_some(())
    })
    .expect("recovery ends");
    for (id, pid) in ids.iter().zip(&pids) {
        let s = agent.status(id);
        assert_eq!(s["state"], "ready", "{s:#}");
        assert_eq!(pid_of(&s), *pid, "the same VM, not a new one");
    }
    for id in &ids[..2] {
        let out = sandbox
            .command(&["stop", id, "--socket", agent.socket.to_str().unwrap()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.trim(),
            "exited: stopped: the guest powered off on the ACPI power button"
        );
        let s = agent.status(id);
        assert!(
            serial_log(&s).contains(POWER_OFF_LINE),
            "{}",
            serial_log(&s)
        );
        assert!(s["pid"].is_null());
        // The client verb; following an ended task prints it and returns.
        let logs = sandbox
            .command(&[
                "logs",
                id,
                "--serial",
                "-f",
                "--socket",
                agent.socket.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(logs.status.success());
        assert!(String::from_utf8_lossy(&logs.stdout).contains(POWER_OFF_LINE));
    }

    // SIGTERM by default leaves the last VM running for the next agent.
    agent.run.child.signal(Signal::SIGTERM);
    assert_eq!(wait_exit(&mut agent), 0);
    assert!(
        http_get(ports[2], "/").is_some(),
        "the VM outlives a SIGTERM of its agent"
    );

    let mut agent = AgentUnderTest::start(&sandbox, &config, &["--stop-tasks-on-exit"]);
    agent.wait_state(&ids[2], "ready", Duration::from_secs(30));
    let last = agent.status(&ids[2]);
    agent.run.child.signal(Signal::SIGTERM);
    assert_eq!(wait_exit(&mut agent), 0, "{}", agent.run.stderr());
    assert!(serial_log(&last).contains(POWER_OFF_LINE));
    let left = reaper.vm_processes();
    assert!(left.is_empty(), "processes outlived the test: {left:?}");
}

#[test]
fn a_vm_killed_from_outside_is_restarted_then_fails_once_its_attempts_are_used_even_with_no_agent()
{
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let parent = cgroup_parent("restart");
    let reaper = Reaper::new(&sandbox, &parent);
    let config = sandbox.write(
        "executor.toml",
        &format!("[agent]\ncgroup_parent = \"{parent}\"\n"),
    );
    let mut agent = AgentUnderTest::start(&sandbox, &config, &[]);
    let port = free_port();
    let id = agent.submit_toml(&task_toml(
        "crashy",
        &server.url("guest.iso"),
        &md5_of(&guest.cooperative),
        port,
        "[restart]\nattempts = 1\ninterval_s = 600\ndelay_s = 1\nmode = \"fail\"\n",
    ));
    let first = pid_of(&agent.wait_state(&id, "ready", BOOT));
    kill(first, Signal::SIGKILL);

    // Restarted per its policy: a new qemu, ready again, the restart and
    // its cause in status.
    let restarted = wait_until(BOOT, || {
        let s = agent.status(&id);
        (s["state"] == "ready" && s["restart_count"] == 1).then_some(s)
    })
    .unwrap_or_else(|| panic!("never restarted: {:#}", agent.status(&id)));
    let second = pid_of(&restarted);
    assert_ne!(second, first);
    let cause = restarted["restarts"][0]["cause"].as_str().unwrap();
    assert!(cause.contains("killed by SIGKILL"), "{cause}");
    assert!(http_get(port, "/").is_some_and(|p| p.contains("test guest")));
    let metrics = agent.get("/metrics").unwrap().body;
    assert!(
        metrics
            .lines()
            .any(|l| l == "qemu_executor_restarts_total 1"),
        "{metrics}"
    );

    // The next crash comes while no agent runs. Its one attempt used, the
    // next agent reports how the VM ended, from the shim's record, and
    // fails the task.
    agent.run.child.signal(Signal::SIGKILL);
    wait_exit(&mut agent);
    kill(second, Signal::SIGKILL);
    wait_until(Duration::from_secs(10), || {
        (!std::path::Path::new(&format!("/proc/{second}/cmdline")).exists()
            || std::fs::read(format!("/proc/{second}/cmdline")).is_ok_and(|c| c.is_empty()))
        .then_some(())
    })
    .expect("qemu ends");
    let agent = AgentUnderTest::start(&sandbox, &config, &[]);
    let failed = agent.wait_state(&id, "failed", Duration::from_secs(60));
    let reason = failed["exit"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("1 restart attempts within 600s used up")
            && reason.contains("killed by SIGKILL")
            && reason.contains("while the agent was down"),
        "{reason}"
    );
    assert_eq!(failed["exit"]["while_agent_down"], true);
    assert_eq!(failed["restart_count"], 1);
    let left = reaper.vm_processes();
    assert!(left.is_empty(), "processes outlived the task: {left:?}");
    for cg in failed["cgroups"].as_array().unwrap() {
        assert!(
            !std::path::Path::new(cg.as_str().unwrap()).exists(),
            "{cg} outlived the task"
        );
    }
}

#[test]
fn an_agent_without_root_says_which_isolation_it_cannot_apply_and_runs_its_vm_without() {
    let sandbox = Sandbox::new();
    let parent = cgroup_parent("unprivileged");
    let _reaper = Reaper::new(&sandbox, &parent);
    let user = test_user();
    let config = sandbox.write(
        "executor.toml",
        &format!("[agent]\nuser = \"{user}\"\ncgroup_parent = \"{parent}\"\n"),
    );
    // The agent's user owns its state; the sandbox is reachable for it.
    std::fs::set_permissions(sandbox.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let status = Command::new("chown")
        .args([&format!("{user}:{user}"), sandbox.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut agent = AgentUnderTest::start_as(&sandbox, &config, &[], Some(user));
    let health = agent.get("/v1/health").unwrap().json();
    let isolation = &health["isolation"];
    for mechanism in ["cgroup", "user", "chroot", "mount_namespace"] {
        assert_eq!(
            isolation[mechanism]["active"], false,
            "{mechanism}: {health:#}"
        );
        let why = isolation[mechanism]["detail"].as_str().unwrap();
        assert!(
            why.contains("the agent does not run as root"),
            "{mechanism}: {why}"
        );
    }
    assert!(
        isolation["user"]["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("cannot switch qemu to \"{user}\"")),
        "{health:#}"
    );
    // qemu's own seccomp sandbox needs no privilege, and stays whole.
    assert_eq!(isolation["sandbox"]["active"], true);
    assert!(
        isolation["sandbox"]["detail"]
            .as_str()
            .unwrap()
            .contains("elevateprivileges=deny")
    );
    let stderr = agent.run.stderr();
    assert!(
        stderr.contains("isolation unavailable") && stderr.contains("mechanism=cgroup"),
        "{stderr}"
    );

    // ... and carries on without them: its VM runs as the agent's user,
    // answers, and stops gracefully.
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let port = free_port();
    let id = agent.submit_toml(&task_toml(
        "plain",
        &server.url("guest.iso"),
        &md5_of(&guest.cooperative),
        port,
        "",
    ));
    let status = agent.wait_state(&id, "ready", BOOT);
    assert!(http_get(port, "/").is_some_and(|p| p.contains("test guest")));
    assert_eq!(status["isolation"]["cgroup"]["active"], false);
    assert!(status["cgroups"].as_array().unwrap().is_empty());
    let pid = pid_of(&status);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        std::path::PathBuf::from("/"),
        "no chroot without root"
    );
    let stopped = agent.post(
        &format!("/v1/tasks/{id}/stop?wait=true"),
        "application/json",
        b"{\"timeout_s\": 60}",
    );
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    assert_eq!(
        stopped.json()["exit"]["reason"],
        "stopped: the guest powered off on the ACPI power button"
    );
    agent.run.child.signal(Signal::SIGTERM);
    assert_eq!(wait_exit(&mut agent), 0, "{}", agent.run.stderr());
}
