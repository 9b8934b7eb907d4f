// SPDX-License-Identifier: Apache-2.0
//! Finds the workspace's binaries, building them once if a test runs before they exist.

use std::path::PathBuf;
use std::sync::Once;

static BUILD: Once = Once::new();

/// The target directory the running test executable lives in (`target/<profile>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(|p| p.parent()).expect("test binary in target/<profile>/deps").to_path_buf()
}

/// Path of workspace binary `name`, after bringing every workspace binary up to date once per
/// test process. Building the whole workspace's binaries (not one package) keeps cargo's
/// feature unification identical to `cargo test --workspace`, so this is a no-op there; a
/// stale binary would test old code.
pub fn bin(name: &str) -> PathBuf {
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = std::process::Command::new(cargo);
        cmd.args(["build", "--workspace", "--bins"]);
        if profile_dir().file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "cargo build --workspace --bins failed");
    });
    let path = profile_dir().join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// `piccolo-broker`.
pub fn broker() -> PathBuf {
    bin("piccolo-broker")
}

/// `piccoloctl`.
pub fn piccoloctl() -> PathBuf {
    bin("piccoloctl")
}
