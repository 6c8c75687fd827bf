//! The wasmtime side: one engine per process with its epoch ticker, policies
//! loaded into an `InstancePre`, and each call made in a fresh store under
//! the policy's limits.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use policy_sdk::{Decision, HostFacts, Metadata, Task};
use wasmtime::component::{Component, ComponentExportIndex, Instance, InstancePre};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap};

use super::artifacts::{ArtifactCache, Origin, sha256_hex};
use super::lift::{self, RawDecision};
use super::ticker::Ticker;
use super::wasi::{self, GuestState};
use super::{
    CONTRACT_VERSION, Fault, Limits, MAX_MEMORY_LIMIT, MAX_MODULE_BYTES, PolicyError, PolicySpec,
    cause,
};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../policy-sdk/wit",
        world: "policy",
    });
}

pub(crate) use bindings::qemu_executor::policy::types as wit;

/// How often the epoch advances while a policy runs: the granularity of
/// time limits.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(2);
/// The exported interface a policy must provide, without its version.
pub(crate) const EVALUATOR: &str = "qemu-executor:policy/evaluator";
/// Instances the pooling allocator keeps ready; evaluations beyond this many
/// at once wait (2 cores gain nothing from more).
const POOL_INSTANCES: u32 = 64;

/// Settings of the engine; the defaults are what the executor runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Pre-reserve memory for instances (the pooling allocator) instead of
    /// mapping it anew for each one.
    pub pooling: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { pooling: true }
    }
}

/// The wasmtime engine, its epoch ticker, the WASI linker and the cache of
/// compiled policies. One per process; cheap to clone.
#[derive(Clone)]
pub struct PolicyEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: wasmtime::component::Linker<GuestState>,
    cache: ArtifactCache,
    ticker: Ticker,
    /// Bounds concurrent instances to what the pool holds.
    slots: Option<Arc<tokio::sync::Semaphore>>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

impl PolicyEngine {
    /// An engine whose compiled policies live in `artifact_dir` (created mode
    /// 0700; refused if others can write into it).
    pub fn new(artifact_dir: &Path) -> Result<Self, PolicyError> {
        Self::with_options(artifact_dir, EngineOptions::default())
    }

    pub fn with_options(artifact_dir: &Path, options: EngineOptions) -> Result<Self, PolicyError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        if options.pooling {
            let mut pool = PoolingAllocationConfig::new();
            pool.total_component_instances(POOL_INSTANCES)
                .total_core_instances(POOL_INSTANCES * 8)
                .total_memories(POOL_INSTANCES * 4)
                .total_tables(POOL_INSTANCES * 8)
                .max_memory_size(usize::try_from(MAX_MEMORY_LIMIT).unwrap_or(usize::MAX))
                .max_core_instances_per_component(64)
                .max_memories_per_component(16)
                .max_tables_per_component(64)
                .max_component_instance_size(1 << 20)
                .max_core_instance_size(1 << 20)
                .table_elements(1 << 18);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        let engine = Engine::new(&config).map_err(|e| PolicyError::Engine(cause(e)))?;
        let linker = wasi::linker(&engine).map_err(|e| PolicyError::Engine(cause(e)))?;
        let cache = ArtifactCache::open(artifact_dir, &engine)?;
        let ticker = Ticker::start(&engine);
        let slots = options
            .pooling
            .then(|| Arc::new(tokio::sync::Semaphore::new(POOL_INSTANCES as usize)));
        Ok(PolicyEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                cache,
                ticker,
                slots,
            }),
        })
    }

    pub(crate) fn slots(&self) -> Option<Arc<tokio::sync::Semaphore>> {
        self.inner.slots.clone()
    }

    pub(crate) fn wasmtime(&self) -> &Engine {
        &self.inner.engine
    }

    /// The WASI world every policy is linked against: what the host grants.
    pub(crate) fn linker(&self) -> &wasmtime::component::Linker<GuestState> {
        &self.inner.linker
    }

    /// The compiled form of a module's bytes, from the cache or compiled now.
    pub(crate) fn compile(
        &self,
        path: &Path,
        bytes: &[u8],
        digest: &str,
    ) -> Result<(Component, Origin), PolicyError> {
        self.inner
            .cache
            .component(&self.inner.engine, path, bytes, digest)
    }

    /// Reads, checks and compiles (or reads back from the cache) one
    /// policy, reads its metadata and has it check its settings. Blocking.
    pub(crate) fn load(&self, spec: &PolicySpec) -> Result<LoadedPolicy, PolicyError> {
        let path = &spec.module;
        spec.limits
            .validate()
            .map_err(|problem| PolicyError::BadLimits {
                path: path.clone(),
                problem,
            })?;
        let bytes = read_module(path)?;
        let digest = sha256_hex(&bytes);
        if let Some(pin) = &spec.sha256 {
            let pin_lower = pin.trim().to_ascii_lowercase();
            if pin_lower.len() != 64 || !pin_lower.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(PolicyError::BadPin {
                    path: path.clone(),
                    pin: pin.clone(),
                });
            }
            if pin_lower != digest {
                return Err(PolicyError::PinMismatch {
                    path: path.clone(),
                    expected: pin_lower,
                    actual: digest,
                });
            }
        }
        let started = Instant::now();
        let (component, origin) = self.compile(path, &bytes, &digest)?;
        check_contract(&self.inner.engine, &component, path)?;
        let exports = Exports::find(&self.inner.engine, &component)
            .ok_or_else(|| PolicyError::NotAPolicy { path: path.clone() })?;
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|err| PolicyError::Link {
                path: path.clone(),
                source: cause(err),
            })?;
        let load_fault = |fault| PolicyError::LoadFault {
            path: path.clone(),
            fault,
        };
        let metadata = read_metadata(self, &pre, exports, spec.limits)
            .map_err(load_fault)?
            .map_err(|(function, err)| PolicyError::Signature {
                path: path.clone(),
                function,
                source: cause(err),
            })?;
        check_metadata(&metadata).map_err(|problem| PolicyError::BadMetadata {
            path: path.clone(),
            problem,
        })?;
        let policy = LoadedPolicy {
            engine: self.clone(),
            path: path.clone(),
            sha256: digest,
            name: metadata.name.clone(),
            metadata,
            settings: spec.settings.clone(),
            limits: spec.limits,
            pre,
            exports,
        };
        policy
            .check_settings()
            .map_err(load_fault)?
            .map_err(|message| PolicyError::BadSettings {
                name: policy.name.clone(),
                path: path.clone(),
                message: super::chain::one_line(&message),
            })?;
        tracing::debug!(
            policy = %policy.name,
            module = %path.display(),
            sha256 = %policy.sha256,
            from_cache = origin == Origin::Cache,
            elapsed_us = started.elapsed().as_micros() as u64,
            "Policy loaded"
        );
        Ok(policy)
    }
}

/// Where the evaluator's functions are in a component.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Exports {
    metadata: ComponentExportIndex,
    check_settings: ComponentExportIndex,
    evaluate: ComponentExportIndex,
}

impl Exports {
    /// The evaluator's functions, under whichever version of the interface
    /// the component exports (see [`check_contract`]); `None` when one is
    /// missing.
    pub(crate) fn find(engine: &Engine, component: &Component) -> Option<Exports> {
        let name = component
            .component_type()
            .exports(engine)
            .find_map(|(name, _)| {
                (name.split_once('@').map_or(name, |(i, _)| i) == EVALUATOR)
                    .then(|| name.to_string())
            })?;
        let instance = component.get_export_index(None, &name)?;
        let func = |f: &str| component.get_export_index(Some(&instance), f);
        Some(Exports {
            metadata: func("metadata")?,
            check_settings: func("check-settings")?,
            evaluate: func("evaluate")?,
        })
    }

    /// Checks that each function has the contract's type, without calling
    /// any; on a mismatch, names the function.
    fn check(
        &self,
        store: &mut Store<GuestState>,
        instance: &Instance,
    ) -> Result<(), (&'static str, wasmtime::Error)> {
        instance
            .get_typed_func::<(), (wit::PolicyMetadata,)>(&mut *store, self.metadata)
            .map_err(|e| ("metadata", e))?;
        instance
            .get_typed_func::<(&str,), (Result<(), String>,)>(&mut *store, self.check_settings)
            .map_err(|e| ("check-settings", e))?;
        instance
            .get_typed_func::<(&wit::Task, &wit::HostFacts, &str), (RawDecision,)>(
                &mut *store,
                self.evaluate,
            )
            .map_err(|e| ("evaluate", e))?;
        Ok(())
    }
}

/// The first call into a policy: checks the types of its functions (a
/// mismatch names the function), then reads its metadata.
#[allow(clippy::type_complexity)]
pub(crate) fn read_metadata(
    engine: &PolicyEngine,
    pre: &InstancePre<GuestState>,
    exports: Exports,
    limits: Limits,
) -> Result<Result<Metadata, (&'static str, wasmtime::Error)>, Fault> {
    call_fresh(engine, pre, limits, |store, instance| {
        if let Err(mismatch) = exports.check(store, instance) {
            return Ok(Ok(Err(mismatch)));
        }
        let f =
            instance.get_typed_func::<(), (wit::PolicyMetadata,)>(&mut *store, exports.metadata)?;
        let (m,) = f.call(&mut *store, ())?;
        Ok(Ok(Ok(Metadata {
            name: m.name,
            version: m.version,
            rewrites: m.rewrites,
        })))
    })
}

pub(crate) fn read_module(path: &Path) -> Result<Vec<u8>, PolicyError> {
    let read_err = |source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(read_err)?.len();
    if len > MAX_MODULE_BYTES {
        return Err(PolicyError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(read_err)
}

/// Refuses a component that does not export the evaluator, or exports one
/// of a contract version this executor does not speak (0.x versions are
/// compatible when their minor versions match, as in Cargo).
fn check_contract(engine: &Engine, component: &Component, path: &Path) -> Result<(), PolicyError> {
    let Some(found) = evaluator_version(engine, component) else {
        return Err(PolicyError::NotAPolicy {
            path: path.to_path_buf(),
        });
    };
    if !compatible(&found, CONTRACT_VERSION) {
        return Err(PolicyError::ContractVersion {
            path: path.to_path_buf(),
            found: if found.is_empty() {
                "(unversioned)".into()
            } else {
                found
            },
            supported: CONTRACT_VERSION.to_string(),
        });
    }
    Ok(())
}

/// The version of the `evaluator` interface a component exports (empty when
/// unversioned), read from its type; `None` when it exports none.
pub(crate) fn evaluator_version(engine: &Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .exports(engine)
        .find_map(|(name, _)| {
            let (interface, version) = name.split_once('@').unwrap_or((name, ""));
            (interface == EVALUATOR).then(|| version.to_string())
        })
}

/// Cargo's rule: `0.y.*` matches `0.y.*`, `x.*` matches `x.*` for x > 0.
pub(crate) fn compatible(found: &str, supported: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64)> {
        let mut parts = v.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    };
    match (parse(found), parse(supported)) {
        (Some((0, a)), Some((0, b))) => a == b,
        (Some((a, _)), Some((b, _))) => a == b,
        _ => false,
    }
}

pub(crate) fn check_metadata(m: &Metadata) -> Result<(), String> {
    let ok_chars = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
    };
    if m.name.is_empty() || m.name.len() > 64 || !ok_chars(&m.name) {
        return Err(format!(
            "name {:?} is not 1 to 64 letters, digits, '-', '_', '.' or '+'",
            super::chain::one_line(&m.name.chars().take(80).collect::<String>())
        ));
    }
    if m.version.len() > 64 || !ok_chars(&m.version) {
        return Err("version is not up to 64 letters, digits, '-', '_', '.' or '+'".into());
    }
    Ok(())
}

/// One policy, ready to evaluate: compiled, linked, metadata read, settings
/// accepted.
pub(crate) struct LoadedPolicy {
    engine: PolicyEngine,
    pub path: PathBuf,
    pub sha256: String,
    /// The metadata's name: what every message about this policy calls it.
    pub name: String,
    pub metadata: Metadata,
    pub settings: String,
    pub limits: Limits,
    pre: InstancePre<GuestState>,
    exports: Exports,
}

impl LoadedPolicy {
    /// Asks the policy about one task, in a fresh instance. Blocking.
    pub fn evaluate(&self, task: &Task, facts: &HostFacts) -> Result<Decision, Fault> {
        let wit_task = wit::Task::from(task.clone());
        let wit_facts = wit::HostFacts::from(facts);
        let rewrites = self.metadata.rewrites;
        call_fresh(&self.engine, &self.pre, self.limits, |store, instance| {
            let f = instance
                .get_typed_func::<(&wit::Task, &wit::HostFacts, &str), (RawDecision,)>(
                    &mut *store,
                    self.exports.evaluate,
                )?;
            let answer = lift::bounded(|| {
                f.call(&mut *store, (&wit_task, &wit_facts, self.settings.as_str()))
            })?;
            Ok(answer.and_then(|(raw,)| match raw {
                RawDecision::Accept => Ok(Decision::Accept),
                RawDecision::Reject(reason) => Ok(Decision::Reject { reason: reason.0 }),
                RawDecision::Rewrite(_) if !rewrites => Err(Fault::UndeclaredRewrite),
                RawDecision::Rewrite(rewrite) => Ok(Decision::Rewrite {
                    task: Box::new(Task::from(wit::Task::from(rewrite.task))),
                    reason: rewrite.reason.0,
                }),
            }))
        })
    }

    /// Has the policy check its settings: `Ok(Err(message))` when it
    /// refuses them, the message cut at `MAX_REASON_BYTES`.
    fn check_settings(&self) -> Result<Result<(), String>, Fault> {
        call_fresh(&self.engine, &self.pre, self.limits, |store, instance| {
            let f = instance.get_typed_func::<(&str,), (Result<(), String>,)>(
                &mut *store,
                self.exports.check_settings,
            )?;
            let (answer,) = f.call(&mut *store, (self.settings.as_str(),))?;
            Ok(Ok(answer.map_err(lift::settings_error)))
        })
    }
}

/// Runs `f` against a fresh instance of `pre` in a fresh store under
/// `limits`, and turns whatever stopped it into a [`Fault`]: an error of
/// `f` is a trap or an exit, its `Err` a policy's answer the host refuses.
pub(crate) fn call_fresh<R>(
    engine: &PolicyEngine,
    pre: &InstancePre<GuestState>,
    limits: Limits,
    f: impl FnOnce(&mut Store<GuestState>, &Instance) -> wasmtime::Result<Result<R, Fault>>,
) -> Result<R, Fault> {
    let inner = &engine.inner;
    let mut store = Store::new(&inner.engine, GuestState::new(limits.memory));
    store.limiter(|state| &mut state.limiter);
    store.set_epoch_deadline(deadline_ticks(limits.time));
    store.epoch_deadline_trap();
    let _running = inner.ticker.running();
    let result = pre
        .instantiate(&mut store)
        .and_then(|instance| f(&mut store, &instance));
    result.unwrap_or_else(|err| Err(fault(&store, limits, err)))
}

fn fault(store: &Store<GuestState>, limits: Limits, err: wasmtime::Error) -> Fault {
    if store.data().limiter.memory_hit {
        return Fault::Memory {
            limit: limits.memory,
        };
    }
    if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
        return Fault::Timeout { limit: limits.time };
    }
    if let Some(exit) = err.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Fault::Exit { code: exit.0 };
    }
    Fault::Trap {
        message: super::chain::one_line(&err.root_cause().to_string()),
        stderr: store.data().stderr_text(),
    }
}

/// Epoch ticks for a time limit, plus one because the current tick may end
/// at any moment.
fn deadline_ticks(limit: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    let ticks = limit.as_nanos().div_ceil(tick);
    u64::try_from(ticks).unwrap_or(u64::MAX).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_versions() {
        assert!(compatible("0.1.0", "0.1.0"));
        assert!(compatible("0.1.7", "0.1.0"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(!compatible("1.0.0", "0.1.0"));
        assert!(compatible("1.4.0", "1.0.0"));
        assert!(!compatible("", "0.1.0"));
    }

    #[test]
    fn deadline_rounds_up() {
        assert_eq!(deadline_ticks(Duration::from_millis(100)), 51);
        assert_eq!(deadline_ticks(Duration::from_millis(1)), 2);
    }

    #[test]
    fn metadata_names_are_plain() {
        let m = |name: &str| Metadata {
            name: name.into(),
            version: "1.0.0".into(),
            rewrites: false,
        };
        assert!(check_metadata(&m("port-range")).is_ok());
        assert!(check_metadata(&m("")).is_err());
        assert!(check_metadata(&m("evil\nname")).is_err());
        assert!(check_metadata(&m(&"x".repeat(65))).is_err());
    }
}
