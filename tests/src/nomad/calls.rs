//! The calls a Nomad client makes, with the arguments it makes them with,
//! and small readers for what comes back (event annotations, Go's zero
//! time, attribute values).

use std::time::{Duration, Instant};

use nomad_proto::base::{NomadConfig, NomadDriverConfig, SetConfigRequest};
use nomad_proto::driver::{
    DestroyTaskRequest, DriverTaskEvent, FingerprintRequest, FingerprintResponse,
    InspectTaskRequest, InspectTaskResponse, StartTaskRequest, StartTaskResponse, StopTaskRequest,
    TaskConfig, TaskEventsRequest, TaskStatsRequest, TaskStatsResponse, WaitTaskRequest,
    WaitTaskResponse,
};
use nomad_proto::handshake::DRIVER_API_VERSION;
use nomad_proto::structs::attribute::Value as AttrValue;
use tonic::Status;

use super::cty::{Value, policy_block, task_config};
use super::plugin::PluginUnderTest;
use super::streams::Collector;
use crate::executor::http_get;

/// The `nomad_config` the driver manager sends: the client's port range.
pub fn nomad_config() -> NomadConfig {
    NomadConfig {
        driver: Some(NomadDriverConfig {
            client_max_port: 32000,
            client_min_port: 20000,
        }),
    }
}

/// `SetConfig` with the API version Nomad echoes back; `nomad` is `None`
/// in the config-validation pass, set by the driver manager.
pub async fn set_config(
    plugin: &PluginUnderTest,
    msgpack: Vec<u8>,
    nomad: Option<NomadConfig>,
) -> Result<(), Status> {
    plugin
        .base()
        .set_config(SetConfigRequest {
            msgpack_config: msgpack,
            nomad_config: nomad,
            plugin_api_version: DRIVER_API_VERSION.to_string(),
        })
        .await
        .map(|_| ())
}

/// Opens the long-lived `Fingerprint` stream.
pub async fn open_fingerprint(plugin: &PluginUnderTest) -> Collector<FingerprintResponse> {
    let opened = Instant::now();
    let stream = plugin
        .driver()
        .fingerprint(FingerprintRequest {})
        .await
        .unwrap_or_else(|e| panic!("Fingerprint: {e}"))
        .into_inner();
    Collector::start(opened, stream)
}

/// Opens the long-lived `TaskEvents` stream.
pub async fn open_events(plugin: &PluginUnderTest) -> Collector<DriverTaskEvent> {
    let opened = Instant::now();
    let stream = plugin
        .driver()
        .task_events(TaskEventsRequest {})
        .await
        .unwrap_or_else(|e| panic!("TaskEvents: {e}"))
        .into_inner();
    Collector::start(opened, stream)
}

/// Opens a `TaskStats` stream at `interval`.
pub async fn open_stats(
    plugin: &PluginUnderTest,
    task_id: &str,
    interval: Duration,
) -> Result<Collector<TaskStatsResponse>, Status> {
    let opened = Instant::now();
    let stream = plugin
        .driver()
        .task_stats(TaskStatsRequest {
            task_id: task_id.to_string(),
            collection_interval: Some(proto_duration(interval)),
        })
        .await?
        .into_inner();
    Ok(Collector::start(opened, stream))
}

/// The error of a server stream: the call's, or its first message's (a
/// server may fail either way; Nomad's client handles both alike).
pub async fn stream_error<T: std::fmt::Debug>(
    call: Result<tonic::Response<tonic::Streaming<T>>, Status>,
) -> Status {
    match call {
        Err(status) => status,
        Ok(response) => match response.into_inner().message().await {
            Err(status) => status,
            Ok(item) => panic!("expected the stream to fail, got {item:?}"),
        },
    }
}

/// `StartTask`, with a generous bound so a hung plugin fails the test
/// instead of hanging it (the call blocks for the image fetch).
pub async fn start_task(
    plugin: &PluginUnderTest,
    task: &TaskConfig,
) -> Result<StartTaskResponse, Status> {
    tokio::time::timeout(
        Duration::from_secs(300),
        plugin.driver().start_task(StartTaskRequest {
            task: Some(task.clone()),
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("StartTask of {} did not return in 300 s", task.id))
    .map(|r| r.into_inner())
}

/// `StopTask` with Nomad's `kill_timeout` and `kill_signal`.
pub async fn stop_task(
    plugin: &PluginUnderTest,
    task_id: &str,
    timeout: Duration,
    signal: &str,
) -> Result<(), Status> {
    plugin
        .driver()
        .stop_task(StopTaskRequest {
            task_id: task_id.to_string(),
            timeout: Some(proto_duration(timeout)),
            signal: signal.to_string(),
        })
        .await
        .map(|_| ())
}

/// `WaitTask`; panics if it does not return within `within`.
pub async fn wait_task(
    plugin: &PluginUnderTest,
    task_id: &str,
    within: Duration,
) -> Result<WaitTaskResponse, Status> {
    let mut driver = plugin.driver();
    let call = driver.wait_task(WaitTaskRequest {
        task_id: task_id.to_string(),
    });
    tokio::time::timeout(within, call)
        .await
        .unwrap_or_else(|_| panic!("WaitTask of {task_id} did not return in {within:?}"))
        .map(|r| r.into_inner())
}

/// A task's end as Nomad's task runner drives it: StopTask with the
/// job's kill timeout, WaitTask for the result, DestroyTask. Panics on a
/// failed call; returns the exit result.
pub async fn stop_wait_destroy(
    plugin: &PluginUnderTest,
    task_id: &str,
    kill_timeout: Duration,
) -> nomad_proto::driver::ExitResult {
    stop_task(plugin, task_id, kill_timeout, "")
        .await
        .expect("StopTask");
    let result = wait_task(plugin, task_id, Duration::from_secs(10))
        .await
        .expect("WaitTask after StopTask")
        .result
        .expect("an exit result");
    destroy_task(plugin, task_id, false)
        .await
        .expect("DestroyTask");
    result
}

pub async fn destroy_task(
    plugin: &PluginUnderTest,
    task_id: &str,
    force: bool,
) -> Result<(), Status> {
    plugin
        .driver()
        .destroy_task(DestroyTaskRequest {
            task_id: task_id.to_string(),
            force,
        })
        .await
        .map(|_| ())
}

pub async fn inspect(
    plugin: &PluginUnderTest,
    task_id: &str,
) -> Result<InspectTaskResponse, Status> {
    plugin
        .driver()
        .inspect_task(InspectTaskRequest {
            task_id: task_id.to_string(),
        })
        .await
        .map(|r| r.into_inner())
}

/// qemu's pid as `InspectTask` reports it (`driver.attributes["pid"]`).
pub async fn qemu_pid(plugin: &PluginUnderTest, task_id: &str) -> String {
    let status = inspect(plugin, task_id)
        .await
        .unwrap_or_else(|e| panic!("InspectTask {task_id}: {e}"));
    status
        .driver
        .and_then(|d| d.attributes.get("pid").cloned())
        .unwrap_or_else(|| panic!("no pid attribute for {task_id}"))
}

fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// An inline `policy {}` block for a shipped policy with JSON settings.
pub fn inline_policy(crate_name: &str, settings: &str) -> Value {
    policy_block([
        (
            "module",
            Value::from(crate::policy_wasm(crate_name).display().to_string()),
        ),
        ("settings", Value::from(settings)),
    ])
}

/// The task config of the test guest fetched from `url` under TCG.
pub fn guest_task(url: &str, checksum: &str) -> Vec<u8> {
    task_config([
        ("image_source", Value::from(url)),
        ("checksum", Value::from(checksum)),
        ("accelerator", Value::from("tcg")),
    ])
    .encode()
}

/// A process's command line, from /proc.
pub fn argv_of(pid: &str) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    raw.split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// The value after `flag` in `argv`.
pub fn option<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    let i = argv.iter().position(|a| a == flag)?;
    argv.get(i + 1).map(String::as_str)
}

/// An event's annotation.
pub fn annotation<'a>(event: &'a DriverTaskEvent, key: &str) -> Option<&'a str> {
    event.annotations.get(key).map(String::as_str)
}

/// An event's `stage` annotation ("" if it has none).
pub fn stage(event: &DriverTaskEvent) -> &str {
    annotation(event, "stage").unwrap_or("")
}

/// The events of one task so far, in order.
pub fn events_of(events: &Collector<DriverTaskEvent>, task_id: &str) -> Vec<DriverTaskEvent> {
    events
        .items()
        .into_iter()
        .filter(|e| e.task_id == task_id)
        .collect()
}

/// Go's zero `time.Time` as a protobuf timestamp: what a Go server sends
/// for "not completed".
pub fn is_go_zero_time(ts: &prost_types::Timestamp) -> bool {
    ts.seconds == -62_135_596_800 && ts.nanos == 0
}

/// A string attribute of a fingerprint.
pub fn string_attr<'a>(fp: &'a FingerprintResponse, key: &str) -> Option<&'a str> {
    match fp.attributes.get(key)?.value.as_ref()? {
        AttrValue::StringVal(s) => Some(s),
        _ => None,
    }
}

/// The version `qemu-system-x86_64 --version` reports, parsed as Nomad's
/// qemu driver parses it (`version (\d[\.\d+]+)`).
pub fn qemu_version() -> String {
    let out = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .expect("qemu-system-x86_64 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    parse_qemu_version(&text).unwrap_or_else(|| panic!("no version in {text:?}"))
}

fn parse_qemu_version(text: &str) -> Option<String> {
    let after = &text[text.find("version ")? + "version ".len()..];
    let version: String = after
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then_some(version)
}

/// Polls the guest with real GETs through `port` until one answers (a
/// forwarded port accepts connections before the guest listens, so only
/// an answer counts); returns the answer, or `None` after `budget`.
pub async fn wait_http(port: u16, budget: Duration) -> Option<String> {
    let deadline = Instant::now() + budget;
    loop {
        let answer = tokio::task::spawn_blocking(move || http_get(port, "/"))
            .await
            .expect("http_get");
        if answer.is_some() || Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_versions_as_nomad_does() {
        assert_eq!(
            parse_qemu_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            )
            .as_deref(),
            Some("7.2.22")
        );
        assert_eq!(
            parse_qemu_version("QEMU emulator version 8.0.0\n").as_deref(),
            Some("8.0.0")
        );
        assert_eq!(parse_qemu_version("QEMU emulator version x"), None);
        assert_eq!(parse_qemu_version("nothing"), None);
    }
}
