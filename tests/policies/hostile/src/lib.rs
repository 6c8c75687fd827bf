//! A policy that misbehaves on purpose, for the tests of the sandbox. Its
//! settings choose how: `{"mode": "<mode>"}`. Every attempt to reach the
//! host that succeeds answers with a reason starting `LEAK:`, so a test can
//! tell a sandbox hole from a refusal.

use std::hint::black_box;

use policy_sdk::{Decision, HostFacts, Policy, Task};
use serde::Deserialize;

pub struct Hostile;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `accept`, `loop`, `alloc`, `panic`, `read-file`, `env`,
    /// `huge-reason`, `invalid-task`, `sleep`, `recurse`, `exit`, `random`,
    /// `clock`, `long-list` (a rewrite with `size` arguments), `fill` (one
    /// `memory.fill` over `size` MiB), `huge-settings-error` (refuses its
    /// settings with 20 MiB of text).
    pub mode: String,
    #[serde(default)]
    pub size: u32,
}

impl Policy for Hostile {
    type Settings = Settings;
    const NAME: &'static str = "hostile";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const REWRITES: bool = true;

    fn check_settings(s: &Settings) -> Result<(), String> {
        match s.mode.as_str() {
            "accept" | "loop" | "alloc" | "panic" | "read-file" | "env" | "huge-reason"
            | "invalid-task" | "sleep" | "recurse" | "exit" | "random" | "clock" | "long-list"
            | "fill" => Ok(()),
            "huge-settings-error" => Err("x".repeat(20 << 20)),
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn evaluate(task: &Task, _facts: &HostFacts, s: &Settings) -> Decision {
        match s.mode.as_str() {
            "loop" => {
                let mut n: u64 = 0;
                loop {
                    n = black_box(n.wrapping_add(1));
                }
            }
            "alloc" => {
                // Reserve without touching the pages, so that the memory
                // limit is reached long before the time limit, even on a
                // loaded machine.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(black_box(Vec::with_capacity(1 << 20)));
                }
            }
            "panic" => panic!("hostile policy panics on purpose"),
            "read-file" => match std::fs::read_to_string("/etc/hostname") {
                Ok(text) => Decision::reject(format!("LEAK: {text}")),
                Err(e) => panic!("cannot read a host file: {e}"),
            },
            "env" => {
                let vars: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
                let args: Vec<String> = std::env::args().collect();
                if vars.is_empty() && args.is_empty() {
                    panic!("no environment variables or arguments visible");
                }
                Decision::reject(format!("LEAK: {vars:?} {args:?}"))
            }
            "huge-reason" => Decision::reject("x".repeat(1 << 20)),
            "invalid-task" => {
                let mut broken = task.clone();
                broken.memory_mb = 0;
                Decision::rewrite(broken, "memory is overrated")
            }
            "sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(3600));
                Decision::Accept
            }
            "recurse" => Decision::reject(format!("depth {}", recurse(black_box(1)))),
            "long-list" => {
                // Cheap here (empty strings allocate nothing), costly for a
                // host that copies every entry before checking the size.
                let mut long = task.clone();
                long.args = vec![String::new(); s.size as usize];
                Decision::rewrite(long, "a long list")
            }
            "fill" => {
                fill(s.size);
                Decision::Accept
            }
            "exit" => std::process::exit(3),
            "random" => {
                // HashMap asks the host for random keys; a fixed seed must
                // not break it.
                let mut map = std::collections::HashMap::new();
                map.insert(task.name.clone(), 1);
                let mut bytes = [0u8; 8];
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = std::collections::hash_map::RandomState::new().hash_one(i) as u8;
                }
                Decision::reject(format!("random {:?} map {}", bytes, map.len()))
            }
            "clock" => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                Decision::reject(format!("clock {now}"))
            }
            _ => Decision::Accept,
        }
    }
}

use std::hash::BuildHasher;

/// Grows memory by `mib` MiB and fills it with one `memory.fill`: a single
/// instruction, which no epoch deadline interrupts.
#[cfg(target_arch = "wasm32")]
fn fill(mib: u32) {
    let pages = (mib as usize) << 4;
    let start = core::arch::wasm32::memory_grow(0, pages);
    if start == usize::MAX {
        panic!("cannot grow memory by {mib} MiB");
    }
    let len = (mib as usize)
        .checked_mul(1 << 20)
        .expect("at most 4095 MiB on wasm32");
    // SAFETY: the pages just grown belong to no one else. With bulk memory
    // (on by default for wasm32-wasip2) this memset is one `memory.fill`.
    unsafe { core::ptr::write_bytes((start << 16) as *mut u8, 0xa5, black_box(len)) };
}

#[cfg(not(target_arch = "wasm32"))]
fn fill(_mib: u32) {}

fn recurse(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let buf = black_box([n; 64]);
    recurse(black_box(n + 1)) + buf[3]
}

policy_sdk::export_policy!(Hostile);
