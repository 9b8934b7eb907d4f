// SPDX-License-Identifier: Apache-2.0
//! Finds the workspace's binaries, building them once if a test runs before they exist.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Mutex;

/// Binaries already brought up to date by this test process.
static BUILT: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The target directory the running test executable lives in (`target/<profile>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(|p| p.parent()).expect("test binary in target/<profile>/deps").to_path_buf()
}

/// Path of workspace binary `name` from package `package`, brought up to date once per
/// test process (`cargo build` is a no-op when it is fresh; a stale binary would test old code).
pub fn bin(package: &str, name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if built.get_or_insert_with(HashSet::new).insert(name.to_owned()) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "-p", package, "--bin", name]);
        if profile_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build -p {package} --bin {name} failed");
    }
    path
}

/// `piccolo-broker`.
pub fn broker() -> PathBuf {
    bin("piccolo-broker", "piccolo-broker")
}

/// `piccoloctl`.
pub fn piccoloctl() -> PathBuf {
    bin("piccoloctl", "piccoloctl")
}
