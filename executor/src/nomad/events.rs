//! Task events for Nomad (`TaskEvents`): what a task went through before
//! and while it ran, shown in `nomad alloc status`. One stream serves every
//! task; each event names its stage in the `stage` annotation.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use nomad_proto::driver::DriverTaskEvent;
use tokio::sync::broadcast;

use crate::policy::ChainOutcome;

/// Events kept for a slow reader before it misses some.
const BACKLOG: usize = 1024;

/// Go's zero time, which Nomad's client reads as "not set" where a
/// timestamp must be present (`completed_at` of a running task).
pub const ZERO_TIME: prost_types::Timestamp = prost_types::Timestamp {
    seconds: -62_135_596_800,
    nanos: 0,
};

pub fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// Which task an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub task_id: String,
    pub alloc_id: String,
    pub task_name: String,
}

#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<DriverTaskEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl Events {
    pub fn subscribe(&self) -> broadcast::Receiver<DriverTaskEvent> {
        self.tx.subscribe()
    }

    pub fn emit(
        &self,
        subject: &Subject,
        stage: &str,
        message: String,
        annotations: &[(&str, String)],
    ) {
        let mut map: HashMap<String, String> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.clone()))
            .collect();
        map.insert("stage".into(), stage.into());
        tracing::info!(task = %subject.task_id, stage, "{message}");
        // Nobody listening is fine: Nomad opens the stream when it wants.
        let _ = self.tx.send(DriverTaskEvent {
            task_id: subject.task_id.clone(),
            alloc_id: subject.alloc_id.clone(),
            task_name: subject.task_name.clone(),
            timestamp: Some(timestamp(SystemTime::now())),
            message,
            annotations: map,
        });
    }

    /// One event per policy that ran.
    pub fn policies(&self, subject: &Subject, outcome: &ChainOutcome) {
        for (message, annotations) in policy_events(outcome) {
            self.emit(subject, "policy", message, &annotations);
        }
    }
}

/// The events of a chain's outcome: message and annotations per policy.
pub fn policy_events(outcome: &ChainOutcome) -> Vec<(String, Vec<(&'static str, String)>)> {
    use crate::policy::StepDecision;
    outcome
        .steps()
        .iter()
        .map(|step| {
            let because = step
                .reason
                .as_ref()
                .map_or_else(String::new, |r| format!(" ({r})"));
            let message = match step.decision {
                StepDecision::Accept => format!("Policy {} accepted the task", step.policy),
                StepDecision::Rewrite => {
                    let changes: Vec<String> = step.diff.iter().map(ToString::to_string).collect();
                    format!(
                        "Policy {} rewrote {}{because}",
                        step.policy,
                        changes.join(", ")
                    )
                }
                StepDecision::Reject => format!(
                    "Policy {} rejected the task: {}",
                    step.policy,
                    step.reason.as_deref().unwrap_or("no reason given")
                ),
                StepDecision::Fault => format!(
                    "Policy {} failed, so the task is rejected: {}",
                    step.policy,
                    step.reason.as_deref().unwrap_or("no reason given")
                ),
            };
            let annotations = vec![
                ("policy", step.policy.clone()),
                ("decision", step.decision.as_str().to_string()),
                ("elapsed_us", step.elapsed.as_micros().to_string()),
            ];
            (message, annotations)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_unix_seconds_and_nanos() {
        let t = timestamp(UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 5));
        assert_eq!((t.seconds, t.nanos), (1_700_000_000, 5));
    }

    #[test]
    fn subscribers_see_events_with_their_stage() {
        let events = Events::default();
        let mut rx = events.subscribe();
        let subject = Subject {
            task_id: "a1/web/0badcafe".into(),
            alloc_id: "a1".into(),
            task_name: "web".into(),
        };
        events.emit(
            &subject,
            "fetch",
            "Image ready".into(),
            &[("cache_hit", "true".into())],
        );
        let e = rx.try_recv().unwrap();
        assert_eq!(e.task_id, subject.task_id);
        assert_eq!(e.annotations["stage"], "fetch");
        assert_eq!(e.annotations["cache_hit"], "true");
        assert!(e.timestamp.is_some());
    }
}
