//! The qemu task's own fields onto our task file: its `config` (both
//! generations), `resources`, `restart` and `kill_timeout`, with the
//! scheduler's defaults. The image and the ports have modules of their
//! own; `docs/jobfile.md` has the table.

use policy_sdk::{Accelerator, DriveInterface, RestartMode};

use super::hcl::{self, Attr, Block};
use super::{Problem, Warning, image, ports};
use crate::task::{FieldErrors, RestartFile, TaskFile};

/// The scheduler's defaults where they differ from a task file's.
pub const DEFAULT_MEMORY_MB: i64 = 300;
pub const DEFAULT_KILL_TIMEOUT_S: i64 = 5;
pub const DEFAULT_GRACEFUL_SHUTDOWN: bool = false;
/// The only emulator the executor runs; the operator picks its binary.
pub const EMULATOR: &str = "qemu-system-x86_64";

/// Problems, warnings, and where each of our fields came from.
#[derive(Default)]
pub struct Ctx {
    pub problems: Vec<Problem>,
    pub warnings: Vec<Warning>,
    /// Our field (or its prefix, `ports[1]`) → their line and field, so a
    /// validation problem points at what the user wrote.
    origins: Vec<(String, usize, String)>,
}

impl Ctx {
    pub fn problem(&mut self, line: usize, field: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(Problem {
            line,
            field: field.into(),
            problem: problem.into(),
        });
    }

    pub fn warn(&mut self, line: usize, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            line,
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn origin(&mut self, ours: impl Into<String>, line: usize, theirs: impl Into<String>) {
        self.origins.push((ours.into(), line, theirs.into()));
    }

    /// Reads one attribute; a bad value becomes a problem naming `field`.
    pub fn read<T>(
        &mut self,
        attr: &Attr,
        field: &str,
        f: impl FnOnce(&Attr) -> hcl::ValueResult<T>,
    ) -> Option<T> {
        match f(attr) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(attr.line, field, e);
                None
            }
        }
    }

    /// Reads a duration in whole seconds; rounding up is worth a warning.
    pub fn duration_s(&mut self, attr: &Attr, field: &str) -> Option<i64> {
        let (secs, rounded) = self.read(attr, field, Attr::duration_s)?;
        if rounded {
            self.warn(
                attr.line,
                field,
                format!("rounded up to {secs}s: this executor counts whole seconds"),
            );
        }
        Some(secs)
    }

    /// A problem of the task file, pointed back at the job's field.
    fn translate(&mut self, field: &str, problem: &str, task_line: usize) {
        let prefix = field.split('.').next().unwrap_or(field);
        let found = self
            .origins
            .iter()
            .find(|(ours, _, _)| ours == field)
            .or_else(|| self.origins.iter().find(|(ours, _, _)| ours == prefix))
            .map(|(_, line, theirs)| (*line, theirs.clone()));
        let (line, theirs) = found.unwrap_or((task_line, "task".to_string()));
        // One forward for TCP and one for UDP share their job line: say it
        // once.
        if self
            .problems
            .iter()
            .any(|p| p.line == line && p.problem == problem)
        {
            return;
        }
        self.problem(line, format!("{theirs} (our {field})"), problem);
    }
}

/// How the job's `type` shapes the restart defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobType {
    Service,
    Batch,
}

impl JobType {
    /// The scheduler's restart defaults: (attempts, interval_s, delay_s).
    fn restart_defaults(self) -> (i64, i64, i64) {
        match self {
            JobType::Service => (2, 1800, 15),
            JobType::Batch => (3, 86_400, 15),
        }
    }
}

/// The blocks that shape one task, from its job and group.
pub struct Scope<'a> {
    pub job_type: JobType,
    pub task: &'a Block,
    pub group_networks: Vec<&'a Block>,
    pub group_services: Vec<&'a Block>,
    pub group_restart: Option<&'a Block>,
}

/// Task-level fields that only matter to the scheduler.
const TASK_IGNORED: &[(&str, &str)] = &[
    ("constraint", "placement is the scheduler's"),
    ("affinity", "placement is the scheduler's"),
    ("meta", "metadata is for the scheduler"),
    ("leader", "there is only one task here"),
    ("lifecycle", "there is only one task here"),
    ("kind", "there is only one task here"),
    (
        "shutdown_delay",
        "it delays service deregistration, which does not happen here",
    ),
    (
        "logs",
        "qemu's log and the serial console go to the task directory",
    ),
    ("identity", "workload identities come from the scheduler"),
    ("vault", "secrets come from the scheduler"),
    ("consul", "service registration does not happen here"),
    ("scaling", "there is one VM per run here"),
    (
        "kill_signal",
        "qemu is stopped over QMP, then killed with SIGKILL at kill_timeout",
    ),
    (
        "env",
        "the scheduler gives it to qemu's process, which the guest never sees",
    ),
];

/// Task-level fields that change what runs, which we cannot honour.
const TASK_UNSUPPORTED: &[(&str, &str)] = &[
    (
        "template",
        "templates are rendered by the scheduler, not here",
    ),
    ("volume_mount", "the VM's only disk is its image"),
    ("dispatch_payload", "there are no dispatched payloads here"),
    ("csi_plugin", "CSI plugins are the scheduler's"),
    ("user", "qemu runs as the executor's user"),
];

/// Maps the task onto a task file and validates it as a task file is.
pub fn task(ctx: &mut Ctx, scope: &Scope<'_>) -> Option<policy_sdk::Task> {
    let task = scope.task;
    let mut config = None;
    let mut artifacts = Vec::new();
    let mut resources = None;
    let mut restart = None;
    let mut kill_timeout = None;
    let mut services = scope.group_services.clone();
    let mut networks = scope.group_networks.clone();

    for attr in &task.attrs {
        match attr.key.as_str() {
            "driver" => {}
            "kill_timeout" => {
                kill_timeout = ctx.duration_s(attr, "kill_timeout");
                ctx.origin("kill_timeout_s", attr.line, "kill_timeout");
            }
            key => other_field(ctx, attr.line, key, false),
        }
    }
    for block in &task.blocks {
        match block.ident.as_str() {
            "config" => config = Some(block),
            "artifact" => artifacts.push(block),
            "resources" => resources = Some(block),
            "restart" => restart = Some(block),
            "service" => services.push(block),
            "network" => networks.push(block),
            key => other_field(ctx, block.line, key, true),
        }
    }

    let Some(config) = config else {
        ctx.problem(
            task.line,
            "config",
            "the qemu task has no config block; it needs image_path or image_source",
        );
        return None;
    };
    let cfg = read_config(ctx, config);
    let resources = resources.map(|r| read_resources(ctx, r, &mut networks));
    let image = image::resolve(ctx, config, &cfg.image, &artifacts);
    let ports = ports::resolve(
        ctx,
        config.line,
        &cfg.ports,
        &networks,
        &services,
        cfg.guest_port_pair,
    );
    let restart = restart_policy(ctx, scope.job_type, scope.group_restart, restart);

    if !ctx.problems.is_empty() {
        return None;
    }
    let image = image?;
    ctx.origin("name", task.line, format!("task {:?}", task.label()));
    let file = TaskFile {
        name: task.label().to_string(),
        image_source: image.source,
        checksum: image.checksum,
        accelerator: Some(cfg.accelerator.unwrap_or(Accelerator::Tcg)),
        kvm_fallback: None,
        host_port: None,
        guest_port: None,
        ports,
        memory_mb: Some(
            resources
                .as_ref()
                .and_then(|r| r.memory_mb)
                .unwrap_or(DEFAULT_MEMORY_MB),
        ),
        cpus: Some(resources.as_ref().and_then(|r| r.cores).unwrap_or(1)),
        kill_timeout_s: Some(kill_timeout.unwrap_or(DEFAULT_KILL_TIMEOUT_S)),
        ready_timeout_s: None,
        ready_serial: None,
        machine_type: Some(
            cfg.machine_type
                .unwrap_or_else(|| crate::task::DEFAULT_MACHINE_TYPE.to_string()),
        ),
        drive_interface: Some(cfg.drive_interface.unwrap_or(DriveInterface::Ide)),
        graceful_shutdown: Some(cfg.graceful_shutdown.unwrap_or(DEFAULT_GRACEFUL_SHUTDOWN)),
        args: cfg.args,
        restart: Some(restart),
    };
    match file.into_task() {
        Ok(task) => Some(task),
        Err(FieldErrors(errors)) => {
            for e in errors {
                ctx.translate(&e.field, &e.problem, task.line);
            }
            None
        }
    }
}

/// A task field that is neither mapped nor understood.
fn other_field(ctx: &mut Ctx, line: usize, key: &str, is_block: bool) {
    if let Some((_, why)) = TASK_IGNORED.iter().find(|(k, _)| *k == key) {
        ctx.warn(line, key, format!("ignored: {why}"));
    } else if let Some((_, why)) = TASK_UNSUPPORTED.iter().find(|(k, _)| *k == key) {
        ctx.problem(line, key, format!("not supported: {why}"));
    } else {
        let what = if is_block { "block" } else { "field" };
        ctx.problem(line, key, format!("not a {what} of a task"));
    }
}

/// The driver's config as read, before the image and ports are resolved.
#[derive(Default)]
pub struct Config {
    pub image: image::ImageFields,
    pub accelerator: Option<Accelerator>,
    pub graceful_shutdown: Option<bool>,
    pub args: Vec<String>,
    pub drive_interface: Option<DriveInterface>,
    pub machine_type: Option<String>,
    pub ports: Vec<ports::PortMapEntry>,
    /// The original driver's `host_port`/`guest_port`.
    pub guest_port_pair: ports::PortPair,
}

const CONFIG_FIELDS: &str = "image_path, image_source, checksum, accelerator, host_port, guest_port, graceful_shutdown, guest_agent, args, port_map, drive_interface, machine_type, emulator";

fn read_config(ctx: &mut Ctx, config: &Block) -> Config {
    let mut cfg = Config::default();
    for attr in &config.attrs {
        let field = format!("config.{}", attr.key);
        let field = field.as_str();
        match attr.key.as_str() {
            "image_path" => {
                cfg.image.image_path = ctx.read(attr, field, Attr::string).map(|v| (v, attr.line))
            }
            "image_source" => {
                cfg.image.image_source = ctx.read(attr, field, Attr::string).map(|v| (v, attr.line))
            }
            "checksum" => {
                cfg.image.checksum = ctx.read(attr, field, Attr::string).map(|v| (v, attr.line))
            }
            "accelerator" => {
                cfg.accelerator = match ctx.read(attr, field, Attr::string).as_deref() {
                    Some("kvm") => Some(Accelerator::Kvm),
                    Some("tcg") => Some(Accelerator::Tcg),
                    Some(other) => {
                        ctx.problem(
                            attr.line,
                            field,
                            format!(
                                "{other:?} is not supported: kvm or tcg (x86_64 Linux hosts only)"
                            ),
                        );
                        None
                    }
                    None => None,
                };
                ctx.origin("accelerator", attr.line, field);
            }
            "host_port" => {
                cfg.guest_port_pair.host = ctx.read(attr, field, Attr::int).map(|v| (v, attr.line))
            }
            "guest_port" => {
                cfg.guest_port_pair.guest = ctx.read(attr, field, Attr::int).map(|v| (v, attr.line))
            }
            "graceful_shutdown" => {
                cfg.graceful_shutdown = ctx.read(attr, field, Attr::bool);
            }
            "guest_agent" => {
                if ctx.read(attr, field, Attr::bool) == Some(true) {
                    ctx.problem(attr.line, field, "not supported: there is no guest agent channel here; the executor talks to qemu over QMP only");
                }
            }
            "args" => {
                cfg.args = ctx.read(attr, field, Attr::strings).unwrap_or_default();
                ctx.origin("args", attr.line, field);
            }
            "port_map" => cfg.ports.extend(ports::port_map_attr(ctx, attr)),
            "drive_interface" => {
                cfg.drive_interface = match ctx.read(attr, field, Attr::string).as_deref() {
                    Some("ide") => Some(DriveInterface::Ide),
                    Some("virtio") => Some(DriveInterface::Virtio),
                    Some(other) => {
                        ctx.problem(
                            attr.line,
                            field,
                            format!("{other:?} is not supported: ide or virtio"),
                        );
                        None
                    }
                    None => None,
                };
            }
            "machine_type" => {
                cfg.machine_type = ctx.read(attr, field, Attr::string);
                ctx.origin("machine_type", attr.line, field);
            }
            "emulator" => {
                if let Some(emulator) = ctx.read(attr, field, Attr::string)
                    && emulator != EMULATOR
                {
                    ctx.problem(attr.line, field, format!("{emulator:?} is not supported: only {EMULATOR} runs here (the operator picks its binary in executor.toml)"));
                }
            }
            other => ctx.problem(
                attr.line,
                field,
                format!("{other:?} is not a field of the qemu driver's config ({CONFIG_FIELDS})"),
            ),
        }
    }
    for block in &config.blocks {
        if block.ident == "port_map" {
            cfg.ports.extend(ports::port_map_block(ctx, block));
        } else {
            ctx.problem(
                block.line,
                format!("config.{}", block.ident),
                format!("not a block of the qemu driver's config ({CONFIG_FIELDS})"),
            );
        }
    }
    // Attributes and blocks were read apart: back to the file's order.
    cfg.ports.sort_by_key(|p| p.line);
    cfg
}

pub struct Resources {
    pub memory_mb: Option<i64>,
    pub cores: Option<i64>,
}

fn read_resources<'a>(ctx: &mut Ctx, block: &'a Block, networks: &mut Vec<&'a Block>) -> Resources {
    let mut res = Resources {
        memory_mb: None,
        cores: None,
    };
    let mut cpu = None;
    let mut memory_max = None;
    for attr in &block.attrs {
        let field = format!("resources.{}", attr.key);
        let field = field.as_str();
        match attr.key.as_str() {
            "memory" => {
                res.memory_mb = ctx.read(attr, field, Attr::int);
                ctx.origin("memory_mb", attr.line, field);
            }
            "cores" => {
                res.cores = ctx.read(attr, field, Attr::int);
                ctx.origin("cpus", attr.line, field);
            }
            "cpu" => cpu = ctx.read(attr, field, Attr::int).map(|v| (v, attr.line)),
            "memory_max" => memory_max = ctx.read(attr, field, Attr::int).map(|v| (v, attr.line)),
            "disk" | "iops" => ctx.warn(attr.line, field, "ignored: disk space is the scheduler's reservation; the VM's disk is its image"),
            "secrets" => ctx.warn(attr.line, field, "ignored: there is no secrets directory here"),
            other => ctx.problem(attr.line, field, format!("{other:?} is not a field of resources (cpu, cores, memory, memory_max, network)")),
        }
    }
    for inner in &block.blocks {
        match inner.ident.as_str() {
            "network" => networks.push(inner),
            "numa" => ctx.warn(
                inner.line,
                "resources.numa",
                "ignored: NUMA placement is the scheduler's",
            ),
            "device" => ctx.problem(
                inner.line,
                "resources.device",
                "not supported: devices are not passed through to the VM here",
            ),
            other => ctx.problem(
                inner.line,
                format!("resources.{other}"),
                "not a block of resources (network)",
            ),
        }
    }
    if let (Some(_), Some((_, line))) = (res.cores, cpu) {
        ctx.problem(
            line,
            "resources.cpu",
            "give cpu (MHz) or cores, not both, as the scheduler requires",
        );
    } else if let Some((mhz, line)) = cpu {
        ctx.warn(line, "resources.cpu", format!("ignored: {mhz} MHz is the scheduler's CPU share, not a number of vCPUs; the VM gets cores vCPUs (default 1)"));
    }
    if let Some((max, line)) = memory_max {
        let memory = res.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        if max < memory {
            ctx.problem(
                line,
                "resources.memory_max",
                format!("{max} is below memory ({memory}), which the scheduler refuses"),
            );
        } else {
            ctx.warn(line, "resources.memory_max", format!("ignored: the VM is sized by memory ({memory} MB), as the scheduler's driver sizes it; memory_max is a limit on the host, which this executor does not set"));
        }
    }
    res
}

/// The restart policy: the job type's defaults, then the group's
/// `restart`, then the task's, field by field.
fn restart_policy(
    ctx: &mut Ctx,
    job_type: JobType,
    group: Option<&Block>,
    task: Option<&Block>,
) -> RestartFile {
    let (attempts, interval_s, delay_s) = job_type.restart_defaults();
    let mut out = RestartFile {
        attempts: Some(attempts),
        interval_s: Some(interval_s),
        delay_s: Some(delay_s),
        mode: Some(RestartMode::Fail),
    };
    for (block, prefix) in [(group, "group.restart"), (task, "restart")] {
        let Some(block) = block else { continue };
        for attr in &block.attrs {
            let field = format!("{prefix}.{}", attr.key);
            let field = field.as_str();
            match attr.key.as_str() {
                "attempts" => {
                    if let Some(v) = ctx.read(attr, field, Attr::int) {
                        out.attempts = Some(v);
                        ctx.origin("restart.attempts", attr.line, field);
                    }
                }
                "interval" => {
                    if let Some(v) = ctx.duration_s(attr, field) {
                        out.interval_s = Some(v);
                        ctx.origin("restart.interval_s", attr.line, field);
                    }
                }
                "delay" => {
                    if let Some(v) = ctx.duration_s(attr, field) {
                        out.delay_s = Some(v);
                        ctx.origin("restart.delay_s", attr.line, field);
                    }
                }
                "mode" => match ctx.read(attr, field, Attr::string).as_deref() {
                    Some("fail") => out.mode = Some(RestartMode::Fail),
                    Some("delay") => out.mode = Some(RestartMode::Delay),
                    Some(other) => ctx.problem(
                        attr.line,
                        field,
                        format!("{other:?} is not a restart mode: fail or delay"),
                    ),
                    None => {}
                },
                "render_templates" => {
                    ctx.warn(attr.line, field, "ignored: templates are not rendered here")
                }
                other => ctx.problem(
                    attr.line,
                    field,
                    format!(
                        "{other:?} is not a field of restart (attempts, interval, delay, mode)"
                    ),
                ),
            }
        }
        for inner in &block.blocks {
            ctx.problem(
                inner.line,
                format!("{prefix}.{}", inner.ident),
                "not a block of restart",
            );
        }
    }
    out
}
