//! The plugin after a crash of the Nomad agent: the agent held the read
//! ends of the plugin's stdout and stderr, so every log line the plugin
//! writes from then on fails with EPIPE. The plugin must carry on: the
//! restarted agent reattaches and stops, starts and destroys tasks.

use std::time::Duration;

use qemu_executor_tests::agent::BOOT;
use qemu_executor_tests::executor::free_port;
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::nomad::NomadEnv;
use qemu_executor_tests::nomad::calls::{
    destroy_task, guest_task, nomad_config, set_config, start_task, stop_task, stop_wait_destroy,
    wait_http, wait_task,
};
use qemu_executor_tests::nomad::cty::plugin_config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_with_nobody_reading_its_output_still_stops_starts_and_destroys() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let env = NomadEnv::new("nomad-epipe", "");
    let config = plugin_config([], Vec::new()).encode();
    let mut plugin = env.start_configured(config.clone()).await;
    let (url, checksum) = (server.url("guest.iso"), md5_of(&guest.cooperative));
    let alloc = env.alloc("web");
    let first_port = free_port();
    let first = alloc
        .task_config(guest_task(&url, &checksum))
        .port("http", first_port, 8080)
        .build();
    start_task(&plugin, &first).await.expect("StartTask");
    wait_http(first_port, BOOT)
        .await
        .expect("the first VM answers");

    // The agent dies; a new one reattaches over a fresh connection and
    // configures the plugin again, as Nomad's driver manager does.
    plugin.kill_stdio_readers();
    plugin.reconnect().await;
    set_config(&plugin, config, Some(nomad_config()))
        .await
        .expect("SetConfig with nobody reading the plugin's logs");

    stop_task(&plugin, &first.id, Duration::from_secs(30), "")
        .await
        .expect("StopTask of the running VM");
    let exit = wait_task(&plugin, &first.id, Duration::from_secs(60))
        .await
        .expect("WaitTask after StopTask");
    assert_eq!(
        exit.result.as_ref().map(|r| (r.exit_code, r.signal)),
        Some((0, 0)),
        "a graceful stop: {exit:?}"
    );
    destroy_task(&plugin, &first.id, false)
        .await
        .expect("DestroyTask of the stopped task");

    let port = free_port();
    let second = alloc
        .task_config(guest_task(&url, &checksum))
        .port("http", port, 8080)
        .build();
    start_task(&plugin, &second)
        .await
        .expect("StartTask with nobody reading the plugin's logs");
    let page = wait_http(port, BOOT).await.expect("the new VM answers");
    assert!(page.contains("qemu-executor test guest"), "{page}");
    stop_wait_destroy(&plugin, &second.id, Duration::from_secs(30)).await;
    env.assert_no_vm();

    let killed = plugin.kill().await;
    assert!(killed.by_itself, "the plugin exits on Shutdown: {killed:?}");
    assert_eq!(killed.status.code(), Some(0), "{killed:?}");
}
