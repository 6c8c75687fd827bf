//! What `qemu-executor nomad-plugin` answers when a task cannot run, as a
//! Nomad client reads it: the gRPC code that decides what the task runner
//! does (`PermissionDenied` for a policy, `InvalidArgument` for a bad
//! config or checksum, `FailedPrecondition` with the recoverable detail
//! for what a restart could fix, `NotFound` for an unknown task), with a
//! message that names the cause; and the calls it does not support.

use std::time::Duration;

use nomad_proto::driver::DriverTaskEvent;
use nomad_proto::driver::exec_task_streaming_request::Setup;
use nomad_proto::driver::{
    CreateNetworkRequest, DestroyNetworkRequest, ExecTaskRequest, ExecTaskStreamingRequest,
    SignalTaskRequest, TaskState, TaskStatsRequest,
};
use qemu_executor_tests::executor::free_port;
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::nomad::alloc::uuid;
use qemu_executor_tests::nomad::calls::{
    annotation, argv_of, destroy_task, events_of, guest_task, inline_policy, inspect, open_events,
    option, qemu_pid, stage, start_task, stop_task, stream_error, wait_task,
};
use qemu_executor_tests::nomad::cty::{Value, plugin_config, task_config};
use qemu_executor_tests::nomad::status::{expect_code, expect_error, recoverable};
use qemu_executor_tests::nomad::{Collector, NomadEnv, PluginUnderTest};
use tonic::Code;

const NOT_FOUND: &str = "task not found for given id";

/// A plugin whose chain admits images from 127.0.0.1 over HTTP or from
/// the allocations' dirs, with the guest served and events followed.
/// Fields drop in order: the plugin before the sandbox's VMs and files.
struct World {
    events: Collector<DriverTaskEvent>,
    plugin: PluginUnderTest,
    env: NomadEnv,
    server: FileServer,
    url: String,
    checksum: String,
}

async fn world(name: &str) -> World {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    // Two quick tries: a refused connection fails in well under a second.
    let env = NomadEnv::new(
        name,
        "[fetch]\nmax_attempts = 2\nretry_base_delay_ms = 100\n",
    );
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
    let plugin = env
        .start_configured(plugin_config([], vec![allowlist]).encode())
        .await;
    let events = open_events(&plugin).await;
    World {
        events,
        plugin,
        env,
        url: server.url("guest.iso"),
        checksum: md5_of(&guest.cooperative),
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_before_any_vm() {
    let mut w = world("nomad-refusals").await;
    let (url, checksum) = (w.url.clone(), w.checksum.clone());

    // Unknown task ids.
    let ghost = format!("{}/ghost/0123abcd", uuid());
    let mut d = w.plugin.driver();
    let second = Duration::from_secs(1);
    let stats = d.task_stats(TaskStatsRequest {
        task_id: ghost.clone(),
        collection_interval: None,
    });
    let not_found = [
        (
            "WaitTask",
            wait_task(&w.plugin, &ghost, second * 10).await.map(|_| ()),
        ),
        ("InspectTask", inspect(&w.plugin, &ghost).await.map(|_| ())),
        ("StopTask", stop_task(&w.plugin, &ghost, second, "").await),
        ("DestroyTask", destroy_task(&w.plugin, &ghost, true).await),
        ("TaskStats", Err(stream_error(stats.await).await)),
    ];
    for (call, result) in not_found {
        expect_error(call, result, Code::NotFound, &[NOT_FOUND]);
    }

    // Malformed task configs: nothing may start.
    let alloc = w.env.alloc("bad");
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
            start_task(&w.plugin, &task).await,
            Code::InvalidArgument,
            needles,
        );
        assert!(
            !events_of(&w.events, &task.id)
                .iter()
                .any(|e| stage(e) == "started"),
            "{what}: a VM started"
        );
    }
    assert!(
        w.env.vm_processes().is_empty(),
        "{:?}",
        w.env.vm_processes()
    );

    // A policy rejection, before any download.
    let gets = w.server.body_requests();
    let elsewhere = url.replace("127.0.0.1", "localhost");
    let task = start(guest_task(&elsewhere, &checksum));
    expect_error(
        "StartTask rejected by image-allowlist",
        start_task(&w.plugin, &task).await,
        Code::PermissionDenied,
        &["image-allowlist", "not from an allowed host or prefix"],
    );
    let rejected = w
        .events
        .wait_for(Duration::from_secs(10), |e| {
            e.task_id == task.id && stage(e) == "policy"
        })
        .await
        .unwrap_or_else(|| panic!("no policy event for {}", task.id));
    assert_eq!(annotation(&rejected, "policy"), Some("image-allowlist"));
    assert_eq!(annotation(&rejected, "decision"), Some("reject"));
    assert!(rejected.timestamp.is_some());
    assert_eq!(w.server.body_requests(), gets, "fetched a rejected image");

    // A bad checksum: not recoverable, and nothing left in the cache.
    let wrong = format!("md5:{}", "0".repeat(32));
    let status = expect_error(
        "StartTask with a wrong checksum",
        start_task(&w.plugin, &start(guest_task(&url, &wrong))).await,
        Code::InvalidArgument,
        &["checksum"],
    );
    assert_eq!(recoverable(&status), None, "{status:?}");
    let cache = w.env.sandbox.cache_dir();
    assert!(
        cache.join("tmp").is_dir(),
        "the download did not go through {}: the check below would prove nothing",
        cache.display()
    );
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
        start_task(&w.plugin, &start(guest_task(&closed, &checksum))).await,
        Code::FailedPrecondition,
    );
    assert_eq!(
        recoverable(&status).map(|r| r.recoverable),
        Some(true),
        "{status:?}"
    );

    w.plugin.kill_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_running_tasks() {
    let guest = guest();
    let mut w = world("nomad-running").await;
    let (url, checksum) = (w.url.clone(), w.checksum.clone());
    let mut d = w.plugin.driver();

    // A running task: unsupported calls, and destroy without force.
    let running = w.env.alloc("running");
    let task = running
        .task_config(guest_task(&url, &checksum))
        .memory_mb(320)
        .cpuset_cpus("0,1")
        .port("http", free_port(), 8080)
        .build();
    start_task(&w.plugin, &task)
        .await
        .unwrap_or_else(|e| panic!("StartTask: {e}"));
    // Memory and cores come from what Nomad allocated.
    let argv = argv_of(&qemu_pid(&w.plugin, &task.id).await);
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
        destroy_task(&w.plugin, &task.id, false).await,
        Code::FailedPrecondition,
    );
    let still = inspect(&w.plugin, &task.id).await.expect("InspectTask");
    assert_eq!(still.task.unwrap().state(), TaskState::Running);
    // No ready check and no ready_serial: nothing may claim the guest is
    // ready (the forwarded port accepts connections long before it is).
    // Checked at the end, so that a failure here hides nothing else.
    let ready_without_check: Vec<_> = events_of(&w.events, &task.id)
        .into_iter()
        .filter(|e| stage(e) == "ready")
        .collect();
    destroy_task(&w.plugin, &task.id, true)
        .await
        .expect("DestroyTask with force");
    expect_code(
        "InspectTask after a forced DestroyTask",
        inspect(&w.plugin, &task.id).await,
        Code::NotFound,
    );
    w.env.assert_no_vm();

    // An image Nomad's artifact stanza put in the task directory, of a
    // guest that ignores the power button: StopTask kills it at the
    // timeout, and WaitTask says so.
    let local = w.env.alloc("local");
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
    let handle = start_task(&w.plugin, &task)
        .await
        .unwrap_or_else(|e| panic!("StartTask with image_path: {e}"))
        .handle
        .expect("a handle");
    assert_eq!(handle.state(), TaskState::Running);
    stop_task(&w.plugin, &task.id, Duration::from_secs(2), "SIGINT")
        .await
        .expect("StopTask");
    let exit = wait_task(&w.plugin, &task.id, Duration::from_secs(10))
        .await
        .expect("WaitTask after StopTask");
    assert_eq!(
        exit.result.as_ref().map(|r| r.signal),
        Some(9),
        "killed at the stop timeout: {exit:?}"
    );
    destroy_task(&w.plugin, &task.id, false)
        .await
        .expect("DestroyTask of a task killed at its stop timeout");
    w.env.assert_no_vm();

    w.plugin.kill_cleanly().await;
    assert!(
        ready_without_check.is_empty(),
        "a ready event for a task without a ready check: {ready_without_check:#?}"
    );
}

/// Nomad stops its plugins while a StartTask is still fetching: the call
/// ends Unavailable (the task runner starts it again on the next plugin),
/// the plugin still exits by itself, and nothing of the task is left: no
/// VM, no task directory, no half-written image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_start_leaves_nothing() {
    let body = qemu_executor_tests::fault::pattern(4 << 20, 9);
    let checksum = format!("md5:{}", qemu_executor_tests::fault::md5_hex(&body));
    let server = qemu_executor_tests::fault::FaultServer::start(
        body,
        vec![qemu_executor_tests::fault::Fault::Slow {
            chunk: 4096,
            interval: Duration::from_millis(100),
        }],
        false,
    )
    .unwrap();
    let env = NomadEnv::new("nomad-shutdown", "");
    let mut plugin = env
        .start_configured(plugin_config([], vec![]).encode())
        .await;
    let events = open_events(&plugin).await;
    let alloc = env.alloc("slow");
    let task = alloc
        .task_config(guest_task(&server.url("slow.iso"), &checksum))
        .port("http", free_port(), 8080)
        .build();
    let starting = {
        let mut driver = plugin.driver();
        let task = task.clone();
        tokio::spawn(async move {
            driver
                .start_task(nomad_proto::driver::StartTaskRequest { task: Some(task) })
                .await
        })
    };
    // The fetch has begun once its accelerator event is out.
    events
        .wait_for(Duration::from_secs(30), |e| {
            e.task_id == task.id && stage(e) == "accelerator"
        })
        .await
        .unwrap_or_else(|| panic!("no accelerator event: {:#?}", events_of(&events, &task.id)));
    assert!(
        !starting.is_finished(),
        "StartTask returned before the slow fetch ended"
    );
    let killed = plugin.kill().await;
    let answer = tokio::time::timeout(Duration::from_secs(10), starting)
        .await
        .expect("StartTask answered once the plugin went")
        .expect("the call's task");
    let status = expect_code("StartTask during shutdown", answer, Code::Unavailable);
    assert!(
        status.message().contains("shutting down"),
        "the plugin's own answer, not a dropped connection: {status:?}"
    );
    assert!(
        killed.by_itself,
        "the plugin needed SIGKILL: {:?}",
        killed.status
    );
    env.assert_no_vm();
    let tasks = env.sandbox.state_dir().join("tasks");
    let left: Vec<_> = std::fs::read_dir(&tasks)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "task directories left: {left:?}");
    for sub in ["images", "tmp"] {
        let files: Vec<_> = std::fs::read_dir(env.sandbox.cache_dir().join(sub))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(files.is_empty(), "left in the cache's {sub}: {files:?}");
    }
}
