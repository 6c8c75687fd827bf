//! A component that exports `qemu-executor:policy/evaluator@0.1.0`, the
//! version the executor speaks, with an `evaluate` of the wrong type:
//! loading it must fail as a module that does not match the contract.
//! Built for wasm32 only; natively empty.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        path: "wit",
        world: "policy",
    });

    use exports::qemu_executor::policy::evaluator::{Guest, PolicyMetadata};

    struct Wrong;

    impl Guest for Wrong {
        fn metadata() -> PolicyMetadata {
            PolicyMetadata {
                name: "wrong-signature".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                rewrites: false,
            }
        }

        fn check_settings(_settings: String) -> Result<(), String> {
            Ok(())
        }

        fn evaluate(_task: String) -> bool {
            true
        }
    }

    export!(Wrong);
}
