//! Tasks through `qemu-executor nomad-plugin`, driven as a Nomad client
//! drives them: the test guest under TCG, fetched over HTTP, its port
//! forwarded as Nomad allocated it, its console in logmon's FIFO; the
//! plugin killed the Nomad way while the VM runs on, and a fresh plugin
//! recovering the task from its handle alone.

use std::collections::BTreeSet;
use std::time::Duration;

use nomad_proto::driver::driver_capabilities::{FsIsolation, MountConfigs};
use nomad_proto::driver::memory_usage::Fields as MemoryFields;
use nomad_proto::driver::network_isolation_spec::NetworkIsolationMode;
use nomad_proto::driver::{
    CapabilitiesRequest, RecoverTaskRequest, TaskConfigSchemaRequest, TaskState, WaitTaskRequest,
};
use qemu_executor_tests::agent::{BOOT, POWER_OFF_LINE};
use qemu_executor_tests::executor::{free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::nomad::calls::{
    annotation, destroy_task, events_of, inline_policy, inspect, is_go_zero_time, open_events,
    open_fingerprint, open_stats, stage, start_task, stop_task, stop_wait_destroy, wait_http,
    wait_task,
};
use qemu_executor_tests::nomad::cty::{
    TASK_ATTRIBUTES, TASK_SCHEMA, Value, plugin_config, task_config,
};
use qemu_executor_tests::nomad::schema::object_attributes;
use qemu_executor_tests::nomad::status::expect_error;
use qemu_executor_tests::nomad::{End, NomadEnv};
use qemu_executor_tests::policy_wasm;
use tonic::Code;

/// What the guest serves on 8080 and prints on its console when up.
const GUEST_PAGE: &str = "qemu-executor test guest";
const GUEST_READY: &str = "qe-guest: ready";
const NOT_FOUND: &str = "task not found for given id";

fn names<'a>(it: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    it.into_iter().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_wait_stop_recover() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let env = NomadEnv::new(
        "nomad-main",
        &format!(
            "[[policy]]\nmodule = \"{}\"\n",
            policy_wasm("accel-fallback").display()
        ),
    );
    let plugin_cfg = plugin_config(
        [],
        vec![inline_policy("port-range", r#"{"min":1024,"max":65535}"#)],
    )
    .encode();

    // Plugin A: the driver manager's sequence.
    let mut a = env.start_configured(plugin_cfg.clone()).await;
    let fingerprints = open_fingerprint(&a).await;
    let events = open_events(&a).await;

    // Per task: schema, capabilities, start.
    let spec = a
        .driver()
        .task_config_schema(TaskConfigSchemaRequest {})
        .await
        .expect("TaskConfigSchema")
        .into_inner()
        .spec
        .expect("a schema");
    let attrs = object_attributes(&spec).unwrap_or_else(|e| panic!("{e}: {spec:?}"));
    assert_eq!(
        names(attrs.keys().map(String::as_str)),
        names(TASK_ATTRIBUTES)
    );
    for (key, ty) in TASK_SCHEMA {
        assert_eq!(attrs[key].type_expr(), ty, "{key}");
    }
    let caps = a
        .driver()
        .capabilities(CapabilitiesRequest {})
        .await
        .expect("Capabilities")
        .into_inner()
        .capabilities
        .expect("capabilities");
    assert!(!caps.send_signals && !caps.exec, "{caps:?}");
    assert_eq!(caps.fs_isolation(), FsIsolation::None);
    assert_eq!(
        caps.network_isolation_modes,
        [NetworkIsolationMode::Host as i32]
    );
    assert!(!caps.must_create_network);
    assert_eq!(caps.mount_configs(), MountConfigs::NoMounts);

    let alloc = env.alloc("web");
    let port = free_port();
    let config = task_config([
        ("image_source", Value::from(server.url("guest.iso"))),
        ("checksum", Value::from(md5_of(&guest.cooperative))),
        ("accelerator", Value::from("tcg")),
        ("ready_check", Value::from("http")),
        ("ready_timeout_s", Value::Int(280)),
    ]);
    let task = alloc
        .task_config(config.encode())
        .memory_mb(256)
        .port("http", port, 8080)
        .build();
    let started = start_task(&a, &task)
        .await
        .unwrap_or_else(|e| panic!("StartTask: {e}"));
    let handle = started.handle.expect("a task handle");
    assert_eq!(handle.version, 1);
    assert_eq!(handle.state(), TaskState::Running);
    assert!(!handle.driver_state.is_empty(), "empty driver_state");
    assert_eq!(
        handle.config.as_ref(),
        Some(&task),
        "the handle holds the task config"
    );

    // The ready check's event says the guest answered: one GET at once
    // must then get an answer through the port Nomad allocated.
    let ready = events
        .wait_for(BOOT, |e| e.task_id == task.id && stage(e) == "ready")
        .await
        .unwrap_or_else(|| panic!("no ready event: {:#?}", events_of(&events, &task.id)));
    assert!(ready.timestamp.is_some(), "{ready:?}");
    let page = tokio::task::spawn_blocking(move || http_get(port, "/"))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("ready event, but the guest does not answer: {ready:?}"));
    assert!(page.contains(GUEST_PAGE), "{page}");
    let page = wait_http(port, BOOT)
        .await
        .unwrap_or_else(|| panic!("the guest never answered on {port}"));
    assert!(page.contains(GUEST_PAGE), "{page}");
    assert!(
        alloc
            .stdout
            .wait_for(GUEST_READY, Duration::from_secs(60))
            .await,
        "the serial console never reached the stdout FIFO: {:?}",
        alloc.stdout.contents()
    );

    let status = inspect(&a, &task.id).await.expect("InspectTask");
    let task_status = status.task.clone().expect("a task status");
    assert_eq!(task_status.id, task.id);
    assert_eq!(task_status.name, "web");
    assert_eq!(task_status.state(), TaskState::Running);
    let started_at = task_status.started_at.expect("started_at");
    assert!(started_at.seconds > 0, "{started_at:?}");
    let completed_at = task_status.completed_at.expect("completed_at");
    assert!(is_go_zero_time(&completed_at), "{completed_at:?}");
    let pid = status.driver.expect("driver status").attributes["pid"].clone();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("qemu alive");
    assert!(
        String::from_utf8_lossy(&cmdline).contains("qemu-system"),
        "pid {pid} is no qemu"
    );

    // What the task went through, as events.
    let task_events = events_of(&events, &task.id);
    for e in &task_events {
        assert!(e.timestamp.is_some(), "no timestamp: {e:?}");
        assert_eq!(e.alloc_id, alloc.alloc_id, "{e:?}");
        assert_eq!(e.task_name, "web", "{e:?}");
        assert!(!stage(e).is_empty(), "no stage: {e:?}");
    }
    let policies: Vec<(&str, &str)> = task_events
        .iter()
        .filter(|e| stage(e) == "policy")
        .map(|e| {
            (
                annotation(e, "policy").unwrap_or(""),
                annotation(e, "decision").unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        policies,
        [("accel-fallback", "accept"), ("port-range", "accept")],
        "the config file's policy, then the inline one: {task_events:#?}"
    );
    let position = |s: &str| task_events.iter().position(|e| stage(e) == s);
    let last_fetch = task_events
        .iter()
        .rev()
        .find(|e| stage(e) == "fetch")
        .unwrap_or_else(|| panic!("no fetch event: {task_events:#?}"));
    assert_eq!(annotation(last_fetch, "cache_hit"), Some("false"));
    assert!(annotation(last_fetch, "bytes").is_some(), "{last_fetch:?}");
    let started_event = task_events
        .iter()
        .find(|e| stage(e) == "started")
        .unwrap_or_else(|| panic!("no started event: {task_events:#?}"));
    assert_eq!(annotation(started_event, "pid"), Some(pid.as_str()));
    let accel = task_events
        .iter()
        .find(|e| stage(e) == "accelerator")
        .unwrap_or_else(|| panic!("no accelerator event: {task_events:#?}"));
    assert_eq!(annotation(accel, "used"), Some("tcg"), "{accel:?}");
    assert!(
        position("policy") < position("fetch") && position("fetch") < position("started"),
        "policies, then the fetch, then the start: {task_events:#?}"
    );

    // Resource usage, as the client's stats hook collects it.
    let stats = open_stats(&a, &task.id, Duration::from_secs(1))
        .await
        .expect("TaskStats");
    let samples = stats.wait_count(2, Duration::from_secs(30)).await;
    assert!(samples.len() >= 2, "{samples:?}, end {:?}", stats.end());
    for s in &samples {
        let s = s.stats.as_ref().expect("stats");
        assert!(s.timestamp.is_some(), "{s:?}");
        let usage = s.agg_resource_usage.as_ref().expect("aggregate usage");
        let memory = usage.memory.as_ref().expect("memory usage");
        assert!(memory.rss > 0, "{s:?}");
        assert!(
            memory.measured_fields.contains(&(MemoryFields::Rss as i32)),
            "{s:?}"
        );
        let cpu = usage.cpu.as_ref().expect("cpu usage");
        assert!(!cpu.measured_fields.is_empty(), "{s:?}");
        assert!(s.resource_usage_by_pid.contains_key(&pid), "{s:?}");
    }
    drop(stats);
    assert!(
        fingerprints.end().is_none() && events.end().is_none(),
        "a long-lived stream ended: {:?} {:?}",
        fingerprints.end(),
        events.end()
    );

    // The agent stops: the plugin goes, the VM stays.
    drop((fingerprints, events));
    a.kill_cleanly().await;
    let page = wait_http(port, Duration::from_secs(30)).await;
    assert!(
        page.is_some_and(|p| p.contains(GUEST_PAGE)),
        "the VM did not outlive its plugin"
    );

    // Plugin B: the agent restarts and recovers the task from its handle.
    let mut b = env.start_configured(plugin_cfg).await;
    let _events = open_events(&b).await;
    let recover = RecoverTaskRequest {
        task_id: String::new(),
        handle: Some(handle),
    };
    b.driver()
        .recover_task(recover.clone())
        .await
        .expect("RecoverTask with the handle only");
    b.driver()
        .recover_task(recover)
        .await
        .expect("RecoverTask of a task already known");
    let again = inspect(&b, &task.id).await.expect("InspectTask");
    let again_status = again.task.expect("a task status");
    assert_eq!(again_status.state(), TaskState::Running);
    assert_eq!(again_status.started_at, Some(started_at));
    assert_eq!(again.driver.expect("driver").attributes["pid"], pid);

    let stats = open_stats(&b, &task.id, Duration::from_secs(1))
        .await
        .expect("TaskStats of a recovered task");
    let mut waiter = b.driver();
    let wait_id = task.id.clone();
    let wait =
        tokio::spawn(async move { waiter.wait_task(WaitTaskRequest { task_id: wait_id }).await });
    // Nomad's task runner waits from the start: the call blocks while the
    // VM runs (half a second shows it was not answered at once).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!wait.is_finished(), "WaitTask returned while the VM runs");
    stop_task(&b, &task.id, Duration::from_secs(30), "")
        .await
        .expect("StopTask");
    let exit = tokio::time::timeout(Duration::from_secs(60), wait)
        .await
        .expect("WaitTask returns once the VM stopped")
        .expect("wait task")
        .expect("WaitTask")
        .into_inner();
    assert_eq!(exit.err, "");
    let result = exit.result.expect("an exit result");
    assert_eq!((result.exit_code, result.signal), (0, 0), "{result:?}");
    let repeat = wait_task(&b, &task.id, Duration::from_secs(10))
        .await
        .expect("WaitTask after the end");
    assert_eq!(repeat.result, Some(result));
    assert!(
        matches!(
            stats.wait_end(Duration::from_secs(10)).await,
            Some(End::Eof)
        ),
        "TaskStats ends when the task exits: {:?}, {} samples",
        stats.end(),
        stats.items().len()
    );
    assert!(
        alloc
            .stdout
            .wait_for(POWER_OFF_LINE, Duration::from_secs(30))
            .await,
        "no power-off line in the stdout FIFO: {:?}",
        alloc.stdout.contents()
    );
    let ended = inspect(&b, &task.id)
        .await
        .expect("InspectTask")
        .task
        .unwrap();
    assert_eq!(ended.state(), TaskState::Exited);
    let completed = ended.completed_at.expect("completed_at");
    assert!(completed.seconds >= started_at.seconds, "{completed:?}");
    assert_eq!(ended.result, Some(result), "InspectTask's exit result");

    destroy_task(&b, &task.id, false)
        .await
        .expect("DestroyTask of an exited task");
    expect_error(
        "InspectTask after DestroyTask",
        inspect(&b, &task.id).await,
        Code::NotFound,
        &[NOT_FOUND],
    );
    env.assert_no_vm();
    b.kill_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_map_logs_without_a_plugin_and_quit() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let env = NomadEnv::new("nomad-portmap", "");
    let config = plugin_config([], vec![]).encode();
    let mut a = env.start_configured(config.clone()).await;

    // Two group ports; port_map forwards "web" alone, to the guest's 8081
    // whatever its `to` says.
    let alloc = env.alloc("mapped");
    let (web, admin) = (free_port(), free_port());
    let task_cfg = task_config([
        ("image_source", Value::from(server.url("guest.iso"))),
        ("checksum", Value::from(md5_of(&guest.cooperative))),
        ("accelerator", Value::from("tcg")),
        (
            "port_map",
            Value::List(vec![Value::map([("web", Value::Int(8081))])]),
        ),
        ("graceful_shutdown", Value::Bool(false)),
    ]);
    let task = alloc
        .task_config(task_cfg.encode())
        .port("web", web, 8080)
        .port("admin", admin, 0)
        .build();
    let handle = start_task(&a, &task)
        .await
        .unwrap_or_else(|e| panic!("StartTask: {e}"))
        .handle
        .expect("a handle");

    // The plugin goes at once: the guest boots with no plugin running, and
    // its console still reaches the FIFO (the VM's shim writes it).
    a.kill_cleanly().await;
    let page = wait_http(web, BOOT)
        .await
        .unwrap_or_else(|| panic!("the guest never answered on {web}"));
    assert!(page.contains("second port"), "web goes to 8081: {page}");
    let refused = std::net::TcpStream::connect(("127.0.0.1", admin))
        .map(|_| ())
        .map_err(|e| e.kind());
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "admin is not in port_map, so nothing may listen on {admin}"
    );
    assert!(
        alloc
            .stdout
            .wait_for(GUEST_READY, Duration::from_secs(60))
            .await,
        "the console stopped with the plugin: {:?}",
        alloc.stdout.contents()
    );

    let mut plugin = env.start_configured(config).await;
    plugin
        .driver()
        .recover_task(RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(handle),
        })
        .await
        .expect("RecoverTask");

    // graceful_shutdown = false: StopTask quits qemu, no power button.
    let result = stop_wait_destroy(&plugin, &task.id, Duration::from_secs(30)).await;
    assert_eq!((result.exit_code, result.signal), (0, 0), "{result:?}");
    assert!(
        !alloc.stdout.contents().contains(POWER_OFF_LINE),
        "the power button was pressed: {}",
        alloc.stdout.contents()
    );
    env.assert_no_vm();
    plugin.kill_cleanly().await;
}

/// This host's KVM answers ioctls but fails real guests. A task asking for
/// kvm is relaunched under tcg after Nomad got its handle, so the handle
/// names a qemu that is gone; a fresh plugin must still find the VM that
/// runs. Where KVM works, or is absent, there is no relaunch and the
/// recovery is checked all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_fallback_after_the_handle_and_recovery_finds_the_relaunched_vm() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let env = NomadEnv::new("nomad-kvm", "");
    let config = plugin_config([], vec![]).encode();
    let mut a = env.start_configured(config.clone()).await;
    let events = open_events(&a).await;
    let alloc = env.alloc("kvm");
    let port = free_port();
    let task = alloc
        .task_config(
            task_config([
                ("image_source", Value::from(server.url("guest.iso"))),
                ("checksum", Value::from(md5_of(&guest.cooperative))),
                ("accelerator", Value::from("kvm")),
            ])
            .encode(),
        )
        .port("http", port, 8080)
        .build();
    let handle = start_task(&a, &task)
        .await
        .unwrap_or_else(|e| panic!("StartTask: {e}"))
        .handle
        .expect("a handle");
    let page = wait_http(port, BOOT).await.unwrap_or_else(|| {
        panic!(
            "the guest never answered: {:#?}",
            events_of(&events, &task.id)
        )
    });
    assert!(page.contains(GUEST_PAGE), "{page}");

    let mine = events_of(&events, &task.id);
    let starts: Vec<_> = mine.iter().filter(|e| stage(e) == "started").collect();
    let fell_back = mine.iter().any(|e| stage(e) == "kvm-fallback");
    let running = starts.last().expect("a started event");
    let pid = annotation(running, "pid").expect("pid").to_string();
    if fell_back {
        assert_eq!(starts.len(), 2, "{mine:#?}");
        assert_eq!(annotation(starts[0], "accelerator"), Some("kvm"));
        assert_eq!(annotation(running, "accelerator"), Some("tcg"));
        assert_ne!(annotation(starts[0], "pid"), Some(pid.as_str()));
    } else {
        eprintln!(
            "no KVM fallback on this host (KVM works or is absent): {:?}",
            mine.iter().map(stage).collect::<Vec<_>>()
        );
        assert_eq!(starts.len(), 1, "{mine:#?}");
    }

    drop(events);
    a.kill_cleanly().await;
    let mut b = env.start_configured(config).await;
    b.driver()
        .recover_task(RecoverTaskRequest {
            task_id: String::new(),
            handle: Some(handle),
        })
        .await
        .expect("RecoverTask with the handle from before the relaunch");
    let status = inspect(&b, &task.id).await.expect("InspectTask");
    assert_eq!(
        status.task.expect("a task status").state(),
        TaskState::Running
    );
    let driver = status.driver.expect("driver attributes");
    assert_eq!(
        driver.attributes["pid"], pid,
        "the recovered VM is the running one"
    );
    assert_eq!(
        Some(driver.attributes["accelerator"].as_str()),
        annotation(running, "accelerator")
    );
    let result = stop_wait_destroy(&b, &task.id, Duration::from_secs(30)).await;
    assert_eq!((result.exit_code, result.signal), (0, 0), "{result:?}");
    env.assert_no_vm();
    b.kill_cleanly().await;
}
