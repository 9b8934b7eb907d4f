// SPDX-License-Identifier: Apache-2.0
//! Runs TPM operations in `piccolo-broker-tpm`, one process per call, so the broker itself
//! never maps the TPM stack (tss-esapi, libtss2, libcrypto: about 1.8 MiB of resident code
//! in a process that otherwise idles) and a crash in that C code cannot take the broker down.
//!
//! The exchange is one `TpmHelperRequest` on the helper's stdin and one `TpmHelperResponse`
//! on its stdout (`tpm.proto`); secrets cross only those pipes. Calls are serialised (swtpm
//! serves one client at a time; a TPM has few session slots), each is bounded by
//! [`DEADLINE`], and the helper runs with a cleared environment. The EK identity, public
//! data, is cached here so that signing a token does not re-create the EK in every helper.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use piccolo_proto::paths::TPM_HELPER_MAX_BYTES as MAX_MESSAGE;
use piccolo_proto::v1::tpm_helper_request::Op;
use piccolo_proto::v1::tpm_helper_response::Result as Answer;
use piccolo_proto::v1::{GetDeviceIdentityResponse, TpmErrorCode, TpmHelperRequest, TpmHelperResponse};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use zeroize::{Zeroize, Zeroizing};

use crate::error::Error;

/// File name of the helper, looked up next to the broker's executable by default.
pub const PROGRAM: &str = "piccolo-broker-tpm";
/// Longest a helper may run: disk enrollment unlocks an Argon2id keyslot and runs
/// `systemd-cryptenroll`; a TPM operation alone takes well under a second.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The helper program and what every request carries.
pub struct TpmHelper {
    program: Option<PathBuf>,
    tcti: String,
    /// Held for a whole exchange: one helper at a time, and the identity it may update.
    state: tokio::sync::Mutex<Option<GetDeviceIdentityResponse>>,
}

impl TpmHelper {
    /// A helper at `program` (None: none could be located) for the TPM behind `tcti`.
    pub fn new(program: Option<PathBuf>, tcti: String) -> TpmHelper {
        TpmHelper { program, tcti, state: tokio::sync::Mutex::new(None) }
    }

    /// Runs `op` in a fresh helper and returns its answer, or the error it reported.
    pub async fn run(&self, op: Op) -> Result<Answer, Error> {
        let mut identity = self.state.lock().await;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok())
            .ok_or_else(|| Error::Internal("clock before 1970 or out of range".into()))?;
        let mut request = TpmHelperRequest { tcti: self.tcti.clone(), now, identity: identity.clone(), op: Some(op) };
        let input = Zeroizing::new(request.encode_to_vec());
        wipe_secrets(&mut request);
        // The gRPC limit is larger; no valid TPM request comes near this one.
        if input.len() as u64 > MAX_MESSAGE {
            return Err(Error::InvalidArgument(format!(
                "TPM request of {} bytes exceeds {MAX_MESSAGE} bytes",
                input.len()
            )));
        }
        let output = tokio::time::timeout(DEADLINE, self.exchange(&input))
            .await
            .map_err(|_| failed(format!("the TPM helper did not answer within {} s", DEADLINE.as_secs())))??;
        let response = TpmHelperResponse::decode(output.as_slice())
            .map_err(|e| failed(format!("the TPM helper's answer does not decode: {e}")))?;
        if response.identity.is_some() {
            identity.clone_from(&response.identity);
        }
        match response.result {
            Some(Answer::Error(e)) => Err(reported(e.code(), e.message)),
            Some(answer) => Ok(answer),
            None => Err(failed("the TPM helper's answer is empty".into())),
        }
    }

    /// Starts the helper, feeds it `input`, and returns what it wrote once it exited 0.
    /// The child is killed if this future is dropped (deadline, broker shutdown).
    async fn exchange(&self, input: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        let program = self.program.as_ref().ok_or_else(|| failed(format!("cannot locate the TPM helper {PROGRAM}")))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Ok(level) = std::env::var("RUST_LOG") {
            cmd.env("RUST_LOG", level);
        }
        let mut child =
            cmd.spawn().map_err(|e| failed(format!("cannot start the TPM helper {}: {e}", program.display())))?;
        let (mut stdin, stdout) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, o),
            _ => return Err(failed("the TPM helper's pipes are missing".into())),
        };
        // Written and read concurrently: neither side may block the other on a full pipe.
        let write = async move {
            let r = stdin.write_all(input).await;
            drop(stdin);
            r
        };
        let read = async move {
            let mut out = Zeroizing::new(Vec::new());
            stdout.take(MAX_MESSAGE + 1).read_to_end(&mut out).await.map(|_| out)
        };
        let (written, output) = tokio::join!(write, read);
        let status = child.wait().await.map_err(|e| failed(format!("waiting for the TPM helper: {e}")))?;
        if !status.success() {
            return Err(failed(format!("the TPM helper failed ({status}); its log is in the broker's journal")));
        }
        // A helper that stopped reading early (EPIPE) is judged by what it answered.
        if let Err(e) = written
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(failed(format!("writing to the TPM helper: {e}")));
        }
        let output = output.map_err(|e| failed(format!("reading the TPM helper's answer: {e}")))?;
        if output.len() as u64 > MAX_MESSAGE {
            return Err(failed(format!("the TPM helper's answer exceeds {MAX_MESSAGE} bytes")));
        }
        Ok(output)
    }
}

/// Wipes the secret a request carries once it is encoded (the encoding wipes itself).
fn wipe_secrets(request: &mut TpmHelperRequest) {
    match &mut request.op {
        Some(Op::SealSecret(r)) => r.secret.zeroize(),
        Some(Op::EnrollDiskTpm(r)) => r.unlock_key.zeroize(),
        Some(Op::ResealDiskTpm(r)) => r.unlock_key.zeroize(),
        _ => {}
    }
}

/// The helper could not be run or did not answer properly.
fn failed(message: String) -> Error {
    tracing::error!(error = %message, "TPM helper failed");
    Error::Backend { code: Code::Internal, message }
}

/// The one mapping of the helper's error classes to gRPC codes (see `handlers::tpm`).
fn reported(code: TpmErrorCode, message: String) -> Error {
    let code = match code {
        TpmErrorCode::InvalidArgument => return Error::InvalidArgument(message),
        TpmErrorCode::FailedPrecondition => Code::FailedPrecondition,
        TpmErrorCode::NotFound => Code::NotFound,
        TpmErrorCode::Unavailable => Code::Unavailable,
        TpmErrorCode::Internal | TpmErrorCode::Unspecified => Code::Internal,
    };
    if code == Code::Internal {
        tracing::error!(error = %message, "TPM operation failed");
    }
    Error::Backend { code, message }
}
