//! The SDK for qemu-executor policies.
//!
//! A policy sees one task before launch, together with the facts of the host
//! it would run on and the settings its operator gave it, and answers with a
//! [`Decision`]: accept, reject with a reason, or rewrite the task with a
//! reason. With this crate a policy is a plain Rust function over the types
//! of [`types`]; [`export_policy!`] turns it into a WebAssembly component
//! that the executor loads (`cargo build --release --target wasm32-wasip2`),
//! and the same code runs natively in the policy's own `cargo test`.
//!
//! # Example
//!
//! ```
//! use policy_sdk::{Decision, HostFacts, Policy, Task};
//! use serde::Deserialize;
//!
//! /// Refuses tasks that ask for more memory than the operator allows.
//! pub struct MemoryCap;
//!
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! pub struct Settings {
//!     #[serde(default = "default_max")]
//!     max_memory_mb: u32,
//! }
//!
//! fn default_max() -> u32 {
//!     4096
//! }
//!
//! impl Policy for MemoryCap {
//!     type Settings = Settings;
//!     const NAME: &'static str = "memory-cap";
//!     const VERSION: &'static str = "0.1.0";
//!     const REWRITES: bool = false;
//!
//!     fn check_settings(settings: &Settings) -> Result<(), String> {
//!         if settings.max_memory_mb == 0 {
//!             return Err("max_memory_mb must be at least 1".into());
//!         }
//!         Ok(())
//!     }
//!
//!     fn evaluate(task: &Task, _facts: &HostFacts, settings: &Settings) -> Decision {
//!         if task.memory_mb > settings.max_memory_mb {
//!             return Decision::reject(format!(
//!                 "memory_mb {} is above the cap of {}",
//!                 task.memory_mb, settings.max_memory_mb
//!             ));
//!         }
//!         Decision::Accept
//!     }
//! }
//!
//! // Generates the component's exports when built for wasm; nothing natively.
//! policy_sdk::export_policy!(MemoryCap);
//!
//! // Natively, the policy is an ordinary function:
//! # let task: Task = serde_json::from_str(r#"{"name":"web","image_source":"http://h/x.iso",
//! #   "checksum":"md5:0123456789abcdef0123456789abcdef","accelerator":"tcg","kvm_fallback":true,
//! #   "ports":[],"memory_mb":8192,"cpus":1,"kill_timeout_s":30,"ready_timeout_s":300,
//! #   "machine_type":"pc","drive_interface":"ide","graceful_shutdown":true,
//! #   "restart":{"attempts":2,"interval_s":1800,"delay_s":15,"mode":"fail"}}"#).unwrap();
//! # let facts: HostFacts = serde_json::from_str(r#"{"driver.qemu":"1","driver.qemu.kvm":"usable",
//! #   "host.cpus":2,"host.memory_mb":8192}"#).unwrap();
//! let decision = policy_sdk::evaluate::<MemoryCap>(&task, &facts, r#"{"max_memory_mb": 1024}"#);
//! assert_eq!(decision.kind(), "reject");
//! assert!(policy_sdk::check_settings::<MemoryCap>(r#"{"max_memory_mb": 0}"#).is_err());
//! assert!(policy_sdk::check_settings::<MemoryCap>(r#"{"max_mb": 1}"#).is_err());
//! ```
//!
//! Table-driven tests read a `CASES.toml` (see [`testing`], feature
//! `testing`), the same file `qemu-executor policy test` runs against the
//! built component.

pub mod types;
mod wire;

#[cfg(feature = "taskfile")]
pub mod taskfile;

#[cfg(feature = "testing")]
pub mod testing;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod guest;

use serde::de::DeserializeOwned;

pub use types::*;

/// A policy: metadata, typed settings and a decision function.
///
/// Everything here is pure: the host gives each evaluation a fresh instance,
/// so nothing carries over from one task to the next, and the policy sees no
/// files, environment, network or real clock.
pub trait Policy {
    /// The operator's settings, parsed from the JSON string the host passes
    /// (`{}` when the operator gave none, so give every field a default if
    /// the policy should work without settings). Use
    /// `#[serde(deny_unknown_fields)]` so that a misspelt key is refused
    /// when the policy is loaded.
    type Settings: DeserializeOwned;
    /// Short name, shown in logs and in every message about this policy.
    const NAME: &'static str;
    const VERSION: &'static str;
    /// Whether this policy may answer [`Decision::Rewrite`]; the host treats
    /// a rewrite from a policy that says `false` as a fault.
    const REWRITES: bool;

    /// Checks settings beyond what their type says (such as `min <= max`).
    /// Called once when the policy is loaded; an error refuses the load.
    fn check_settings(_settings: &Self::Settings) -> Result<(), String> {
        Ok(())
    }

    /// Decides about one task.
    fn evaluate(task: &Task, facts: &HostFacts, settings: &Self::Settings) -> Decision;
}

/// The metadata a policy exports.
pub fn metadata<P: Policy>() -> Metadata {
    Metadata {
        name: P::NAME.to_string(),
        version: P::VERSION.to_string(),
        rewrites: P::REWRITES,
    }
}

/// Parses settings as the host passes them; an empty string means `{}`.
pub fn parse_settings<P: Policy>(json: &str) -> Result<P::Settings, String> {
    let json = if json.trim().is_empty() { "{}" } else { json };
    serde_json::from_str(json).map_err(|e| format!("Bad settings for {}: {e}", P::NAME))
}

/// What the component's `check-settings` export answers: the settings
/// parse into [`Policy::Settings`] and pass [`Policy::check_settings`].
pub fn check_settings<P: Policy>(json: &str) -> Result<(), String> {
    let settings = parse_settings::<P>(json)?;
    P::check_settings(&settings).map_err(|e| format!("Bad settings for {}: {e}", P::NAME))
}

/// What the component's `evaluate` export answers. Settings that do not
/// parse (the host checked them at load, so this only happens to a host that
/// skipped the check) reject the task.
pub fn evaluate<P: Policy>(task: &Task, facts: &HostFacts, settings_json: &str) -> Decision {
    match parse_settings::<P>(settings_json) {
        Ok(settings) => P::evaluate(task, facts, &settings),
        Err(e) => Decision::reject(e),
    }
}

/// Exports a [`Policy`] as the component's `evaluator` interface when built
/// for `wasm32`; expands to nothing on other targets, so the same crate
/// builds and tests natively.
///
/// ```ignore
/// policy_sdk::export_policy!(MyPolicy);
/// ```
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct PolicyComponent;

            impl $crate::guest::Guest for PolicyComponent {
                fn metadata() -> $crate::guest::wit::PolicyMetadata {
                    $crate::guest::metadata::<$policy>()
                }

                fn check_settings(settings: ::std::string::String) -> Result<(), ::std::string::String> {
                    $crate::check_settings::<$policy>(&settings)
                }

                fn evaluate(
                    task: $crate::guest::wit::Task,
                    facts: $crate::guest::wit::HostFacts,
                    settings: ::std::string::String,
                ) -> $crate::guest::wit::Decision {
                    $crate::guest::evaluate::<$policy>(task, facts, &settings)
                }
            }

            $crate::guest::bindings::__export_policy_component!(PolicyComponent with_types_in $crate::guest::bindings);
        };
    };
}
