// SPDX-License-Identifier: Apache-2.0
//! Updates, through the update worker's control socket: status, check now, apply now, cancel,
//! rollback, maintenance window.
//!
//! Admin only (401 without a session, 403 for a cookie session without its CSRF token), but
//! not gated on the lock state: nothing here touches the control store, and an update or a
//! rollback must stay possible on a box whose store is locked.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{ApiJson, json};
use crate::auth::AuthAnyLock;
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;
use crate::updates::{UpdateStatus, UpdateWindow, Updater};

/// Options of check and apply (the body may be left out).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UpdateJobRequest {
    /// Also retry a version that failed or was cancelled before (default false).
    pub force: bool,
}

fn updater(state: &SharedState) -> Updater {
    Updater::new(&state.cfg.updater_socket)
}

/// No body, a JSON `null` (the document allows both) or `{"force": ...}`.
type JobBody = Option<ApiJson<Option<UpdateJobRequest>>>;

fn force(body: JobBody) -> bool {
    body.and_then(|ApiJson(b)| b).is_some_and(|b| b.force)
}

/// The update worker's status: phase, version, download progress, message, running version,
/// window, last/next check and the record of attempts. Not gated on the lock state.
#[utoipa::path(get, path = "/api/v1/updates", operation_id = "updates_status", tag = "updates", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Update status", body = UpdateStatus),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 502, description = "The update worker failed the request", body = ErrorBody),
        (status = 503, description = "The update worker is unreachable or refused this worker", body = ErrorBody),
    ))]
pub async fn status(State(state): State<SharedState>, _auth: AuthAnyLock) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, updater(&state).status().await?))
}

/// Checks the update server now. Answers once the check has a result; an update found is
/// downloaded, written and activated in the background (follow it on `GET /api/v1/events`),
/// then waits for the maintenance window. Not gated on the lock state.
#[utoipa::path(post, path = "/api/v1/updates/check", operation_id = "updates_check", tag = "updates", security(("bearer" = []), ("cookie" = [])),
    request_body(content = Option<UpdateJobRequest>, description = "Optional; without a body `force` is false"),
    responses(
        (status = 200, description = "The status after the check", body = UpdateStatus),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie session without its CSRF token", body = ErrorBody),
        (status = 409, description = "`busy`: another update job runs; `conflict`: the job was cancelled meanwhile", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 502, description = "`update_failed`: the check failed (update server unreachable, manifest rejected, ...)", body = ErrorBody),
        (status = 503, description = "The update worker is unreachable or refused this worker", body = ErrorBody),
    ))]
pub async fn check(State(state): State<SharedState>, _auth: AuthAnyLock, body: JobBody) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, updater(&state).check(force(body)).await?))
}

/// Installs now and reboots as soon as the update is staged, outside the window (reboots at
/// once when an update is staged already). Not gated on the lock state.
#[utoipa::path(post, path = "/api/v1/updates/apply", operation_id = "updates_apply", tag = "updates", security(("bearer" = []), ("cookie" = [])),
    request_body(content = Option<UpdateJobRequest>, description = "Optional; without a body `force` is false"),
    responses(
        (status = 200, description = "The status once the command was taken", body = UpdateStatus),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie session without its CSRF token", body = ErrorBody),
        (status = 409, description = "`busy`: another update job runs (or the updater is still recovering)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 502, description = "`update_failed`: the update worker failed the command", body = ErrorBody),
        (status = 503, description = "The update worker is unreachable or refused this worker", body = ErrorBody),
    ))]
pub async fn apply(State(state): State<SharedState>, _auth: AuthAnyLock, body: JobBody) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, updater(&state).apply(force(body)).await?))
}

/// Stops a download, or un-stages an activated update (the inactive slot becomes unbootable).
/// The version is recorded `cancelled` and not retried automatically. Not gated on the lock
/// state.
#[utoipa::path(post, path = "/api/v1/updates/cancel", operation_id = "updates_cancel", tag = "updates", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "The status after cancelling", body = UpdateStatus),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie session without its CSRF token", body = ErrorBody),
        (status = 409, description = "`conflict`: nothing to cancel; `busy`: a job holds the engine", body = ErrorBody),
        (status = 502, description = "`update_failed`: the broker refused or failed the un-staging", body = ErrorBody),
        (status = 503, description = "The update worker is unreachable or refused this worker", body = ErrorBody),
    ))]
pub async fn cancel(State(state): State<SharedState>, _auth: AuthAnyLock) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, updater(&state).cancel().await?))
}

/// Makes the other slot boot next and reboots. The broker refuses unless that slot would boot.
/// Not gated on the lock state.
#[utoipa::path(post, path = "/api/v1/updates/rollback", operation_id = "updates_rollback", tag = "updates", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Rollback set; a reboot was requested", body = UpdateStatus),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie session without its CSRF token", body = ErrorBody),
        (status = 409, description = "`conflict`: the other slot would not boot; `busy`: a job runs", body = ErrorBody),
        (status = 502, description = "`update_failed`: the broker failed the rollback or the reboot", body = ErrorBody),
        (status = 503, description = "The update worker is unreachable or refused this worker", body = ErrorBody),
    ))]
pub async fn rollback(State(state): State<SharedState>, _auth: AuthAnyLock) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, updater(&state).rollback().await?))
}

/// Replaces the maintenance window (`HH:MM` UTC, may wrap midnight; equal times mean any
/// time). Kept by the update worker across restarts. Not gated on the lock state.
#[utoipa::path(put, path = "/api/v1/updates/window", operation_id = "updates_set_window", tag = "updates", security(("bearer" = []), ("cookie" = [])),
    request_body = UpdateWindow,
    responses(
        (status = 200, description = "The status with the new window", body = UpdateStatus),
        (status = 400, description = "Malformed body or a time that is not HH:MM", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Cookie session without its CSRF token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 502, description = "`update_failed`: the window could not be stored", body = ErrorBody),
        (status = 503, description = "The update worker is unreachable or refused this worker", body = ErrorBody),
    ))]
pub async fn set_window(
    State(state): State<SharedState>,
    _auth: AuthAnyLock,
    ApiJson(window): ApiJson<UpdateWindow>,
) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, updater(&state).set_window(window).await?))
}
