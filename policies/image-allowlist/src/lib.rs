//! `image-allowlist`: images come only from where the operator allows, with
//! a checksum algorithm the operator trusts.
//!
//! Settings (all optional):
//! - `schemes` (default `["https"]`): allowed URL schemes (`http`, `https`,
//!   `file`);
//! - `hosts` (default none): allowed hosts, exactly or as `*.example.org`
//!   for any subdomain;
//! - `prefixes` (default none): allowed URL prefixes, each ending with `/`
//!   (`"https://images.example.org/vm/"`, `"file:///var/lib/images/"`);
//! - `algorithms` (default `["sha256", "sha512"]`): allowed checksum
//!   algorithms; md5 only if listed.
//!
//! With neither `hosts` nor `prefixes`, any source of an allowed scheme
//! passes; otherwise the source must match one host or one prefix. A source
//! with a `..` path segment is refused, so that a prefix cannot be escaped.

use policy_sdk::{ChecksumAlgorithm, Decision, HostFacts, Policy, Task};
use serde::Deserialize;

pub struct ImageAllowlist;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_schemes")]
    pub schemes: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub prefixes: Vec<String>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<ChecksumAlgorithm>,
}

fn default_schemes() -> Vec<String> {
    vec!["https".into()]
}

fn default_algorithms() -> Vec<ChecksumAlgorithm> {
    vec![ChecksumAlgorithm::Sha256, ChecksumAlgorithm::Sha512]
}

impl Policy for ImageAllowlist {
    type Settings = Settings;
    const NAME: &'static str = "image-allowlist";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const REWRITES: bool = false;

    fn check_settings(s: &Settings) -> Result<(), String> {
        if s.schemes.is_empty() {
            return Err("schemes is empty: no image could ever pass".into());
        }
        if let Some(bad) = s
            .schemes
            .iter()
            .find(|x| !matches!(x.as_str(), "http" | "https" | "file"))
        {
            return Err(format!(
                "scheme {bad:?} is not one the executor fetches (http, https, file)"
            ));
        }
        if s.algorithms.is_empty() {
            return Err("algorithms is empty: no image could ever pass".into());
        }
        for host in &s.hosts {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty() || bare.contains(['/', ':', '@', '*']) {
                return Err(format!(
                    "host {host:?} is not a host name (or *.domain) without port or path"
                ));
            }
        }
        for prefix in &s.prefixes {
            if !prefix.contains("://") || !prefix.ends_with('/') {
                return Err(format!(
                    "prefix {prefix:?} must be a URL ending with '/', so that it matches whole path segments"
                ));
            }
        }
        Ok(())
    }

    fn evaluate(task: &Task, _facts: &HostFacts, s: &Settings) -> Decision {
        let source = task.image_source.as_str();
        let Some(url) = Url::parse(source) else {
            return Decision::reject(format!("image_source {source:?} is not a URL"));
        };
        if !s.schemes.iter().any(|x| x.eq_ignore_ascii_case(url.scheme)) {
            return Decision::reject(format!(
                "image_source scheme {:?} is not allowed (allowed: {})",
                url.scheme,
                s.schemes.join(", ")
            ));
        }
        if url.climbs() {
            return Decision::reject(format!("image_source {source:?} has a '..' path segment"));
        }
        let restricted = !s.hosts.is_empty() || !s.prefixes.is_empty();
        let host_ok = s.hosts.iter().any(|h| host_matches(h, &url.host));
        let prefix_ok = s.prefixes.iter().any(|p| source.starts_with(p.as_str()));
        if restricted && !host_ok && !prefix_ok {
            return Decision::reject(format!(
                "image_source {source:?} is not from an allowed host or prefix"
            ));
        }
        let algorithm = task.checksum.algorithm;
        if !s.algorithms.contains(&algorithm) {
            let allowed: Vec<&str> = s.algorithms.iter().map(|a| a.as_str()).collect();
            return Decision::reject(format!(
                "checksum algorithm {algorithm} is not allowed (allowed: {})",
                allowed.join(", ")
            ));
        }
        Decision::Accept
    }
}

/// The parts of a URL this policy looks at. A small parser keeps the
/// component small; the executor validates the URL fully anyway.
struct Url<'a> {
    scheme: &'a str,
    /// Lower-case, without user info or port; empty for `file:///`.
    host: String,
    path: &'a str,
}

impl<'a> Url<'a> {
    fn parse(source: &'a str) -> Option<Self> {
        let (scheme, rest) = source.split_once("://")?;
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let host = if let Some(v6) = host_port.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            host_port.split(':').next().unwrap_or("")
        };
        Some(Url {
            scheme,
            host: host.to_ascii_lowercase(),
            path,
        })
    }

    /// Whether a path segment is `..` (also percent-encoded).
    fn climbs(&self) -> bool {
        let path = self.path.split(['?', '#']).next().unwrap_or("");
        path.split('/').any(|segment| {
            let s = segment.to_ascii_lowercase().replace("%2e", ".");
            s == ".."
        })
    }
}

fn host_matches(allowed: &str, host: &str) -> bool {
    let allowed = allowed.to_ascii_lowercase();
    match allowed.strip_prefix("*.") {
        Some(domain) => host.len() > domain.len() && host.ends_with(&format!(".{domain}")),
        None => host == allowed,
    }
}

policy_sdk::export_policy!(ImageAllowlist);

#[cfg(test)]
mod tests {
    use policy_sdk::testing::{self, default_facts};

    use super::*;

    fn eval(source: &str, checksum: &str, settings: &str) -> Decision {
        let text = format!(
            "[[case]]\nname = \"t\"\nexpect = \"accept\"\ntask = {{ host_port = 1, guest_port = 2, image_source = {source:?}, checksum = {checksum:?} }}\n"
        );
        let task = testing::parse_cases(&text).unwrap().remove(0).task;
        policy_sdk::evaluate::<ImageAllowlist>(&task, &default_facts(), settings)
    }

    fn sha256() -> String {
        format!("sha256:{}", "a".repeat(64))
    }

    #[test]
    fn url_parts() {
        let u = Url::parse("https://user:pw@Images.Example.org:8443/vm/x.qcow2?a=b").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.path),
            ("https", "images.example.org", "/vm/x.qcow2?a=b")
        );
        let u = Url::parse("http://[::1]:80/x").unwrap();
        assert_eq!(u.host, "::1");
        let u = Url::parse("file:///var/lib/images/x.iso").unwrap();
        assert_eq!((u.host.as_str(), u.path), ("", "/var/lib/images/x.iso"));
        assert!(Url::parse("https://h/a/%2E%2e/b").unwrap().climbs());
        assert!(!Url::parse("https://h/a/..b/c").unwrap().climbs());
    }

    #[test]
    fn hosts_and_wildcards() {
        assert!(host_matches("images.example.org", "images.example.org"));
        assert!(host_matches("*.example.org", "a.b.example.org"));
        assert!(!host_matches("*.example.org", "example.org"));
        assert!(!host_matches("*.example.org", "evil-example.org"));
        assert!(!host_matches("example.org", "example.org.evil.com"));
    }

    #[test]
    fn defaults_want_https_and_sha2() {
        assert_eq!(eval("https://h/x.iso", &sha256(), "{}"), Decision::Accept);
        assert_eq!(eval("http://h/x.iso", &sha256(), "{}").kind(), "reject");
        let md5 = "md5:0123456789abcdef0123456789abcdef";
        let Decision::Reject { reason } = eval("https://h/x.iso", md5, "{}") else {
            panic!("md5 must be refused by default");
        };
        assert!(reason.contains("md5"), "{reason}");
    }

    #[test]
    fn prefixes_cannot_be_escaped() {
        let settings = r#"{"prefixes":["https://h/vm/"]}"#;
        assert_eq!(
            eval("https://h/vm/x.iso", &sha256(), settings),
            Decision::Accept
        );
        assert_eq!(
            eval("https://h/vm-evil/x.iso", &sha256(), settings).kind(),
            "reject"
        );
        assert_eq!(
            eval("https://h/vm/../secret.iso", &sha256(), settings).kind(),
            "reject"
        );
    }

    #[test]
    fn bad_settings() {
        let check = policy_sdk::check_settings::<ImageAllowlist>;
        assert!(check(r#"{"schemes":["ftp"]}"#).unwrap_err().contains("ftp"));
        assert!(check(r#"{"schemes":[]}"#).is_err());
        assert!(
            check(r#"{"algorithms":["crc32"]}"#)
                .unwrap_err()
                .contains("crc32")
        );
        assert!(
            check(r#"{"prefixes":["https://h/vm"]}"#)
                .unwrap_err()
                .contains("ending with '/'")
        );
        assert!(check(r#"{"hosts":["h:8080"]}"#).is_err());
    }

    #[test]
    fn cases() {
        testing::assert_cases::<ImageAllowlist>(concat!(env!("CARGO_MANIFEST_DIR"), "/CASES.toml"));
    }
}
