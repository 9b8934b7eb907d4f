// SPDX-License-Identifier: Apache-2.0
//! The broker's error type and the one place it becomes a `tonic::Status`.
//!
//! Messages returned to callers are short and never carry secrets; details go to the log.

use piccolo_proto::Rpc;
use tonic::{Code, Status};

/// Everything that can go wrong in a broker call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection carried no SO_PEERCRED (not a Unix socket).
    #[error("no peer credentials on this connection")]
    NoPeerCredentials,
    /// The policy does not allow this caller this RPC (with these arguments).
    #[error("{0}: permission denied")]
    Denied(Rpc),
    /// The audit record could not be made durable, so the call is refused.
    #[error("audit log unavailable")]
    Audit(#[source] piccolo_audit::AuditError),
    /// An argument failed validation; nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A handler task panicked or was cancelled.
    #[error("internal error")]
    Internal(String),
    /// A backend refused or failed; the service's own `From` impl (in its handler module)
    /// chose the code and wrote a message without secrets.
    #[error("{message}")]
    Backend {
        /// The status code.
        code: Code,
        /// What went wrong, for the caller.
        message: String,
    },
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::NoPeerCredentials => Code::Unauthenticated,
            Error::Denied(_) => Code::PermissionDenied,
            Error::Audit(_) => Code::Unavailable,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Internal(_) => Code::Internal,
            Error::Backend { code, .. } => *code,
        };
        Status::new(code, e.to_string())
    }
}

/// An error and its whole `source()` chain, `: `-joined, for a caller-facing message
/// (backend errors name paths and steps, never data).
pub fn chain_message(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        src = s.source();
    }
    message
}

/// gRPC code name as written in audit records (`PERMISSION_DENIED`, ...).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
