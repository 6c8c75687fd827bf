//! The plugin block of a Nomad client's configuration:
//!
//! ```hcl
//! plugin "qemu-executor" {
//!   args = ["nomad-plugin"]
//!   config {
//!     config    = "/etc/qemu-executor/executor.toml"   # [fetch], [qemu], [args], [[policy]], [agent]
//!     state_dir = "/var/lib/qemu-executor"
//!     cache_dir = "/var/cache/qemu-executor"
//!     policy {
//!       module   = "/etc/qemu-executor/policies/port_range.wasm"
//!       settings = jsonencode({ min = 20000, max = 30000 })
//!     }
//!   }
//! }
//! ```
//!
//! and what it builds: the launch pipeline `run` and `agent` use, with the
//! agent's confinement of VMs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::cty::{self, CtyError, Whole};
use crate::config::Config;
use crate::fetch::Fetcher;
use crate::host::isolation::Isolation;
use crate::host::probe::Probe;
use crate::launch::{Detached, LiveSeam, Pipeline};
use crate::policy::config::{LimitsConfig, PolicyConfig, SettingsValue};
use crate::policy::{Chain, PolicyEngine, artifact_dir};

/// How often Fingerprint reports when the config does not say.
pub const DEFAULT_FINGERPRINT_PERIOD: Duration = Duration::from_secs(30);
const MAX_FINGERPRINT_PERIOD_S: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum PluginConfigError {
    #[error("Invalid plugin config")]
    Decode(#[from] CtyError),
    #[error("Invalid plugin config: {field}: {problem}")]
    Field { field: String, problem: String },
    #[error("Cannot load the executor config")]
    Config(#[from] crate::config::ConfigError),
    #[error("Cannot open the image cache")]
    Cache(#[from] crate::cache::CacheError),
    #[error("Invalid [fetch] settings")]
    Fetch(#[from] crate::fetch::FetchError),
    #[error("Cannot load the policy chain")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("Cannot prepare the VMs' confinement")]
    Isolation(#[from] crate::host::isolation::IsolationError),
    #[error("Cannot find the qemu-executor binary for the VMs' shims")]
    Exe(#[source] std::io::Error),
    #[error("Loading the policies failed")]
    Blocking(#[source] tokio::task::JoinError),
}

/// The decoded plugin block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    #[serde(default)]
    pub config: Option<PathBuf>,
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub fingerprint_period_s: Option<Whole>,
    #[serde(default)]
    pub policy: Option<Vec<InlinePolicy>>,
}

/// A `policy { ... }` block: one `[[policy]]` entry written in HCL.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlinePolicy {
    pub module: PathBuf,
    #[serde(default)]
    pub sha256: Option<String>,
    /// JSON, as HCL's `jsonencode` writes it.
    #[serde(default)]
    pub settings: Option<String>,
    #[serde(default)]
    pub time_ms: Option<Whole>,
    #[serde(default)]
    pub memory_mb: Option<Whole>,
}

/// Where paths come from when the plugin block leaves them out: the
/// global options of the command line, then the usual defaults.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub config: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
}

impl PluginConfig {
    /// Decodes and checks the plugin block's msgpack (empty: defaults).
    pub fn decode(bytes: &[u8]) -> Result<PluginConfig, PluginConfigError> {
        let value = cty::decode(bytes)?;
        let config: PluginConfig = if value.is_null() {
            PluginConfig::default()
        } else {
            cty::read(value)?
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), PluginConfigError> {
        let field = |field: &str, problem: String| PluginConfigError::Field {
            field: field.to_string(),
            problem,
        };
        for (name, path) in [
            ("config", &self.config),
            ("state_dir", &self.state_dir),
            ("cache_dir", &self.cache_dir),
        ] {
            if let Some(p) = path
                && !p.is_absolute()
            {
                // The plugin's working directory is Nomad's business.
                return Err(field(
                    name,
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        if let Some(Whole(s)) = self.fingerprint_period_s
            && !(1..=MAX_FINGERPRINT_PERIOD_S).contains(&s)
        {
            return Err(field(
                "fingerprint_period_s",
                format!("{s} is out of range (1 to {MAX_FINGERPRINT_PERIOD_S})"),
            ));
        }
        for (i, p) in self.inline_policies().iter().enumerate() {
            let name = format!("policy[{i}]");
            if !p.module.is_absolute() {
                return Err(field(
                    &format!("{name}.module"),
                    format!("{} is not an absolute path", p.module.display()),
                ));
            }
            p.validate().map_err(|problem| field(&name, problem))?;
        }
        Ok(())
    }

    pub fn fingerprint_period(&self) -> Duration {
        self.fingerprint_period_s
            .map_or(DEFAULT_FINGERPRINT_PERIOD, |Whole(s)| {
                Duration::from_secs(s.unsigned_abs())
            })
    }

    /// The inline policies as `[[policy]]` entries.
    pub fn inline_policies(&self) -> Vec<PolicyConfig> {
        let whole = |w: Option<Whole>| w.map(|Whole(v)| v.max(0).unsigned_abs());
        self.policy
            .iter()
            .flatten()
            .map(|p| PolicyConfig {
                module: p.module.clone(),
                settings: p.settings.clone().map(SettingsValue::Json),
                sha256: p.sha256.clone(),
                limits: LimitsConfig {
                    time_ms: whole(p.time_ms),
                    memory_mb: whole(p.memory_mb),
                },
            })
            .collect()
    }

    /// The executor config: the file, then the inline policies after its
    /// own.
    pub fn executor_config(&self, defaults: &Defaults) -> Result<Config, PluginConfigError> {
        let path = self.config.as_deref().or(defaults.config.as_deref());
        let mut config = Config::load_or_default(path)?;
        config.policy.extend(self.inline_policies());
        config.validate()?;
        Ok(config)
    }

    pub fn state_dir(&self, defaults: &Defaults) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| defaults.state_dir.clone())
    }

    pub fn cache_dir(&self, defaults: &Defaults) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| defaults.cache_dir.clone())
    }
}

/// What the plugin runs tasks with, built from its config.
pub struct Configured {
    /// Its VMs are detached: they outlive the plugin.
    pub pipeline: Pipeline,
    pub fingerprint_period: Duration,
}

impl Configured {
    /// Builds everything a task needs; policies are compiled (or read back
    /// from the cache) on a blocking thread.
    pub async fn build(
        config: &PluginConfig,
        defaults: &Defaults,
    ) -> Result<Configured, PluginConfigError> {
        let executor = config.executor_config(defaults)?;
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        let state_dir = absolute(config.state_dir(defaults));
        let cache_dir = absolute(config.cache_dir(defaults));
        let cache = crate::cache::Cache::open(&cache_dir)?;
        let specs = executor.policy_specs()?;
        let engine = PolicyEngine::new(&artifact_dir(&cache_dir))?;
        let chain = tokio::task::spawn_blocking(move || Chain::load(&engine, &specs))
            .await
            .map_err(PluginConfigError::Blocking)??;
        let isolation = Isolation::detect(&executor.agent, executor.qemu.sandbox)?;
        let mut probe = Probe::new(state_dir.clone());
        if let Some(binary) = &executor.qemu.binary {
            probe.qemu_binary = Some(binary.clone());
        }
        let pipeline = Pipeline {
            seam: LiveSeam {
                probe,
                chain,
                fetcher: Fetcher::new(executor.fetch.clone())?,
                cache,
            },
            state_dir,
            detached: Some(Detached {
                exe: std::env::current_exe().map_err(PluginConfigError::Exe)?,
                isolation,
            }),
            config: executor,
        };
        Ok(Configured {
            pipeline,
            fingerprint_period: config.fingerprint_period(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// cty's encoding of `config { state_dir = "/s" policy { module = "/p.wasm" } }`.
    fn encoded() -> Vec<u8> {
        let mut b = vec![0x85];
        for k in ["cache_dir", "config", "fingerprint_period_s"] {
            b.push(0xa0 | k.len() as u8);
            b.extend_from_slice(k.as_bytes());
            b.push(0xc0);
        }
        b.push(0xa6);
        b.extend_from_slice(b"policy");
        b.push(0x91);
        b.push(0x85);
        for k in ["memory_mb", "module", "settings", "sha256", "time_ms"] {
            b.push(0xa0 | k.len() as u8);
            b.extend_from_slice(k.as_bytes());
            if k == "module" {
                b.push(0xa7);
                b.extend_from_slice(b"/p.wasm");
            } else {
                b.push(0xc0);
            }
        }
        b.push(0xa9);
        b.extend_from_slice(b"state_dir");
        b.push(0xa2);
        b.extend_from_slice(b"/s");
        b
    }

    #[test]
    fn decodes_the_plugin_block() {
        let c = PluginConfig::decode(&encoded()).unwrap();
        assert_eq!(c.state_dir.as_deref(), Some(Path::new("/s")));
        assert_eq!(c.inline_policies().len(), 1);
        assert_eq!(c.inline_policies()[0].module, Path::new("/p.wasm"));
        assert_eq!(c.fingerprint_period(), DEFAULT_FINGERPRINT_PERIOD);
        assert_eq!(PluginConfig::decode(&[]).unwrap(), PluginConfig::default());
    }

    #[test]
    fn problems_name_the_field() {
        // {"state_dir": "relative"}
        let mut b = vec![0x81, 0xa9];
        b.extend_from_slice(b"state_dir");
        b.push(0xa8);
        b.extend_from_slice(b"relative");
        let err = PluginConfig::decode(&b).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid plugin config: state_dir: relative is not an absolute path"
        );
        // {"statedir": "/x"}
        let mut b = vec![0x81, 0xa8];
        b.extend_from_slice(b"statedir");
        b.extend_from_slice(&[0xa2, b'/', b'x']);
        let err = PluginConfig::decode(&b).unwrap_err();
        let chain = crate::error_chain(&err);
        assert!(chain.contains("unknown field `statedir`"), "{chain}");
    }
}
