//! Issue 16 through the agent and the Nomad plugin: `file://` sources
//! confined (none by default; for a Nomad task, its own directory), and a
//! chain a later policy's rewrite cannot slip through. `hardening.rs`
//! has the same through `run`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_executor_tests::agent::{AgentUnderTest, task_toml};
use qemu_executor_tests::executor::{Sandbox, free_port};
use qemu_executor_tests::guest::md5_of;
use qemu_executor_tests::nomad::NomadEnv;
use qemu_executor_tests::nomad::calls::{guest_task, inline_policy, start_task};
use qemu_executor_tests::nomad::cty::{Value, plugin_config, task_config};
use qemu_executor_tests::nomad::status::expect_error;
use qemu_executor_tests::policy_wasm;
use tonic::Code;

const WRONG: &str = "md5:00000000000000000000000000000000";
const FAST_FETCH: &str = "[fetch]\nmax_attempts = 1\nconnect_timeout_ms = 1000\n";

/// A secret beside `dir`, a symlink to it inside, and the secret's digest.
fn plant(dir: &Path) -> (PathBuf, String) {
    let secret = dir.parent().unwrap().join("secret.img");
    std::fs::write(&secret, "another tenant's disk").unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::os::unix::fs::symlink(&secret, dir.join("link.img")).unwrap();
    let digest = md5_of(&secret).trim_start_matches("md5:").to_string();
    (secret, digest)
}

fn file_url(path: &Path) -> String {
    format!("file://{}", path.display())
}

/// The reason the agent gives for a task that failed, once it has.
fn failure(agent: &AgentUnderTest, toml: &str) -> String {
    let id = agent.submit_toml(toml);
    let status = agent.wait_state(&id, "failed", Duration::from_secs(60));
    status["exit"]["reason"].as_str().unwrap().to_string()
}

#[test]
fn the_agent_reads_no_host_file_outside_the_allowed_directories() {
    let sandbox = Sandbox::new();
    let images = sandbox.path().join("images");
    let (secret, digest) = plant(&images);
    let own = images.join("own.img");
    std::fs::write(&own, "the operator's image").unwrap();
    let task = |source: &str| task_toml("web", source, WRONG, free_port(), "");

    // By default no directory is open.
    let closed = Sandbox::new();
    let config = closed.write("executor.toml", FAST_FETCH);
    let agent = AgentUnderTest::start(&closed, &config, &[]);
    let reason = failure(&agent, &task("file:///etc/shadow"));
    assert!(
        reason.contains("no directory is open to file:// sources"),
        "{reason}"
    );
    drop(agent);

    let config = sandbox.write(
        "open.toml",
        &format!("{FAST_FETCH}file_dirs = [\"{}\"]\n", images.display()),
    );
    let agent = AgentUnderTest::start(&sandbox, &config, &[]);
    for source in [
        file_url(&secret),
        file_url(&images.join("link.img")),
        format!("file://{}/../secret.img", images.display()),
    ] {
        let reason = failure(&agent, &task(&source));
        assert!(
            reason.contains("outside the directories file:// sources may be read from"),
            "{source}: {reason}"
        );
        assert!(!reason.contains(&digest), "{reason}");
    }
    let reason = failure(&agent, &task(&file_url(&own)));
    assert!(
        reason.contains("the file does not have md5:0000"),
        "{reason}"
    );
    assert!(
        !reason.contains(md5_of(&own).trim_start_matches("md5:")),
        "{reason}"
    );
    let cached = std::fs::read_dir(sandbox.cache_dir().join("images"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(cached, 0, "a refused file reached the cache");
}

/// image-allowlist, then port-range, then a policy that points the task at
/// the cloud's metadata service, on port 22 of every interface.
fn bypass_chain() -> [(&'static str, String); 3] {
    [
        (
            "image-allowlist",
            r#"{"schemes": ["http"], "hosts": ["127.0.0.1"], "algorithms": ["md5"]}"#.into(),
        ),
        ("port-range", r#"{"min": 1024, "max": 65535}"#.into()),
        (
            "rewriter",
            r#"{"image_source": "http://169.254.169.254/latest/meta-data", "host_port": 22, "host_ip": "0.0.0.0"}"#.into(),
        ),
    ]
}

#[test]
fn a_later_rewrite_cannot_undo_an_allowlist_in_the_agent() {
    let sandbox = Sandbox::new();
    let mut config = FAST_FETCH.to_string();
    for (name, settings) in bypass_chain() {
        config.push_str(&format!(
            "\n[[policy]]\nmodule = \"{}\"\nsettings = '{settings}'\n",
            policy_wasm(name).display()
        ));
    }
    let config = sandbox.write("executor.toml", &config);
    let agent = AgentUnderTest::start(&sandbox, &config, &[]);
    let id = agent.submit_toml(&task_toml(
        "web",
        "http://127.0.0.1:9/guest.iso",
        WRONG,
        free_port(),
        "",
    ));
    let status = agent.wait_state(&id, "failed", Duration::from_secs(60));
    let reason = status["exit"]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("Rejected by policy image-allowlist: "),
        "{reason}"
    );
    let steps: Vec<(String, String, u64)> = status["policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["policy"].as_str().unwrap().to_string(),
                s["decision"].as_str().unwrap().to_string(),
                s["pass"].as_u64().unwrap(),
            )
        })
        .collect();
    let step = |p: &str, d: &str, n| (p.to_string(), d.to_string(), n);
    assert_eq!(
        steps,
        [
            step("image-allowlist", "accept", 1),
            step("port-range", "accept", 1),
            step("rewriter", "rewrite", 1),
            step("image-allowlist", "reject", 2),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_reads_files_of_the_task_directory_only() {
    let env = NomadEnv::new("harden-files", FAST_FETCH);
    let mut plugin = env
        .start_configured(plugin_config([], vec![]).encode())
        .await;
    let other = env.alloc("other");
    let victim = other.task_dir().join("local/disk.img");
    std::fs::write(&victim, "another tenant's disk").unwrap();
    let digest = md5_of(&victim).trim_start_matches("md5:").to_string();
    let alloc = env.alloc("web");
    let local = alloc.task_dir().join("local");
    std::os::unix::fs::symlink(&victim, local.join("link.img")).unwrap();
    std::fs::write(local.join("own.img"), "this task's own image").unwrap();
    let start = |config: Vec<u8>| {
        alloc
            .task_config(config)
            .port("http", free_port(), 8080)
            .build()
    };

    // Another allocation's disk, by its path or through a symlink.
    for source in [file_url(&victim), file_url(&local.join("link.img"))] {
        let status = expect_error(
            &format!("StartTask of {source}"),
            start_task(&plugin, &start(guest_task(&source, WRONG))).await,
            Code::InvalidArgument,
            &["outside the directories file:// sources may be read from"],
        );
        assert!(!status.message().contains(&digest), "{status:?}");
    }
    let status = expect_error(
        "StartTask with an image_path symlink out of the task directory",
        start_task(
            &plugin,
            &start(
                task_config([
                    ("image_path", Value::from("local/link.img")),
                    ("accelerator", Value::from("tcg")),
                ])
                .encode(),
            ),
        )
        .await,
        Code::InvalidArgument,
        &[
            "image_path",
            "leads outside the task directory through a symlink",
        ],
    );
    assert!(!status.message().contains(&digest), "{status:?}");

    // The task's own directory is open to it: the file is read, and a
    // wrong checksum does not tell its digest.
    let own = local.join("own.img");
    let status = expect_error(
        "StartTask of its own file with a wrong checksum",
        start_task(&plugin, &start(guest_task(&file_url(&own), WRONG))).await,
        Code::InvalidArgument,
        &["Checksum mismatch", "the file does not have md5:0000"],
    );
    assert!(
        !status
            .message()
            .contains(md5_of(&own).trim_start_matches("md5:")),
        "{status:?}"
    );
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());
    plugin.kill_cleanly().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_rewrite_cannot_undo_an_allowlist_in_the_plugin() {
    let env = NomadEnv::new("harden-chain", FAST_FETCH);
    let policies = bypass_chain()
        .iter()
        .map(|(name, settings)| inline_policy(name, settings))
        .collect();
    let mut plugin = env
        .start_configured(plugin_config([], policies).encode())
        .await;
    let alloc = env.alloc("web");
    let task = alloc
        .task_config(guest_task("http://127.0.0.1:9/guest.iso", WRONG))
        .port("http", free_port(), 8080)
        .build();
    expect_error(
        "StartTask with a rewrite past the allowlist",
        start_task(&plugin, &task).await,
        Code::PermissionDenied,
        &[
            "Rejected by policy image-allowlist",
            "http://169.254.169.254/latest/meta-data",
        ],
    );
    assert!(env.vm_processes().is_empty(), "{:?}", env.vm_processes());
    plugin.kill_cleanly().await;
}
