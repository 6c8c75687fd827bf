//! The job around the task: the one `job` block, its groups (or the tasks
//! an early job put straight under `job`), the qemu task to run, and the
//! job's and group's own fields, most of which only guide the scheduler.

use super::hcl::Block;
use super::mapping::{self, Ctx, JobType, Scope};
use super::{Converted, JobError};

/// Job fields that only matter to the scheduler.
const JOB_IGNORED: &[&str] = &[
    "affinity",
    "all_at_once",
    "constraint",
    "consul",
    "consul_token",
    "datacenters",
    "id",
    "meta",
    "migrate",
    "multiregion",
    "name",
    "namespace",
    "node_pool",
    "parameterized",
    "periodic",
    "priority",
    "region",
    "reschedule",
    "spread",
    "ui",
    "update",
    "vault",
    "vault_token",
];

/// Group fields that only matter to the scheduler.
const GROUP_IGNORED: &[&str] = &[
    "affinity",
    "constraint",
    "consul",
    "count",
    "disconnect",
    "ephemeral_disk",
    "max_client_disconnect",
    "meta",
    "migrate",
    "prevent_reschedule_on_lost",
    "reschedule",
    "scaling",
    "shutdown_delay",
    "spread",
    "stop_after_client_disconnect",
    "update",
    "vault",
];

/// A task with the group it sits in (`None`: straight under the job).
struct Candidate<'a> {
    group: Option<&'a Block>,
    task: &'a Block,
    driver: String,
}

impl Candidate<'_> {
    fn group_name(&self) -> &str {
        self.group.map_or(self.task.label(), Block::label)
    }

    fn full_name(&self) -> String {
        format!("{}/{}", self.group_name(), self.task.label())
    }
}

pub fn convert(file: &Block, wanted: Option<&str>) -> Result<Converted, JobError> {
    let mut ctx = Ctx::default();
    let job = the_job(&mut ctx, file)?;

    let mut candidates = Vec::new();
    for block in &job.blocks {
        match block.ident.as_str() {
            "group" => {
                for task in block.blocks_named("task") {
                    candidates.push(candidate(Some(block), task));
                }
            }
            "task" => candidates.push(candidate(None, block)),
            _ => {}
        }
    }
    let chosen = choose(job, &candidates, wanted)?;

    let job_type = job_fields(&mut ctx, job);
    let mut scope = Scope {
        job_type,
        task: chosen.task,
        group_networks: Vec::new(),
        group_services: Vec::new(),
        group_restart: None,
    };
    if let Some(group) = chosen.group {
        group_fields(&mut ctx, group, &mut scope);
    }
    for other in candidates
        .iter()
        .filter(|c| !std::ptr::eq(c.task, chosen.task))
    {
        let why = if other.driver == "qemu" {
            "not run: one task runs at a time here (name it with --task to run it instead)"
                .to_string()
        } else {
            format!(
                "not run: only qemu tasks run here, and its driver is {:?}",
                other.driver
            )
        };
        ctx.warn(
            other.task.line,
            format!("task {:?}", other.full_name()),
            why,
        );
    }

    let task = mapping::task(&mut ctx, &scope);
    // In the order of the file, as a person reads it.
    ctx.problems.sort_by_key(|p| p.line);
    ctx.warnings.sort_by_key(|w| w.line);
    match task {
        Some(task) if ctx.problems.is_empty() => Ok(Converted {
            task,
            warnings: ctx.warnings,
            job: job.label().to_string(),
            group: chosen.group_name().to_string(),
            task_name: chosen.task.label().to_string(),
        }),
        _ => Err(JobError::problems(ctx.problems)),
    }
}

/// The file's single `job` block; variables and locals are let be, as the
/// values that use them cannot be read anyway.
fn the_job<'a>(ctx: &mut Ctx, file: &'a Block) -> Result<&'a Block, JobError> {
    let mut jobs = Vec::new();
    for block in &file.blocks {
        match block.ident.as_str() {
            "job" => jobs.push(block),
            "variable" | "variables" | "locals" => ctx.warn(
                block.line,
                block.ident.as_str(),
                "ignored: values that use variables cannot be read here",
            ),
            other => ctx.problem(
                block.line,
                other,
                "not part of a job file (a job file holds one job block)",
            ),
        }
    }
    for attr in &file.attrs {
        ctx.problem(
            attr.line,
            attr.key.as_str(),
            "not part of a job file (a job file holds one job block)",
        );
    }
    match jobs.as_slice() {
        [job] if ctx.problems.is_empty() => Ok(job),
        [] if ctx.problems.is_empty() => {
            ctx.problem(
                1,
                "job",
                "the file holds no job block: write job \"name\" { … }",
            );
            Err(JobError::problems(std::mem::take(&mut ctx.problems)))
        }
        [_, second, ..] => {
            ctx.problem(
                second.line,
                "job",
                "a job file holds one job; this is a second one",
            );
            Err(JobError::problems(std::mem::take(&mut ctx.problems)))
        }
        _ => Err(JobError::problems(std::mem::take(&mut ctx.problems))),
    }
}

fn candidate<'a>(group: Option<&'a Block>, task: &'a Block) -> Candidate<'a> {
    let driver = task
        .attr("driver")
        .and_then(|a| a.string().ok())
        .unwrap_or_default();
    Candidate {
        group,
        task,
        driver,
    }
}

fn choose<'a, 'b>(
    job: &Block,
    candidates: &'b [Candidate<'a>],
    wanted: Option<&str>,
) -> Result<&'b Candidate<'a>, JobError> {
    let qemu: Vec<&Candidate<'_>> = candidates.iter().filter(|c| c.driver == "qemu").collect();
    // A task name is unique within its group only; GROUP/TASK tells apart
    // two groups' tasks of one name.
    let listing = |list: &[&Candidate<'_>]| {
        list.iter()
            .map(|c| c.full_name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if qemu.is_empty() {
        let others = if candidates.is_empty() {
            "none".to_string()
        } else {
            candidates
                .iter()
                .map(|c| format!("{} ({})", c.full_name(), c.driver))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(JobError::NoQemuTask {
            job: job.label().to_string(),
            others,
        });
    }
    let matching: Vec<&Candidate<'_>> = match wanted {
        None => qemu.clone(),
        Some(name) => qemu
            .iter()
            .copied()
            .filter(|c| c.task.label() == name || c.full_name() == name)
            .collect(),
    };
    match matching.as_slice() {
        [one] => Ok(one),
        [] => Err(JobError::TaskNotFound {
            job: job.label().to_string(),
            name: wanted.unwrap_or_default().to_string(),
            candidates: listing(&qemu),
        }),
        many => Err(JobError::AmbiguousTask {
            job: job.label().to_string(),
            count: many.len(),
            candidates: listing(many),
        }),
    }
}

fn job_fields(ctx: &mut Ctx, job: &Block) -> JobType {
    let mut job_type = JobType::Service;
    for attr in &job.attrs {
        let field = format!("job.{}", attr.key);
        match attr.key.as_str() {
            "type" => match ctx.read(attr, &field, super::hcl::Attr::string).as_deref() {
                Some("service" | "system") | None => {}
                Some("batch" | "sysbatch") => job_type = JobType::Batch,
                Some(other) => ctx.problem(
                    attr.line,
                    field,
                    format!("{other:?} is not a job type (service, batch, system, sysbatch)"),
                ),
            },
            key => ignored_or_unknown(ctx, attr.line, &field, key, JOB_IGNORED, "job"),
        }
    }
    for block in &job.blocks {
        let field = format!("job.{}", block.ident);
        match block.ident.as_str() {
            "group" | "task" => {}
            key => ignored_or_unknown(ctx, block.line, &field, key, JOB_IGNORED, "job"),
        }
    }
    job_type
}

fn group_fields<'a>(ctx: &mut Ctx, group: &'a Block, scope: &mut Scope<'a>) {
    for attr in &group.attrs {
        let field = format!("group.{}", attr.key);
        ignored_or_unknown(ctx, attr.line, &field, &attr.key, GROUP_IGNORED, "group");
    }
    for block in &group.blocks {
        let field = format!("group.{}", block.ident);
        match block.ident.as_str() {
            "task" => {}
            "network" => scope.group_networks.push(block),
            "service" => scope.group_services.push(block),
            "restart" => scope.group_restart = Some(block),
            "volume" => ctx.problem(
                block.line,
                field,
                "not supported: the VM's only disk is its image",
            ),
            key => ignored_or_unknown(ctx, block.line, &field, key, GROUP_IGNORED, "group"),
        }
    }
}

fn ignored_or_unknown(
    ctx: &mut Ctx,
    line: usize,
    field: &str,
    key: &str,
    ignored: &[&str],
    what: &str,
) {
    if ignored.contains(&key) {
        ctx.warn(
            line,
            field,
            "ignored: it only guides the scheduler, and there is none here",
        );
    } else {
        ctx.problem(line, field, format!("{key:?} is not a field of a {what}"));
    }
}
