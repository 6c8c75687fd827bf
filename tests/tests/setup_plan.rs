//! `scripts/setup.sh` must install a matching qemu pair from every state a
//! machine can be in, not only from the state of the machine the tests run
//! on (which remembers what earlier runs installed). Each test makes the
//! script plan for a recorded or derived dpkg state and has apt resolve
//! that plan against the same state with `apt-get -s`, as a new machine
//! would.
//!
//! `tests/data/setup/dpkg-status-new-machine.gz` is `/var/lib/dpkg/status`
//! of a new machine of ours (a backported qemu-utils 10.x, no qemu-system).
//! To refresh it, on a new machine before anything is installed:
//! `gzip -9n < /var/lib/dpkg/status > tests/data/setup/dpkg-status-new-machine.gz`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The recorded status of a new machine, as text.
fn new_machine_status() -> String {
    let path = repo_root().join("tests/data/setup/dpkg-status-new-machine.gz");
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(&path)
        .output()
        .expect("run gzip");
    assert!(out.status.success(), "gzip -dc {}", path.display());
    String::from_utf8(out.stdout).expect("dpkg status is UTF-8")
}

/// Stanzas of a dpkg status file, by package name.
fn without_package(status: &str, package: &str) -> String {
    status
        .split("\n\n")
        .filter(|stanza| {
            !stanza
                .lines()
                .any(|line| line == format!("Package: {package}"))
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// A stanza saying `package` is installed at `version`. Enough for dpkg-query
/// and apt: the package's own dependencies are not what is being tested.
fn installed_stanza(package: &str, version: &str) -> String {
    format!(
        "Package: {package}\nStatus: install ok installed\nPriority: optional\n\
         Section: misc\nMaintainer: test\nArchitecture: amd64\nVersion: {version}\n\
         Description: recorded for the setup plan test\n\n"
    )
}

fn installed_version(status: &str, package: &str) -> Option<String> {
    let stanza = status.split("\n\n").find(|stanza| {
        stanza
            .lines()
            .any(|line| line == format!("Package: {package}"))
    })?;
    stanza
        .lines()
        .find_map(|line| line.strip_prefix("Version: "))
        .map(str::to_string)
}

/// A dpkg admin directory holding `status`.
fn admindir(status: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut file = std::fs::File::create(dir.path().join("status")).expect("status file");
    file.write_all(status.as_bytes()).expect("write status");
    dir
}

/// What setup.sh would install on a machine in this state.
fn plan(admin: &Path) -> Vec<String> {
    let out = Command::new(repo_root().join("scripts/setup.sh"))
        .arg("--plan")
        .env("SETUP_DPKG_ADMINDIR", admin)
        .output()
        .expect("run scripts/setup.sh --plan");
    assert!(
        out.status.success(),
        "setup.sh --plan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("plan is UTF-8")
        .lines()
        .map(str::to_string)
        .collect()
}

/// The version apt offers for qemu-system-x86 here.
fn candidate() -> String {
    let out = Command::new("apt-cache")
        .args(["policy", "qemu-system-x86"])
        .output()
        .expect("run apt-cache");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Candidate: "))
        .filter(|version| *version != "(none)")
        .unwrap_or_else(|| panic!("apt offers no qemu-system-x86 (apt lists missing?): {text}"))
        .to_string()
}

/// Resolves the plan as `apt-get install` would on a machine in this state
/// and returns what apt would install, as (package, version).
fn resolve(admin: &Path, plan: &[String]) -> Vec<(String, String)> {
    let status = admin.join("status");
    let out = Command::new("apt-get")
        .arg("-s")
        .arg(format!("-oDir::State::status={}", status.display()))
        .args([
            "install",
            "-y",
            "--no-install-recommends",
            "--allow-downgrades",
        ])
        .args(plan)
        .output()
        .expect("run apt-get -s");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "apt refuses setup's plan {plan:?}:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "Inst NAME [OLD] (NEW SOURCE [ARCH])" or "Inst NAME (NEW SOURCE [ARCH])"
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("Inst "))
        .filter_map(|rest| {
            let name = rest.split_whitespace().next()?;
            let new = rest.split('(').nth(1)?.split_whitespace().next()?;
            Some((name.to_string(), new.to_string()))
        })
        .collect()
}

/// After the plan, both qemu packages are at the same version.
fn assert_matching_pair(status: &str, installs: &[(String, String)]) {
    let after = |package: &str| {
        installs
            .iter()
            .find(|(name, _)| name == package)
            .map(|(_, version)| version.clone())
            .or_else(|| installed_version(status, package))
            .unwrap_or_else(|| panic!("{package} is neither installed nor planned"))
    };
    assert_eq!(
        after("qemu-system-x86"),
        after("qemu-utils"),
        "qemu pair after setup"
    );
}

fn qemu_entries(plan: &[String]) -> Vec<&String> {
    plan.iter().filter(|p| p.starts_with("qemu-")).collect()
}

#[test]
fn a_new_machine_gets_a_matching_qemu_pair() {
    let status = new_machine_status();
    assert!(
        installed_version(&status, "qemu-utils").is_some()
            && installed_version(&status, "qemu-system-x86").is_none(),
        "the recorded new machine has qemu-utils and no qemu-system"
    );
    let admin = admindir(&status);
    let plan = plan(admin.path());
    let want = candidate();
    assert!(
        plan.contains(&format!("qemu-system-x86={want}")),
        "{plan:?}"
    );
    assert!(plan.contains(&format!("qemu-utils={want}")), "{plan:?}");
    let installs = resolve(admin.path(), &plan);
    assert_matching_pair(&status, &installs);
    for tool in [
        "xorriso",
        "cpio",
        "protobuf-compiler",
        "isolinux",
        "syslinux-common",
    ] {
        assert!(
            installs.iter().any(|(name, _)| name == tool)
                || installed_version(&status, tool).is_some(),
            "{tool} is neither installed nor planned"
        );
    }
}

#[test]
fn a_machine_without_qemu_gets_a_matching_pair() {
    let status = without_package(&new_machine_status(), "qemu-utils");
    let admin = admindir(&status);
    let plan = plan(admin.path());
    assert_eq!(qemu_entries(&plan).len(), 2, "{plan:?}");
    assert_matching_pair(&status, &resolve(admin.path(), &plan));
}

#[test]
fn a_matching_pair_is_left_alone() {
    let version = candidate();
    let status = without_package(&new_machine_status(), "qemu-utils")
        + "\n\n"
        + &installed_stanza("qemu-utils", &version)
        + &installed_stanza("qemu-system-x86", &version);
    let admin = admindir(&status);
    let plan = plan(admin.path());
    assert!(
        qemu_entries(&plan).is_empty(),
        "a matching pair is replanned: {plan:?}"
    );
}

#[test]
fn a_mismatched_pair_is_made_to_match() {
    // The image's qemu-utils 10.x beside an older qemu-system-x86.
    let status =
        new_machine_status() + "\n\n" + &installed_stanza("qemu-system-x86", "1:7.2+dfsg-7");
    let admin = admindir(&status);
    let plan = plan(admin.path());
    assert_eq!(qemu_entries(&plan).len(), 2, "{plan:?}");
    assert_matching_pair(&status, &resolve(admin.path(), &plan));
}
