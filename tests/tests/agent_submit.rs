//! What a submit to the agent may not do: take a host port that a live
//! task holds, or start a second VM when a client repeats a submit with
//! its idempotency key. And a qemu that cannot forward its port is
//! reported with qemu's own words.

use std::time::Duration;

use qemu_executor_tests::agent::{
    AgentUnderTest, BOOT, Reaper, cgroup_parent, request_with, task_toml,
};
use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;

fn agent(sandbox: &Sandbox, test: &str) -> (AgentUnderTest, Reaper) {
    let parent = cgroup_parent(test);
    let reaper = Reaper::new(sandbox, &parent);
    let config = sandbox.write(
        "executor.toml",
        &format!("[agent]\ncgroup_parent = \"{parent}\"\n"),
    );
    (AgentUnderTest::start(sandbox, &config, &[]), reaper)
}

#[test]
fn a_host_port_has_one_owner_and_qemu_says_why_it_could_not_forward() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let (agent, _reaper) = agent(&sandbox, "ports");
    let (url, checksum) = (server.url("guest.iso"), md5_of(&guest.cooperative));
    let port = free_port();
    let first = agent.submit_toml(&task_toml("first", &url, &checksum, port, ""));
    agent.wait_state(&first, "ready", BOOT);

    let second = task_toml("second", &url, &checksum, port, "");
    let refused = agent.post("/v1/tasks", "application/toml", second.as_bytes());
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert!(
        refused.body.contains(&first) && refused.body.contains(&port.to_string()),
        "the answer names the task holding the port: {}",
        refused.body
    );
    assert!(http_get(port, "/").is_some_and(|p| p.contains("qemu-executor test guest")));

    // A port the agent cannot know is taken: qemu's own message says so.
    let outsider = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let taken = outsider.local_addr().unwrap().port();
    let blocked = agent.submit_toml(&task_toml(
        "blocked",
        &url,
        &checksum,
        taken,
        "[restart]\nattempts = 0\n",
    ));
    let failed = agent.wait_state(&blocked, "failed", BOOT);
    let reason = failed["exit"]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("host forwarding rule") && !reason.contains("Cannot talk to qemu over QMP"),
        "{failed:#}"
    );

    // Once the first task has ended, the port is free for another.
    let stopped = agent.post(
        &format!("/v1/tasks/{first}/stop?wait=1"),
        "application/json",
        b"",
    );
    assert_eq!(stopped.status, 200, "{}", stopped.body);
    let again = agent.submit_toml(&second);
    agent.wait_state(&again, "ready", BOOT);
    let stopped = agent.post(
        &format!("/v1/tasks/{again}/stop?wait=1"),
        "application/json",
        b"",
    );
    assert_eq!(stopped.status, 200, "{}", stopped.body);
}

#[test]
fn a_submit_repeated_with_its_idempotency_key_returns_the_first_task() {
    let sandbox = Sandbox::new();
    let server = FileServer::start(sandbox.path()).unwrap();
    let (agent, _reaper) = agent(&sandbox, "idempotent");
    // The image is missing: the task fails at its fetch, and no VM runs.
    let task = task_toml(
        "retried",
        &server.url("missing.iso"),
        &format!("md5:{}", "0".repeat(32)),
        free_port(),
        "[restart]\nattempts = 0\n",
    );
    let submit = |key: &str, body: &str| {
        request_with(
            &agent.socket,
            "POST",
            "/v1/tasks",
            &[("Idempotency-Key", key)],
            Some("application/toml"),
            body.as_bytes(),
        )
        .expect("POST /v1/tasks")
    };
    let created = submit("ci-run-41/vm-1", &task);
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let repeated = submit("ci-run-41/vm-1", &task);
    assert_eq!(repeated.status, 200, "{}", repeated.body);
    assert_eq!(repeated.json()["id"], id.as_str());
    agent.wait_state(&id, "failed", Duration::from_secs(60));
    let after_end = submit("ci-run-41/vm-1", &task);
    assert_eq!(after_end.json()["id"], id.as_str(), "{}", after_end.body);

    let other = task.replace("retried", "other");
    let reused = submit("ci-run-41/vm-1", &other);
    assert_eq!(reused.status, 409, "{}", reused.body);
    assert!(reused.body.contains(&id), "{}", reused.body);
    let bad = submit("two words", &task);
    assert_eq!(bad.status, 400, "{}", bad.body);

    let list = agent.get("/v1/tasks").unwrap().json();
    let named = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "retried")
        .count();
    assert_eq!(named, 1, "{list:#}");

    // The key survives a restart of the agent.
    drop(agent);
    let (agent, _reaper2) = self::agent(&sandbox, "idempotent2");
    let after_restart = request_with(
        &agent.socket,
        "POST",
        "/v1/tasks",
        &[("Idempotency-Key", "ci-run-41/vm-1")],
        Some("application/toml"),
        task.as_bytes(),
    )
    .unwrap();
    assert_eq!(after_restart.status, 200, "{}", after_restart.body);
    assert_eq!(after_restart.json()["id"], id.as_str());
}
