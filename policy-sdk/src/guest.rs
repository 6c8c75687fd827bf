//! The component side, compiled only for `wasm32`: wit-bindgen's bindings of
//! `wit/policy.wit` and the conversions between its types and the SDK's, so
//! that policies only ever see [`crate::types`]. Used by
//! [`crate::export_policy!`]; not an API of its own.

pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "__export_policy_component",
        default_bindings_module: "policy_sdk::guest::bindings",
    });
}

pub use bindings::exports::qemu_executor::policy::evaluator::Guest;
pub use bindings::qemu_executor::policy::types as wit;

use crate::types as sdk;

pub fn metadata<P: crate::Policy>() -> wit::PolicyMetadata {
    let m = crate::metadata::<P>();
    wit::PolicyMetadata {
        name: m.name,
        version: m.version,
        rewrites: m.rewrites,
    }
}

pub fn evaluate<P: crate::Policy>(
    task: wit::Task,
    facts: wit::HostFacts,
    settings: &str,
) -> wit::Decision {
    let task = sdk::Task::from(task);
    let facts = sdk::HostFacts::from(facts);
    match crate::evaluate::<P>(&task, &facts, settings) {
        sdk::Decision::Accept => wit::Decision::Accept,
        sdk::Decision::Reject { reason } => wit::Decision::Reject(reason),
        sdk::Decision::Rewrite { task, reason } => wit::Decision::Rewrite(wit::Rewrite {
            task: (*task).into(),
            reason,
        }),
    }
}

crate::__wire_conversions!(bindings::qemu_executor::policy::types);
