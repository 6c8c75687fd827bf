//! A component that exports `qemu-executor:policy/evaluator@0.2.0`, a
//! contract version the executor does not speak: loading it must fail with
//! a message naming both versions. Built for wasm32 only; natively empty.

#[cfg(target_arch = "wasm32")]
mod component {
    wit_bindgen::generate!({
        path: "wit",
        world: "policy",
    });

    use exports::qemu_executor::policy::evaluator::{Guest, PolicyMetadata};

    struct Future;

    impl Guest for Future {
        fn metadata() -> PolicyMetadata {
            PolicyMetadata {
                name: "future-contract".into(),
                version: env!("CARGO_PKG_VERSION").into(),
                rewrites: false,
            }
        }

        fn evaluate(_task: String) -> Result<String, String> {
            Ok(r#"{"decision":"accept"}"#.into())
        }
    }

    export!(Future);
}
