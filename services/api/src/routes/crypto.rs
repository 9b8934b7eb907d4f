// SPDX-License-Identifier: Apache-2.0
//! Lock state of the control store: status, unlock, lock, recovery-key rotation and TPM
//! auto-unlock enrolment.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::Response;
use piccolo_keyset::RecoveryKey;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{RecoveryKeyResponse, StateResponse};
use super::{ApiJson, checked, json, password, verify_password};
use crate::auth::Auth;
use crate::backend::LockState;
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// Unlock with exactly one of the two credentials.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum UnlockRequest {
    /// With the admin password.
    Password(PasswordRequest),
    /// With the recovery key.
    RecoveryKey(RecoveryKeyRequest),
}

/// The recovery key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryKeyRequest {
    /// The recovery key (dashes, spaces and case are forgiven).
    #[schema(min_length = 1, max_length = 128)]
    pub recovery_key: String,
}

/// The admin password (also: re-entering it for a sensitive operation).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    /// The admin password.
    #[schema(min_length = 1, max_length = 256)]
    pub password: String,
}

/// Lock state and TPM auto-unlock.
#[derive(Debug, Serialize, ToSchema)]
pub struct CryptoStatus {
    /// The control store's lock state.
    pub state: LockState,
    /// Whether the SDEK is also sealed to the TPM (PCR 7), so the box unlocks itself at boot.
    pub tpm_enrolled: bool,
    /// Why the last TPM auto-unlock failed, e.g. "TPM unlock failed: PCR 7 changed".
    pub tpm_last_error: Option<String>,
}

/// Enable or disable TPM auto-unlock.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TpmRequest {
    /// `true`: seal the SDEK to PCR 7 through the broker; `false`: remove the sealed copy.
    pub enabled: bool,
    /// The admin password (re-entered: enabling lets the box unlock without anyone).
    #[schema(min_length = 1, max_length = 256)]
    pub password: String,
}

/// The lock state and TPM auto-unlock status (public: it reveals only whether the box is set
/// up, open, and unlocks itself).
#[utoipa::path(get, path = "/api/v1/crypto/status", tag = "crypto",
    responses(
        (status = 200, description = "Lock state", body = CryptoStatus),
        (status = 500, description = "Internal error (key set unreadable)", body = ErrorBody),
    ))]
pub async fn status(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let lock = state.lock_state();
    let tpm_enrolled = lock != LockState::Uninitialised && state.persistence.read_tpm_enrolled().await?;
    Ok(json(StatusCode::OK, CryptoStatus { state: lock, tpm_enrolled, tpm_last_error: state.tpm_error() }))
}

/// Unlocks the control store with the password or the recovery key (no session needed).
/// Already unlocked: answers the state without checking anything.
#[utoipa::path(post, path = "/api/v1/crypto/unlock", tag = "crypto", request_body = UnlockRequest,
    responses(
        (status = 200, description = "Unlocked", body = StateResponse),
        (status = 400, description = "Malformed request (give exactly one credential)", body = ErrorBody),
        (status = 401, description = "Wrong password, wrong or mistyped recovery key", body = ErrorBody),
        (status = 409, description = "Another lock-state transition is running", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 423, description = "Not set up", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "The broker is unreachable or refused a volume operation; still locked", body = ErrorBody),
    ))]
pub async fn unlock(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<UnlockRequest>,
) -> Result<Response, ApiError> {
    enum Cred {
        Password(piccolo_keyset::Password),
        Recovery(RecoveryKey),
    }
    let cred = match req {
        UnlockRequest::Password(p) => Cred::Password(password("password", p.password, 1)?),
        UnlockRequest::RecoveryKey(r) => {
            let rk = r.recovery_key;
            if rk.is_empty() || rk.chars().count() > 128 {
                return Err(ApiError::BadRequest("recovery_key must be 1 to 128 characters".into()));
            }
            state.limiter.check(client.ip())?;
            Cred::Recovery(RecoveryKey::parse(&rk).map_err(|e| ApiError::MistypedRecoveryKey(e.to_string()))?)
        }
    };
    match state.lock_state() {
        LockState::Uninitialised => return Err(ApiError::SetupRequired),
        LockState::Unlocked => return Ok(json(StatusCode::OK, StateResponse { state: LockState::Unlocked })),
        _ => {}
    }
    // Key set → SDEK → mount volumes through the broker → open the store; any failure rolls
    // back to locked.
    let p = &state.persistence;
    match cred {
        Cred::Password(pw) => checked(&state, client, p.unlock_with_password(pw)).await?,
        Cred::Recovery(rk) => {
            checked(&state, client, p.unlock_with_recovery_key(rk.expose_secret().to_string())).await?
        }
    }
    state.sessions.load_key(&p.store()).await?;
    tracing::info!(client = %client.ip(), "control store unlocked");
    Ok(json(StatusCode::OK, StateResponse { state: state.lock_state() }))
}

/// Locks: closes the control store, unmounts the control and application volumes, zeroes
/// the keys (bootstrap stays mounted). Sessions get 423 until unlock.
#[utoipa::path(post, path = "/api/v1/crypto/lock", tag = "crypto", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Locked", body = StateResponse),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 423, description = "Already locked", body = ErrorBody),
        (status = 500, description = "Locked, but a volume could not be unmounted (see the log)", body = ErrorBody),
    ))]
pub async fn lock(State(state): State<SharedState>, _auth: Auth) -> Result<Response, ApiError> {
    state.persistence.lock().await?;
    tracing::info!("control store locked");
    Ok(json(StatusCode::OK, StateResponse { state: state.lock_state() }))
}

/// Replaces the recovery key (the old one stops working) and shows the new one once.
#[utoipa::path(post, path = "/api/v1/crypto/recovery-key", tag = "crypto", request_body = PasswordRequest,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "The new recovery key, shown once", body = RecoveryKeyResponse),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Not logged in or wrong password", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
    ))]
pub async fn recovery_key(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    _auth: Auth,
    ApiJson(req): ApiJson<PasswordRequest>,
) -> Result<Response, ApiError> {
    let pw = password("password", req.password, 1)?;
    checked(&state, client, verify_password(&state.persistence, pw)).await?;
    let key = state.persistence.rotate_recovery_key().await?;
    tracing::info!(client = %client.ip(), "recovery key rotated");
    Ok(json(
        StatusCode::OK,
        RecoveryKeyResponse { recovery_key: key.expose_secret().to_string(), state: state.lock_state() },
    ))
}

/// Enables (seals the SDEK to PCR 7 through the broker's TPM service) or disables TPM
/// auto-unlock. With it the box unlocks itself at boot while PCR 7 (Secure Boot state) is
/// unchanged; after a change it stays locked and the status says why.
#[utoipa::path(post, path = "/api/v1/crypto/tpm", tag = "crypto", request_body = TpmRequest,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Done", body = CryptoStatus),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Not logged in or wrong password", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "The broker or its TPM is unreachable or refused", body = ErrorBody),
    ))]
pub async fn tpm(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    _auth: Auth,
    ApiJson(req): ApiJson<TpmRequest>,
) -> Result<Response, ApiError> {
    let pw = password("password", req.password, 1)?;
    checked(&state, client, verify_password(&state.persistence, pw)).await?;
    if req.enabled {
        state.persistence.enable_tpm_unlock().await?;
        state.set_tpm_error(None);
    } else {
        state.persistence.disable_tpm_unlock().await?;
    }
    tracing::info!(client = %client.ip(), enabled = req.enabled, "TPM auto-unlock changed");
    let tpm_enrolled = state.persistence.read_tpm_enrolled().await?;
    Ok(json(
        StatusCode::OK,
        CryptoStatus { state: state.lock_state(), tpm_enrolled, tpm_last_error: state.tpm_error() },
    ))
}
