// SPDX-License-Identifier: Apache-2.0
//! Health, boot state and the event stream.

use std::convert::Infallible;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast::error::RecvError;
use utoipa::{IntoParams, ToSchema};

use super::json;
use crate::auth::Auth;
use crate::backend::LockState;
use crate::boot::BootStateView;
use crate::error::{ApiError, ErrorBody};
use crate::events::Event;
use crate::state::SharedState;

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    /// Always `ok`.
    pub status: String,
}

/// Readiness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// Always `ready` when answered.
    pub status: String,
    /// The control store's lock state.
    pub state: LockState,
}

/// One server-sent event as it travels: `event` names it, `data` is the [`Event`] as JSON.
#[derive(Debug, Serialize, ToSchema)]
pub struct SseMessage {
    /// `lock`, `boot` or `update`.
    #[schema(pattern = "^(lock|boot|update)$")]
    pub event: String,
    /// The Event, JSON-encoded.
    pub data: String,
}

/// Options of the event stream.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// End the stream after this many events (for scripts); default: never.
    #[param(minimum = 1, maximum = 1000000)]
    pub limit: Option<u32>,
}

/// Liveness: the worker answers.
#[utoipa::path(get, path = "/api/v1/health/live", tag = "health",
    responses((status = 200, description = "Alive", body = Live)))]
pub async fn live() -> Response {
    json(StatusCode::OK, Live { status: "ok".into() })
}

/// Readiness: the worker serves requests (locked or not; the state says which).
#[utoipa::path(get, path = "/api/v1/health/ready", tag = "health",
    responses((status = 200, description = "Ready", body = Ready)))]
pub async fn ready(State(state): State<SharedState>) -> Response {
    json(StatusCode::OK, Ready { status: "ready".into(), state: state.lock_state() })
}

/// The A/B boot state, from the broker.
#[utoipa::path(get, path = "/api/v1/boot", tag = "system", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "Boot state", body = BootStateView),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 503, description = "Broker unreachable or refused", body = ErrorBody),
    ))]
pub async fn boot_state(State(state): State<SharedState>, _auth: Auth) -> Result<Response, ApiError> {
    let view = crate::boot::fetch(&state.cfg.broker_socket).await?;
    Ok(json(StatusCode::OK, view))
}

/// Server-sent events: `lock` (lock state; sent first on connect), `boot` (boot state
/// changes, polled from the broker) and `update` (the update worker's status on every change:
/// phase, version, `bytes_done`/`bytes_total` while downloading, message). The stream ends after the event that ends the session (import, password change
/// or reset), or after `limit` events.
#[utoipa::path(get, path = "/api/v1/events", tag = "system", security(("bearer" = []), ("cookie" = [])),
    responses(
        (status = 200, description = "An event stream; each `data:` is one Event as JSON", body = SseMessage, content_type = "text/event-stream"),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
    ))]
pub async fn events(
    State(state): State<SharedState>,
    auth: Auth,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = match query.limit {
        Some(0) | Some(1_000_001..) => return Err(ApiError::BadRequest("limit must be 1 to 1000000".into())),
        Some(n) => Some(n),
        None => None,
    };
    let rx = state.events.subscribe();
    let first = Event::lock(state.lock_state());
    let s = stream::unfold(
        (Some(first), rx, false, state, auth.session, limit),
        |(pending, mut rx, done, st, sid, left)| async move {
            if done || left == Some(0) {
                return None;
            }
            let left = left.map(|n| n - 1);
            let ev = match pending {
                Some(ev) => ev,
                None => loop {
                    match rx.recv().await {
                        Ok(ev) => break ev,
                        Err(RecvError::Lagged(_)) => continue,
                        Err(RecvError::Closed) => return None,
                    }
                },
            };
            let done = !st.sessions.is_live(&sid);
            let sse = SseEvent::default().event(ev.name()).json_data(&ev).unwrap_or_default();
            Some((Ok::<_, Infallible>(sse), (None, rx, done, st, sid, left)))
        },
    );
    Ok(Sse::new(s).keep_alive(KeepAlive::default()).into_response())
}
