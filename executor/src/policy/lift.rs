//! A policy's decision read out of its memory with its sizes checked first.
//!
//! Lifting a value copies every string and list entry in the host, where no
//! time limit reaches: a decision of two million list entries took the host
//! 800 ms to lift before a check of the whole value could refuse it. These
//! types mirror the contract's, but each string and list of a rewritten
//! task, and the reason, is charged against its cap from the length the
//! policy wrote, *before* its contents are read; the first charge over a
//! cap stops the lifting. (The values cannot be lifted lazily instead: the
//! policy frees them in its post-return function, which wasmtime runs as
//! soon as the result is lifted.)
//!
//! The charges count for the call running on this thread: [`bounded`]
//! resets them before the call and turns an overrun into a [`Fault`].

use std::cell::Cell;

use wasmtime::ValRaw;
use wasmtime::component::__internal::{CanonicalAbiInfo, InstanceType, InterfaceType, LiftContext};
use wasmtime::component::{ComponentType, Lift};

use super::host::wit;
use super::{Fault, MAX_REASON_BYTES, MAX_TASK_BYTES};

/// Bytes a port mapping or an argument counts for besides its strings:
/// what it costs to keep, log and print beyond its text.
const PORT_BYTES: usize = 16;
const ARG_BYTES: usize = 8;
/// The tag wasmtime's compact UTF-16 encoding sets in a string's length.
const UTF16_TAG: u32 = 1 << 31;

thread_local! {
    /// Bytes of the rewritten task charged so far in this call.
    static TASK_BYTES: Cell<usize> = const { Cell::new(0) };
    /// The first cap passed in this call: what, how much, the cap.
    static OVERRUN: Cell<Option<(&'static str, usize, usize)>> = const { Cell::new(None) };
}

/// Makes `call` (a call into a policy, which lifts its result) with the
/// charges reset; an answer over a cap is a [`Fault`], whatever error the
/// stopped lifting gave.
pub(crate) fn bounded<R>(
    call: impl FnOnce() -> wasmtime::Result<R>,
) -> wasmtime::Result<Result<R, Fault>> {
    TASK_BYTES.set(0);
    OVERRUN.set(None);
    let result = call();
    if let Some((what, size, limit)) = OVERRUN.take() {
        return Ok(Err(Fault::OutputTooLarge { what, size, limit }));
    }
    result.map(Ok)
}

fn over(what: &'static str, size: usize, limit: usize) -> wasmtime::Error {
    OVERRUN.set(Some((what, size, limit)));
    wasmtime::Error::msg(format!("the policy's {what} is over {limit} bytes"))
}

fn charge_task(bytes: usize) -> wasmtime::Result<()> {
    let total = TASK_BYTES.get().saturating_add(bytes);
    TASK_BYTES.set(total);
    if total > MAX_TASK_BYTES {
        return Err(over("task", total, MAX_TASK_BYTES));
    }
    Ok(())
}

/// The length a string or list of the policy's says it has: the second
/// half of its pointer pair, flat or in memory.
fn flat_len(src: &[ValRaw; 2]) -> usize {
    (src[1].get_u32() & !UTF16_TAG) as usize
}

fn memory_len(bytes: &[u8]) -> usize {
    let len: [u8; 4] = bytes
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .unwrap_or([0xff; 4]);
    (u32::from_le_bytes(len) & !UTF16_TAG) as usize
}

/// Implements `ComponentType` and `Lift` for a wrapper of `$inner` that is
/// charged `$charge(len)` before the value is lifted.
macro_rules! charged {
    ($(#[$doc:meta])* $name:ident($inner:ty) $(<$g:ident: $b:ident>)?, $charge:expr) => {
        $(#[$doc])*
        pub(crate) struct $name$(<$g>)?(pub $inner);

        // SAFETY: the layout, the ABI and the type check are those of
        // `$inner`, to which lifting is forwarded.
        unsafe impl$(<$g: $b>)? ComponentType for $name$(<$g>)? {
            type Lower = [ValRaw; 2];
            const ABI: CanonicalAbiInfo = <$inner as ComponentType>::ABI;

            fn typecheck(ty: &InterfaceType, types: &InstanceType<'_>) -> wasmtime::Result<()> {
                <$inner as ComponentType>::typecheck(ty, types)
            }
        }

        // SAFETY: as above; only the length is read before forwarding.
        unsafe impl$(<$g: Lift>)? Lift for $name$(<$g>)? {
            fn linear_lift_from_flat(
                cx: &mut LiftContext<'_>,
                ty: InterfaceType,
                src: &Self::Lower,
            ) -> wasmtime::Result<Self> {
                ($charge)(flat_len(src))?;
                <$inner as Lift>::linear_lift_from_flat(cx, ty, src).map($name)
            }

            fn linear_lift_from_memory(
                cx: &mut LiftContext<'_>,
                ty: InterfaceType,
                bytes: &[u8],
            ) -> wasmtime::Result<Self> {
                ($charge)(memory_len(bytes))?;
                <$inner as Lift>::linear_lift_from_memory(cx, ty, bytes).map($name)
            }
        }
    };
}

charged!(
    /// A string of a rewritten task.
    Text(String),
    charge_task
);
charged!(
    /// The ports of a rewritten task.
    Ports(Vec<T>) <T: ComponentType>,
    |n: usize| charge_task(n.saturating_mul(PORT_BYTES))
);
charged!(
    /// The arguments of a rewritten task.
    Args(Vec<T>) <T: ComponentType>,
    |n: usize| charge_task(n.saturating_mul(ARG_BYTES))
);
charged!(
    /// A reason, refused over [`MAX_REASON_BYTES`].
    Reason(String),
    |n: usize| if n > MAX_REASON_BYTES {
        Err(over("reason", n, MAX_REASON_BYTES))
    } else {
        Ok(())
    }
);

#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct RawPort {
    host: u16,
    guest: u16,
    protocol: wit::Protocol,
    #[component(name = "host-ip")]
    host_ip: Text,
    check: wit::ReadyCheck,
    #[component(name = "http-path")]
    http_path: Text,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct RawChecksum {
    algorithm: wit::ChecksumAlgorithm,
    digest: Text,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct RawTask {
    name: Text,
    #[component(name = "image-source")]
    image_source: Text,
    checksum: RawChecksum,
    accelerator: wit::Accelerator,
    #[component(name = "kvm-fallback")]
    kvm_fallback: bool,
    ports: Ports<RawPort>,
    #[component(name = "memory-mb")]
    memory_mb: u32,
    cpus: u32,
    #[component(name = "kill-timeout-s")]
    kill_timeout_s: u32,
    #[component(name = "ready-timeout-s")]
    ready_timeout_s: u32,
    #[component(name = "ready-serial")]
    ready_serial: Option<Text>,
    #[component(name = "machine-type")]
    machine_type: Text,
    #[component(name = "drive-interface")]
    drive_interface: wit::DriveInterface,
    #[component(name = "graceful-shutdown")]
    graceful_shutdown: bool,
    args: Args<Text>,
    restart: wit::RestartPolicy,
}

#[derive(ComponentType, Lift)]
#[component(record)]
pub(crate) struct RawRewrite {
    pub task: RawTask,
    pub reason: Reason,
}

// Lifted once per call and taken apart at once: boxing the rewrite would
// save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(ComponentType, Lift)]
#[component(variant)]
pub(crate) enum RawDecision {
    #[component(name = "accept")]
    Accept,
    #[component(name = "reject")]
    Reject(Reason),
    #[component(name = "rewrite")]
    Rewrite(RawRewrite),
}

impl From<RawTask> for wit::Task {
    fn from(t: RawTask) -> wit::Task {
        wit::Task {
            name: t.name.0,
            image_source: t.image_source.0,
            checksum: wit::Checksum {
                algorithm: t.checksum.algorithm,
                digest: t.checksum.digest.0,
            },
            accelerator: t.accelerator,
            kvm_fallback: t.kvm_fallback,
            ports: t
                .ports
                .0
                .into_iter()
                .map(|p| wit::PortMapping {
                    host: p.host,
                    guest: p.guest,
                    protocol: p.protocol,
                    host_ip: p.host_ip.0,
                    check: p.check,
                    http_path: p.http_path.0,
                })
                .collect(),
            memory_mb: t.memory_mb,
            cpus: t.cpus,
            kill_timeout_s: t.kill_timeout_s,
            ready_timeout_s: t.ready_timeout_s,
            ready_serial: t.ready_serial.map(|s| s.0),
            machine_type: t.machine_type.0,
            drive_interface: t.drive_interface,
            graceful_shutdown: t.graceful_shutdown,
            args: t.args.0.into_iter().map(|a| a.0).collect(),
            restart: t.restart,
        }
    }
}

/// The error of `check-settings`, cut at [`MAX_REASON_BYTES`] like a
/// reason, saying how long it was.
pub(crate) fn settings_error(message: String) -> String {
    if message.len() <= MAX_REASON_BYTES {
        return message;
    }
    format!(
        "{} [cut: {} bytes in all]",
        crate::text::truncate(&message, MAX_REASON_BYTES),
        message.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_read_from_the_pointer_pair() {
        let mut bytes = [0u8; 8];
        bytes[4..].copy_from_slice(&2_000_000u32.to_le_bytes());
        assert_eq!(memory_len(&bytes), 2_000_000);
        assert_eq!(memory_len(&[0; 3]), !UTF16_TAG as usize);
    }

    #[test]
    fn charges_add_up_until_the_cap() {
        let outcome = bounded(|| {
            charge_task(MAX_TASK_BYTES - 10)?;
            charge_task(8)?;
            charge_task(2_000_000 * ARG_BYTES)?;
            unreachable!("the third charge is over the cap")
        })
        .unwrap();
        assert_eq!(
            outcome,
            Err::<(), _>(Fault::OutputTooLarge {
                what: "task",
                size: MAX_TASK_BYTES - 2 + 16_000_000,
                limit: MAX_TASK_BYTES
            })
        );
        // The next call starts from nothing.
        assert_eq!(bounded(|| charge_task(100)).unwrap(), Ok(()));
    }

    #[test]
    fn a_settings_error_is_cut() {
        assert_eq!(settings_error("short".into()), "short");
        let long = settings_error("é".repeat(5000));
        assert!(long.ends_with(" [cut: 10000 bytes in all]"), "{long}");
        assert!(long.len() < MAX_REASON_BYTES + 40);
    }
}
