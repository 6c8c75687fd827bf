//! The fetch module's unit tests.

use super::*;

#[test]
fn only_http_https_and_file_sources() {
    assert!(parse_source("http://127.0.0.1:8000/g.iso").is_ok());
    assert!(parse_source("https://example.org/g.iso").is_ok());
    assert!(parse_source("file:///srv/g.iso").is_ok());
    for bad in [
        "ftp://h/g.iso",
        "gopher://h/x",
        "data:text/plain,hi",
        "/srv/g.iso",
        "http://",
    ] {
        assert!(parse_source(bad).is_err(), "{bad}");
    }
}

fn local_image(dir: &std::path::Path, len: usize) -> (String, Checksum) {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
    let path = dir.join("local.img");
    std::fs::write(&path, &data).unwrap();
    let mut h = Hasher::new(policy_sdk::ChecksumAlgorithm::Md5);
    h.update(&data);
    let sum = format!("md5:{}", h.finalize_hex()).parse().unwrap();
    (format!("file://{}", path.display()), sum)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_in_one_process_download_once() {
    let dir = tempfile::tempdir().unwrap();
    let (url, sum) = local_image(dir.path(), 5 << 20);
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let fetcher = Fetcher::new(FetchConfig::default())
        .unwrap()
        .granting(dir.path());
    let fetches = (0..4).map(|_| {
        let (f, c, u, s) = (fetcher.clone(), cache.clone(), url.clone(), sum.clone());
        tokio::spawn(async move { f.fetch(&c, &u, &s).await.unwrap() })
    });
    let mut results = Vec::new();
    for f in fetches {
        results.push(f.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| !r.cache_hit).count(), 1);
    assert!(results.iter().all(|r| r.path == results[0].path));
    assert_eq!(results.iter().map(|r| r.body_bytes).sum::<u64>(), 5 << 20);
}

#[tokio::test]
async fn a_leased_image_survives_gc_until_released() {
    let dir = tempfile::tempdir().unwrap();
    let (url, sum) = local_image(dir.path(), 10_000);
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let fetcher = Fetcher::new(FetchConfig::default())
        .unwrap()
        .granting(dir.path());
    let (fetched, lease) = fetcher
        .fetch_leased(&cache, &url, &sum, "task-1", std::process::id())
        .await
        .unwrap();
    assert_eq!((fetched.size, fetched.cache_hit), (10_000, false));
    let report = cache.gc(Some(0)).unwrap();
    assert!(report.evicted.is_empty() && !report.reached());
    assert_eq!(report.kept_in_use[0].holders, ["task-1"]);
    lease.release().unwrap();
    assert_eq!(cache.gc(Some(0)).unwrap().evicted.len(), 1);
    assert!(!fetched.path.exists());
}

/// A secret outside the allowed directory, reached directly, through
/// `..`, and through a symlink planted inside it.
#[tokio::test]
async fn file_sources_stay_inside_the_allowed_directories() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("images");
    std::fs::create_dir(&allowed).unwrap();
    let (secret_url, secret_sum) = local_image(dir.path(), 1000);
    let secret = secret_url.trim_start_matches("file://").to_string();
    std::os::unix::fs::symlink(&secret, allowed.join("link.img")).unwrap();
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let closed = Fetcher::new(FetchConfig::default()).unwrap();
    let err = closed
        .fetch(&cache, &secret_url, &secret_sum)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::FileSourcesClosed { .. }), "{err}");
    let config = FetchConfig {
        file_dirs: vec![allowed.clone()],
        ..FetchConfig::default()
    };
    let open = Fetcher::new(config).unwrap();
    for url in [
        secret_url.clone(),
        format!("file://{}/../local.img", allowed.display()),
        format!("file://{}/link.img", allowed.display()),
        // Whether a file exists outside is not told either.
        format!("file://{}/nothing.img", dir.path().display()),
    ] {
        let err = open.fetch(&cache, &url, &secret_sum).await.unwrap_err();
        assert!(
            matches!(err, FetchError::FileOutside { .. }),
            "{url}: {err}"
        );
    }
    // Nothing was copied, and a cached entry does not make it pass.
    assert!(cache.lookup(&secret_sum).unwrap().is_none());
    let granted = closed.granting(dir.path());
    granted
        .fetch(&cache, &secret_url, &secret_sum)
        .await
        .unwrap();
    let err = open
        .fetch(&cache, &secret_url, &secret_sum)
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::FileOutside { .. }), "{err}");
    // Inside, the reason a read fails is told.
    let missing = format!("file://{}/missing.img", allowed.display());
    let err = open.fetch(&cache, &missing, &secret_sum).await.unwrap_err();
    assert!(matches!(err, FetchError::ReadSource { .. }), "{err}");
}

#[tokio::test]
async fn a_local_mismatch_does_not_show_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (url, sum) = local_image(dir.path(), 1000);
    let cache = Cache::open(&dir.path().join("cache")).unwrap();
    let fetcher = Fetcher::new(FetchConfig::default())
        .unwrap()
        .granting(dir.path());
    let wrong: Checksum = "md5:0123456789abcdef0123456789abcdef".parse().unwrap();
    let err = fetcher.fetch(&cache, &url, &wrong).await.unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, FetchError::LocalMismatch { .. }), "{message}");
    assert!(!message.contains(&sum.digest), "{message}");
    assert!(!message.contains("1000"), "{message}");
    assert!(cache.lookup(&wrong).unwrap().is_none());
}

#[test]
fn mismatch_message_shows_both_sums() {
    let expected: Checksum = "md5:0123456789abcdef0123456789abcdef".parse().unwrap();
    let actual: Checksum = "md5:ffffffffffffffffffffffffffffffff".parse().unwrap();
    let err = FetchError::Mismatch {
        url: "http://h/g.iso".into(),
        expected,
        actual,
        size: 3,
    };
    assert_eq!(
        err.to_string(),
        "Checksum mismatch for http://h/g.iso: expected md5:0123456789abcdef0123456789abcdef, got md5:ffffffffffffffffffffffffffffffff (3 bytes received)"
    );
}
