//! What the policy sandbox costs: compiling a component, loading it from the
//! precompiled cache, and one evaluation in a fresh instance, for each
//! shipped policy and for the chain of four, next to the same logic as
//! plain native Rust.
//!
//! Then the same for the policies written in Python and JavaScript next to
//! their Rust twins: size, compile, load from the cache, one evaluation in a
//! fresh instance, and the least memory limit under which they evaluate.
//!
//! Build the components first (`scripts/build-policies.sh`, and
//! `scripts/build-foreign-policies.sh` for the second part), then
//! `cargo bench -p qemu-executor --bench policy`. Not a timed test: it
//! prints median, min and max over N runs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use policy_sdk::testing::default_facts;
use policy_sdk::{HostFacts, KvmStatus, Policy, Task};
use qemu_executor::policy::{Chain, ChainOutcome, EngineOptions, Limits, PolicyEngine, PolicySpec};

/// (component in the foreign-policies directory, Rust twin crate).
const FOREIGN: [(&str, &str); 2] = [
    ("accel_fallback_py.wasm", "accel-fallback"),
    ("port_range_js.wasm", "port-range"),
];

/// (crate, settings): settings chosen so that each policy does real work
/// on the task below (two of them rewrite it).
const POLICIES: [(&str, &str); 4] = [
    ("accel-fallback", "{}"),
    ("port-range", r#"{"min":20000,"max":30000,"mode":"clamp"}"#),
    (
        "resource-caps",
        r#"{"max_memory_mb":2048,"max_cpus":2,"mode":"clamp"}"#,
    ),
    (
        "image-allowlist",
        r#"{"hosts":["images.example.org"],"algorithms":["sha256"]}"#,
    ),
];

fn main() {
    let dir = policy_dir();
    let wasm = |name: &str| {
        let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
        assert!(
            path.exists(),
            "{} is missing: run scripts/build-policies.sh first (or set QE_POLICY_DIR)",
            path.display()
        );
        path
    };
    let task = task();
    let facts = HostFacts {
        kvm: KvmStatus::Absent,
        ..default_facts()
    };
    let scratch = tempfile::tempdir().expect("temp dir");

    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>6}",
        "", "median", "min", "max", "runs"
    );

    for (name, settings) in POLICIES {
        let spec = PolicySpec::new(wasm(name)).with_settings(settings);
        let mut i = 0;
        report(&format!("compile {name}"), 5, || {
            i += 1;
            let engine =
                PolicyEngine::new(&scratch.path().join(format!("c-{name}-{i}"))).expect("engine");
            let started = Instant::now();
            Chain::load(&engine, std::slice::from_ref(&spec)).expect("load");
            started.elapsed()
        });
    }

    let artifacts = scratch.path().join("artifacts");
    let engine = PolicyEngine::new(&artifacts).expect("engine");
    let specs: Vec<PolicySpec> = POLICIES
        .iter()
        .map(|(name, settings)| PolicySpec::new(wasm(name)).with_settings(*settings))
        .collect();
    Chain::load(&engine, &specs).expect("warm the cache");
    for spec in &specs {
        let name = spec
            .module
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .replace('_', "-");
        report(&format!("load from cache {name}"), 50, || {
            let started = Instant::now();
            Chain::load(&engine, std::slice::from_ref(spec)).expect("load");
            started.elapsed()
        });
    }

    for (label, options) in [
        ("", EngineOptions::default()),
        (" (no pooling)", EngineOptions { pooling: false }),
    ] {
        let engine = PolicyEngine::with_options(&artifacts, options).expect("engine");
        for spec in &specs {
            let chain = Chain::load(&engine, std::slice::from_ref(spec)).expect("load");
            let name = chain.describe()[0].name.clone();
            report(&format!("evaluate {name}{label}"), 2000, || {
                let started = Instant::now();
                let outcome = chain.evaluate_blocking(task.clone(), &facts);
                let took = started.elapsed();
                assert!(
                    matches!(outcome, ChainOutcome::Accepted { .. }),
                    "{outcome:?}"
                );
                took
            });
        }
        let chain = Chain::load(&engine, &specs).expect("load");
        report(&format!("evaluate chain of four{label}"), 2000, || {
            let started = Instant::now();
            let outcome = chain.evaluate_blocking(task.clone(), &facts);
            let took = started.elapsed();
            assert!(
                matches!(outcome, ChainOutcome::Accepted { .. }),
                "{outcome:?}"
            );
            took
        });
    }

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let chain = Chain::load(&engine, &specs).expect("load");
    report(
        "evaluate chain of four, async (spawn_blocking)",
        2000,
        || {
            let started = Instant::now();
            let outcome = rt.block_on(chain.evaluate(task.clone(), &facts));
            let took = started.elapsed();
            assert!(
                matches!(outcome, ChainOutcome::Accepted { .. }),
                "{outcome:?}"
            );
            took
        },
    );

    native::<accel_fallback::AccelFallback>("accel-fallback", &task, &facts);
    native::<port_range::PortRange>("port-range", &task, &facts);
    native::<resource_caps::ResourceCaps>("resource-caps", &task, &facts);
    native::<image_allowlist::ImageAllowlist>("image-allowlist", &task, &facts);

    foreign(&wasm, scratch.path(), &task, &facts);
}

/// The Python and JavaScript twins against the Rust policies, under the
/// default limits (the settings are the Rust twin's from [`POLICIES`]).
fn foreign(rust_wasm: &dyn Fn(&str) -> PathBuf, scratch: &Path, task: &Task, facts: &HostFacts) {
    let dir = foreign_dir();
    println!();
    for (file, twin) in FOREIGN {
        let path = dir.join(file);
        if !path.exists() {
            println!(
                "{} is missing: run scripts/build-foreign-policies.sh (or set QE_FOREIGN_POLICY_DIR)",
                path.display()
            );
            continue;
        }
        let settings = POLICIES.iter().find(|(n, _)| *n == twin).unwrap().1;
        for (label, module) in [
            (file.to_string(), path.clone()),
            (twin.to_string(), rust_wasm(twin)),
        ] {
            let size = std::fs::metadata(&module).expect("size").len();
            println!(
                "{:<44} {:>12}",
                format!("size {label}"),
                format!("{:.1} KiB", size as f64 / 1024.0)
            );
            let spec = PolicySpec::new(&module).with_settings(settings);
            let mut i = 0;
            report(&format!("compile {label}"), 2, || {
                i += 1;
                let engine =
                    PolicyEngine::new(&scratch.join(format!("fc-{label}-{i}"))).expect("engine");
                let started = Instant::now();
                Chain::load(&engine, std::slice::from_ref(&spec)).expect("load");
                started.elapsed()
            });
            let engine = PolicyEngine::new(&scratch.join("foreign-artifacts")).expect("engine");
            Chain::load(&engine, std::slice::from_ref(&spec)).expect("warm the cache");
            report(&format!("load from cache {label}"), 20, || {
                let started = Instant::now();
                Chain::load(&engine, std::slice::from_ref(&spec)).expect("load");
                started.elapsed()
            });
            let chain = Chain::load(&engine, std::slice::from_ref(&spec)).expect("load");
            report(&format!("evaluate {label}"), 500, || {
                let started = Instant::now();
                let outcome = chain.evaluate_blocking(task.clone(), facts);
                let took = started.elapsed();
                assert!(outcome.rewritten(), "{outcome:?}");
                took
            });
            println!(
                "{:<44} {:>12}",
                format!("least memory limit {label}"),
                least_memory_mb(&engine, &spec, task, facts)
                    .map_or_else(|| "over 64 MiB".to_string(), |mb| format!("{mb} MiB"))
            );
        }
    }
}

/// The smallest memory limit, in MiB up to the default 64, under which the
/// policy loads and rewrites the task (bisection: more memory never hurts).
fn least_memory_mb(
    engine: &PolicyEngine,
    spec: &PolicySpec,
    task: &Task,
    facts: &HostFacts,
) -> Option<u64> {
    let works = |mb: u64| {
        let mut spec = spec.clone();
        spec.limits = Limits {
            memory: mb << 20,
            ..Limits::default()
        };
        Chain::load(engine, &[spec])
            .map(|chain| chain.evaluate_blocking(task.clone(), facts).rewritten())
            .unwrap_or(false)
    };
    if !works(64) {
        return None;
    }
    let (mut low, mut high) = (0, 64);
    while high - low > 1 {
        let mid = (low + high) / 2;
        if works(mid.max(1)) {
            high = mid;
        } else {
            low = mid;
        }
    }
    Some(high.max(1))
}

/// `QE_FOREIGN_POLICY_DIR`, else `foreign-policies` in this benchmark's
/// target directory, where `scripts/build-foreign-policies.sh` builds.
fn foreign_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QE_FOREIGN_POLICY_DIR") {
        return PathBuf::from(dir);
    }
    target_dir().join("foreign-policies")
}

/// The same policy called as a Rust function, settings parsed each time as
/// the component does.
fn native<P: Policy>(name: &str, task: &Task, facts: &HostFacts) {
    let settings = POLICIES.iter().find(|(n, _)| *n == name).unwrap().1;
    report(&format!("native {name}"), 20_000, || {
        let started = Instant::now();
        let decision = policy_sdk::evaluate::<P>(task, facts, settings);
        let took = started.elapsed();
        std::hint::black_box(decision);
        took
    });
}

fn report(label: &str, runs: usize, mut once: impl FnMut() -> Duration) {
    // One unmeasured run: first-touch costs are not what is measured.
    once();
    let mut times: Vec<Duration> = (0..runs).map(|_| once()).collect();
    times.sort();
    println!(
        "{label:<44} {:>12} {:>12} {:>12} {runs:>6}",
        show(times[times.len() / 2]),
        show(times[0]),
        show(times[times.len() - 1]),
    );
}

fn show(d: Duration) -> String {
    if d >= Duration::from_millis(1) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    }
}

fn task() -> Task {
    let file = qemu_executor::task::parse_toml(
        "name = \"web\"\nimage_source = \"https://images.example.org/vm/guest.qcow2\"\n\
         checksum = \"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n\
         accelerator = \"kvm\"\nhost_port = 8080\nguest_port = 80\nmemory_mb = 1024\n",
    )
    .expect("task");
    file.into_task().expect("valid task")
}

/// `QE_POLICY_DIR`, else `wasm32-wasip2/release` next to this benchmark's
/// own target directory (`<target>/release/deps/policy-*`).
fn policy_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QE_POLICY_DIR") {
        return PathBuf::from(dir);
    }
    target_dir().join("wasm32-wasip2/release")
}

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("benchmark path");
    exe.parent()
        .and_then(|deps| deps.parent())
        .and_then(|profile| profile.parent())
        .expect("benchmark sits in <target>/<profile>/deps")
        .to_path_buf()
}
