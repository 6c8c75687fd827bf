//! The per-VM shim on its own (`qemu-executor shim`), with a stand-in for
//! qemu: it reports its child's pid, puts the child in a session of its
//! own, records how the child ended, and takes the child along when it is
//! killed itself.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use qemu_executor::qemu::process::ProcessIdentity;
use qemu_executor::qemu::shim::{ExitRecord, parse_report};
use qemu_executor_tests::executor_bin;
use qemu_executor_tests::proc::{GroupChild, wait_until};

struct Shim {
    child: GroupChild,
    child_identity: ProcessIdentity,
    record: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn start(program: &[&str]) -> Shim {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("exit.json");
    let mut cmd = Command::new(executor_bin());
    cmd.args(["shim", "--exit-record"])
        .arg(&record)
        .arg("--dir")
        .arg(dir.path())
        .arg("--")
        .args(program)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = GroupChild::spawn(cmd).unwrap();
    let stdout = child.child_mut().stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let child_identity = parse_report(&line).unwrap_or_else(|| panic!("report: {line:?}"));
    Shim {
        child,
        child_identity,
        record,
        _dir: dir,
    }
}

fn gone(identity: &ProcessIdentity) -> bool {
    wait_until(Duration::from_secs(10), || {
        (!identity.is_alive()).then_some(())
    })
    .is_some()
}

#[test]
fn the_shim_records_an_exit_code_and_a_killing_signal() {
    let mut shim = start(&["/bin/sh", "-c", "exit 3"]);
    let status = shim
        .child
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("the shim ends after its child");
    assert!(status.success());
    let record = ExitRecord::read(&shim.record).expect("an exit record");
    assert_eq!(record.qemu_pid, shim.child_identity.pid);
    assert_eq!(record.status().code(), Some(3));

    let mut shim = start(&["/bin/sleep", "60"]);
    let pid = shim.child_identity.pid as i32;
    // The child leads a session of its own, apart from the shim's.
    let pid_t = nix::unistd::Pid::from_raw(pid);
    assert_eq!(nix::unistd::getsid(Some(pid_t)).unwrap(), pid_t);
    nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGKILL).unwrap();
    shim.child
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("the shim ends after its child");
    let record = ExitRecord::read(&shim.record).expect("an exit record");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&record.status()),
        Some(9)
    );
}

#[test]
fn a_killed_shim_takes_its_child_along_and_leaves_no_record() {
    let shim = start(&["/bin/sleep", "60"]);
    assert!(shim.child_identity.is_alive());
    shim.child.signal(nix::sys::signal::Signal::SIGKILL);
    assert!(gone(&shim.child_identity), "the child outlived its shim");
    assert_eq!(ExitRecord::read(&shim.record), None);
}

#[test]
fn the_shim_ignores_the_signals_a_terminal_or_its_agent_would_send() {
    let mut shim = start(&["/bin/sleep", "60"]);
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGHUP,
    ] {
        shim.child.signal(signal);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(shim.child.wait_timeout(Duration::ZERO).unwrap().is_none());
    assert!(shim.child_identity.is_alive());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim.child_identity.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(gone(&shim.child_identity));
}

#[test]
fn a_shim_that_cannot_start_its_program_says_why_and_reports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(executor_bin())
        .args(["shim", "--exit-record"])
        .arg(dir.path().join("exit.json"))
        .arg("--dir")
        .arg(dir.path())
        .args(["--", "/nonexistent/qemu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stdout.is_empty(), "no report: {:?}", out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot start /nonexistent/qemu"),
        "{stderr}"
    );
    assert!(!dir.path().join("exit.json").exists());
}
