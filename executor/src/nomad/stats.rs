//! `TaskStats` samples: qemu's resident memory and CPU use, from /proc.

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use nomad_proto::driver::{
    CpuUsage, MemoryUsage, TaskResourceUsage, TaskStats, cpu_usage, memory_usage,
};

use super::events::timestamp;
use crate::host::usage::{self, Usage};

/// Turns successive readings of one process into samples: CPU percent is
/// the CPU time used since the previous reading over the time passed.
pub struct Sampler {
    task_id: String,
    pid: u32,
    previous: Option<(Instant, Usage)>,
    /// MHz of one core, for Nomad's `total_ticks`.
    mhz: f64,
}

impl Sampler {
    pub fn new(task_id: String, pid: u32) -> Sampler {
        Sampler {
            task_id,
            pid,
            previous: None,
            mhz: core_mhz().unwrap_or(1000.0),
        }
    }

    /// A sample now; `None` once the process is gone.
    pub fn sample(&mut self) -> Option<TaskStats> {
        let now = Instant::now();
        let usage = usage::of(self.pid)?;
        let percent = match self.previous {
            Some((then, before)) => {
                let wall = now.duration_since(then).as_secs_f64();
                let cpu = usage.cpu_time_ms.saturating_sub(before.cpu_time_ms) as f64 / 1000.0;
                if wall > 0.0 { cpu / wall * 100.0 } else { 0.0 }
            }
            None => 0.0,
        };
        self.previous = Some((now, usage));
        let resources = TaskResourceUsage {
            cpu: Some(CpuUsage {
                percent,
                total_ticks: percent / 100.0 * self.mhz,
                measured_fields: vec![
                    cpu_usage::Fields::Percent as i32,
                    cpu_usage::Fields::TotalTicks as i32,
                ],
                ..Default::default()
            }),
            memory: Some(MemoryUsage {
                rss: usage.rss_bytes,
                measured_fields: vec![memory_usage::Fields::Rss as i32],
                ..Default::default()
            }),
        };
        Some(TaskStats {
            id: self.task_id.clone(),
            timestamp: Some(timestamp(SystemTime::now())),
            agg_resource_usage: Some(resources.clone()),
            resource_usage_by_pid: HashMap::from([(self.pid.to_string(), resources)]),
        })
    }
}

/// The clock of the first core, from /proc/cpuinfo.
fn core_mhz() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    parse_mhz(&text)
}

fn parse_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let mut s = Sampler::new("a/b/c".into(), std::process::id());
        let first = s.sample().unwrap();
        let m = first
            .agg_resource_usage
            .as_ref()
            .unwrap()
            .memory
            .as_ref()
            .unwrap();
        assert!(m.rss > 0);
        assert!(first.timestamp.is_some());
        assert!(
            first
                .resource_usage_by_pid
                .contains_key(&std::process::id().to_string())
        );
        assert!(Sampler::new("x".into(), u32::MAX).sample().is_none());
    }

    #[test]
    fn reads_the_clock() {
        assert_eq!(
            parse_mhz("processor\t: 0\ncpu MHz\t\t: 2445.406\n"),
            Some(2445.406)
        );
        assert_eq!(parse_mhz("processor: 0\n"), None);
    }
}
