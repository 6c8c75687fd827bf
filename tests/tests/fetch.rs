//! `qemu-executor fetch` and `qemu-executor cache` against a server that
//! misbehaves on purpose: the real binary, a real socket, one temporary
//! cache per test, and the exact outcome asserted each time (the error a
//! person reads, or the right file), with nothing half-written left behind.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use qemu_executor_tests::executor_bin;
use qemu_executor_tests::fault::{Fault, FaultServer, md5_hex, pattern};
use qemu_executor_tests::proc::GroupChild;

const MIB: usize = 1 << 20;

/// Settings that keep every test within seconds: short delays between
/// attempts, three attempts, short timeouts.
const FAST: &[(&str, &str)] = &[
    ("connect_timeout_ms", "2000"),
    ("read_timeout_ms", "3000"),
    ("max_attempts", "3"),
    ("retry_base_delay_ms", "10"),
    ("retry_max_delay_ms", "50"),
];

struct Env {
    _dir: tempfile::TempDir,
    root: PathBuf,
    cache: PathBuf,
    config: PathBuf,
}

struct Outcome {
    success: bool,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn path(&self) -> PathBuf {
        assert!(self.success, "fetch failed:\n{}", self.stderr);
        PathBuf::from(self.stdout.trim())
    }

    /// The error chain as main prints it, for exact comparisons.
    fn error(&self) -> &str {
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
    fn new(settings: &[(&str, &str)]) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        Env::with_cache(dir, cache, settings)
    }

    fn with_cache(dir: tempfile::TempDir, cache: PathBuf, settings: &[(&str, &str)]) -> Env {
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

    fn spawn(&self, args: &[&str], tag: &str) -> (GroupChild, PathBuf, PathBuf) {
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
            .stdin(std::process::Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap());
        (GroupChild::spawn(cmd).unwrap(), out, err)
    }

    fn finish(child: &mut GroupChild, out: &Path, err: &Path) -> Outcome {
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

    fn run(&self, args: &[&str]) -> Outcome {
        let (mut child, out, err) = self.spawn(args, "run");
        Env::finish(&mut child, &out, &err)
    }

    fn fetch(&self, url: &str, checksum: &str) -> Outcome {
        self.run(&["fetch", url, "--checksum", checksum])
    }

    fn names(&self, sub: &str) -> Vec<String> {
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
    fn assert_clean(&self, entries: &[&str]) {
        assert_eq!(
            self.names("tmp"),
            Vec::<String>::new(),
            "partial downloads left"
        );
        assert_eq!(self.names("images"), entries, "cache entries");
    }
}

fn md5_sum(data: &[u8]) -> String {
    format!("md5:{}", md5_hex(data))
}

fn entry(data: &[u8]) -> String {
    format!("md5-{}", md5_hex(data))
}

#[test]
fn cut_off_body_is_resumed_with_a_range_request() {
    let body = pattern(2 * MIB, 1);
    let server = FaultServer::start(
        body.clone(),
        vec![Fault::CutAfter(MIB), Fault::Normal],
        true,
    )
    .unwrap();
    let env = Env::new(&[]);
    let out = env.fetch(&server.url("guest.img"), &md5_sum(&body));
    let path = out.path();
    assert_eq!(fs::read(&path).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let range = requests[1].header("range").expect("the retry resumes");
    let offset: usize = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .unwrap()
        .parse()
        .unwrap();
    assert!(offset > 0 && offset <= MIB, "{range}");
    assert!(
        out.stderr.contains("Resuming the download"),
        "{}",
        out.stderr
    );
    env.assert_clean(&[&entry(&body)]);
}

#[test]
fn server_errors_are_retried_until_the_file_comes() {
    let body = pattern(100_000, 2);
    let script = vec![Fault::Status(500), Fault::Status(500), Fault::Normal];
    let server = FaultServer::start(body.clone(), script, true).unwrap();
    let env = Env::new(&[]);
    let path = env.fetch(&server.url("guest.img"), &md5_sum(&body)).path();
    assert_eq!(fs::read(path).unwrap(), body);
    assert_eq!(server.gets(), 3);
    env.assert_clean(&[&entry(&body)]);
}

#[test]
fn server_errors_give_up_after_the_last_attempt() {
    let body = pattern(1000, 3);
    let server = FaultServer::start(body.clone(), vec![Fault::Status(503)], true).unwrap();
    let env = Env::new(&[]);
    let url = server.url("guest.img");
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: Giving up on {url} after 3 attempts\n  caused by: Server answered 503 Service Unavailable for {url}\n"
        )
    );
    assert_eq!(server.gets(), 3);
    env.assert_clean(&[]);
}

#[test]
fn client_errors_are_not_retried() {
    let body = pattern(1000, 4);
    let server = FaultServer::start(body.clone(), vec![Fault::Status(404)], true).unwrap();
    let env = Env::new(&[]);
    let url = server.url("missing.img");
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!("error: Server answered 404 Not Found for {url}\n")
    );
    assert_eq!(server.gets(), 1);
    env.assert_clean(&[]);
}

#[test]
fn trickling_server_is_cut_off_by_the_read_timeout() {
    let body = pattern(10_000, 5);
    let server = FaultServer::start(
        body.clone(),
        vec![Fault::Trickle(Duration::from_secs(2))],
        true,
    )
    .unwrap();
    let env = Env::new(&[("read_timeout_ms", "300"), ("max_attempts", "2")]);
    let url = server.url("guest.img");
    let started = Instant::now();
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: Giving up on {url} after 2 attempts\n  caused by: No data from {url} for 300 ms (fetch.read_timeout_ms)\n"
        )
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    env.assert_clean(&[]);
}

#[test]
fn steady_trickle_is_cut_off_by_the_minimum_speed() {
    // A byte every 50 ms never trips a 3 s read timeout; the speed check
    // over a 500 ms window does.
    let body = pattern(10_000, 6);
    let server = FaultServer::start(
        body.clone(),
        vec![Fault::Trickle(Duration::from_millis(50))],
        true,
    )
    .unwrap();
    let env = Env::new(&[
        ("min_speed_bytes_per_s", "1000"),
        ("min_speed_window_ms", "500"),
        ("max_attempts", "1"),
    ]);
    let url = server.url("guest.img");
    let err = env.fetch(&url, &md5_sum(&body)).error().to_string();
    assert!(
        err.starts_with(&format!("error: Download from {url} too slow: ")),
        "{err}"
    );
    assert!(
        err.ends_with("bytes/s, below fetch.min_speed_bytes_per_s = 1000\n"),
        "{err}"
    );
    env.assert_clean(&[]);
}

#[test]
fn content_length_over_the_limit_is_refused_before_the_body() {
    let body = pattern(2 * MIB, 7);
    let server = FaultServer::start(body.clone(), vec![Fault::Normal], true).unwrap();
    let env = Env::new(&[("max_image_size", "\"1M\"")]);
    let url = server.url("big.img");
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: {url} is 2.0 MiB (2097152 bytes), over the limit of 1.0 MiB (fetch.max_image_size)\n"
        )
    );
    assert_eq!(server.gets(), 1, "not retried");
    env.assert_clean(&[]);
}

#[test]
fn body_over_the_limit_without_content_length_is_cut() {
    let body = pattern(2 * MIB, 8);
    let server = FaultServer::start(body.clone(), vec![Fault::NoLength], true).unwrap();
    let env = Env::new(&[("max_image_size", "\"1M\"")]);
    let url = server.url("big.img");
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: {url} sent more than 1.0 MiB without ending, the limit (fetch.max_image_size)\n"
        )
    );
    assert_eq!(server.gets(), 1, "not retried");
    env.assert_clean(&[]);
}

#[test]
fn body_without_content_length_is_fine_within_the_limit() {
    let body = pattern(300_000, 9);
    let server = FaultServer::start(body.clone(), vec![Fault::NoLength], true).unwrap();
    let env = Env::new(&[]);
    let path = env.fetch(&server.url("g.img"), &md5_sum(&body)).path();
    assert_eq!(fs::read(path).unwrap(), body);
    env.assert_clean(&[&entry(&body)]);
}

#[test]
fn content_length_shorter_than_the_body_is_a_mismatch() {
    // The client reads what was announced; the rest never reaches the
    // file, so the digest tells.
    let body = pattern(200_000, 10);
    let server = FaultServer::start(body.clone(), vec![Fault::LyingLength(100_000)], true).unwrap();
    let env = Env::new(&[]);
    let url = server.url("g.img");
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: Checksum mismatch for {url}: expected {}, got {} (100000 bytes received)\n",
            md5_sum(&body),
            md5_sum(&body[..100_000])
        )
    );
    env.assert_clean(&[]);
}

#[test]
fn content_length_longer_than_the_body_is_truncation() {
    let body = pattern(100_000, 11);
    let server = FaultServer::start(body.clone(), vec![Fault::LyingLength(200_000)], true).unwrap();
    let env = Env::new(&[]);
    let url = server.url("g.img");
    let err = env.fetch(&url, &md5_sum(&body)).error().to_string();
    let head = format!(
        "error: Giving up on {url} after 3 attempts\n  caused by: Body of {url} broke off after 100000 bytes of the image\n"
    );
    assert!(err.starts_with(&head), "{err}");
    // Each attempt resumed at 100000 and got the whole file again (200):
    // the fetcher started over every time instead of appending.
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[1].header("range"), Some("bytes=100000-"));
    env.assert_clean(&[]);
}

#[test]
fn redirect_loop_is_refused() {
    let body = pattern(1000, 12);
    let server =
        FaultServer::start(body.clone(), vec![Fault::RedirectTo("/loop".into())], true).unwrap();
    let env = Env::new(&[]);
    let url = server.url("g.img");
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: Redirect loop at {url}: it leads back to {}\n",
            server.url("loop")
        )
    );
    assert_eq!(server.gets(), 2, "g.img, then /loop which leads to itself");
    env.assert_clean(&[]);
}

#[test]
fn long_redirect_chain_is_refused_after_the_limit() {
    let body = pattern(1000, 13);
    let server = FaultServer::start(body.clone(), vec![Fault::RedirectChain], true).unwrap();
    let env = Env::new(&[("max_redirects", "4")]);
    let url = server.url("g.img");
    let out = env.fetch(&url, &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!("error: More than 4 redirects for {url} (fetch.max_redirects)\n")
    );
    assert_eq!(server.gets(), 5, "the first request and 4 redirects");
    env.assert_clean(&[]);
}

#[test]
fn server_ignoring_range_is_downloaded_again_from_the_start() {
    let body = pattern(2 * MIB, 14);
    let script = vec![Fault::CutAfter(MIB), Fault::IgnoreRange];
    let server = FaultServer::start(body.clone(), script, true).unwrap();
    let env = Env::new(&[]);
    let out = env.fetch(&server.url("g.img"), &md5_sum(&body));
    assert_eq!(fs::read(out.path()).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert!(
        requests[1].header("range").is_some(),
        "a resume was asked for"
    );
    assert!(
        out.stderr.contains("Server ignored the Range request"),
        "{}",
        out.stderr
    );
    env.assert_clean(&[&entry(&body)]);
}

#[test]
fn without_accept_ranges_a_retry_starts_from_zero() {
    let body = pattern(2 * MIB, 15);
    let script = vec![Fault::CutAfter(MIB), Fault::Normal];
    let server = FaultServer::start(body.clone(), script, false).unwrap();
    let env = Env::new(&[]);
    let out = env.fetch(&server.url("g.img"), &md5_sum(&body));
    assert_eq!(fs::read(out.path()).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].header("range"), None);
    env.assert_clean(&[&entry(&body)]);
}

#[test]
fn different_file_is_a_mismatch_with_both_sums_and_nothing_left() {
    let served = pattern(300_000, 16);
    let described = pattern(300_000, 17);
    let server = FaultServer::start(served.clone(), vec![Fault::Normal], true).unwrap();
    let env = Env::new(&[]);
    let url = server.url("g.img");
    let out = env.fetch(&url, &md5_sum(&described));
    assert_eq!(
        out.error(),
        format!(
            "error: Checksum mismatch for {url}: expected {}, got {} (300000 bytes received)\n",
            md5_sum(&described),
            md5_sum(&served)
        )
    );
    assert_eq!(server.gets(), 1, "a plain mismatch is not retried");
    env.assert_clean(&[]);
}

#[test]
fn second_fetch_sends_no_request_at_all() {
    let body = pattern(500_000, 18);
    let server = FaultServer::start(body.clone(), vec![Fault::Normal], true).unwrap();
    let env = Env::new(&[]);
    let url = server.url("g.img");
    let first = env.fetch(&url, &md5_sum(&body)).path();
    assert_eq!(server.requests().len(), 1);
    // Same content under a bare MD5: the same entry, found without asking.
    let second = env.fetch(&url, &md5_hex(&body)).path();
    assert_eq!(first, second);
    assert_eq!(server.requests().len(), 1, "no GET, no HEAD");
    let mode = fs::metadata(&first).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o444
    );
    env.assert_clean(&[&entry(&body)]);
}

#[test]
fn concurrent_fetches_end_in_one_download_and_one_entry() {
    let body = pattern(2 * MIB, 19);
    let slow = Fault::Slow {
        chunk: 64 * 1024,
        interval: Duration::from_millis(40),
    };
    let server = FaultServer::start(body.clone(), vec![slow], true).unwrap();
    let env = Env::new(&[]);
    let (url, sum) = (server.url("g.img"), md5_sum(&body));
    let args = ["fetch", url.as_str(), "--checksum", sum.as_str()];
    let (mut a, a_out, a_err) = env.spawn(&args, "a");
    let (mut b, b_out, b_err) = env.spawn(&args, "b");
    let (a, b) = (
        Env::finish(&mut a, &a_out, &a_err),
        Env::finish(&mut b, &b_out, &b_err),
    );
    assert_eq!(a.path(), b.path());
    assert_eq!(fs::read(a.path()).unwrap(), body);
    assert_eq!(server.gets(), 1, "one body download");
    let waited = [&a, &b]
        .iter()
        .filter(|o| {
            o.stderr
                .contains("Image fetched meanwhile by another fetch")
        })
        .count();
    assert_eq!(
        waited, 1,
        "one waited for the other:\n{}\n{}",
        a.stderr, b.stderr
    );
    env.assert_clean(&[&entry(&body)]);
}

/// A small tmpfs, unmounted even when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
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

#[test]
fn full_disk_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("small");
    let Some(_mount) = Tmpfs::mount(&cache, "2m") else {
        return;
    };
    let env = Env::with_cache(dir, cache.clone(), &[]);
    let body = pattern(3 * MIB, 20);

    // Content-Length known: refused up front from the free space.
    let server = FaultServer::start(body.clone(), vec![Fault::Normal], true).unwrap();
    let err = env
        .fetch(&server.url("g.img"), &md5_sum(&body))
        .error()
        .to_string();
    let head = format!(
        "error: Not enough free space in the cache at {}: the image needs 3.0 MiB more, ",
        cache.display()
    );
    assert!(err.starts_with(&head), "{err}");
    env.assert_clean(&[]);

    // No Content-Length: the disk fills up mid-download.
    let server = FaultServer::start(body.clone(), vec![Fault::NoLength], true).unwrap();
    let out = env.fetch(&server.url("g.img"), &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: Cannot write the image into the cache at {}\n  caused by: No space left on device (os error 28)\n",
            cache.join("tmp").display()
        )
    );
    env.assert_clean(&[]);

    // The cache still works for what fits.
    let small = pattern(100_000, 21);
    let server = FaultServer::start(small.clone(), vec![Fault::Normal], true).unwrap();
    env.fetch(&server.url("s.img"), &md5_sum(&small)).path();
    env.assert_clean(&[&entry(&small)]);
}

#[test]
fn planted_symlink_in_the_cache_is_not_followed() {
    let body = pattern(1000, 22);
    let server = FaultServer::start(body.clone(), vec![Fault::Normal], true).unwrap();
    let env = Env::new(&[]);
    // Lay the cache out, then plant a link where the entry will go.
    assert!(env.run(&["cache", "ls"]).success);
    let secret = env.root.join("secret");
    fs::write(&secret, b"host secret").unwrap();
    let planted = env.cache.join("images").join(entry(&body));
    std::os::unix::fs::symlink(&secret, &planted).unwrap();

    let out = env.fetch(&server.url("g.img"), &md5_sum(&body));
    assert_eq!(
        out.error(),
        format!(
            "error: Cache entry {} is a symlink: refusing to follow it (remove it if you did not put it there)\n",
            planted.display()
        )
    );
    assert_eq!(server.requests().len(), 0);
    assert_eq!(fs::read(&secret).unwrap(), b"host secret");
    assert!(
        fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[test]
fn file_urls_are_copied_into_the_cache() {
    let env = Env::new(&[]);
    let body = pattern(3 * MIB + 17, 23);
    let source = env.root.join("local.img");
    fs::write(&source, &body).unwrap();
    let url = format!("file://{}", source.display());
    let path = env.fetch(&url, &md5_sum(&body)).path();
    assert_eq!(fs::read(path).unwrap(), body);
    env.assert_clean(&[&entry(&body)]);
    let out = env.fetch("ftp://127.0.0.1/g.img", &md5_sum(&body));
    assert_eq!(
        out.error(),
        "error: Image source ftp://127.0.0.1/g.img is not supported: use an http, https or file URL\n"
    );
}

fn ls_json(env: &Env) -> Vec<serde_json::Value> {
    let out = env.run(&["cache", "ls", "--json"]);
    assert!(out.success, "{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn cache_ls_and_gc_evict_least_recently_used_and_spare_leased() {
    let env = Env::new(&[]);
    let images: Vec<Vec<u8>> = (0..3).map(|i| pattern(100_000, 30 + i)).collect();
    let servers: Vec<FaultServer> = images
        .iter()
        .map(|b| FaultServer::start(b.clone(), vec![Fault::Normal], true).unwrap())
        .collect();
    let fetch = |i: usize| {
        env.fetch(&servers[i].url("g.img"), &md5_sum(&images[i]))
            .path()
    };
    let (a, _b, _c) = (fetch(0), fetch(1), fetch(2));
    assert_eq!(fetch(0), a, "a hit makes A the most recently used");
    let order = |list: &[serde_json::Value]| -> Vec<String> {
        list.iter()
            .map(|e| e["checksum"].as_str().unwrap().to_string())
            .collect()
    };
    let list = ls_json(&env);
    let (a_sum, b_sum, c_sum) = (
        md5_sum(&images[0]),
        md5_sum(&images[1]),
        md5_sum(&images[2]),
    );
    assert_eq!(
        order(&list),
        [a_sum.as_str(), c_sum.as_str(), b_sum.as_str()],
        "most recently used first"
    );
    assert_eq!(list[0]["size"], 100_000);
    assert_eq!(list[0]["tasks"], serde_json::json!([]));

    // C is used by a task whose process (here a sleep) still runs; taking
    // the lease is a use too.
    let mut holder = Command::new("sleep");
    holder.arg("300");
    let holder = GroupChild::spawn(holder).unwrap();
    let cache = qemu_executor::cache::Cache::open(&env.cache).unwrap();
    let c_checksum: policy_sdk::Checksum = c_sum.parse().unwrap();
    cache.lease(&c_checksum, "task-c", holder.id()).unwrap();
    let list = ls_json(&env);
    assert_eq!(
        order(&list),
        [c_sum.as_str(), a_sum.as_str(), b_sum.as_str()]
    );
    assert_eq!(list[0]["tasks"], serde_json::json!(["task-c"]));
    let table = env.run(&["cache", "ls"]).stdout;
    assert!(table.starts_with("CHECKSUM"), "{table}");
    assert!(table.contains("task-c"), "{table}");

    // Room for two: B, the least recently used, goes.
    let out = env.run(&["cache", "gc", "--max-size", "200000"]);
    assert!(out.success, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        format!(
            "evicted {} (97.7 KiB)\ncache size: 293.0 KiB -> 195.3 KiB (limit 195.3 KiB)\n",
            md5_sum(&images[1])
        )
    );
    assert_eq!(env.names("images"), {
        let mut v = vec![entry(&images[0]), entry(&images[2])];
        v.sort();
        v
    });

    // Room for none: A goes, leased C stays, and gc says why.
    let out = env.run(&["cache", "gc", "--max-size", "0"]);
    assert_eq!(
        out.stdout,
        format!(
            "evicted {} (97.7 KiB)\nkept {} (97.7 KiB): in use by task-c\ncache size: 195.3 KiB -> 97.7 KiB (limit 0 B): cannot get under the limit, 1 image(s) in use\n",
            md5_sum(&images[0]),
            md5_sum(&images[2])
        )
    );
    assert_eq!(env.names("images"), [entry(&images[2])]);

    // Once the holder is gone its lease is dead: gc removes it and the image.
    drop(holder);
    let out = env.run(&["cache", "gc", "--max-size", "0"]);
    assert_eq!(
        out.stdout,
        format!(
            "evicted {} (97.7 KiB)\nremoved 1 dead lease(s)\ncache size: 97.7 KiB -> 0 B (limit 0 B)\n",
            md5_sum(&images[2])
        )
    );
    env.assert_clean(&[]);
}

#[test]
fn gc_removes_abandoned_partial_downloads_only() {
    let env = Env::new(&[]);
    assert!(env.run(&["cache", "ls"]).success);
    let tmp = env.cache.join("tmp");
    let old = tmp.join(format!("md5-{}.abandoned", "0".repeat(32)));
    let fresh = tmp.join(format!("md5-{}.inflight", "1".repeat(32)));
    fs::write(&old, b"partial").unwrap();
    fs::write(&fresh, b"partial").unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let out = env.run(&["cache", "gc"]);
    assert_eq!(
        out.stdout,
        "removed 1 abandoned partial download(s)\ncache size: 0 B -> 0 B\n"
    );
    assert!(!old.exists());
    assert!(
        fresh.exists(),
        "a recent partial download may still be written"
    );
}
