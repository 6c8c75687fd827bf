//! `qemu-executor agent` end to end with VMs: real qemu under TCG booting
//! the test guest served over HTTP, several at once, across restarts of
//! the agent and of the VMs.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use qemu_executor_tests::agent::{
    AgentUnderTest, BOOT, POWER_OFF_LINE, Reaper, cgroup_parent, kill, pid_of, serial_log,
    task_toml, test_user, wait_exit,
};
use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::policy_wasm;
use qemu_executor_tests::proc::wait_until;

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
    // The guest prints its marker after its web servers answer (it pings
    // its gateway first), so the console may lag the readiness a moment.
    let serial_path = format!("/v1/tasks/{}/logs?serial=true", ids[0]);
    let serial = wait_until(Duration::from_secs(60), || {
        let serial = agent.get(&serial_path).unwrap();
        serial.body.contains("qe-guest: ready").then_some(serial)
    });
    assert!(
        serial.is_some(),
        "{}",
        agent.get(&serial_path).unwrap().body
    );

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
