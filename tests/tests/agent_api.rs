//! `qemu-executor agent`'s API end to end: bad requests, the socket's
//! permissions, the client verbs, and an agent without root that says what
//! isolation it lacks.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use qemu_executor_tests::agent::{
    AgentUnderTest, BOOT, Reaper, cgroup_parent, pid_of, request, task_toml, test_user, wait_exit,
};
use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;

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
