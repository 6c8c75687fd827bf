//! The task's free-form `args`, as the original driver had them, and the
//! operator's allowlist that keeps them from becoming a way out of the VM
//! (CVE-2021-43415 smuggled `-drive file=/host/secret` through them).
//!
//! Off unless the operator enables it. Then every flag must be on the
//! allowlist, and its value may only use the option keys listed for it,
//! so a value cannot carry a second option either.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Flags that open host files or devices, or rewire the executor's own
/// plumbing. No allowlist may contain them.
pub const NEVER_ALLOWED: &[&str] = &[
    "-accel",
    "-add-fd",
    "-bios",
    "-blockdev",
    "-cdrom",
    "-chardev",
    "-chroot",
    "-D",
    "-daemonize",
    "-device",
    "-display",
    "-drive",
    "-dtb",
    "-enable-kvm",
    "-fda",
    "-fdb",
    "-fsdev",
    "-gdb",
    "-global",
    "-hda",
    "-hdb",
    "-hdc",
    "-hdd",
    "-incoming",
    "-initrd",
    "-kernel",
    "-L",
    "-loadvm",
    "-m",
    "-M",
    "-machine",
    "-mon",
    "-monitor",
    "-mtdblock",
    "-name",
    "-net",
    "-netdev",
    "-nic",
    "-object",
    "-option-rom",
    "-parallel",
    "-pflash",
    "-pidfile",
    "-plugin",
    "-qmp",
    "-qmp-pretty",
    "-readconfig",
    "-run-with",
    "-runas",
    "-s",
    "-S",
    "-sandbox",
    "-sd",
    "-serial",
    "-smp",
    "-spice",
    "-trace",
    "-virtfs",
    "-vnc",
    "-writeconfig",
];

/// `[args]` in executor.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgsConfig {
    /// Default false: tasks with `args` are refused.
    #[serde(default)]
    pub enabled: bool,
    /// Flag → the option keys its value may use. `""` in the list allows a
    /// bare leading value (`-k en-us`); an empty list means the flag takes
    /// no value (`-no-reboot`).
    #[serde(default)]
    pub allow: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("args: passthrough is disabled on this host ([args] enabled = false in executor.toml)")]
    Disabled,
    #[error("args[{index}]: {flag:?} is not on the operator's allowlist")]
    NotAllowed { index: usize, flag: String },
    #[error("args[{index}]: expected a flag starting with '-', found {token:?}")]
    NotAFlag { index: usize, token: String },
    #[error("args[{index}]: {flag} needs a value")]
    MissingValue { index: usize, flag: String },
    #[error("args[{index}]: value {value:?} of {flag} uses {key:?}, which is not allowed for it")]
    KeyNotAllowed {
        index: usize,
        flag: String,
        value: String,
        key: String,
    },
    #[error("[args] allow: {0} can never be allowed: it opens host files or rewires the executor")]
    NeverAllowed(String),
}

impl ArgsConfig {
    pub fn validate(&self) -> Result<(), ArgsError> {
        match self
            .allow
            .keys()
            .find(|f| NEVER_ALLOWED.contains(&normalize(f)))
        {
            Some(flag) => Err(ArgsError::NeverAllowed(flag.clone())),
            None => Ok(()),
        }
    }

    /// Checks a task's `args` and returns them as they go to qemu.
    pub fn check(&self, args: &[String]) -> Result<Vec<String>, ArgsError> {
        if args.is_empty() {
            return Ok(Vec::new());
        }
        if !self.enabled {
            return Err(ArgsError::Disabled);
        }
        let mut out = Vec::with_capacity(args.len());
        let mut i = 0;
        while i < args.len() {
            let token = &args[i];
            if !token.starts_with('-') {
                return Err(ArgsError::NotAFlag {
                    index: i,
                    token: token.clone(),
                });
            }
            let flag = normalize(token);
            let keys = self
                .allow
                .iter()
                .find(|(allowed, _)| normalize(allowed) == flag)
                .map(|(_, keys)| keys)
                .filter(|_| !NEVER_ALLOWED.contains(&flag))
                .ok_or_else(|| ArgsError::NotAllowed {
                    index: i,
                    flag: token.clone(),
                })?;
            out.push(flag.to_string());
            if keys.is_empty() {
                i += 1;
                continue;
            }
            let value = args
                .get(i + 1)
                .filter(|v| !v.starts_with('-'))
                .ok_or_else(|| ArgsError::MissingValue {
                    index: i,
                    flag: flag.to_string(),
                })?;
            for (n, part) in split_opts(value).iter().enumerate() {
                let key = match part.split_once('=') {
                    Some((k, _)) => k,
                    None if n == 0 => "",
                    None => part.as_str(),
                };
                if !keys.iter().any(|k| k == key) {
                    return Err(ArgsError::KeyNotAllowed {
                        index: i + 1,
                        flag: flag.to_string(),
                        value: value.clone(),
                        key: key.to_string(),
                    });
                }
            }
            out.push(value.clone());
            i += 2;
        }
        Ok(out)
    }
}

/// qemu accepts `--flag` for `-flag`.
fn normalize(flag: &str) -> &str {
    flag.strip_prefix("--")
        .map_or(flag, |rest| &flag[flag.len() - rest.len() - 1..])
}

/// Splits an option string the way qemu does: at single commas, with a
/// doubled comma standing for a literal one.
pub fn split_opts(value: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                parts.last_mut().expect("never empty").push(',');
            }
            ',' => parts.push(String::new()),
            c => parts.last_mut().expect("never empty").push(c),
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ArgsConfig {
        let text = r#"
enabled = true
[allow]
"-smbios" = ["type", "manufacturer", "serial"]
"-k" = [""]
"-no-reboot" = []
"-rtc" = ["base", "clock"]
"#;
        let c: ArgsConfig = toml::from_str(text).unwrap();
        c.validate().unwrap();
        c
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn off_by_default() {
        let c = ArgsConfig::default();
        assert_eq!(c.check(&[]), Ok(vec![]));
        assert_eq!(c.check(&args(&["-no-reboot"])), Err(ArgsError::Disabled));
    }

    #[test]
    fn allowed_flags_and_keys_pass() {
        let c = config();
        let a = args(&[
            "-smbios",
            "type=1,serial=abc,,def",
            "--no-reboot",
            "-k",
            "en-us",
            "-rtc",
            "base=utc",
        ]);
        assert_eq!(
            c.check(&a).unwrap(),
            args(&[
                "-smbios",
                "type=1,serial=abc,,def",
                "-no-reboot",
                "-k",
                "en-us",
                "-rtc",
                "base=utc"
            ])
        );
    }

    #[test]
    fn the_cve_path_is_closed() {
        let c = config();
        assert_eq!(
            c.check(&args(&["-drive", "file=/etc/shadow"])),
            Err(ArgsError::NotAllowed {
                index: 0,
                flag: "-drive".into()
            })
        );
        // A value cannot smuggle a second flag...
        assert_eq!(
            c.check(&args(&["-k", "-drive", "file=/etc/shadow"])),
            Err(ArgsError::MissingValue {
                index: 0,
                flag: "-k".into()
            })
        );
        // ...nor a second option inside its own option string.
        assert!(matches!(
            c.check(&args(&["-smbios", "type=1,file=/etc/shadow"])),
            Err(ArgsError::KeyNotAllowed { ref key, .. }) if key == "file"
        ));
        assert!(matches!(
            c.check(&args(&["-rtc", "base=utc,clock=host,driftfix=slew"])),
            Err(ArgsError::KeyNotAllowed { ref key, .. }) if key == "driftfix"
        ));
        // A bare value where only keys are allowed.
        assert!(matches!(
            c.check(&args(&["-smbios", "file=/x"])),
            Err(ArgsError::KeyNotAllowed { .. })
        ));
        assert_eq!(
            c.check(&args(&["stray"])),
            Err(ArgsError::NotAFlag {
                index: 0,
                token: "stray".into()
            })
        );
        assert_eq!(
            c.check(&args(&["-rtc"])),
            Err(ArgsError::MissingValue {
                index: 0,
                flag: "-rtc".into()
            })
        );
    }

    #[test]
    fn dangerous_flags_cannot_be_allowed() {
        for flag in [
            "-drive",
            "--drive",
            "-chardev",
            "-device",
            "-object",
            "-readconfig",
        ] {
            let c = ArgsConfig {
                enabled: true,
                allow: BTreeMap::from([(flag.to_string(), vec!["file".to_string()])]),
            };
            assert_eq!(
                c.validate(),
                Err(ArgsError::NeverAllowed(flag.into())),
                "{flag}"
            );
            assert!(c.check(&args(&[flag, "file=/x"])).is_err());
        }
    }

    #[test]
    fn splitting_follows_qemu() {
        assert_eq!(split_opts("a=1,b=2"), ["a=1", "b=2"]);
        assert_eq!(split_opts("a=x,,y"), ["a=x,y"]);
        assert_eq!(split_opts(""), [""]);
    }
}
