//! Counters for `GET /metrics`, in the Prometheus text format: tasks by
//! state, restarts, bytes fetched and cache hits, policy evaluations,
//! rejections and faults, and evaluation time as a histogram.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::record::TaskState;

/// Upper bounds of the evaluation-time buckets, in seconds: policies take
/// tens of microseconds when warm, milliseconds when cold, and are cut off
/// at their time limit (100 ms by default).
const EVAL_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
];

#[derive(Debug, Default)]
pub struct Metrics {
    pub restarts: AtomicU64,
    pub fetch_bytes: AtomicU64,
    pub fetches: AtomicU64,
    pub cache_hits: AtomicU64,
    pub evaluations: AtomicU64,
    pub rejections: AtomicU64,
    pub faults: AtomicU64,
    eval_buckets: [AtomicU64; EVAL_BUCKETS.len()],
    eval_count: AtomicU64,
    eval_sum_us: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Metrics {
    pub fn restarted(&self) {
        bump(&self.restarts, 1);
    }

    pub fn fetched(&self, body_bytes: u64, cache_hit: bool) {
        bump(&self.fetches, 1);
        bump(&self.fetch_bytes, body_bytes);
        if cache_hit {
            bump(&self.cache_hits, 1);
        }
    }

    /// One run of the policy chain: how long, and whether it rejected the
    /// task (`fault`: because a policy failed).
    pub fn evaluated(&self, took: Duration, rejected: bool, fault: bool) {
        bump(&self.evaluations, 1);
        if rejected {
            bump(&self.rejections, 1);
        }
        if fault {
            bump(&self.faults, 1);
        }
        let secs = took.as_secs_f64();
        for (bound, bucket) in EVAL_BUCKETS.iter().zip(&self.eval_buckets) {
            if secs <= *bound {
                bump(bucket, 1);
            }
        }
        bump(&self.eval_count, 1);
        bump(
            &self.eval_sum_us,
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// The exposition text; `states` counts the tasks in each state now.
    pub fn render(&self, states: &[(TaskState, u64)]) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            );
        };
        counter(
            "qemu_executor_restarts_total",
            "VM restarts by the restart policy.",
            get(&self.restarts),
        );
        counter(
            "qemu_executor_fetches_total",
            "Image fetches, cache hits included.",
            get(&self.fetches),
        );
        counter(
            "qemu_executor_fetch_bytes_total",
            "Image body bytes downloaded.",
            get(&self.fetch_bytes),
        );
        counter(
            "qemu_executor_cache_hits_total",
            "Fetches answered from the image cache.",
            get(&self.cache_hits),
        );
        counter(
            "qemu_executor_policy_evaluations_total",
            "Runs of the policy chain.",
            get(&self.evaluations),
        );
        counter(
            "qemu_executor_policy_rejections_total",
            "Tasks the policy chain rejected, faults included.",
            get(&self.rejections),
        );
        counter(
            "qemu_executor_policy_faults_total",
            "Tasks rejected because a policy failed (trap, limit, bad output).",
            get(&self.faults),
        );

        out.push_str(
            "# HELP qemu_executor_tasks Tasks by state.\n# TYPE qemu_executor_tasks gauge\n",
        );
        for state in TaskState::ALL {
            let n = states
                .iter()
                .find(|(s, _)| *s == state)
                .map_or(0, |(_, n)| *n);
            let _ = writeln!(out, "qemu_executor_tasks{{state=\"{state}\"}} {n}");
        }

        let name = "qemu_executor_policy_evaluation_seconds";
        let _ = write!(
            out,
            "# HELP {name} Time to run the policy chain on a task.\n# TYPE {name} histogram\n"
        );
        for (bound, bucket) in EVAL_BUCKETS.iter().zip(&self.eval_buckets) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", get(bucket));
        }
        let count = get(&self.eval_count);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            get(&self.eval_sum_us) as f64 / 1_000_000.0
        );
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.restarted();
        m.fetched(1000, false);
        m.fetched(0, true);
        m.evaluated(Duration::from_micros(80), false, false);
        m.evaluated(Duration::from_millis(3), true, false);
        m.evaluated(Duration::from_secs(2), true, true);
        let text = m.render(&[(TaskState::Ready, 3), (TaskState::Failed, 1)]);
        for line in [
            "qemu_executor_restarts_total 1",
            "qemu_executor_fetches_total 2",
            "qemu_executor_fetch_bytes_total 1000",
            "qemu_executor_cache_hits_total 1",
            "qemu_executor_policy_evaluations_total 3",
            "qemu_executor_policy_rejections_total 2",
            "qemu_executor_policy_faults_total 1",
            "qemu_executor_tasks{state=\"ready\"} 3",
            "qemu_executor_tasks{state=\"failed\"} 1",
            "qemu_executor_tasks{state=\"pending\"} 0",
            "qemu_executor_policy_evaluation_seconds_bucket{le=\"0.0001\"} 1",
            "qemu_executor_policy_evaluation_seconds_bucket{le=\"0.005\"} 2",
            "qemu_executor_policy_evaluation_seconds_bucket{le=\"1\"} 2",
            "qemu_executor_policy_evaluation_seconds_bucket{le=\"+Inf\"} 3",
            "qemu_executor_policy_evaluation_seconds_count 3",
            "# TYPE qemu_executor_policy_evaluation_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
