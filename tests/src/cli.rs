//! Running the real `qemu-executor` against a temporary cache: each test
//! gets its own cache directory and `executor.toml`, children in their own
//! process group, and helpers to assert that nothing half-written is left.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::executor_bin;
use crate::fault::md5_hex;
use crate::proc::GroupChild;

pub const MIB: usize = 1 << 20;

/// Settings that keep every test within seconds: short delays between
/// attempts, three attempts, short timeouts.
pub const FAST: &[(&str, &str)] = &[
    ("connect_timeout_ms", "2000"),
    ("read_timeout_ms", "3000"),
    ("max_attempts", "3"),
    ("retry_base_delay_ms", "10"),
    ("retry_max_delay_ms", "50"),
];

/// A temporary cache and configuration for running the real binary.
pub struct Env {
    _dir: tempfile::TempDir,
    /// The temporary directory holding everything below.
    pub root: PathBuf,
    pub cache: PathBuf,
    pub config: PathBuf,
}

/// How a run of the binary ended.
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn path(&self) -> PathBuf {
        assert!(self.success, "fetch failed:\n{}", self.stderr);
        PathBuf::from(self.stdout.trim())
    }

    /// The error chain as main prints it, for exact comparisons.
    pub fn error(&self) -> &str {
        assert!(!self.success, "expected a failure, got {}", self.stdout);
        let start = self
            .stderr
            .match_indices("error: ")
            .map(|(i, _)| i)
            .find(|&i| i == 0 || self.stderr.as_bytes()[i - 1] == b'\n')
            .expect("an error line");
        &self.stderr[start..]
    }
}

impl Env {
    pub fn new(settings: &[(&str, &str)]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        Env::with_cache(dir, cache, settings)
    }

    pub fn with_cache(dir: tempfile::TempDir, cache: PathBuf, settings: &[(&str, &str)]) -> Env {
        let mut table: BTreeMap<&str, &str> = FAST.iter().copied().collect();
        table.extend(settings.iter().copied());
        let mut text = String::from("[fetch]\n");
        for (k, v) in table {
            text.push_str(&format!("{k} = {v}\n"));
        }
        let config = dir.path().join("executor.toml");
        fs::write(&config, text).unwrap();
        Env {
            root: dir.path().to_path_buf(),
            _dir: dir,
            cache,
            config,
        }
    }

    pub fn spawn(&self, args: &[&str], tag: &str) -> (GroupChild, PathBuf, PathBuf) {
        let (out, err) = (
            self.root.join(format!("{tag}.stdout")),
            self.root.join(format!("{tag}.stderr")),
        );
        let mut cmd = Command::new(executor_bin());
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .env_remove("RUST_LOG")
            // Loopback servers only: no proxy may stand in between.
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .stdin(std::process::Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        (GroupChild::spawn(cmd).unwrap(), out, err)
    }

    pub fn finish(child: &mut GroupChild, out: &Path, err: &Path) -> Outcome {
        let status = child
            .wait_timeout(Duration::from_secs(60))
            .unwrap()
            .expect("qemu-executor finished within 60 s");
        Outcome {
            success: status.success(),
            stdout: fs::read_to_string(out).unwrap(),
            stderr: fs::read_to_string(err).unwrap(),
        }
    }

    pub fn run(&self, args: &[&str]) -> Outcome {
        let (mut child, out, err) = self.spawn(args, "run");
        Env::finish(&mut child, &out, &err)
    }

    pub fn fetch(&self, url: &str, checksum: &str) -> Outcome {
        self.run(&["fetch", url, "--checksum", checksum])
    }

    pub fn names(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(self.cache.join(sub))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Nothing half-written: no partial download, no entry but `entries`.
    pub fn assert_clean(&self, entries: &[&str]) {
        assert_eq!(
            self.names("tmp"),
            Vec::<String>::new(),
            "partial downloads left"
        );
        assert_eq!(self.names("images"), entries, "cache entries");
    }
}

/// `md5:<hex>` of `data`, as a task writes a checksum.
pub fn md5_sum(data: &[u8]) -> String {
    format!("md5:{}", md5_hex(data))
}

/// The name of the cache entry holding `data`.
pub fn entry(data: &[u8]) -> String {
    format!("md5-{}", md5_hex(data))
}

/// A small tmpfs, unmounted even when the test fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(dir).unwrap();
        let result = nix::mount::mount(
            Some("tmpfs"),
            dir,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some(format!("size={size}").as_str()),
        );
        match result {
            Ok(()) => Some(Tmpfs(dir.to_path_buf())),
            Err(e) if !nix::unistd::geteuid().is_root() => {
                eprintln!("skipping: mounting a tmpfs needs root ({e})");
                None
            }
            Err(e) => panic!("mount tmpfs on {}: {e}", dir.display()),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}
