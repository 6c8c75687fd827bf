//! The image cache through the real binary: no second download, one
//! download for concurrent fetches, a full disk, a planted symlink, local
//! files, and `cache ls` / `cache gc` with leases and LRU order.

use std::fs;
use std::process::Command;
use std::time::Duration;

use qemu_executor_tests::cli::{Env, MIB, Tmpfs, entry, md5_sum};
use qemu_executor_tests::fault::{Fault, FaultServer, md5_hex, pattern};
use qemu_executor_tests::proc::GroupChild;

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
