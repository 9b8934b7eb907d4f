// SPDX-License-Identifier: Apache-2.0
//! The one error type of the HTTP layer and its one mapping to HTTP.
//!
//! Every error leaves the worker as `{"error": {"code": ..., "message": ...}}` with the
//! status below. Messages never carry secrets or internal paths: details go to the log.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// A machine-readable code and a human-readable message.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `locked`, `rate_limited`, `csrf`.
    pub code: String,
    /// What went wrong, for people. Never contains a secret.
    pub message: String,
}

/// Everything a handler can answer instead of success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request (bad JSON, missing field, value out of range).
    #[error("{0}")]
    BadRequest(String),
    /// No valid session cookie or bearer token.
    #[error("authentication required")]
    Unauthenticated,
    /// A password, recovery key or setup code was wrong.
    #[error("{0}")]
    WrongCredentials(&'static str),
    /// A recovery key with a typo (wrong length, character or checksum).
    #[error("{0}")]
    MistypedRecoveryKey(String),
    /// A cookie-authenticated unsafe request without the session's CSRF token.
    #[error("missing or wrong CSRF token (send the X-CSRF-Token header)")]
    Csrf,
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// Route exists, method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Setup was already done.
    #[error("the key set is already initialised")]
    AlreadyInitialised,
    /// Request body over the limit.
    #[error("request body too large")]
    PayloadTooLarge,
    /// An import archive was refused; nothing changed.
    #[error("import rejected: {0}")]
    ImportRejected(String),
    /// The control store is locked.
    #[error("the control store is locked; unlock it first")]
    Locked,
    /// First-run setup has not been done.
    #[error("first-run setup has not been done")]
    SetupRequired,
    /// Too many attempts; retry after this many seconds.
    #[error("too many attempts; retry later")]
    RateLimited {
        /// Seconds until the next attempt is considered.
        retry_after: u64,
    },
    /// A dependency (broker, updater) is unreachable or failed.
    #[error("{0}")]
    Unavailable(String),
    /// The update worker runs another job (FAILED_PRECONDITION "busy: ...").
    #[error("{0}")]
    UpdaterBusy(String),
    /// The update worker refused the command in its current state (nothing to cancel, the
    /// other slot would not boot, cancelled meanwhile).
    #[error("{0}")]
    UpdateConflict(String),
    /// The update worker tried and failed (update server unreachable, bad manifest, ...).
    #[error("{0}")]
    UpdateFailed(String),
    /// This node is a follower: the control store is read-only here.
    #[error("this node is not the leader: the control store is read-only")]
    NotLeader,
    /// Another lock-state transition (unlock, lock, export, import) is in progress.
    #[error("{0}; retry when it has finished")]
    Busy(String),
    /// Anything else; details are in the log only.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The HTTP status and stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::WrongCredentials(_) => (StatusCode::UNAUTHORIZED, "wrong_credentials"),
            ApiError::MistypedRecoveryKey(_) => (StatusCode::UNAUTHORIZED, "recovery_key_mistyped"),
            ApiError::Csrf => (StatusCode::FORBIDDEN, "csrf"),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::AlreadyInitialised => (StatusCode::CONFLICT, "already_initialised"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::ImportRejected(_) => (StatusCode::UNPROCESSABLE_ENTITY, "import_rejected"),
            ApiError::Locked => (StatusCode::LOCKED, "locked"),
            ApiError::SetupRequired => (StatusCode::LOCKED, "setup_required"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::UpdaterBusy(_) => (StatusCode::CONFLICT, "busy"),
            ApiError::UpdateConflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::UpdateFailed(_) => (StatusCode::BAD_GATEWAY, "update_failed"),
            ApiError::NotLeader => (StatusCode::SERVICE_UNAVAILABLE, "not_leader"),
            ApiError::Busy(_) => (StatusCode::CONFLICT, "busy"),
            ApiError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = ErrorBody { error: ErrorDetail { code: code.to_string(), message: self.to_string() } };
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::RateLimited { retry_after } = self
            && let Ok(v) = HeaderValue::from_str(&retry_after.max(1).to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// The single mapping from persistence errors to HTTP errors.
impl From<piccolo_persistence::Error> for ApiError {
    fn from(e: piccolo_persistence::Error) -> ApiError {
        use piccolo_persistence::Error as E;
        match e {
            E::Locked => ApiError::Locked,
            E::NotLocked { state } => ApiError::Busy(format!("the control store is {state}")),
            E::AlreadySetUp => ApiError::AlreadyInitialised,
            E::NotSetUp => ApiError::SetupRequired,
            e @ E::SetupInterrupted { .. } => ApiError::Busy(e.to_string()),
            E::Keyset(k) => ApiError::from(k),
            E::Store(s) => ApiError::from(s),
            e @ (E::Volume { .. } | E::Tpm { .. } | E::TpmUnavailable | E::MountNotVisible { .. }) => {
                tracing::error!(error = %ErrorChain(&e), "broker call failed");
                // The top-level message names the step and the volume, never a key.
                ApiError::Unavailable(e.to_string())
            }
            other => {
                tracing::error!(error = %ErrorChain(&other), "persistence failed");
                ApiError::Internal
            }
        }
    }
}

/// Key-set errors (wrong credentials, weak passwords, rejected archives).
impl From<piccolo_keyset::Error> for ApiError {
    fn from(e: piccolo_keyset::Error) -> ApiError {
        use piccolo_keyset::Error as K;
        match e {
            K::WrongPassword => ApiError::WrongCredentials("wrong password"),
            K::WrongRecoveryKey => ApiError::WrongCredentials("wrong recovery key"),
            e @ K::RecoveryKeyMistyped { .. } => ApiError::MistypedRecoveryKey(e.to_string()),
            K::KeysetExists { .. } => ApiError::AlreadyInitialised,
            e @ (K::PasswordTooShort { .. } | K::PasswordTooLong { .. }) => ApiError::BadRequest(e.to_string()),
            e @ K::VolumeMounted { .. } => ApiError::ImportRejected(e.to_string()),
            e if e.is_archive_rejection() => ApiError::ImportRejected(e.to_string()),
            other => {
                tracing::error!(error = %ErrorChain(&other), "key set operation failed");
                ApiError::Internal
            }
        }
    }
}

/// Control-store errors: `Locked` is 423, `NotLeader` 503 `not_leader`.
impl From<piccolo_store::Error> for ApiError {
    fn from(e: piccolo_store::Error) -> ApiError {
        match e {
            piccolo_store::Error::Locked => ApiError::Locked,
            piccolo_store::Error::NotLeader => ApiError::NotLeader,
            other => {
                tracing::error!(error = %ErrorChain(&other), "control store failed");
                ApiError::Internal
            }
        }
    }
}

/// A gRPC status from the update worker (a newtype, so a broker status cannot take this
/// mapping by accident through `?`).
#[derive(Debug)]
pub struct UpdaterStatus(pub tonic::Status);

/// The single mapping from the update worker's gRPC statuses to HTTP errors. Its messages
/// carry no secrets (the worker never puts a device token in one), so they are passed on.
impl From<UpdaterStatus> for ApiError {
    fn from(UpdaterStatus(s): UpdaterStatus) -> ApiError {
        use tonic::Code;
        let msg = s.message().to_string();
        match s.code() {
            Code::FailedPrecondition if msg.starts_with("busy") => ApiError::UpdaterBusy(msg),
            Code::FailedPrecondition | Code::Aborted | Code::Cancelled | Code::AlreadyExists => {
                ApiError::UpdateConflict(msg)
            }
            Code::InvalidArgument | Code::OutOfRange => ApiError::BadRequest(msg),
            Code::Unavailable | Code::DeadlineExceeded => {
                tracing::warn!(code = ?s.code(), message = %msg, "updater unavailable");
                ApiError::Unavailable(format!("the update worker is unavailable: {msg}"))
            }
            Code::PermissionDenied | Code::Unauthenticated | Code::Unimplemented => {
                // A deployment fault (this worker's uid is not in the updater's table, or an
                // older updater): nothing the client can fix.
                tracing::error!(code = ?s.code(), message = %msg, "the updater refused the API worker");
                ApiError::Unavailable("the update worker refused the API worker".into())
            }
            _ => {
                tracing::warn!(code = ?s.code(), message = %msg, "update command failed");
                ApiError::UpdateFailed(msg)
            }
        }
    }
}

/// Formats an error with its whole `source()` chain: `a: b: c`.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut src = self.0.source();
        while let Some(s) = src {
            write!(f, ": {s}")?;
            src = s.source();
        }
        Ok(())
    }
}
