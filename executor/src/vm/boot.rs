//! The boot watch: every port answers through its forward, the serial
//! console shows the task's marker, or the boot fails (qemu ends, KVM
//! fails the guest, the ready timeout passes).

use std::time::Duration;

use policy_sdk::PortMapping;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Ending, Vm};
use crate::logtail::LogTail;
use crate::qemu::qmp::Event;
use crate::readiness;

/// How often logs are read while the guest boots.
const BOOT_TICK: Duration = Duration::from_millis(200);
/// Under kvm, how long a guest with nothing to check (no port check, no
/// console line) is still watched for KVM's failures before it counts as
/// ready. A lying KVM fails a guest in its first seconds; declaring it
/// ready at once would leave it hung under kvm with no fallback.
const KVM_WATCH: Duration = Duration::from_secs(30);

/// Lines in qemu's own output that mean KVM cannot run this guest.
const KVM_FAILURE_MARKERS: [&str; 5] = [
    "KVM internal error",
    "kvm run failed",
    "failed to initialize kvm",
    "Could not access KVM kernel module",
    "KVM: entry failed",
];

/// How the boot went.
#[derive(Debug, Clone)]
pub enum Boot {
    Ready,
    /// KVM failed this guest; the reason says how it showed.
    KvmFailed(String),
    Ended(Ending),
    NotReady,
    Cancelled,
}

/// What the boot watch needs to know.
pub struct BootWatch<'a> {
    pub ports: &'a [PortMapping],
    pub ready_serial: Option<&'a str>,
    pub ready_timeout: Duration,
    /// Whether this boot runs under kvm, where a failure may be KVM's.
    pub under_kvm: bool,
    /// Under kvm: a guest that prints nothing on its serial console for
    /// this long is taken as hung. `None` outside kvm or when disabled.
    pub kvm_stall: Option<Duration>,
}

/// What the boot watch reads of the guest's and qemu's logs.
struct Logs {
    serial: LogTail,
    qemu: LogTail,
    last_serial_growth: Instant,
    serial_ok: bool,
    deadline: Instant,
}

impl Logs {
    /// Reads what the logs grew by; says how the boot ended, if it did.
    fn tick(&mut self, watch: &BootWatch<'_>, ports_ready: bool) -> Option<Boot> {
        let now = Instant::now();
        if self.serial.poll() {
            self.last_serial_growth = now;
        }
        if let Some(marker) = watch.ready_serial
            && !self.serial_ok
            && self.serial.contains(marker)
        {
            self.serial_ok = true;
        }
        self.qemu.poll();
        if watch.under_kvm
            && let Some(marker) = kvm_failure(self.qemu.text())
        {
            return Some(Boot::KvmFailed(marker));
        }
        if let Some(stall) = watch.kvm_stall
            && now - self.last_serial_growth >= stall
        {
            return Some(Boot::KvmFailed(format!(
                "no output on the serial console for {}s under kvm",
                stall.as_secs()
            )));
        }
        if now >= self.deadline {
            // Only the KVM watch left: the guest has nothing else to show.
            return Some(if ports_ready && self.serial_ok {
                Boot::Ready
            } else {
                Boot::NotReady
            });
        }
        None
    }
}

impl Vm {
    pub async fn boot(
        &mut self,
        watch: &BootWatch<'_>,
        cancel: &CancellationToken,
        on_port: &mut (dyn FnMut(&PortMapping) + Send),
    ) -> Boot {
        let started = Instant::now();
        let mut logs = Logs {
            serial: LogTail::new(self.dir.serial_log()),
            qemu: LogTail::starting_at(self.dir.qemu_log(), self.log_start),
            last_serial_growth: started,
            serial_ok: watch.ready_serial.is_none(),
            deadline: started + watch.ready_timeout,
        };
        let guest_checked = readiness::guest_is_checked(watch.ports, watch.ready_serial);
        let kvm_watch_until = (watch.under_kvm && !guest_checked).then(|| started + KVM_WATCH);

        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(watch.ports.len().max(1));
        let mut probes = tokio::task::JoinSet::new();
        for (i, port) in watch.ports.iter().enumerate() {
            let (port, tx) = (port.clone(), ready_tx.clone());
            probes.spawn(async move {
                readiness::wait_for(&port).await;
                let _ = tx.send(i).await;
            });
        }
        drop(ready_tx);
        let mut pending_ports = watch.ports.len();
        let mut tick = tokio::time::interval(BOOT_TICK);

        loop {
            let kvm_watched = kvm_watch_until.is_none_or(|until| Instant::now() >= until);
            if pending_ports == 0 && logs.serial_ok && kvm_watched {
                return Boot::Ready;
            }
            tokio::select! {
                status = self.process.wait() => {
                    self.read_last_events().await;
                    let tail = self.log_tail();
                    if watch.under_kvm && let Some(marker) = kvm_failure(&tail) {
                        return Boot::KvmFailed(marker);
                    }
                    return Boot::Ended(self.ending_after_exit(status, tail));
                }
                event = self.events.recv() => {
                    match event {
                        Ok(ev) => if let Some(boot) = self.on_boot_event(&ev, watch.under_kvm).await {
                            return boot;
                        },
                        Err(RecvError::Lagged(_)) => {}
                        // The connection is gone; qemu's exit follows.
                        Err(RecvError::Closed) => {
                            let status = self.process.wait().await;
                            let tail = self.log_tail();
                            return Boot::Ended(self.ending_after_exit(status, tail));
                        }
                    }
                }
                Some(i) = ready_rx.recv() => {
                    on_port(&watch.ports[i]);
                    pending_ports -= 1;
                }
                _ = tick.tick() => if let Some(boot) = logs.tick(watch, pending_ports == 0) {
                    return boot;
                },
                _ = cancel.cancelled() => return Boot::Cancelled,
            }
        }
    }

    async fn on_boot_event(&mut self, event: &Event, under_kvm: bool) -> Option<Boot> {
        match event.name.as_str() {
            "SHUTDOWN" => {
                self.shutdown_by_guest |= event.data["guest"].as_bool() == Some(true);
                None
            }
            "STOP" => match self.qmp.status().await.as_deref() {
                Ok("internal-error") if under_kvm => Some(Boot::KvmFailed(
                    "KVM internal error: qemu stopped the guest (query-status: internal-error)"
                        .into(),
                )),
                Ok("internal-error") => Some(Boot::Ended(Ending::QemuExited {
                    status: "internal error (query-status: internal-error)".into(),
                    log_tail: self.log_tail(),
                })),
                _ => None,
            },
            "GUEST_PANICKED" => Some(Boot::Ended(Ending::QemuExited {
                status: "guest panicked".into(),
                log_tail: String::new(),
            })),
            _ => None,
        }
    }
}

/// The marker line that shows KVM failed, if `log` has one.
pub fn kvm_failure(log: &str) -> Option<String> {
    log.lines()
        .find(|line| KVM_FAILURE_MARKERS.iter().any(|m| line.contains(m)))
        .map(|line| line.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_markers() {
        let log = "qemu-system-x86_64: warning: host doesn't support requested feature: CPUID.01H:ECX.pni [bit 0]\nKVM internal error. Suberror: 1\nextra data[0]: 0x1\n";
        assert_eq!(
            kvm_failure(log).as_deref(),
            Some("KVM internal error. Suberror: 1")
        );
        assert_eq!(
            kvm_failure("qemu-system-x86_64: -accel kvm: failed to initialize kvm: No such file or directory").as_deref(),
            Some("qemu-system-x86_64: -accel kvm: failed to initialize kvm: No such file or directory")
        );
        assert_eq!(
            kvm_failure("qemu-system-x86_64: warning: something else"),
            None
        );
    }
}
