//! One `[[policy]]` entry of `executor.toml`:
//!
//! ```toml
//! [[policy]]
//! module = "/etc/qemu-executor/policies/port_range.wasm"
//! sha256 = "3f1c…"                      # optional pin of the module's bytes
//! settings = { min = 20000, max = 30000, mode = "clamp" }
//! # or: settings = '{"min": 20000, "max": 30000}'
//! limits = { time_ms = 100, memory_mb = 64 }   # optional, these are the defaults
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{Limits, PolicySpec};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The component (`.wasm`); relative paths are relative to the directory
    /// of the configuration file.
    pub module: PathBuf,
    /// Handed to the policy as JSON; default `{}`.
    #[serde(default)]
    pub settings: Option<SettingsValue>,
    /// sha256 of the module's bytes, 64 hex digits; the module is refused
    /// when its bytes do not match.
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Settings as a TOML table or as a JSON string.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SettingsValue {
    Json(String),
    Table(toml::Table),
}

/// Per-policy limits; absent fields take the defaults of [`Limits`]
/// (100 ms, 64 MiB; with a time limit under 64 ms, 1 MiB per ms of it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Wall-clock time of one evaluation, in milliseconds.
    #[serde(default)]
    pub time_ms: Option<u64>,
    /// Linear memory, in MiB.
    #[serde(default)]
    pub memory_mb: Option<u64>,
}

impl LimitsConfig {
    /// The limits, defaults filled in (not yet validated: see
    /// [`Limits::validate`]). `policy check|test|inspect` take the same two
    /// numbers as `--time-limit-ms` and `--memory-limit-mb`.
    pub fn resolve(&self) -> Limits {
        let time = self
            .time_ms
            .map_or(Limits::default().time, Duration::from_millis);
        // Unset memory is the default, or what a short time limit bounds.
        let defaults = Limits::with_time(time);
        Limits {
            time,
            memory: self
                .memory_mb
                .map_or(defaults.memory, |mb| mb.saturating_mul(1 << 20)),
        }
    }
}

impl PolicyConfig {
    /// Checks what can be checked without loading the module, naming the
    /// field.
    pub fn validate(&self) -> Result<(), String> {
        self.settings_json()?;
        if let Some(pin) = &self.sha256
            && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!("sha256: {pin:?} is not 64 hex digits"));
        }
        self.limits()
            .validate()
            .map_err(|problem| format!("limits: {problem}"))
    }

    fn settings_json(&self) -> Result<String, String> {
        match &self.settings {
            None => Ok("{}".to_string()),
            Some(SettingsValue::Json(text)) => {
                serde_json::from_str::<serde_json::Value>(text)
                    .map_err(|e| format!("settings: not valid JSON: {e}"))?;
                Ok(text.clone())
            }
            Some(SettingsValue::Table(table)) => serde_json::to_string(table)
                .map_err(|e| format!("settings: cannot be expressed as JSON: {e}")),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits.resolve()
    }

    /// The spec to load, with a relative `module` resolved against
    /// `base_dir` (the configuration file's directory).
    pub fn to_spec(&self, base_dir: &Path) -> Result<PolicySpec, String> {
        self.validate()?;
        Ok(PolicySpec {
            module: base_dir.join(&self.module),
            settings: self.settings_json()?,
            sha256: self.sha256.as_ref().map(|s| s.to_ascii_lowercase()),
            limits: self.limits(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        policy: Vec<PolicyConfig>,
    }

    fn parse(text: &str) -> Result<Vec<PolicyConfig>, toml::de::Error> {
        toml::from_str::<File>(text).map(|f| f.policy)
    }

    #[test]
    fn table_and_json_settings_give_the_same_spec() {
        let policies = parse(
            r#"
[[policy]]
module = "port_range.wasm"
settings = { min = 20000, max = 30000, mode = "clamp" }

[[policy]]
module = "/abs/port_range.wasm"
settings = '{"max":30000,"min":20000,"mode":"clamp"}'
sha256 = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
limits = { time_ms = 250, memory_mb = 128 }
"#,
        )
        .unwrap();
        let a = policies[0].to_spec(Path::new("/etc/qe")).unwrap();
        let b = policies[1].to_spec(Path::new("/etc/qe")).unwrap();
        assert_eq!(a.module, PathBuf::from("/etc/qe/port_range.wasm"));
        assert_eq!(b.module, PathBuf::from("/abs/port_range.wasm"));
        let json = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(json(&a.settings), json(&b.settings));
        assert_eq!(a.limits, Limits::default());
        assert_eq!(b.limits.time, Duration::from_millis(250));
        assert_eq!(b.limits.memory, 128 << 20);
        assert_eq!(b.sha256.as_deref().unwrap().len(), 64);
        assert!(b.sha256.as_deref().unwrap().starts_with("abcdef"));
    }

    #[test]
    fn missing_settings_are_an_empty_object() {
        let p = &parse("[[policy]]\nmodule = \"p.wasm\"\n").unwrap()[0];
        assert_eq!(p.to_spec(Path::new(".")).unwrap().settings, "{}");
    }

    #[test]
    fn mistakes_are_named() {
        let err = parse("[[policy]]\nmodule = \"p.wasm\"\nsetings = {}\n").unwrap_err();
        assert!(err.to_string().contains("setings"), "{err}");
        let err = parse("[[policy]]\nmodule = \"p.wasm\"\nlimits = { time = 5 }\n").unwrap_err();
        assert!(err.to_string().contains("time"), "{err}");
        let bad_json = &parse("[[policy]]\nmodule = \"p.wasm\"\nsettings = '{min'\n").unwrap()[0];
        assert!(bad_json.validate().unwrap_err().starts_with("settings:"));
        let bad_pin = &parse("[[policy]]\nmodule = \"p.wasm\"\nsha256 = \"abc\"\n").unwrap()[0];
        assert!(bad_pin.validate().unwrap_err().starts_with("sha256:"));
        let bad_limit =
            &parse("[[policy]]\nmodule = \"p.wasm\"\nlimits = { memory_mb = 0 }\n").unwrap()[0];
        assert!(bad_limit.validate().unwrap_err().starts_with("limits:"));
    }
}
