//! What a policy's store holds, and the WASI preview-2 world it sees: deny
//! all. No preopened directories, environment, arguments or sockets; stdin
//! closed, stdout discarded, stderr kept (a little of it) for fault messages;
//! clocks frozen and randomness from a fixed seed, so that an evaluation is a
//! function of its inputs; and no way to block the host thread.

use std::time::Duration;

use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::p2::{DynPollable, Pollable, subscribe};
use wasmtime_wasi::{
    Deterministic, HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView,
    WasiView,
};

/// How much of a policy's stderr is kept for the fault message (a panic
/// message fits); writes beyond it see a closed stream.
pub(crate) const STDERR_CAPTURE: usize = 2048;
/// Largest table a policy may grow (each element is host memory).
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Largest single request for random bytes.
const MAX_RANDOM_BYTES: u64 = 64 << 10;
/// The bytes every policy's "random" source cycles through. Fixed, so that
/// an evaluation is reproducible; a policy has nothing to keep secret.
const RANDOM_SEED: [u8; 32] = *b"qemu-executor policy fixed seed!";
/// The wall clock a policy sees: 2024-01-01T00:00:00Z, always.
const FIXED_WALL_CLOCK: Duration = Duration::from_secs(1_704_067_200);
/// The version of `wasi:clocks` that `wasmtime-wasi` 48 provides; the
/// subscriptions of this instance are replaced below.
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// The data of one evaluation's store.
pub(crate) struct GuestState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub limiter: Limiter,
    pub stderr: MemoryOutputPipe,
}

impl GuestState {
    pub fn new(memory_limit: u64) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(Deterministic::new(RANDOM_SEED.to_vec()))
            .insecure_random(Deterministic::new(RANDOM_SEED.to_vec()))
            .insecure_random_seed(u128::from_le_bytes(
                RANDOM_SEED[..16].try_into().expect("16 bytes"),
            ))
            .max_random_size(MAX_RANDOM_BYTES)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        GuestState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory: usize::try_from(memory_limit).unwrap_or(usize::MAX),
                memory_hit: false,
            },
            stderr,
        }
    }

    /// The start of what the policy wrote to stderr, on one line.
    pub fn stderr_text(&self) -> String {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        super::chain::one_line(text.trim())
    }
}

impl WasiView for GuestState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Memory and table limits of one store; remembers whether the memory limit
/// was what stopped the policy, so the fault can say so.
pub(crate) struct Limiter {
    memory: usize,
    pub memory_hit: bool,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.memory_hit = true;
            wasmtime::bail!("memory limit of {} bytes reached", self.memory);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Both clocks stand still.
struct FrozenClock;

impl HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn now(&self) -> Duration {
        FIXED_WALL_CLOCK
    }
}

impl HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        0
    }
}

/// A pollable that is always ready.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}

/// The WASI preview-2 interfaces, with the monotonic clock's subscriptions
/// replaced by pollables that are ready at once: a policy that sleeps must
/// not hold a host thread where no epoch deadline can reach it (sleeping
/// forever would otherwise block forever). With a frozen clock, a sleep
/// that returns at once is consistent: no time passed.
pub(crate) fn linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<GuestState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |cx: StoreContextMut<'_, GuestState>, (_,): (u64,)| ready_pollable(cx),
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |cx: StoreContextMut<'_, GuestState>, (_,): (u64,)| ready_pollable(cx),
    )?;
    linker.allow_shadowing(false);
    Ok(linker)
}

fn ready_pollable(
    mut cx: StoreContextMut<'_, GuestState>,
) -> wasmtime::Result<(Resource<DynPollable>,)> {
    let table = &mut cx.data_mut().table;
    let ready = table.push(Ready)?;
    Ok((subscribe(table, ready)?,))
}
