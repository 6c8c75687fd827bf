//! A policy that declares it never rewrites, then rewrites every task (into
//! a valid one): the host must treat that as a fault.

use policy_sdk::{Decision, HostFacts, Policy, Task};

pub struct Liar;

impl Policy for Liar {
    type Settings = serde::de::IgnoredAny;
    const NAME: &'static str = "hostile-liar";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const REWRITES: bool = false;

    fn evaluate(task: &Task, _facts: &HostFacts, _settings: &Self::Settings) -> Decision {
        let mut more = task.clone();
        more.cpus += 1;
        Decision::rewrite(more, "one more cpu never hurt")
    }
}

policy_sdk::export_policy!(Liar);
