// SPDX-License-Identifier: Apache-2.0
//! TPM auto-unlock against a real TPM: swtpm, with tpm2-tools standing in for the broker's
//! SealSecret/UnsealSecret (a PCR 7 policy seal). After PCR 7 is extended the unlock fails with
//! exactly "TPM unlock failed: PCR 7 changed" and the password still works.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{FAST, pw};
use piccolo_keyset::{Error, Keyset, Secret, TpmUnsealError};

/// A swtpm process on free localhost ports; killed on drop.
struct Swtpm {
    child: Child,
    port: u16,
    _state: tempfile::TempDir,
}

impl Swtpm {
    fn start() -> Swtpm {
        let state = tempfile::tempdir().unwrap();
        // The swtpm TCTI always uses port + 1 for the control channel.
        let (port, ctrl) = loop {
            let a = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = a.local_addr().unwrap().port();
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
            .expect("swtpm is installed");
        let tpm = Swtpm { child, port, _state: state };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() || TcpStream::connect(("127.0.0.1", ctrl)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        tpm
    }

    /// Runs a tpm2-tools command against this TPM, feeding `stdin`.
    fn tool(&self, cwd: &Path, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .current_dir(cwd)
            .env("TPM2TOOLS_TCTI", format!("swtpm:host=127.0.0.1,port={}", self.port))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        // Transient objects stay loaded in the simulator; free the slots after every command.
        if args[0] != "tpm2_flushcontext" {
            self.tool(cwd, &["tpm2_flushcontext", "-t"], b"");
            self.tool(cwd, &["tpm2_flushcontext", "-s"], b"");
        }
        out
    }

    fn ok(&self, cwd: &Path, args: &[&str], stdin: &[u8]) -> Vec<u8> {
        let out = self.tool(cwd, args, stdin);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// What the broker's SealSecret would do: seal `secret` to the current PCR 7. The blob is
    /// `len(public) as u16 BE || public || private`.
    fn seal(&self, secret: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        self.ok(d, &["tpm2_createprimary", "-Q", "-C", "o", "-c", "prim.ctx"], b"");
        self.ok(d, &["tpm2_pcrread", "-Q", "sha256:7", "-o", "pcr.bin"], b"");
        self.ok(
            d,
            &["tpm2_createpolicy", "-Q", "--policy-pcr", "-l", "sha256:7", "-f", "pcr.bin", "-L", "pol.dig"],
            b"",
        );
        let attrs = "fixedtpm|fixedparent|noda|adminwithpolicy";
        let args = [
            "tpm2_create",
            "-Q",
            "-C",
            "prim.ctx",
            "-L",
            "pol.dig",
            "-a",
            attrs,
            "-i",
            "-",
            "-u",
            "seal.pub",
            "-r",
            "seal.priv",
        ];
        self.ok(d, &args, secret);
        let public = std::fs::read(d.join("seal.pub")).unwrap();
        let private = std::fs::read(d.join("seal.priv")).unwrap();
        let mut blob = u16::try_from(public.len()).unwrap().to_be_bytes().to_vec();
        blob.extend_from_slice(&public);
        blob.extend_from_slice(&private);
        blob
    }

    /// What the broker's UnsealSecret would do; a policy failure (TPM_RC_POLICY_FAIL, 0x99d)
    /// is the PCR mismatch.
    fn unseal(&self, blob: &[u8]) -> Result<Secret, TpmUnsealError> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let len = usize::from(u16::from_be_bytes([blob[0], blob[1]]));
        std::fs::write(d.join("seal.pub"), &blob[2..2 + len]).unwrap();
        std::fs::write(d.join("seal.priv"), &blob[2 + len..]).unwrap();
        self.ok(d, &["tpm2_createprimary", "-Q", "-C", "o", "-c", "prim.ctx"], b"");
        self.ok(d, &["tpm2_load", "-Q", "-C", "prim.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx"], b"");
        let out = self.tool(d, &["tpm2_unseal", "-c", "seal.ctx", "-p", "pcr:sha256:7"], b"");
        if out.status.success() {
            return Ok(Secret::new(out.stdout));
        }
        let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
        if stderr.contains("0x99d") {
            Err(TpmUnsealError::PcrMismatch)
        } else {
            Err(TpmUnsealError::Failed(stderr.into()))
        }
    }

    fn extend_pcr7(&self) {
        let dir = tempfile::tempdir().unwrap();
        self.ok(dir.path(), &["tpm2_pcrextend", &format!("7:sha256={}", "ab".repeat(32))], b"");
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn state() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    (dir, path)
}

#[test]
fn tpm_unlock_works_until_pcr7_changes() {
    let tpm = Swtpm::start();
    let (_dir, state) = state();
    let created = Keyset::create(&state, &pw("admin password 1"), FAST).unwrap();
    let mut ks = created.keyset;
    assert!(matches!(ks.unlock_with_tpm(|b| tpm.unseal(b)), Err(Error::TpmNotEnrolled { .. })));

    let blob = tpm.seal(created.sdek.expose_secret());
    ks.write_tpm_sealed_sdek(&created.sdek, &blob).unwrap();
    let ks = Keyset::read(&state).unwrap();
    assert!(ks.has_tpm_seal());
    let sdek = ks.unlock_with_tpm(|b| tpm.unseal(b)).unwrap();
    assert_eq!(sdek.expose_secret(), created.sdek.expose_secret());

    tpm.extend_pcr7();
    let err = ks.unlock_with_tpm(|b| tpm.unseal(b)).unwrap_err();
    assert!(matches!(err, Error::TpmPcrChanged), "{err:?}");
    assert_eq!(err.to_string(), "TPM unlock failed: PCR 7 changed");
    // Still unlockable the normal way.
    assert!(ks.unlock_with_password(&pw("admin password 1")).is_ok());
}

#[test]
fn tpm_unlock_rejects_a_foreign_secret_and_can_be_removed() {
    let tpm = Swtpm::start();
    let (_dir, state) = state();
    let created = Keyset::create(&state, &pw("admin password 1"), FAST).unwrap();
    let mut ks = created.keyset;
    // A blob that unseals to something else (e.g. another appliance's SDEK).
    let blob = tpm.seal(&[7u8; 32]);
    ks.write_tpm_sealed_sdek(&created.sdek, &blob).unwrap();
    assert!(matches!(ks.unlock_with_tpm(|b| tpm.unseal(b)), Err(Error::TpmWrongSecret)));
    // Other unseal failures are reported as such, not as a PCR change.
    let err =
        ks.unlock_with_tpm(|_| Err::<Secret, _>(TpmUnsealError::Failed("broker unreachable".into()))).unwrap_err();
    assert!(matches!(err, Error::TpmUnseal { .. }) && err.to_string() == "TPM unlock failed", "{err}");
    assert!(matches!(ks.write_tpm_sealed_sdek(&created.sdek, &[]), Err(Error::TpmBlobSize { .. })));
    ks.remove_tpm_sealed_sdek().unwrap();
    assert!(!Keyset::read(&state).unwrap().has_tpm_seal());
}
