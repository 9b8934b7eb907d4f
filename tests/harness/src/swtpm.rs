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
        let (port, _) = loop {
            let a = TcpListener::bind("127.0.0.1:0").expect("bind probe");
            let port = a.local_addr().expect("probe addr").port();
            if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break (port, port + 1);
            }
        };
        let child = Self::spawn(state.path(), port);
        let tpm = Swtpm { child, port, state };
        tpm.wait_listening();
        tpm
    }

    fn spawn(state: &std::path::Path, port: u16) -> Child {
        let ctrl = port + 1;
        Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is installed (.ci/apt-packages)")
    }

    fn wait_listening(&self) {
        let (port, ctrl) = (self.port, self.port + 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() || TcpStream::connect(("127.0.0.1", ctrl)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Power-cycles the TPM: kills swtpm and starts it again on the same state and ports
    /// (startup-clear: PCRs reset, seeds and NV kept), like a reboot of the machine.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.child = Self::spawn(self.state.path(), self.port);
            std::thread::sleep(Duration::from_millis(50));
            match self.child.try_wait() {
                // The old ports may still be in TIME_WAIT for a moment: try again.
                Ok(Some(_)) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                _ => break,
            }
        }
        self.wait_listening();
    }

    /// Flushes transient objects and sessions a tool left behind (swtpm has no resource
    /// manager, so a client that exits without flushing leaks TPM slots).
    pub fn flush_all(&self) {
        for t in ["-t", "-s", "-l"] {
            let _ = self.tool(&["tpm2_flushcontext", t]);
        }
    }

    /// The sha256 value PCR `index` has after [`Swtpm::extend_pcr`] from `before`.
    pub fn extended_value(before: &[u8]) -> Vec<u8> {
        let digest = [0xabu8; 32];
        let mut input = before.to_vec();
        input.extend_from_slice(&digest);
        sha256(&input)
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

    /// Extends sha256 PCR `index` with a fixed digest (0xab x 32) (what a firmware change looks like).
    pub fn extend_pcr(&self, index: u32) {
        let digest = "ab".repeat(32);
        let out = self.tool(&["tpm2_pcrextend", &format!("{index}:sha256={digest}")]);
        assert!(out.status.success(), "tpm2_pcrextend: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// SHA-256 through `sha256sum` (keeps the harness free of crypto crates).
fn sha256(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut c = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
    c.stdin.take().expect("stdin").write_all(data).expect("write");
    let out = c.wait_with_output().expect("sha256sum");
    let hex = String::from_utf8_lossy(&out.stdout);
    let hex = hex.split_whitespace().next().expect("digest");
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
