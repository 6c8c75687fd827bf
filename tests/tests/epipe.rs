//! A vanished stdout or stderr (EPIPE: the reader went away) is a normal
//! event: a client verb exits quietly, and `run` keeps supervising its VM
//! and still stops it gracefully.

use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use qemu_executor_tests::executor::{Sandbox, free_port, http_get};
use qemu_executor_tests::guest::{guest, md5_of};
use qemu_executor_tests::http::FileServer;
use qemu_executor_tests::proc::{GroupChild, wait_until};

/// The write end of a pipe whose read end is already closed: every write
/// to it fails with EPIPE.
fn readerless_pipe() -> OwnedFd {
    let (read, write) = nix::unistd::pipe().expect("pipe");
    drop(read);
    write
}

#[test]
fn client_verbs_exit_quietly_when_their_reader_is_gone() {
    let sandbox = Sandbox::new();
    for args in [
        &["fingerprint", "--json"][..],
        &["cache", "ls"][..],
        &["fingerprint"][..],
    ] {
        let mut cmd = sandbox.command(args);
        cmd.stdout(Stdio::from(readerless_pipe()));
        let out = cmd.output().expect("run qemu-executor");
        let (status, stderr) = (out.status, String::from_utf8_lossy(&out.stderr));
        assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
        assert_ne!(status.code(), Some(101), "{args:?} panicked: {status:?}");
        assert!(
            !stderr.contains("Broken pipe"),
            "{args:?} complained:\n{stderr}"
        );
    }
}

#[test]
fn run_keeps_its_vm_and_stops_it_gracefully_with_no_reader_for_its_output() {
    let guest = guest();
    let server = FileServer::start(guest.dir()).unwrap();
    let sandbox = Sandbox::new();
    let port = free_port();
    let task = sandbox.write(
        "web.toml",
        &format!(
            "name = \"epipe\"\nimage_source = \"{}\"\nchecksum = \"{}\"\nhost_port = {port}\nguest_port = 8080\nmemory_mb = 256\nready_timeout_s = 170\n",
            server.url("guest.iso"),
            md5_of(&guest.cooperative)
        ),
    );
    let mut cmd = sandbox.command(&["run", task.to_str().unwrap()]);
    cmd.stdout(Stdio::from(readerless_pipe()))
        .stderr(Stdio::from(readerless_pipe()));
    let mut run = GroupChild::spawn(cmd).expect("spawn run");
    // Nothing it prints can be read: the guest itself says it is up.
    let page = wait_until(Duration::from_secs(180), || http_get(port, "/"));
    assert!(
        run.child_mut().try_wait().expect("try_wait").is_none(),
        "run ended while its guest booted"
    );
    let page = page.expect("the guest answers through the forward");
    assert!(page.contains("qemu-executor test guest"), "{page}");
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let status = run
        .wait_timeout(Duration::from_secs(60))
        .expect("wait")
        .expect("run ends after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "a graceful stop exits 0: {status:?}"
    );
    assert!(
        sandbox
            .serial_logs()
            .contains("qe-guest: power button, powering off"),
        "the guest was stopped with the power button"
    );
    sandbox.assert_no_qemu();
}
