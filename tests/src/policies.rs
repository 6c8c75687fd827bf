//! Where the policy components built by `scripts/build-policies.sh` and
//! `scripts/build-foreign-policies.sh` are.

use std::path::PathBuf;

/// The directory holding the `.wasm` policies: `QE_POLICY_DIR`, else
/// `wasm32-wasip2/release` in the target directory this test binary was
/// built in (`<target>/<profile>/deps/<test>`), which is where
/// `scripts/build-policies.sh` puts them with the same `CARGO_TARGET_DIR`.
pub fn policy_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QE_POLICY_DIR") {
        return PathBuf::from(dir);
    }
    target_dir().join("wasm32-wasip2/release")
}

/// The target directory this test binary was built in
/// (`<target>/<profile>/deps/<test>`).
fn target_dir() -> PathBuf {
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()));
    from_exe
        .or_else(|| std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// The component of one policy crate (`port-range` → `port_range.wasm`);
/// panics with how to build it when it is missing.
pub fn policy_wasm(crate_name: &str) -> PathBuf {
    let path = policy_dir().join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        path.exists(),
        "{} is missing: build the policies first with `scripts/build-policies.sh` \
         (and point QE_POLICY_DIR at the directory it prints if it is not the default)",
        path.display()
    );
    path
}

/// The directory holding the policies written in Python and JavaScript,
/// built by `scripts/build-foreign-policies.sh`: `QE_FOREIGN_POLICY_DIR`,
/// else `foreign-policies` in the target directory this test binary was
/// built in, where that script puts them with the same `CARGO_TARGET_DIR`.
pub fn foreign_policy_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("QE_FOREIGN_POLICY_DIR") {
        return PathBuf::from(dir);
    }
    target_dir().join("foreign-policies")
}

/// One foreign policy component (`accel_fallback_py.wasm`); panics with how
/// to build it when it is missing.
pub fn foreign_policy_wasm(file: &str) -> PathBuf {
    let path = foreign_policy_dir().join(file);
    assert!(
        path.exists(),
        "{} is missing: build the Python and JavaScript policies first with \
         `scripts/build-foreign-policies.sh` (needs python3 and Node.js with npm; \
         point QE_FOREIGN_POLICY_DIR at the directory it prints if it is not the default)",
        path.display()
    );
    path
}
