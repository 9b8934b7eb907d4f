// SPDX-License-Identifier: Apache-2.0
//! First-run setup, login, logout, session info, password change and reset.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use piccolo_keyset::MIN_NEW_PASSWORD_CHARS;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiJson, checked, json, password, verify_password};
use crate::auth::{Auth, AuthVia, Issued, clear_cookie, session_cookie};
use crate::backend::LockState;
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// First-run setup.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupRequest {
    /// The one-time code from the journal or `<runtime dir>/setup-code`.
    #[schema(min_length = 1, max_length = 64)]
    pub setup_code: String,
    /// The admin password to set.
    #[schema(min_length = 8, max_length = 256)]
    pub password: String,
}

/// The recovery key, shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct RecoveryKeyResponse {
    /// Write it down: it is shown only now and resets the password or unlocks the store.
    pub recovery_key: String,
    /// Lock state afterwards.
    pub state: LockState,
}

/// Login with the admin password.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    /// The admin password.
    #[schema(min_length = 1, max_length = 256)]
    pub password: String,
}

/// A new session.
#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// Bearer JWT for API clients (`Authorization: Bearer ...`).
    pub token: String,
    /// Send as `X-CSRF-Token` on unsafe requests authenticated by the cookie.
    pub csrf_token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

/// The current session.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionInfo {
    /// How this request authenticated.
    pub via: AuthVia,
    /// The session's CSRF token.
    pub csrf_token: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Password change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    /// The current admin password.
    #[schema(min_length = 1, max_length = 256)]
    pub current_password: String,
    /// The new admin password.
    #[schema(min_length = 8, max_length = 256)]
    pub new_password: String,
}

/// Password reset with the recovery key.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPasswordRequest {
    /// The recovery key (dashes, spaces and case are forgiven).
    #[schema(min_length = 1, max_length = 128)]
    pub recovery_key: String,
    /// The new admin password.
    #[schema(min_length = 8, max_length = 256)]
    pub new_password: String,
}

/// Lock state after an operation.
#[derive(Debug, Serialize, ToSchema)]
pub struct StateResponse {
    /// The control store's lock state.
    pub state: LockState,
}

fn with_session(state: &SharedState, issued: Issued, status: StatusCode) -> Response {
    let cookie = session_cookie(&issued, state.cfg.secure_cookies, state.cfg.session_ttl);
    let body = LoginResponse { token: issued.token, csrf_token: issued.csrf_token, expires_at: issued.expires_at };
    let mut resp = json(status, body);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// Whether a string is within a schema's character bounds.
fn bounded(field: &str, v: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let n = v.chars().count();
    if n < min || n > max {
        return Err(ApiError::BadRequest(format!("{field} must be {min} to {max} characters")));
    }
    Ok(())
}

/// First-run setup: sets the admin password, creates the key set, returns the recovery key.
#[utoipa::path(post, path = "/api/v1/setup", tag = "setup", request_body = SetupRequest,
    responses(
        (status = 201, description = "Key set created and unlocked; log in next", body = RecoveryKeyResponse),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Wrong setup code", body = ErrorBody),
        (status = 409, description = "Already initialised, or another transition is running", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "The broker is unreachable or refused a volume operation; still locked", body = ErrorBody),
    ))]
pub async fn setup(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<SetupRequest>,
) -> Result<Response, ApiError> {
    bounded("setup_code", &req.setup_code, 1, 64)?;
    let pw = password("password", req.password, MIN_NEW_PASSWORD_CHARS)?;
    if state.lock_state() != LockState::Uninitialised {
        return Err(ApiError::AlreadyInitialised);
    }
    state.limiter.check(client.ip())?;
    if !state.setup.matches(&req.setup_code) {
        state.limiter.failure(client.ip());
        tracing::warn!(client = %client.ip(), "wrong setup code");
        return Err(ApiError::WrongCredentials("wrong setup code"));
    }
    // Key set, bootstrap and control volumes through the broker, then the store.
    let recovery = checked(&state, client, state.persistence.setup(pw)).await?;
    state.setup.consume();
    state.sessions.load_key(&state.persistence.store()).await?;
    tracing::info!(client = %client.ip(), "first-run setup done");
    let body = RecoveryKeyResponse { recovery_key: recovery.expose_secret().to_string(), state: state.lock_state() };
    Ok(json(StatusCode::CREATED, body))
}

/// Logs in with the admin password: sets the session cookie and returns a bearer token.
#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in", body = LoginResponse,
            headers(("Set-Cookie" = String, description = "piccolo_session; HttpOnly; SameSite=Strict"))),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Wrong password", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 423, description = "Locked or not set up", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    crate::auth::require_unlocked(&state.persistence)?;
    let pw = password("password", req.password, 1)?;
    checked(&state, client, verify_password(&state.persistence, pw)).await?;
    let issued = state.sessions.issue()?;
    tracing::info!(client = %client.ip(), "login");
    Ok(with_session(&state, issued, StatusCode::OK))
}

/// Ends the current session (cookie and bearer token alike).
#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 204, description = "Logged out"),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
    ))]
pub async fn logout(State(state): State<SharedState>, auth: Auth) -> Response {
    state.sessions.revoke(auth.session);
    let mut resp = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&clear_cookie(state.cfg.secure_cookies)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// The current session.
#[utoipa::path(get, path = "/api/v1/auth/session", tag = "auth", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "The session", body = SessionInfo),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
    ))]
pub async fn session(auth: Auth) -> Response {
    let body = SessionInfo {
        via: auth.via,
        csrf_token: auth.csrf_token,
        created_at: auth.created_at,
        expires_at: auth.expires_at,
    };
    json(StatusCode::OK, body)
}

/// Changes the admin password (one atomic key-set rewrap). Every session ends, the token
/// signing key is replaced, and the caller gets a fresh session.
#[utoipa::path(post, path = "/api/v1/auth/password", tag = "auth", request_body = ChangePasswordRequest,
    security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Changed; a new session for the caller", body = LoginResponse,
            headers(("Set-Cookie" = String, description = "The new session cookie"))),
        (status = 400, description = "Malformed request or weak password", body = ErrorBody),
        (status = 401, description = "Not logged in or wrong current password", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "Follower node (code not_leader): the store is read-only", body = ErrorBody),
    ))]
pub async fn change_password(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    _auth: Auth,
    ApiJson(req): ApiJson<ChangePasswordRequest>,
) -> Result<Response, ApiError> {
    let current = password("current_password", req.current_password, 1)?;
    let new = password("new_password", req.new_password, MIN_NEW_PASSWORD_CHARS)?;
    checked(&state, client, state.persistence.change_password(current, new)).await?;
    // The key set now opens only with the new password; end every session at once and
    // replace the token key in the control store.
    state.sessions.revoke_all_except(None);
    state.sessions.rotate_key(&state.persistence.store()).await?;
    tracing::info!(client = %client.ip(), "admin password changed; all sessions revoked");
    let issued = state.sessions.issue()?;
    Ok(with_session(&state, issued, StatusCode::OK))
}

/// Sets a new password with the recovery key (no session needed). Every session ends; the
/// store is unlocked afterwards.
#[utoipa::path(post, path = "/api/v1/auth/reset", tag = "auth", request_body = ResetPasswordRequest,
    responses(
        (status = 200, description = "Password reset; log in with the new password", body = StateResponse),
        (status = 400, description = "Malformed request or weak password", body = ErrorBody),
        (status = 401, description = "Wrong or mistyped recovery key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 409, description = "Another lock-state transition is running", body = ErrorBody),
        (status = 423, description = "Not set up", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "The broker is unreachable or refused a volume operation", body = ErrorBody),
    ))]
pub async fn reset_password(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<ResetPasswordRequest>,
) -> Result<Response, ApiError> {
    if state.lock_state() == LockState::Uninitialised {
        return Err(ApiError::SetupRequired);
    }
    bounded("recovery_key", &req.recovery_key, 1, 128)?;
    let new = password("new_password", req.new_password, MIN_NEW_PASSWORD_CHARS)?;
    state.limiter.check(client.ip())?;
    // A typo is reported as such before it counts as a failed attempt.
    piccolo_keyset::RecoveryKey::parse(&req.recovery_key).map_err(|e| ApiError::MistypedRecoveryKey(e.to_string()))?;
    let typed = req.recovery_key;
    checked(&state, client, state.persistence.reset_password(typed.clone(), new)).await?;
    state.sessions.revoke_all_except(None);
    // Locked: the recovery key (checked just now; SHA-256, no Argon2id) also unlocks, so the
    // admin can log in with the new password straight away.
    if state.persistence.state() == piccolo_persistence::LockState::Locked {
        state.persistence.unlock_with_recovery_key(typed).await?;
    }
    state.sessions.rotate_key(&state.persistence.store()).await?;
    tracing::warn!(client = %client.ip(), "admin password reset with the recovery key; all sessions revoked");
    Ok(json(StatusCode::OK, StateResponse { state: state.lock_state() }))
}
