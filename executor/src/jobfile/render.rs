//! A task written out as a task file in our TOML format, every field
//! explicit: where the scheduler's defaults differ from ours (kill
//! timeout, graceful shutdown, memory) the file must say so, and a file
//! that says everything reads back to the very same task.

use policy_sdk::Task;

use super::Loaded;

/// The task as a task file. Reading it back gives the same task.
pub fn to_toml(task: &Task) -> String {
    // A Task's serde form uses the task file's own field names; what can
    // fail to serialise (a map with non-string keys) a Task does not hold.
    toml::to_string_pretty(task).expect("a task serialises to TOML")
}

/// The task file `convert` prints: a comment saying where it came from
/// and what was ignored, then the task.
pub fn converted_file(loaded: &Loaded, source: &str) -> String {
    let mut out = String::new();
    match &loaded.origin {
        Some(origin) => out.push_str(&format!(
            "# Converted from {source} (job {:?}, group {:?}, task {:?}) by qemu-executor convert.\n",
            origin.job, origin.group, origin.task
        )),
        None => out.push_str(&format!(
            "# Task file {source}, with every default written out, by qemu-executor convert.\n"
        )),
    }
    if !loaded.warnings.is_empty() {
        out.push_str("# Ignored here:\n");
        for w in &loaded.warnings {
            let line = w.to_string().replace('\n', " ");
            out.push_str(&format!("#   {line}\n"));
        }
    }
    out.push('\n');
    out.push_str(&to_toml(&loaded.task));
    out
}
