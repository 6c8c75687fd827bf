use policy_sdk::Accelerator;
use qemu_executor::qemu::cmdline::{BootMedium, Confinement};
use qemu_executor::supervisor::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("debug").init();
    let args: Vec<String> = std::env::args().collect();
    let iso = PathBuf::from(&args[1]);
    let accel = if args[2] == "kvm" {
        Accelerator::Kvm
    } else {
        Accelerator::Tcg
    };
    let text = format!(
        "name = \"scratch\"\nimage_source = \"file:///x\"\nchecksum = \"{}\"\nhost_port = 18095\nguest_port = 8080\nmemory_mb = 256\n",
        "0".repeat(32)
    );
    let task = qemu_executor::task::parse_toml(&text)
        .unwrap()
        .into_task()
        .unwrap();
    let dir = TaskDir {
        root: PathBuf::from("/tmp/scratch-task"),
    };
    let _ = std::fs::remove_dir_all(&dir.root);
    std::fs::create_dir_all(&dir.root).unwrap();
    let launch = Launch {
        qemu: Path::new("/usr/bin/qemu-system-x86_64"),
        task: &task,
        accelerator: accel,
        medium: BootMedium::Cdrom { path: iso },
        dir: &dir,
        extra_args: &[],
        confinement: Confinement {
            sandbox: true,
            ..Default::default()
        },
        die_with_parent: true,
    };
    let t0 = Instant::now();
    let mut vm = launch.start().await.unwrap();
    println!("started pid {} at {:?}", vm.pid(), t0.elapsed());
    let cancel = tokio_util::sync::CancellationToken::new();
    let watch = BootWatch {
        ports: &task.ports,
        ready_serial: None,
        ready_timeout: Duration::from_secs(60),
        kvm_stall: (accel == Accelerator::Kvm).then_some(Duration::from_secs(10)),
    };
    let boot = vm
        .boot(&watch, &cancel, |p| {
            println!(
                "ready: {} {}:{} -> guest {} at {:?}",
                p.protocol,
                p.host_ip,
                p.host,
                p.guest,
                t0.elapsed()
            )
        })
        .await;
    println!("boot: {boot:?} at {:?}", t0.elapsed());
    let t1 = Instant::now();
    let ending = vm
        .stop(
            true,
            Duration::from_secs(args.get(3).map_or(10, |s| s.parse().unwrap())),
        )
        .await;
    println!("ending: {ending} in {:?}", t1.elapsed());
}
