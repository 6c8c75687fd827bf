//! The test guest: built once per machine by `tests/guest/build-guest.sh`
//! and cached outside the repository.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The two guest ISOs.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Powers off on the ACPI power button.
    pub cooperative: PathBuf,
    /// Ignores the power button.
    pub stubborn: PathBuf,
}

impl Guest {
    /// The directory holding both ISOs, to serve over HTTP.
    pub fn dir(&self) -> &Path {
        self.cooperative.parent().expect("ISO has a directory")
    }
}

/// Builds the guest if needed (fast when it is up to date).
pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build-guest.sh");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed:\n{}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("paths are UTF-8");
        let mut lines = stdout.lines().map(PathBuf::from);
        let (Some(cooperative), Some(stubborn)) = (lines.next(), lines.next()) else {
            panic!("{} printed no ISO paths: {stdout:?}", script.display());
        };
        Guest {
            cooperative,
            stubborn,
        }
    })
}

/// The MD5 of a file, as `md5:<hex>`, computed by coreutils so the test
/// does not trust the code under test.
pub fn md5_of(path: &Path) -> String {
    let out = Command::new("md5sum")
        .arg(path)
        .output()
        .expect("md5sum runs");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    format!("md5:{}", text.split_whitespace().next().expect("a digest"))
}
