//! What the Nomad plugin costs, driven as a Nomad client drives it:
//!
//!   cargo build --release -p qemu-executor
//!   QE_POLICY_DIR=$(scripts/build-policies.sh) cargo bench -p qemu-executor-tests --bench nomad
//!
//! Launch to handshake; SetConfig with two policies (artifacts cached);
//! StartTask of N test guests (image cached after the first); the
//! plugin's own memory and CPU while they run; a Nomad restart (kill,
//! fresh plugin, SetConfig, RecoverTask of all N); graceful StopTask.
//! Real qemu under TCG; N defaults to 3 (`QE_NOMAD_BENCH_VMS`).

use std::time::{Duration, Instant};

use nomad_proto::driver::RecoverTaskRequest;
use qemu_executor_tests::agent::BOOT;
use qemu_executor_tests::executor::free_port;
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::nomad::NomadEnv;
use qemu_executor_tests::nomad::calls::{
    destroy_task, guest_task, inline_policy, nomad_config, set_config, start_task, stop_task,
    wait_http, wait_task,
};
use qemu_executor_tests::nomad::cty::plugin_config;

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// VmRSS and utime + stime (ticks) of a process.
fn usage(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    (rss_kb, fields.iter().sum())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("QE_NOMAD_BENCH_VMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let env = NomadEnv::new("nomad-bench", "");
    let config = plugin_config(
        [],
        vec![
            inline_policy("port-range", r#"{"min":1024,"max":65535}"#),
            inline_policy("accel-fallback", "{}"),
        ],
    )
    .encode();

    let t = Instant::now();
    let mut a = env.start_plugin().await;
    let handshake = t.elapsed();
    let t = Instant::now();
    set_config(&a, config.clone(), Some(nomad_config()))
        .await
        .expect("SetConfig");
    let first_config = t.elapsed();
    let t = Instant::now();
    set_config(&a, config.clone(), Some(nomad_config()))
        .await
        .expect("SetConfig");
    let warm_config = t.elapsed();

    let mut tasks = Vec::new();
    let mut starts = Vec::new();
    for i in 0..n {
        let alloc = env.alloc(&format!("vm{i}"));
        let port = free_port();
        let task = alloc
            .task_config(guest_task(
                &server.url("guest.iso"),
                &md5_of(&guest.cooperative),
            ))
            .memory_mb(256)
            .port("http", port, 8080)
            .build();
        let t = Instant::now();
        let handle = start_task(&a, &task)
            .await
            .unwrap_or_else(|e| panic!("StartTask: {e}"))
            .handle
            .expect("a handle");
        starts.push(t.elapsed());
        tasks.push((alloc, task, handle, port));
    }
    for (_, _, _, port) in &tasks {
        wait_http(*port, BOOT).await.expect("the guest answers");
    }
    let (rss_busy, _) = usage(a.pid());
    let (_, ticks_before) = usage(a.pid());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (rss_idle, ticks_after) = usage(a.pid());

    a.kill_cleanly().await;
    let t = Instant::now();
    let b = env.start_plugin().await;
    set_config(&b, config, Some(nomad_config()))
        .await
        .expect("SetConfig");
    let recover_started = Instant::now();
    for (_, _, handle, _) in &tasks {
        b.driver()
            .recover_task(RecoverTaskRequest {
                task_id: String::new(),
                handle: Some(handle.clone()),
            })
            .await
            .expect("RecoverTask");
    }
    let recover_all = recover_started.elapsed();
    let restart = t.elapsed();

    let mut stops = Vec::new();
    for (_, task, _, _) in &tasks {
        let t = Instant::now();
        stop_task(&b, &task.id, Duration::from_secs(30), "")
            .await
            .expect("StopTask");
        stops.push(t.elapsed());
        wait_task(&b, &task.id, Duration::from_secs(10))
            .await
            .expect("WaitTask");
        destroy_task(&b, &task.id, false)
            .await
            .expect("DestroyTask");
    }
    env.assert_no_vm();
    let mut b = b;
    b.kill_cleanly().await;

    println!("| measure | value |");
    println!("|---|---|");
    println!("| launch to handshake line | {} |", ms(handshake));
    println!(
        "| first SetConfig, 2 policies (compile or artifact cache) | {} |",
        ms(first_config)
    );
    println!("| SetConfig again | {} |", ms(warm_config));
    println!(
        "| StartTask, first (downloads 10 MiB) | {} |",
        ms(starts[0])
    );
    for (i, s) in starts.iter().enumerate().skip(1) {
        println!("| StartTask {} (image cached) | {} |", i + 1, ms(*s));
    }
    println!(
        "| plugin RSS with {n} VMs ready | {:.1} MB |",
        rss_busy as f64 / 1024.0
    );
    println!(
        "| plugin RSS after 10 s idle | {:.1} MB |",
        rss_idle as f64 / 1024.0
    );
    println!(
        "| plugin CPU over 10 s idle | {} ticks |",
        ticks_after - ticks_before
    );
    println!("| RecoverTask of {n} VMs | {} |", ms(recover_all));
    println!(
        "| Nomad restart: new plugin to all {n} recovered | {} |",
        ms(restart)
    );
    for (i, s) in stops.iter().enumerate() {
        println!("| StopTask {} (guest powers off) | {} |", i + 1, ms(*s));
    }
}
