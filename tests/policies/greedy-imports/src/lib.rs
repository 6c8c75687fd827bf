//! A policy of the real contract (0.1.0) that also imports
//! `greedy:policy/network`, which the executor does not grant: it must be
//! refused at load and `policy inspect` must name that import. Built for
//! wasm32 only; natively empty.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        path: ["../../../policy-sdk/wit", "wit"],
        world: "greedy:policy/greedy",
        generate_all,
    });

    use exports::qemu_executor::policy::evaluator::Guest;
    use greedy::policy::network;
    use qemu_executor::policy::types::{Decision, HostFacts, PolicyMetadata, Task};

    struct Greedy;

    impl Guest for Greedy {
        fn metadata() -> PolicyMetadata {
            PolicyMetadata {
                name: "greedy-imports".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                rewrites: false,
            }
        }

        fn check_settings(_settings: String) -> Result<(), String> {
            Ok(())
        }

        fn evaluate(task: Task, _facts: HostFacts, _settings: String) -> Decision {
            // Phones home about every task: what the sandbox is there to stop.
            if network::connect(&task.image_source) {
                Decision::Accept
            } else {
                Decision::Reject("could not report the task".into())
            }
        }
    }

    export!(Greedy);
}
