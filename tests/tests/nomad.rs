//! `qemu-executor nomad-plugin` driven the way a Nomad client drives a
//! task-driver plugin (see `qemu_executor_tests::nomad`): launched with
//! go-plugin's handshake, configured with cty-encoded msgpack, running the
//! test guest under TCG with its port forwarded as Nomad allocated it,
//! surviving the plugin's death and recovered by a fresh plugin from the
//! task handle alone. Checked against /work/nomad/CONTRACT.md and the
//! published protocol, not against a running Nomad (none can run here).

use std::collections::BTreeSet;
use std::time::Duration;

use nomad_proto::base::{ConfigSchemaRequest, PluginInfoRequest, PluginType};
use nomad_proto::driver::driver_capabilities::{FsIsolation, MountConfigs};
use nomad_proto::driver::exec_task_streaming_request::Setup;
use nomad_proto::driver::fingerprint_response::HealthState;
use nomad_proto::driver::memory_usage::Fields as MemoryFields;
use nomad_proto::driver::network_isolation_spec::NetworkIsolationMode;
use nomad_proto::driver::{
    CapabilitiesRequest, CreateNetworkRequest, DestroyNetworkRequest, DestroyTaskRequest,
    ExecTaskRequest, ExecTaskStreamingRequest, InitRequest, RecoverTaskRequest, ShutdownRequest,
    SignalTaskRequest, StopTaskRequest, TaskConfigSchemaRequest, TaskState, TaskStatsRequest,
    WaitTaskRequest,
};
use nomad_proto::structs::attribute::Value as AttrValue;
use qemu_executor_tests::agent::{BOOT, POWER_OFF_LINE};
use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::nomad::calls::{
    annotation, events_of, inspect, is_go_zero_time, nomad_config, open_events, open_fingerprint,
    open_stats, qemu_version, set_config, stage, start_task, stream_error, string_attr, wait_http,
};
use qemu_executor_tests::nomad::cty::{
    PLUGIN_ATTRIBUTES, POLICY_ATTRIBUTES, TASK_ATTRIBUTES, Value, plugin_config, policy_block,
    task_config,
};
use qemu_executor_tests::nomad::schema::{Attribute, object_attributes};
use qemu_executor_tests::nomad::status::{expect_code, expect_error, recoverable};
use qemu_executor_tests::nomad::{End, NomadEnv, PluginUnderTest, plugin_command};
use qemu_executor_tests::policy_wasm;
use qemu_executor_tests::proc::GroupChild;
use tonic::Code;

/// What the guest serves on 8080 and prints on its console when up.
const GUEST_PAGE: &str = "qemu-executor test guest";
const GUEST_READY: &str = "qe-guest: ready";
const NOT_FOUND: &str = "task not found for given id";

/// The task schema's attributes and types, from the contract.
const TASK_TYPES: [(&str, &str); 16] = [
    ("image_source", "string"),
    ("image_path", "string"),
    ("checksum", "string"),
    ("accelerator", "string"),
    ("kvm_fallback", "bool"),
    ("host_port", "number"),
    ("guest_port", "number"),
    ("port_map", "list(map(number))"),
    ("graceful_shutdown", "bool"),
    ("args", "list(string)"),
    ("machine_type", "string"),
    ("drive_interface", "string"),
    ("ready_serial", "string"),
    ("ready_timeout_s", "number"),
    ("ready_check", "string"),
    ("emulator", "string"),
];

fn names<'a>(it: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    it.into_iter().map(str::to_string).collect()
}

/// An inline `policy {}` block for a shipped policy with JSON settings.
fn inline_policy(crate_name: &str, settings: &str) -> Value {
    policy_block([
        (
            "module",
            Value::from(policy_wasm(crate_name).display().to_string()),
        ),
        ("settings", Value::from(settings)),
    ])
}

/// The task config of the test guest fetched from `url` under TCG.
fn guest_task(url: &str, checksum: &str) -> Vec<u8> {
    task_config([
        ("image_source", Value::from(url)),
        ("checksum", Value::from(checksum)),
        ("accelerator", Value::from("tcg")),
    ])
    .encode()
}

/// qemu's command line, from /proc.
fn qemu_argv(pid: &str) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_else(|e| panic!("qemu {pid} is gone: {e}"));
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The value after `flag` in `argv`.
fn option<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    let i = argv.iter().position(|a| a == flag)?;
    argv.get(i + 1).map(String::as_str)
}

/// Kills `plugin` the Nomad way and checks it went by itself, cleanly,
/// having logged only hclog JSON.
async fn kill_cleanly(plugin: &mut PluginUnderTest) {
    let killed = plugin.kill().await;
    assert!(
        killed.by_itself,
        "the plugin needed SIGKILL after the controller's Shutdown ({:?})",
        killed.shutdown_call
    );
    assert_eq!(killed.status.code(), Some(0), "{killed:?}");
    // A Go plugin's listener unlinks its socket on the way out.
    assert!(
        !plugin.socket.exists(),
        "the plugin left its socket behind: {}",
        plugin.socket.display()
    );
    plugin.assert_stderr_is_hclog();
}

#[test]
fn refuses_to_start_without_nomad() {
    let sandbox = Sandbox::new();
    for cookie in [None, Some("not-the-cookie")] {
        let mut cmd = plugin_command(&sandbox, None, false);
        if let Some(value) = cookie {
            cmd.env(nomad_proto::handshake::MAGIC_COOKIE_KEY, value);
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let out = GroupChild::spawn(cmd)
            .expect("spawn")
            .wait_with_output()
            .expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "cookie {cookie:?}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "cookie {cookie:?}: stdout {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(stderr.contains("Nomad"), "cookie {cookie:?}: {stderr}");
        // For a person, not a log collector.
        assert!(!stderr.trim_start().starts_with('{'), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_and_plugin_info() {
    let env = NomadEnv::new("nomad-info", "");
    let port_range = inline_policy("port-range", r#"{"min":1024,"max":65535}"#);

    // Agent start: the loader fingerprints the plugin, then kills it.
    let mut plugin = env.start_plugin().await;
    let health = plugin
        .health()
        .check(tonic_health::pb::HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .expect("health Check")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let info = plugin
        .base()
        .plugin_info(PluginInfoRequest {})
        .await
        .expect("PluginInfo")
        .into_inner();
    assert_eq!(info.r#type(), PluginType::Driver);
    assert_eq!(info.plugin_api_versions, ["v0.1.0"]);
    assert_eq!(info.plugin_version, "0.1.0");
    assert_eq!(info.name, "qemu-executor");
    let spec = plugin
        .base()
        .config_schema(ConfigSchemaRequest {})
        .await
        .expect("ConfigSchema")
        .into_inner()
        .spec
        .expect("a schema");
    let attrs = object_attributes(&spec).unwrap_or_else(|e| panic!("{e}: {spec:?}"));
    assert_eq!(
        names(attrs.keys().map(String::as_str)),
        names(PLUGIN_ATTRIBUTES)
    );
    for key in ["config", "state_dir", "cache_dir"] {
        assert_eq!(attrs[key].type_expr(), "string", "{key}");
    }
    assert_eq!(attrs["fingerprint_period_s"].type_expr(), "number");
    if let Attribute::Attr {
        default: Some(default),
        ..
    } = &attrs["fingerprint_period_s"]
    {
        assert_eq!(default, "30");
    }
    let Attribute::Blocks { nested, .. } = &attrs["policy"] else {
        panic!("policy is not a block list: {:?}", attrs["policy"]);
    };
    assert_eq!(
        names(nested.keys().map(String::as_str)),
        names(POLICY_ATTRIBUTES)
    );
    assert!(
        matches!(&nested["module"], Attribute::Attr { type_expr, required: true, .. } if type_expr == "string"),
        "{:?}",
        nested["module"]
    );
    for (key, ty) in [
        ("sha256", "string"),
        ("settings", "string"),
        ("time_ms", "number"),
        ("memory_mb", "number"),
    ] {
        assert_eq!(nested[key].type_expr(), ty, "policy.{key}");
    }
    kill_cleanly(&mut plugin).await;

    // Config validation: SetConfig twice without the agent's config.
    let mut plugin = env.start_plugin().await;
    let config = plugin_config([], vec![port_range.clone()]).encode();
    for pass in 1..=2 {
        set_config(&plugin, config.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("SetConfig pass {pass}: {e}"));
    }
    set_config(&plugin, Vec::new(), None)
        .await
        .expect("SetConfig with no config at all (all defaults)");
    expect_code(
        "SetConfig of bytes that are no msgpack",
        set_config(&plugin, vec![0xc1], None).await,
        Code::InvalidArgument,
    );
    let unknown = plugin_config([], vec![]).with("bogus_setting", Value::Int(1));
    expect_error(
        "SetConfig with an unknown key",
        set_config(&plugin, unknown.encode(), None).await,
        Code::InvalidArgument,
        &["bogus_setting"],
    );
    let missing = policy_block([("module", Value::from("/nonexistent/missing.wasm"))]);
    expect_error(
        "SetConfig with a policy module that does not exist",
        set_config(&plugin, plugin_config([], vec![missing]).encode(), None).await,
        Code::InvalidArgument,
        &["/nonexistent/missing.wasm"],
    );
    kill_cleanly(&mut plugin).await;

    // The driver manager: config with the agent's settings, Init, then the
    // fingerprint stream for the plugin's lifetime.
    let mut plugin = env.start_plugin().await;
    let config = plugin_config([("fingerprint_period_s", Value::Int(1))], vec![port_range]);
    set_config(&plugin, config.encode(), Some(nomad_config()))
        .await
        .expect("SetConfig");
    plugin.driver().init(InitRequest {}).await.expect("Init");
    let fingerprints = open_fingerprint(&plugin).await;
    let first = fingerprints
        .wait_for(Duration::from_secs(10), |_| true)
        .await
        .unwrap_or_else(|| panic!("no fingerprint within 10 s: {:?}", fingerprints.end()));
    assert_eq!(first.health(), HealthState::Healthy, "{first:?}");
    assert_eq!(first.health_description, "Healthy");
    assert_eq!(first.err, "");
    let attr = |key: &str| {
        first.attributes[key]
            .value
            .clone()
            .unwrap_or_else(|| panic!("{key} has no value"))
    };
    assert_eq!(attr("driver.qemu"), AttrValue::BoolVal(true));
    assert_eq!(
        string_attr(&first, "driver.qemu.version"),
        Some(qemu_version().as_str())
    );
    let emulators = string_attr(&first, "driver.qemu.emulators").expect("emulators");
    assert!(emulators.split(',').any(|e| e == "x86_64"), "{emulators}");
    assert_eq!(
        string_attr(&first, "driver.qemu-executor.version"),
        Some("0.1.0")
    );
    let accelerators = string_attr(&first, "driver.qemu-executor.accelerators").expect("accels");
    assert!(
        accelerators.split(',').any(|a| a == "tcg"),
        "{accelerators}"
    );
    let kvm = string_attr(&first, "driver.qemu-executor.kvm").expect("kvm");
    assert!(
        ["usable", "unavailable", "broken"]
            .iter()
            .any(|p| kvm.starts_with(p)),
        "{kvm}"
    );
    assert_eq!(
        attr("driver.qemu-executor.policies"),
        AttrValue::IntVal(1),
        "one inline policy, none in the config file"
    );
    let two = fingerprints.wait_count(2, Duration::from_secs(10)).await;
    assert!(
        two.len() >= 2,
        "no second fingerprint with fingerprint_period_s = 1: {two:?}, end {:?}",
        fingerprints.end()
    );
    assert_eq!(two[1].health(), HealthState::Healthy);

    // Agent shutdown: the driver's Shutdown, then the controller's.
    plugin
        .driver()
        .shutdown(ShutdownRequest {})
        .await
        .expect("Driver.Shutdown");
    kill_cleanly(&mut plugin).await;
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
    let mut a = env.start_plugin().await;
    set_config(&a, plugin_cfg.clone(), Some(nomad_config()))
        .await
        .expect("SetConfig");
    a.driver().init(InitRequest {}).await.expect("Init");
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
    for (key, ty) in TASK_TYPES {
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
    kill_cleanly(&mut a).await;
    let page = wait_http(port, Duration::from_secs(30)).await;
    assert!(
        page.is_some_and(|p| p.contains(GUEST_PAGE)),
        "the VM did not outlive its plugin"
    );

    // Plugin B: the agent restarts and recovers the task from its handle.
    let mut b = env.start_plugin().await;
    set_config(&b, plugin_cfg, Some(nomad_config()))
        .await
        .expect("SetConfig");
    b.driver().init(InitRequest {}).await.expect("Init");
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
    b.driver()
        .stop_task(StopTaskRequest {
            task_id: task.id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 30,
                nanos: 0,
            }),
            signal: String::new(),
        })
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
    let repeat = tokio::time::timeout(
        Duration::from_secs(10),
        b.driver().wait_task(WaitTaskRequest {
            task_id: task.id.clone(),
        }),
    )
    .await
    .expect("WaitTask after the end returns at once")
    .expect("WaitTask")
    .into_inner();
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

    b.driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task.id.clone(),
            force: false,
        })
        .await
        .expect("DestroyTask of an exited task");
    expect_error(
        "InspectTask after DestroyTask",
        inspect(&b, &task.id).await,
        Code::NotFound,
        &[NOT_FOUND],
    );
    env.assert_no_vm();
    kill_cleanly(&mut b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_as_nomad_reads_them() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let env = NomadEnv::new(
        "nomad-errors",
        "[fetch]\nmax_attempts = 2\nretry_base_delay_ms = 100\n",
    );
    // Images from 127.0.0.1 over HTTP, or from the allocations' dirs.
    let allowlist = inline_policy(
        "image-allowlist",
        &serde_json::json!({
            "schemes": ["http", "file"],
            "hosts": ["127.0.0.1"],
            "prefixes": [format!("file://{}/allocs/", env.sandbox.path().display())],
            "algorithms": ["md5", "sha256"],
        })
        .to_string(),
    );
    let mut plugin = env.start_plugin().await;
    set_config(
        &plugin,
        plugin_config([], vec![allowlist]).encode(),
        Some(nomad_config()),
    )
    .await
    .expect("SetConfig");
    plugin.driver().init(InitRequest {}).await.expect("Init");
    let events = open_events(&plugin).await;
    let checksum = md5_of(&guest.cooperative);
    let url = server.url("guest.iso");

    // Unknown task ids.
    let ghost = format!(
        "{}/ghost/0123abcd",
        qemu_executor_tests::nomad::alloc::uuid()
    );
    let mut d = plugin.driver();
    let id = || ghost.clone();
    let not_found = [
        (
            "WaitTask",
            d.wait_task(WaitTaskRequest { task_id: id() })
                .await
                .map(|_| ()),
        ),
        ("InspectTask", inspect(&plugin, &ghost).await.map(|_| ())),
        (
            "StopTask",
            d.stop_task(StopTaskRequest {
                task_id: id(),
                timeout: None,
                signal: String::new(),
            })
            .await
            .map(|_| ()),
        ),
        (
            "DestroyTask",
            d.destroy_task(DestroyTaskRequest {
                task_id: id(),
                force: true,
            })
            .await
            .map(|_| ()),
        ),
        (
            "TaskStats",
            Err(stream_error(
                d.task_stats(TaskStatsRequest {
                    task_id: id(),
                    collection_interval: None,
                })
                .await,
            )
            .await),
        ),
    ];
    for (call, result) in not_found {
        expect_error(call, result, Code::NotFound, &[NOT_FOUND]);
    }

    // Malformed task configs: nothing may start.
    let alloc = env.alloc("bad");
    let start = |config: Vec<u8>| {
        alloc
            .task_config(config)
            .port("http", free_port(), 8080)
            .build()
    };
    let good = || {
        task_config([
            ("image_source", Value::from(url.as_str())),
            ("checksum", Value::from(checksum.as_str())),
            ("accelerator", Value::from("tcg")),
        ])
    };
    let malformed: [(&str, Vec<u8>, &[&str]); 5] = [
        ("bytes that are no msgpack", vec![0xc1], &[]),
        (
            "an unknown key",
            good().with("bogus_key", Value::Int(1)).encode(),
            &["bogus_key"],
        ),
        (
            "a string where a number belongs",
            good().with("ready_timeout_s", Value::from("soon")).encode(),
            &["ready_timeout_s"],
        ),
        (
            "neither image_source nor image_path",
            task_config([("accelerator", Value::from("tcg"))]).encode(),
            &["image_source"],
        ),
        (
            "both image_source and image_path",
            good()
                .with("image_path", Value::from("local/guest.iso"))
                .encode(),
            &["image_source", "image_path"],
        ),
    ];
    for (what, bytes, needles) in malformed {
        let task = start(bytes);
        expect_error(
            &format!("StartTask with {what}"),
            start_task(&plugin, &task).await,
            Code::InvalidArgument,
            needles,
        );
        assert!(
            !events_of(&events, &task.id)
                .iter()
                .any(|e| stage(e) == "started"),
            "{what}: a VM started"
        );
    }
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());

    // A policy rejection, before any download.
    let gets = server.body_requests();
    let elsewhere = url.replace("127.0.0.1", "localhost");
    let task = start(guest_task(&elsewhere, &checksum));
    expect_error(
        "StartTask rejected by image-allowlist",
        start_task(&plugin, &task).await,
        Code::PermissionDenied,
        &["image-allowlist", "not from an allowed host or prefix"],
    );
    let rejected = events
        .wait_for(Duration::from_secs(10), |e| {
            e.task_id == task.id && stage(e) == "policy"
        })
        .await
        .unwrap_or_else(|| panic!("no policy event for {}", task.id));
    assert_eq!(annotation(&rejected, "policy"), Some("image-allowlist"));
    assert_eq!(annotation(&rejected, "decision"), Some("reject"));
    assert!(rejected.timestamp.is_some());
    assert_eq!(server.body_requests(), gets, "fetched a rejected image");

    // A bad checksum: not recoverable, and nothing left in the cache.
    let wrong = format!("md5:{}", "0".repeat(32));
    let status = expect_error(
        "StartTask with a wrong checksum",
        start_task(&plugin, &start(guest_task(&url, &wrong))).await,
        Code::InvalidArgument,
        &["checksum"],
    );
    assert_eq!(recoverable(&status), None, "{status:?}");
    let cache = env.sandbox.cache_dir();
    for sub in ["images", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(cache.join(sub))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "cache {sub} after a bad checksum: {left:?}"
        );
    }

    // Connection refused: a retry could fix it, so Nomad may restart.
    let closed = format!("http://127.0.0.1:{}/guest.iso", free_port());
    let status = expect_code(
        "StartTask from a closed port",
        start_task(&plugin, &start(guest_task(&closed, &checksum))).await,
        Code::FailedPrecondition,
    );
    assert_eq!(
        recoverable(&status).map(|r| r.recoverable),
        Some(true),
        "{status:?}"
    );

    // A running task: unsupported calls, and destroy without force.
    let running = env.alloc("running");
    let task = running
        .task_config(guest_task(&url, &checksum))
        .memory_mb(320)
        .cpuset_cpus("0,1")
        .port("http", free_port(), 8080)
        .build();
    start_task(&plugin, &task)
        .await
        .unwrap_or_else(|e| panic!("StartTask: {e}"));
    // Memory and cores come from what Nomad allocated.
    let pid = inspect(&plugin, &task.id)
        .await
        .expect("InspectTask")
        .driver
        .expect("driver status")
        .attributes["pid"]
        .clone();
    let argv = qemu_argv(&pid);
    assert_eq!(option(&argv, "-m"), Some("320"), "{argv:?}");
    assert_eq!(option(&argv, "-smp"), Some("2"), "{argv:?}");
    let id = || task.id.clone();
    expect_code(
        "SignalTask",
        d.signal_task(SignalTaskRequest {
            task_id: id(),
            signal: "SIGHUP".into(),
        })
        .await,
        Code::Unimplemented,
    );
    expect_code(
        "ExecTask",
        d.exec_task(ExecTaskRequest {
            task_id: id(),
            command: vec!["/bin/true".into()],
            timeout: None,
        })
        .await,
        Code::Unimplemented,
    );
    let setup = ExecTaskStreamingRequest {
        setup: Some(Setup {
            task_id: id(),
            command: vec!["/bin/sh".into()],
            tty: false,
        }),
        ..Default::default()
    };
    let streaming = stream_error(d.exec_task_streaming(tokio_stream::iter([setup])).await).await;
    assert_eq!(streaming.code(), Code::Unimplemented, "{streaming:?}");
    expect_code(
        "CreateNetwork",
        d.create_network(CreateNetworkRequest {
            alloc_id: running.alloc_id.clone(),
            hostname: "running".into(),
        })
        .await,
        Code::Unimplemented,
    );
    expect_code(
        "DestroyNetwork",
        d.destroy_network(DestroyNetworkRequest {
            alloc_id: running.alloc_id.clone(),
            isolation_spec: None,
        })
        .await,
        Code::Unimplemented,
    );
    expect_code(
        "DestroyTask of a running task without force",
        d.destroy_task(DestroyTaskRequest {
            task_id: id(),
            force: false,
        })
        .await,
        Code::FailedPrecondition,
    );
    let still = inspect(&plugin, &task.id).await.expect("InspectTask");
    assert_eq!(still.task.unwrap().state(), TaskState::Running);
    // No ready check and no ready_serial: nothing may claim the guest is
    // ready (the forwarded port accepts connections long before it is).
    // Checked at the end, so that a failure here hides nothing else.
    let ready_without_check: Vec<_> = events_of(&events, &task.id)
        .into_iter()
        .filter(|e| stage(e) == "ready")
        .collect();
    d.destroy_task(DestroyTaskRequest {
        task_id: id(),
        force: true,
    })
    .await
    .expect("DestroyTask with force");
    expect_code(
        "InspectTask after a forced DestroyTask",
        inspect(&plugin, &task.id).await,
        Code::NotFound,
    );
    env.assert_no_vm();

    // An image Nomad's artifact stanza put in the task directory, of a
    // guest that ignores the power button: StopTask kills it at the
    // timeout, and WaitTask says so.
    let local = env.alloc("local");
    std::fs::copy(&guest.stubborn, local.task_dir().join("local/guest.iso")).unwrap();
    let task = local
        .task_config(
            task_config([
                ("image_path", Value::from("local/guest.iso")),
                ("accelerator", Value::from("tcg")),
            ])
            .encode(),
        )
        .port("http", free_port(), 8080)
        .build();
    let handle = start_task(&plugin, &task)
        .await
        .unwrap_or_else(|e| panic!("StartTask with image_path: {e}"))
        .handle
        .expect("a handle");
    assert_eq!(handle.state(), TaskState::Running);
    d.stop_task(StopTaskRequest {
        task_id: task.id.clone(),
        timeout: Some(prost_types::Duration {
            seconds: 2,
            nanos: 0,
        }),
        signal: "SIGINT".into(),
    })
    .await
    .expect("StopTask");
    let exit = tokio::time::timeout(
        Duration::from_secs(10),
        d.wait_task(WaitTaskRequest {
            task_id: task.id.clone(),
        }),
    )
    .await
    .expect("WaitTask after StopTask returns at once")
    .expect("WaitTask")
    .into_inner();
    assert_eq!(
        exit.result.as_ref().map(|r| r.signal),
        Some(9),
        "killed at the stop timeout: {exit:?}"
    );
    d.destroy_task(DestroyTaskRequest {
        task_id: task.id.clone(),
        force: false,
    })
    .await
    .expect("DestroyTask of a task killed at its stop timeout");
    env.assert_no_vm();

    kill_cleanly(&mut plugin).await;
    assert!(
        ready_without_check.is_empty(),
        "a ready event for a task without a ready check: {ready_without_check:#?}"
    );
}
