//! The pipeline's paths, through a seam that stands in for the host: the
//! policy chain's answer, the fetch and the VM are scripted, everything
//! else (task directories, `task.json`, argv, cleanup) is real.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use policy_sdk::{Accelerator, Checksum, HostFacts, KvmStatus, PortMapping, Task};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::cache::CacheError;
use crate::fetch::{FetchError, Fetched, ProgressObserver};
use crate::host::probe::{FingerprintError, QemuInfo};
use crate::policy::ChainOutcome;
use crate::qemu::cmdline::DiskFormat;
use crate::qemu::image::ImageError;
use crate::qemu::process::ProcessIdentity;
use crate::vm::{Boot, BootWatch, Ending, Launch, Machine, StopHow, SuperviseError};

/// What a fake VM does when booted.
#[derive(Debug, Clone)]
enum Script {
    /// Boots to this, then (if ready) runs until stopped.
    Boot(Boot),
    /// Boots to ready, then shuts down by itself.
    ReadyThenShutdown,
    /// Still booting when a stop comes.
    BootUntilStopped,
}

enum FetchScript {
    Image,
    Fail,
    Hang,
}

/// The host as the tests script it. Every call it sees is logged.
struct FakeSeam {
    facts: HostFacts,
    policies: Box<dyn Fn(Task) -> ChainOutcome + Send + Sync>,
    fetch: FetchScript,
    image: PathBuf,
    boots: Mutex<VecDeque<Script>>,
    leases: Mutex<BTreeSet<String>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl FakeSeam {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn logged(&self, what: &str) -> usize {
        self.log().iter().filter(|l| l.starts_with(what)).count()
    }
}

struct FakeVm {
    script: Script,
    log: Arc<Mutex<Vec<String>>>,
}

impl Machine for FakeVm {
    fn identity(&self) -> ProcessIdentity {
        ProcessIdentity {
            pid: 4242,
            start_time: 1,
        }
    }

    fn shim(&self) -> Option<ProcessIdentity> {
        None
    }

    async fn boot<'a>(
        &'a mut self,
        watch: &'a BootWatch<'a>,
        cancel: &'a CancellationToken,
        on_port: &'a mut (dyn FnMut(&PortMapping) + Send),
    ) -> Boot {
        match &self.script {
            Script::Boot(Boot::Ready) | Script::ReadyThenShutdown => {
                if let Some(port) = watch.ports.first() {
                    on_port(port);
                }
                Boot::Ready
            }
            Script::Boot(other) => other.clone(),
            Script::BootUntilStopped => {
                cancel.cancelled().await;
                Boot::Cancelled
            }
        }
    }

    async fn wait<'a>(&'a mut self, cancel: &'a CancellationToken) -> Option<Ending> {
        if matches!(self.script, Script::ReadyThenShutdown) {
            return Some(Ending::GuestShutdown);
        }
        cancel.cancelled().await;
        None
    }

    fn stop(
        &mut self,
        graceful: bool,
        kill_timeout: Duration,
    ) -> impl Future<Output = Ending> + Send + '_ {
        self.log.lock().unwrap().push(format!(
            "stop graceful={graceful} timeout={}",
            kill_timeout.as_secs()
        ));
        async move {
            Ending::Stopped(if graceful {
                StopHow::Powerdown
            } else {
                StopHow::Quit
            })
        }
    }
}

impl Seam for FakeSeam {
    type Vm = FakeVm;

    async fn facts(&self) -> HostFacts {
        self.log.lock().unwrap().push("facts".into());
        self.facts.clone()
    }

    async fn evaluate(&self, task: Task, _facts: &HostFacts) -> ChainOutcome {
        self.log.lock().unwrap().push("evaluate".into());
        (self.policies)(task)
    }

    async fn qemu(&self) -> Result<QemuInfo, FingerprintError> {
        Ok(QemuInfo {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            version: "7.2.22".into(),
            accelerators: self.facts.accelerators.clone(),
        })
    }

    async fn fetch(
        &self,
        source: &str,
        _checksum: &Checksum,
        holder: &str,
        _file_dir: Option<&Path>,
        _progress: Option<ProgressObserver>,
    ) -> Result<Fetched, FetchError> {
        self.log.lock().unwrap().push(format!("fetch {source}"));
        match self.fetch {
            FetchScript::Image => {
                self.leases.lock().unwrap().insert(holder.to_string());
                Ok(Fetched {
                    path: self.image.clone(),
                    size: 4096,
                    body_bytes: 4096,
                    cache_hit: false,
                })
            }
            FetchScript::Fail => Err(FetchError::UnsupportedScheme {
                source_url: source.to_string(),
            }),
            FetchScript::Hang => std::future::pending().await,
        }
    }

    fn renew_lease(&self, _checksum: &Checksum, holder: &str) -> Result<(), CacheError> {
        self.leases.lock().unwrap().insert(holder.to_string());
        Ok(())
    }

    fn release_lease(&self, _checksum: &Checksum, holder: &str) -> Result<(), CacheError> {
        self.leases.lock().unwrap().remove(holder);
        Ok(())
    }

    async fn create_overlay(
        &self,
        _image: &Path,
        _format: DiskFormat,
        overlay: &Path,
    ) -> Result<(), ImageError> {
        std::fs::write(overlay, b"QFI\xfb").unwrap();
        Ok(())
    }

    async fn start(&self, launch: Launch<'_>) -> Result<FakeVm, SuperviseError> {
        let argv: Vec<String> = launch
            .argv()?
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        self.log
            .lock()
            .unwrap()
            .push(format!("start {}", argv.join(" ")));
        let script = self
            .boots
            .lock()
            .unwrap()
            .pop_front()
            .expect("a start the test did not script");
        Ok(FakeVm {
            script,
            log: self.log.clone(),
        })
    }

    async fn adopt(&self, _found: &Found) -> Adoption<FakeVm> {
        Adoption::Running(FakeVm {
            script: Script::BootUntilStopped,
            log: self.log.clone(),
        })
    }

    fn record_kvm_failure(&self, reason: &str, _qemu_version: Option<&str>) {
        self.log.lock().unwrap().push(format!("verdict {reason}"));
    }
}

struct World {
    pipeline: Pipeline<FakeSeam>,
    _dir: tempfile::TempDir,
}

fn facts(kvm: KvmStatus) -> HostFacts {
    HostFacts {
        qemu_found: true,
        qemu_version: Some("7.2.22".into()),
        accelerators: vec!["tcg".into(), "kvm".into()],
        kvm,
        host_cpus: 2,
        host_memory_mb: 4096,
    }
}

fn task(extra: &str) -> Task {
    let text = format!(
        "name = \"web\"\nimage_source = \"http://127.0.0.1/guest.iso\"\nchecksum = \"{}\"\nhost_port = 18080\nguest_port = 8080\n{extra}",
        "0".repeat(32)
    );
    crate::task::parse_toml(&text).unwrap().into_task().unwrap()
}

fn accept(task: Task) -> ChainOutcome {
    ChainOutcome::Accepted {
        task,
        steps: Vec::new(),
    }
}

fn world(
    kvm: KvmStatus,
    policies: impl Fn(Task) -> ChainOutcome + Send + Sync + 'static,
    fetch: FetchScript,
    boots: Vec<Script>,
) -> World {
    let dir = tempfile::tempdir().unwrap();
    // An ISO 9660 volume as `image::detect` knows it: "CD001" at 0x8001.
    let image = dir.path().join("guest.iso");
    let mut bytes = vec![0u8; 0x9000];
    bytes[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(&image, bytes).unwrap();
    World {
        pipeline: Pipeline {
            config: Config::default(),
            state_dir: dir.path().join("state"),
            seam: FakeSeam {
                facts: facts(kvm),
                policies: Box::new(policies),
                fetch,
                image,
                boots: Mutex::new(boots.into()),
                leases: Mutex::default(),
                log: Arc::default(),
            },
            detached: None,
        },
        _dir: dir,
    }
}

/// What a front end sees of one run, in order.
#[derive(Default)]
struct Seen {
    events: Vec<String>,
}

impl Seen {
    fn record(&mut self, event: Event<'_>) {
        self.events.push(match event {
            Event::Facts(_) => "facts".into(),
            Event::Policies(_) => "policies".into(),
            Event::Accelerator { chosen, .. } => format!("accelerator {chosen}"),
            Event::Image(_) => "image".into(),
            Event::Confined { .. } => "confined".into(),
            Event::Started { accelerator, .. } => format!("started {accelerator}"),
            Event::PortReady(p) => format!("port {}", p.host),
            Event::Ready { .. } => "ready".into(),
            Event::KvmFallback { .. } => "kvm fallback".into(),
            Event::Stopping => "stopping".into(),
        });
    }
}

/// `run`'s sequence: every step, then the release.
async fn run(
    world: &World,
    task: Task,
    stop: &StopSignal,
    seen: &mut Seen,
) -> Result<(Ending, TaskDir), LaunchError> {
    let pipeline = &world.pipeline;
    let mut on_event = |e: Event<'_>| seen.record(e);
    let admitted = pipeline.admit(task, &mut on_event).await?;
    let plan = pipeline.plan(&admitted, &mut on_event).await?;
    let dir = task_dir(&pipeline.state_dir, &admitted.task.name)?;
    let placement = Placement {
        dir: dir.clone(),
        exit_record: None,
        forwards: Vec::new(),
        file_dir: None,
    };
    let checksum = admitted.task.checksum.clone();
    let holdings = Holdings {
        dir: dir.clone(),
        checksums: vec![checksum],
        cgroups: Vec::new(),
        exit_record: None,
    };
    // As `run` does: a failed preparation gives back what it took itself.
    let prepared = pipeline
        .prepare(admitted, plan, &placement, stop, None, &mut on_event)
        .await?;
    let ended = pipeline
        .launch(&prepared, &placement, stop, &mut on_event)
        .await;
    pipeline.release(&holdings);
    ended.map(|ending| (ending, dir))
}

fn assert_released(world: &World) {
    let seam = &world.pipeline.seam;
    assert!(
        seam.leases.lock().unwrap().is_empty(),
        "a lease is still held"
    );
    let tasks = world.pipeline.state_dir.join("tasks");
    for dir in std::fs::read_dir(&tasks).into_iter().flatten().flatten() {
        for name in ["disk.qcow2", "qmp.sock"] {
            assert!(
                !dir.path().join(name).exists(),
                "{name} left in {}",
                dir.path().display()
            );
        }
    }
}

#[tokio::test]
async fn a_rejection_stops_before_the_fetch() {
    let w = world(
        KvmStatus::Usable,
        |_| ChainOutcome::Rejected {
            policy: "image-allowlist".into(),
            reason: "not from an allowed host".into(),
            fault: false,
            steps: Vec::new(),
        },
        FetchScript::Image,
        Vec::new(),
    );
    let mut seen = Seen::default();
    let err = run(&w, task(""), &StopSignal::default(), &mut seen)
        .await
        .unwrap_err();
    assert!(
        matches!(err, LaunchError::Rejected { fault: false, .. }),
        "{err:?}"
    );
    assert_eq!(err.exit(), Exit::REJECTED);
    assert!(
        err.to_string().contains("not from an allowed host"),
        "{err}"
    );
    assert_eq!(
        w.pipeline.seam.logged("fetch"),
        0,
        "fetched a rejected image"
    );
    assert_eq!(seen.events, ["facts", "policies"]);
    assert!(
        !w.pipeline.state_dir.join("tasks").exists(),
        "a task directory for a rejected task"
    );
}

#[tokio::test]
async fn a_rewrite_is_what_runs() {
    let w = world(
        KvmStatus::Usable,
        |mut task| {
            task.memory_mb = 320;
            accept(task)
        },
        FetchScript::Image,
        vec![Script::ReadyThenShutdown],
    );
    let mut seen = Seen::default();
    let (ending, dir) = run(&w, task(""), &StopSignal::default(), &mut seen)
        .await
        .unwrap();
    assert_eq!(ending, Ending::GuestShutdown);
    assert_eq!(ending.exit(), Exit::SUCCESS);
    let written: Task = serde_json::from_slice(&std::fs::read(dir.task_file()).unwrap()).unwrap();
    assert_eq!(written.memory_mb, 320, "task.json holds the final task");
    let start = w
        .pipeline
        .seam
        .log()
        .into_iter()
        .find(|l| l.starts_with("start"))
        .unwrap();
    assert!(start.contains(" -m 320 "), "{start}");
    assert_eq!(
        seen.events,
        [
            "facts",
            "policies",
            "accelerator tcg",
            "image",
            "started tcg",
            "port 18080",
            "ready"
        ]
    );
    assert_released(&w);
}

#[tokio::test]
async fn a_plan_right_after_the_admission_probes_the_host_once_and_a_relaunch_again() {
    let w = world(
        KvmStatus::Usable,
        accept,
        FetchScript::Image,
        vec![Script::ReadyThenShutdown],
    );
    run(&w, task(""), &StopSignal::default(), &mut Seen::default())
        .await
        .unwrap();
    assert_eq!(
        w.pipeline.seam.logged("facts"),
        1,
        "{:?}",
        w.pipeline.seam.log()
    );
    let stored = Admitted::of(task(""), &w.pipeline.config).unwrap();
    w.pipeline.plan(&stored, &mut |_| {}).await.unwrap();
    assert_eq!(
        w.pipeline.seam.logged("facts"),
        2,
        "a relaunch sees the host as it is now"
    );
}

#[tokio::test]
async fn refused_args_exit_invalid_before_anything_runs() {
    let w = world(KvmStatus::Usable, accept, FetchScript::Image, Vec::new());
    let mut seen = Seen::default();
    let err = run(
        &w,
        task("args = [\"-no-reboot\"]\n"),
        &StopSignal::default(),
        &mut seen,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, LaunchError::Args(_)), "{err:?}");
    assert_eq!(err.kind(), Kind::Invalid);
    assert_eq!(err.exit(), Exit::INVALID);
    assert_eq!(w.pipeline.seam.logged("fetch"), 0);
}

/// The events of a kvm task that ran to its end on a host whose KVM is
/// `kvm`.
async fn kvm_task_events(kvm: KvmStatus) -> Vec<String> {
    let w = world(
        kvm,
        accept,
        FetchScript::Image,
        vec![Script::ReadyThenShutdown],
    );
    let mut seen = Seen::default();
    let task = task("accelerator = \"kvm\"\n");
    run(&w, task, &StopSignal::default(), &mut seen)
        .await
        .unwrap();
    seen.events
}

#[tokio::test]
async fn each_accelerator_choice() {
    let usable = kvm_task_events(KvmStatus::Usable).await;
    assert!(usable.contains(&"started kvm".to_string()), "{usable:?}");
    // tcg where KVM is known to lie and the task allows it.
    let lying = kvm_task_events(KvmStatus::Unusable("emulation failure".into())).await;
    assert!(lying.contains(&"accelerator tcg".to_string()), "{lying:?}");
    // A refusal where it does not.
    let w = world(KvmStatus::Absent, accept, FetchScript::Image, Vec::new());
    let no_fallback = task("accelerator = \"kvm\"\nkvm_fallback = false\n");
    let err = run(
        &w,
        no_fallback,
        &StopSignal::default(),
        &mut Seen::default(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, LaunchError::KvmUnavailable(KvmStatus::Absent)),
        "{err:?}"
    );
    assert_eq!(err.exit(), Exit::QEMU);
    assert_eq!(w.pipeline.seam.logged("fetch"), 0);
}

#[tokio::test]
async fn a_failed_fetch_holds_nothing() {
    let w = world(KvmStatus::Usable, accept, FetchScript::Fail, Vec::new());
    let err = run(&w, task(""), &StopSignal::default(), &mut Seen::default())
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::Fetch(_)), "{err:?}");
    assert_eq!(err.kind(), Kind::Fetch { retryable: false });
    assert_eq!(err.exit(), Exit::FETCH);
    assert_eq!(w.pipeline.seam.logged("start"), 0);
    assert_released(&w);
}

#[tokio::test]
async fn a_stop_during_the_fetch_launches_nothing() {
    let w = world(KvmStatus::Usable, accept, FetchScript::Hang, Vec::new());
    let stop = StopSignal::default();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        stopper.request(None);
    });
    let err = run(&w, task(""), &stop, &mut Seen::default())
        .await
        .unwrap_err();
    assert!(matches!(err, LaunchError::Interrupted), "{err:?}");
    assert_eq!(err.exit(), Exit::INTERRUPTED);
    assert_eq!(w.pipeline.seam.logged("start"), 0);
    assert_released(&w);
}

#[tokio::test]
async fn a_stop_during_the_boot_is_graceful_with_the_requested_timeout() {
    let w = world(
        KvmStatus::Usable,
        accept,
        FetchScript::Image,
        vec![Script::BootUntilStopped],
    );
    let stop = StopSignal::default();
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        stopper.request(Some(Duration::from_secs(7)));
    });
    let mut seen = Seen::default();
    let (ending, _) = run(&w, task(""), &stop, &mut seen).await.unwrap();
    assert_eq!(ending, Ending::Stopped(StopHow::Powerdown));
    assert_eq!(seen.events.last().map(String::as_str), Some("stopping"));
    assert_eq!(
        w.pipeline.seam.logged("stop graceful=true timeout=7"),
        1,
        "{:?}",
        w.pipeline.seam.log()
    );
    assert_released(&w);
}

#[tokio::test]
async fn a_kvm_failure_relaunches_under_tcg_once_and_is_remembered() {
    let w = world(
        KvmStatus::Usable,
        accept,
        FetchScript::Image,
        vec![
            Script::Boot(Boot::KvmFailed("KVM internal error. Suberror: 1".into())),
            Script::ReadyThenShutdown,
        ],
    );
    let mut seen = Seen::default();
    let (ending, _) = run(
        &w,
        task("accelerator = \"kvm\"\n"),
        &StopSignal::default(),
        &mut seen,
    )
    .await
    .unwrap();
    assert_eq!(ending, Ending::GuestShutdown);
    let log = w.pipeline.seam.log();
    let starts: Vec<&String> = log.iter().filter(|l| l.starts_with("start")).collect();
    assert_eq!(starts.len(), 2, "{log:?}");
    assert!(starts[0].contains("-accel kvm"), "{}", starts[0]);
    assert!(starts[1].contains("-accel tcg"), "{}", starts[1]);
    assert_eq!(w.pipeline.seam.logged("verdict KVM internal error"), 1);
    assert_eq!(
        w.pipeline.seam.logged("stop graceful=false timeout=0"),
        1,
        "the failed kvm boot is stopped"
    );
    assert!(seen.events.contains(&"kvm fallback".to_string()));
    assert_released(&w);
}

#[tokio::test]
async fn a_kvm_failure_without_fallback_ends_the_task() {
    let w = world(
        KvmStatus::Usable,
        accept,
        FetchScript::Image,
        vec![Script::Boot(Boot::KvmFailed("KVM internal error".into()))],
    );
    let (ending, _) = run(
        &w,
        task("accelerator = \"kvm\"\nkvm_fallback = false\n"),
        &StopSignal::default(),
        &mut Seen::default(),
    )
    .await
    .unwrap();
    assert!(matches!(ending, Ending::KvmUnusable { .. }), "{ending:?}");
    assert_eq!(ending.exit(), Exit::QEMU);
    assert_eq!(w.pipeline.seam.logged("start"), 1);
    assert_released(&w);
}

#[tokio::test]
async fn a_guest_never_ready_is_stopped_and_says_so() {
    let w = world(
        KvmStatus::Usable,
        accept,
        FetchScript::Image,
        vec![Script::Boot(Boot::NotReady)],
    );
    let (ending, _) = run(
        &w,
        task("ready_timeout_s = 9\n"),
        &StopSignal::default(),
        &mut Seen::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        ending,
        Ending::NotReady {
            after: Duration::from_secs(9)
        }
    );
    assert_eq!(ending.exit(), Exit::NOT_READY);
    assert_eq!(w.pipeline.seam.logged("stop graceful=false"), 1);
    assert_released(&w);
}

#[tokio::test]
async fn an_adopted_vm_is_stopped_again_when_its_stop_died_with_its_supervisor() {
    let w = world(KvmStatus::Usable, accept, FetchScript::Image, Vec::new());
    let dir = task_dir(&w.pipeline.state_dir, "web").unwrap();
    let found = Found {
        qemu: ProcessIdentity {
            pid: 4242,
            start_time: 1,
        },
        shim: ProcessIdentity {
            pid: 4241,
            start_time: 1,
        },
        exit_record: dir.root.join("exit.json"),
        dir: dir.clone(),
    };
    let task = task("kill_timeout_s = 11\n");
    let Adoption::Running(vm) = w.pipeline.adopt(&found, &task.checksum).await else {
        panic!("not adopted");
    };
    assert!(
        w.pipeline.seam.leases.lock().unwrap().contains(&dir.key()),
        "the lease is renewed"
    );
    let mut seen = Seen::default();
    let ending = w
        .pipeline
        .resume(
            vm,
            &task,
            Accelerator::Tcg,
            Phase::Stopping,
            &StopSignal::default(),
            &mut |e| seen.record(e),
        )
        .await;
    assert_eq!(ending, Ending::Stopped(StopHow::Powerdown));
    assert_eq!(w.pipeline.seam.logged("stop graceful=true timeout=11"), 1);
}

#[test]
fn a_boot_phase_keeps_what_is_left_of_the_timeout_and_a_minimum() {
    assert_eq!(
        Phase::booting(60, 1_000, 21_000),
        Phase::Booting {
            left: Duration::from_secs(40)
        }
    );
    assert_eq!(
        Phase::booting(60, 1_000, 99_000),
        Phase::Booting {
            left: Duration::from_secs(5)
        }
    );
}

/// No message a user sees repeats its own cause: each layer says what it
/// was doing, the cause says why.
#[test]
fn no_error_message_repeats_its_cause() {
    let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
    let errors: Vec<LaunchError> = vec![
        LaunchError::Start(SuperviseError::Process(
            crate::qemu::process::ProcessError::Spawn {
                binary: "/usr/bin/qemu-system-x86_64".into(),
                source: io(),
            },
        )),
        LaunchError::Start(SuperviseError::EarlyExit {
            status: "exit code 1".into(),
            log_tail: "Could not set up host forwarding rule".into(),
        }),
        LaunchError::Reconnect(SuperviseError::Qmp(crate::qemu::qmp::QmpError::Io(io()))),
        LaunchError::Fetch(FetchError::UnsupportedScheme {
            source_url: "ftp://h/x".into(),
        }),
        LaunchError::Qemu(FingerprintError::QemuNotFound),
        LaunchError::TaskDir {
            path: "/var/lib/qemu-executor/tasks".into(),
            source: io(),
        },
        LaunchError::Image(ImageError::Read {
            path: "/cache/x".into(),
            source: io(),
        }),
        LaunchError::Isolation(crate::host::isolation::IsolationError::NoSuchUser(
            "qe".into(),
        )),
        LaunchError::KvmUnavailable(KvmStatus::Absent),
        LaunchError::ShimKilled,
    ];
    for err in &errors {
        assert_no_repeats(err);
    }
}

pub(crate) fn assert_no_repeats(err: &dyn std::error::Error) {
    let mut layers = vec![err.to_string()];
    let mut cause = err.source();
    while let Some(c) = cause {
        layers.push(c.to_string());
        cause = c.source();
    }
    for (i, outer) in layers.iter().enumerate() {
        for inner in &layers[i + 1..] {
            assert!(
                !outer.contains(inner.as_str()) && outer != inner,
                "{outer:?} repeats its cause {inner:?} (whole chain: {})",
                crate::error_chain(err)
            );
        }
    }
}
