//! `qemu-executor fetch` against a server that misbehaves on purpose: the
//! real binary, a real socket, one temporary cache per test, and the exact
//! outcome asserted each time (the error a person reads, or the right
//! file), with nothing half-written left behind.

use std::fs;
use std::time::{Duration, Instant};

use qemu_executor_tests::cli::{Env, MIB, entry, md5_sum};
use qemu_executor_tests::fault::{Fault, FaultServer, pattern};

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
fn inconsistent_partial_answer_falls_back_to_a_full_download() {
    // The resume is answered with a 206 whose Content-Range starts at 0:
    // appending it would corrupt the file, so it is refused and the next
    // attempt downloads from the start without Range.
    let body = pattern(2 * MIB, 24);
    let script = vec![Fault::CutAfter(MIB), Fault::WrongRange, Fault::Normal];
    let server = FaultServer::start(body.clone(), script, true).unwrap();
    let env = Env::new(&[]);
    let out = env.fetch(&server.url("g.img"), &md5_sum(&body));
    assert_eq!(fs::read(out.path()).unwrap(), body);
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests[1].header("range").is_some());
    assert_eq!(requests[2].header("range"), None);
    assert!(
        out.stderr.contains("Bad partial answer from") && out.stderr.contains("starts at byte 0"),
        "{}",
        out.stderr
    );
    env.assert_clean(&[&entry(&body)]);
}

#[test]
fn interrupted_fetch_leaves_nothing_behind() {
    let body = pattern(2 * MIB, 25);
    let slow = Fault::Slow {
        chunk: 32 * 1024,
        interval: Duration::from_millis(50),
    };
    let server = FaultServer::start(body.clone(), vec![slow], true).unwrap();
    let env = Env::new(&[]);
    let (url, sum) = (server.url("g.img"), md5_sum(&body));
    let (mut child, out, err) = env.spawn(&["fetch", &url, "--checksum", &sum], "int");
    let started = qemu_executor_tests::proc::wait_until(Duration::from_secs(10), || {
        (!env.names("tmp").is_empty()).then_some(())
    });
    assert!(started.is_some(), "the download started");
    child.signal(nix::sys::signal::Signal::SIGINT);
    let outcome = Env::finish(&mut child, &out, &err);
    assert_eq!(
        outcome.error(),
        "error: Interrupted by SIGINT; nothing was cached\n"
    );
    env.assert_clean(&[]);
}

#[test]
fn refused_connections_are_retried_then_reported() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = Env::new(&[]);
    let url = format!("http://127.0.0.1:{port}/g.img");
    let out = env.fetch(&url, &md5_sum(b"x"));
    let err = out.error();
    let head = format!(
        "error: Giving up on {url} after 3 attempts\n  caused by: Cannot connect to {url}\n  caused by: "
    );
    assert!(err.starts_with(&head), "{err}");
    assert_eq!(
        out.stderr
            .matches("Download attempt failed; retrying")
            .count(),
        2
    );
    env.assert_clean(&[]);
}
