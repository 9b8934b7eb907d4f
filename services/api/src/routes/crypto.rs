// SPDX-License-Identifier: Apache-2.0
//! Lock state of the control store: status, unlock, lock, and recovery-key rotation.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::Response;
use piccolo_keyset::RecoveryKey;
use serde::Deserialize;
use utoipa::ToSchema;

use super::auth::{RecoveryKeyResponse, StateResponse};
use super::{ApiJson, checked, json, password};
use crate::auth::Auth;
use crate::backend::LockState;
use crate::error::{ApiError, ErrorBody};
use crate::events::Event;
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

/// The lock state (public: it reveals only whether the box is set up and open).
#[utoipa::path(get, path = "/api/v1/crypto/status", tag = "crypto",
    responses((status = 200, description = "Lock state", body = StateResponse)))]
pub async fn status(State(state): State<SharedState>) -> Response {
    json(StatusCode::OK, StateResponse { state: state.backend.lock_state() })
}

/// Unlocks the control store with the password or the recovery key (no session needed).
/// Already unlocked: answers the state without checking anything.
#[utoipa::path(post, path = "/api/v1/crypto/unlock", tag = "crypto", request_body = UnlockRequest,
    responses(
        (status = 200, description = "Unlocked", body = StateResponse),
        (status = 400, description = "Malformed request (give exactly one credential)", body = ErrorBody),
        (status = 401, description = "Wrong password, wrong or mistyped recovery key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 423, description = "Not set up", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
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
    match state.backend.lock_state() {
        LockState::Uninitialised => return Err(ApiError::SetupRequired),
        LockState::Unlocked => return Ok(json(StatusCode::OK, StateResponse { state: LockState::Unlocked })),
        LockState::Locked => {}
    }
    checked(&state, client, move |b| match cred {
        Cred::Password(pw) => b.unlock_with_password(&pw),
        Cred::Recovery(rk) => b.unlock_with_recovery_key(&rk),
    })
    .await?;
    let st = state.clone();
    super::blocking(&state, move |b| st.sessions.load_key(b)).await?;
    tracing::info!(client = %client.ip(), "control store unlocked");
    state.publish(Event::lock(LockState::Unlocked));
    Ok(json(StatusCode::OK, StateResponse { state: LockState::Unlocked }))
}

/// Locks the control store: the SDEK leaves memory; sessions get 423 until unlock.
#[utoipa::path(post, path = "/api/v1/crypto/lock", tag = "crypto", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Locked", body = StateResponse),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 423, description = "Already locked", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ))]
pub async fn lock(State(state): State<SharedState>, _auth: Auth) -> Result<Response, ApiError> {
    super::blocking(&state, |b| b.lock()).await?;
    tracing::info!("control store locked");
    state.publish(Event::lock(LockState::Locked));
    Ok(json(StatusCode::OK, StateResponse { state: LockState::Locked }))
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
    let key = checked(&state, client, move |b| b.rotate_recovery_key(&pw)).await?;
    tracing::info!(client = %client.ip(), "recovery key rotated");
    Ok(json(
        StatusCode::OK,
        RecoveryKeyResponse { recovery_key: key.expose_secret().to_string(), state: state.backend.lock_state() },
    ))
}
