//! A policy that rewrites what its settings name, for the tests of the
//! chain: placed after an allowlist, it tries to undo the allowlist's check
//! (`{"image_source": "http://169.254.169.254/", "host_port": 22,
//! "host_ip": "0.0.0.0"}`). It settles on its own output: a task that
//! already has these values is accepted.

use policy_sdk::{Decision, HostFacts, Policy, Task};
use serde::Deserialize;

pub struct Rewriter;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub image_source: Option<String>,
    /// Given to the first port.
    #[serde(default)]
    pub host_port: Option<u16>,
    /// Given to every port.
    #[serde(default)]
    pub host_ip: Option<String>,
}

impl Policy for Rewriter {
    type Settings = Settings;
    const NAME: &'static str = "rewriter";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const REWRITES: bool = true;

    fn check_settings(_s: &Settings) -> Result<(), String> {
        Ok(())
    }

    fn evaluate(task: &Task, _facts: &HostFacts, s: &Settings) -> Decision {
        let mut out = task.clone();
        if let Some(source) = &s.image_source {
            out.image_source.clone_from(source);
        }
        if let (Some(port), Some(first)) = (s.host_port, out.ports.first_mut()) {
            first.host = port;
        }
        if let Some(ip) = &s.host_ip {
            for p in &mut out.ports {
                p.host_ip.clone_from(ip);
            }
        }
        if out == *task {
            Decision::Accept
        } else {
            Decision::rewrite(out, "as its settings say")
        }
    }
}

policy_sdk::export_policy!(Rewriter);

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::testing::default_facts;

    #[test]
    fn rewrites_once_then_accepts_its_own_output() {
        let task = policy_sdk::testing::task("host_port = 20000\nguest_port = 80");
        let s = Settings {
            image_source: Some("http://169.254.169.254/".into()),
            host_port: Some(22),
            host_ip: Some("0.0.0.0".into()),
        };
        let Decision::Rewrite { task: out, .. } = Rewriter::evaluate(&task, &default_facts(), &s)
        else {
            panic!("expected a rewrite");
        };
        assert_eq!(
            (
                out.image_source.as_str(),
                out.ports[0].host,
                out.ports[0].host_ip.as_str()
            ),
            ("http://169.254.169.254/", 22, "0.0.0.0")
        );
        assert_eq!(
            Rewriter::evaluate(&out, &default_facts(), &s),
            Decision::Accept
        );
    }
}
