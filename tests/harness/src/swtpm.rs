// SPDX-License-Identifier: Apache-2.0
//! A real software TPM (swtpm) per test: TCP on free localhost ports, its own state
//! directory, killed on drop.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running swtpm.
pub struct Swtpm {
    child: Child,
    /// The TPM command port; the control channel is `port + 1` (the swtpm TCTI's rule).
    pub port: u16,
    state: tempfile::TempDir,
}

impl Swtpm {
    /// Starts a fresh, manufactured TPM (startup-clear) and waits until it listens.
    pub fn start() -> Swtpm {
        let state = tempfile::tempdir().expect("swtpm state dir");
        let (port, ctrl) = loop {
            let a = TcpListener::bind("127.0.0.1:0").expect("bind probe");
            let port = a.local_addr().expect("probe addr").port();
            if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break (port, port + 1);
            }
        };
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear", "--tpmstate"])
            .arg(format!("dir={}", state.path().display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is installed (.ci/apt-packages)");
        let tpm = Swtpm { child, port, state };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() || TcpStream::connect(("127.0.0.1", ctrl)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        tpm
    }

    /// The TCTI string for tss-esapi and tpm2-tools (`TPM2TOOLS_TCTI`).
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The state directory (survives only as long as this value).
    pub fn state_dir(&self) -> &std::path::Path {
        self.state.path()
    }

    /// Runs a tpm2-tools command against this TPM and returns its output (not checked).
    pub fn tool(&self, args: &[&str]) -> Output {
        Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .stdin(Stdio::null())
            .output()
            .expect("tpm2-tools is installed (.ci/apt-packages)")
    }

    /// Extends sha256 PCR `index` with a fixed digest (what a firmware change looks like).
    pub fn extend_pcr(&self, index: u32) {
        let digest = "ab".repeat(32);
        let out = self.tool(&["tpm2_pcrextend", &format!("{index}:sha256={digest}")]);
        assert!(out.status.success(), "tpm2_pcrextend: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
