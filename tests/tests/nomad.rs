//! `qemu-executor nomad-plugin` as a Nomad client's plugin loader and
//! driver manager see it (see `qemu_executor_tests::nomad`): refused
//! without go-plugin's cookie, the handshake, the base plugin's calls,
//! the config-validation pass, and the fingerprint stream. Checked against
//! /work/nomad/CONTRACT.md and the published protocol, not against a
//! running Nomad (none can run here). Tasks: `nomad_tasks.rs`; errors:
//! `nomad_errors.rs`.

use std::collections::BTreeSet;
use std::time::Duration;

use nomad_proto::base::{ConfigSchemaRequest, PluginInfoRequest, PluginType};
use nomad_proto::driver::fingerprint_response::HealthState;
use nomad_proto::driver::{InitRequest, ShutdownRequest};
use nomad_proto::structs::attribute::Value as AttrValue;
use qemu_executor_tests::executor::Sandbox;
use qemu_executor_tests::nomad::calls::{
    inline_policy, nomad_config, open_fingerprint, qemu_version, set_config, string_attr,
};
use qemu_executor_tests::nomad::cty::{
    PLUGIN_ATTRIBUTES, POLICY_ATTRIBUTES, Value, plugin_config, policy_block,
};
use qemu_executor_tests::nomad::schema::{Attribute, object_attributes};
use qemu_executor_tests::nomad::status::{expect_code, expect_error};
use qemu_executor_tests::nomad::{NomadEnv, plugin_command};
use qemu_executor_tests::proc::GroupChild;
use tonic::Code;

fn names<'a>(it: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    it.into_iter().map(str::to_string).collect()
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
    plugin.kill_cleanly().await;

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
    plugin.kill_cleanly().await;

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

    // Ctrl-C at the agent's terminal reaches the plugin too: it must stay
    // for the agent to shut it down in order.
    plugin.signal(nix::sys::signal::Signal::SIGINT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(plugin.exited().is_none(), "SIGINT ended the plugin");
    let health = plugin
        .health()
        .check(tonic_health::pb::HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .expect("health Check after SIGINT")
        .into_inner();
    assert_eq!(
        health.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // Agent shutdown: the driver's Shutdown, then the controller's.
    plugin
        .driver()
        .shutdown(ShutdownRequest {})
        .await
        .expect("Driver.Shutdown");
    plugin.kill_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprint_without_qemu_is_undetected() {
    let env = NomadEnv::new(
        "nomad-noqemu",
        "[qemu]\nbinary = \"/nonexistent/qemu-system-x86_64\"\n",
    );
    let mut plugin = env.start_configured(Vec::new()).await;
    let fingerprints = open_fingerprint(&plugin).await;
    let first = fingerprints
        .wait_for(Duration::from_secs(10), |_| true)
        .await
        .unwrap_or_else(|| panic!("no fingerprint within 10 s: {:?}", fingerprints.end()));
    assert_eq!(first.health(), HealthState::Undetected, "{first:?}");
    assert!(
        !first.health_description.is_empty(),
        "UNDETECTED without a reason: {first:?}"
    );
    drop(fingerprints);
    plugin.kill_cleanly().await;
}
