// SPDX-License-Identifier: Apache-2.0
//! Finds the workspace's binaries, building them once if a test runs before they exist.

use std::path::PathBuf;
use std::sync::Mutex;

static BUILD: Mutex<()> = Mutex::new(());

/// The target directory the running test executable lives in (`target/<profile>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(|p| p.parent()).expect("test binary in target/<profile>/deps").to_path_buf()
}

/// Path of workspace binary `name` from package `package`, built if missing.
pub fn bin(package: &str, name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() {
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
