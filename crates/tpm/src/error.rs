// SPDX-License-Identifier: Apache-2.0
//! The crate's one error type, named after the failed step, and its status-code class.
//!
//! Messages never carry secrets, sealed plaintext or unlock keys: only sizes, indices,
//! TPM response codes and tool exit statuses.

use tss_esapi::constants::response_code::Tss2ResponseCodeKind;

/// The gRPC code class of an [`Error`]; the broker maps it to `tonic::Code` in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The caller's argument is wrong; nothing was changed.
    InvalidArgument,
    /// No TPM, or the TPM state does not allow the request (PCR policy mismatch).
    FailedPrecondition,
    /// The named partition does not exist.
    NotFound,
    /// The TPM refuses for now (dictionary-attack lockout, out of sessions/objects).
    Unavailable,
    /// Anything else: a TPM command or a tool failed unexpectedly.
    Internal,
}

/// Everything that can go wrong in a TPM operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No TPM is reachable through the configured TCTI (absent device, nothing listening).
    #[error("no TPM ({0})")]
    NoTpm(String),
    /// An argument failed validation before the TPM was touched.
    #[error("{0}")]
    InvalidArgument(String),
    /// The sealed blob is not one of ours: wrong magic, version, length or checksum.
    #[error("sealed blob is corrupt or not a piccolo sealed blob: {0}")]
    CorruptBlob(String),
    /// The blob parses but the TPM refuses to load it: sealed by another TPM (or owner).
    #[error("sealed blob was not made by this TPM")]
    ForeignBlob(#[source] tss_esapi::Error),
    /// The PCRs no longer have the values the secret was sealed to. No data is returned.
    #[error("PCR policy mismatch")]
    PcrPolicyMismatch,
    /// The TPM is in dictionary-attack lockout.
    #[error("TPM is in dictionary-attack lockout")]
    Lockout(#[source] tss_esapi::Error),
    /// A TPM command failed; `step` names it.
    #[error("TPM command failed: {step}")]
    Tpm {
        /// The command or step.
        step: &'static str,
        /// The TSS/TPM response.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM answer did not have the expected shape.
    #[error("unexpected TPM answer: {0}")]
    Unexpected(&'static str),
    /// The named partition does not exist below the device directory.
    #[error("partition {0:?} not found")]
    PartitionNotFound(String),
    /// The partition is not a LUKS2 volume.
    #[error("partition {0:?} is not a LUKS2 volume")]
    NotLuks2(String),
    /// The unlock key opens no keyslot of the volume; nothing was changed.
    #[error("the unlock key opens no keyslot of {0:?}")]
    UnlockKeyRejected(String),
    /// The PCR values asked for cannot be bound by this systemd-cryptenroll (see `disk`).
    #[error("{0}")]
    Unsupported(String),
    /// A private temp file for the unlock key could not be made.
    #[error("cannot write the private key file")]
    KeyFile(#[source] std::io::Error),
    /// An external tool could not be started.
    #[error("cannot run {tool}")]
    Spawn {
        /// Program.
        tool: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An external tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// Program.
        tool: &'static str,
        /// Exit status.
        status: String,
        /// Last lines of its stderr (the tools print no secrets: keys go through files).
        stderr: String,
    },
}

impl Error {
    /// The status-code class for the broker.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) | Error::CorruptBlob(_) | Error::ForeignBlob(_) | Error::UnlockKeyRejected(_) => {
                Code::InvalidArgument
            }
            Error::NoTpm(_) | Error::PcrPolicyMismatch | Error::NotLuks2(_) | Error::Unsupported(_) => {
                Code::FailedPrecondition
            }
            Error::PartitionNotFound(_) => Code::NotFound,
            Error::Lockout(_) => Code::Unavailable,
            Error::Tpm { source, .. } if is_resource_shortage(source) => Code::Unavailable,
            Error::Tpm { .. } | Error::Unexpected(_) | Error::KeyFile(_) | Error::Spawn { .. } | Error::Tool { .. } => {
                Code::Internal
            }
        }
    }

    /// Wraps a TSS error of `step`, picking out lockout.
    pub(crate) fn tpm(step: &'static str) -> impl FnOnce(tss_esapi::Error) -> Error {
        move |source| match kind(&source) {
            Some(Tss2ResponseCodeKind::Lockout) => Error::Lockout(source),
            _ => Error::Tpm { step, source },
        }
    }
}

/// The response-code kind of a TSS error, if it came from the TPM.
pub(crate) fn kind(e: &tss_esapi::Error) -> Option<Tss2ResponseCodeKind> {
    match e {
        tss_esapi::Error::Tss2Error(rc) => rc.kind(),
        tss_esapi::Error::WrapperError(_) => None,
    }
}

fn is_resource_shortage(e: &tss_esapi::Error) -> bool {
    matches!(
        kind(e),
        Some(
            Tss2ResponseCodeKind::ObjectMemory
                | Tss2ResponseCodeKind::SessionMemory
                | Tss2ResponseCodeKind::Memory
                | Tss2ResponseCodeKind::SessionHandles
                | Tss2ResponseCodeKind::ObjectHandles
                | Tss2ResponseCodeKind::Retry
                | Tss2ResponseCodeKind::Yielded
                | Tss2ResponseCodeKind::Testing
        )
    )
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
