//! The restart policy of the cluster scheduler's job files: at most
//! `attempts` restarts within any `interval_s`, each after `delay_s`; once
//! they are used up, `mode = "fail"` gives up and `mode = "delay"` waits
//! for the interval to roll over. Pure, over the restart history.

use std::time::Duration;

use policy_sdk::{RestartMode, RestartPolicy};

/// What to do about a VM that ended without being asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart it after this long.
    Restart { after: Duration },
    /// Give up: the task fails with this reason.
    Fail { reason: String },
}

/// Decides at `now_ms`, given the times of earlier restarts.
pub fn decide(policy: &RestartPolicy, history_ms: &[u64], now_ms: u64) -> Decision {
    let interval_ms = u64::from(policy.interval_s) * 1000;
    let delay = Duration::from_secs(policy.delay_s.into());
    let window_start = now_ms.saturating_sub(interval_ms);
    let recent: Vec<u64> = history_ms
        .iter()
        .copied()
        .filter(|&t| t > window_start)
        .collect();
    if recent.len() < policy.attempts as usize {
        return Decision::Restart { after: delay };
    }
    match policy.mode {
        RestartMode::Fail => Decision::Fail {
            reason: format!(
                "{} restart attempts within {}s used up (restart mode \"fail\")",
                policy.attempts, policy.interval_s
            ),
        },
        RestartMode::Delay => {
            // The oldest restart counted leaves the window first.
            let rolls_over = recent.iter().min().map_or(now_ms, |&t| t + interval_ms);
            let wait = Duration::from_millis(rolls_over.saturating_sub(now_ms));
            Decision::Restart {
                after: wait.max(delay),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, interval_s: u32, delay_s: u32, mode: RestartMode) -> RestartPolicy {
        RestartPolicy {
            attempts,
            interval_s,
            delay_s,
            mode,
        }
    }

    #[test]
    fn restarts_until_the_attempts_are_used_then_fails() {
        let p = policy(2, 60, 5, RestartMode::Fail);
        let now = 1_000_000;
        assert_eq!(
            decide(&p, &[], now),
            Decision::Restart {
                after: Duration::from_secs(5)
            }
        );
        assert!(matches!(
            decide(&p, &[now - 10_000], now),
            Decision::Restart { .. }
        ));
        let Decision::Fail { reason } = decide(&p, &[now - 20_000, now - 10_000], now) else {
            panic!("expected a failure");
        };
        assert_eq!(
            reason,
            "2 restart attempts within 60s used up (restart mode \"fail\")"
        );
        // Restarts older than the interval no longer count.
        assert!(matches!(
            decide(&p, &[now - 70_000, now - 10_000], now),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn delay_mode_waits_for_the_interval_to_roll_over() {
        let p = policy(1, 60, 5, RestartMode::Delay);
        let now = 1_000_000;
        assert_eq!(
            decide(&p, &[now - 20_000], now),
            Decision::Restart {
                after: Duration::from_secs(40)
            }
        );
        // Never shorter than the delay.
        assert_eq!(
            decide(&p, &[now - 59_000], now),
            Decision::Restart {
                after: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn zero_attempts_never_restart_in_fail_mode() {
        let p = policy(0, 60, 1, RestartMode::Fail);
        assert!(matches!(decide(&p, &[], 5), Decision::Fail { .. }));
    }
}
