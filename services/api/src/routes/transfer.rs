// SPDX-License-Identifier: Apache-2.0
//! Export download and import upload, both streamed (constant memory in the archive size).

use std::io;

use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::stream;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};
use utoipa::ToSchema;

use super::{blocking, json};
use crate::auth::Auth;
use crate::backend::{ExportKind, ImportInfo, LockState};
use crate::error::{ApiError, ErrorBody};
use crate::events::Event;
use crate::state::SharedState;

/// A `piccolo-export` archive (POSIX tar).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Archive(#[allow(dead_code)] Vec<u8>);

/// Bytes buffered between the blocking archive writer and the response body.
const PIPE_BYTES: usize = 256 * 1024;

/// Streams an export archive: `control` (ciphertext only, restores onto this key set) or
/// `full` (ciphertext and the sealed key set, restores on new hardware with the password).
#[utoipa::path(get, path = "/api/v1/export/{kind}", tag = "transfer", security(("bearer" = []), ("cookie" = [])),
    params(("kind" = ExportKind, Path, description = "control or full")),
    responses(
        (status = 200, description = "The archive, streamed", body = Archive, content_type = "application/x-tar"),
        (status = 400, description = "Unknown kind", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ))]
pub async fn export(
    State(state): State<SharedState>,
    _auth: Auth,
    Path(kind): Path<String>,
) -> Result<Response, ApiError> {
    let kind = match kind.as_str() {
        "control" => ExportKind::Control,
        "full" => ExportKind::Full,
        _ => return Err(ApiError::BadRequest("kind must be control or full".into())),
    };
    let (reader, writer) = tokio::io::duplex(PIPE_BYTES);
    let mut writer = SyncIoBridge::new(writer);
    let backend = state.backend.clone();
    let task = tokio::task::spawn_blocking(move || {
        let res = backend.export(kind, &mut writer);
        let flushed = io::Write::flush(&mut writer).and_then(|()| writer.shutdown());
        drop(writer);
        res.and_then(|info| flushed.map(|()| info).map_err(|e| crate::backend::BackendError::Internal(Box::new(e))))
    });
    let mut chunks = ReaderStream::new(reader);
    // Answer an error properly if the export fails before its first byte.
    let first = chunks.next().await;
    let first = match first {
        Some(Ok(b)) => b,
        Some(Err(e)) => {
            tracing::error!(error = %e, "export pipe failed");
            return Err(ApiError::Internal);
        }
        None => {
            // The writer finished without a byte: it failed before the archive started.
            task.await.map_err(|_| ApiError::Internal)??;
            tracing::error!("export produced no bytes");
            return Err(ApiError::Internal);
        }
    };
    // After the last chunk, the writer's result: a late failure aborts the body, so the
    // client sees a broken transfer rather than a short archive.
    let tail = stream::once(async move {
        match task.await {
            Ok(Ok(info)) => {
                tracing::info!(bytes = info.archive_bytes, sha256 = %info.archive_sha256, "export streamed");
                None
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "export failed mid-stream");
                Some(Err(io::Error::other("export failed")))
            }
            Err(_) => Some(Err(io::Error::other("export task panicked"))),
        }
    })
    .filter_map(|x| async move { x });
    let body = Body::from_stream(stream::once(async move { Ok::<_, io::Error>(first) }).chain(chunks).chain(tail));
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
    let name = match kind {
        ExportKind::Control => "attachment; filename=\"piccolo-control.pcv\"",
        ExportKind::Full => "attachment; filename=\"piccolo-full.pcv\"",
    };
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(name));
    Ok(resp)
}

/// Imports an archive (streamed). The persistence layer validates all of it (format, paths,
/// sizes, every digest, the overall checksum, the key set) before anything changes; on
/// success the store is locked and every session ends: unlock with the export's password.
#[utoipa::path(post, path = "/api/v1/import", tag = "transfer", security(("bearer" = []), ("cookie" = [])),
    request_body(content = Archive, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Imported; the store is locked", body = ImportInfo),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 422, description = "Archive rejected; nothing changed", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
    ))]
pub async fn import(State(state): State<SharedState>, _auth: Auth, body: Body) -> Result<Response, ApiError> {
    let data = body.into_data_stream().map(|r| r.map_err(io::Error::other));
    let reader = SyncIoBridge::new(StreamReader::new(data));
    let info = blocking(&state, move |b| {
        let mut reader = reader;
        b.import(&mut reader)
    })
    .await?;
    state.sessions.clear();
    tracing::warn!(kind = ?info.kind, volumes = ?info.volumes, "import done; store locked");
    state.publish(Event::lock(state.backend.lock_state()));
    Ok(json(StatusCode::OK, info))
}

/// Restores a fresh box from a `full` export instead of setting it up: needs the first-run
/// setup code in `X-Setup-Code` (same attempt limits as setup). Validated completely before
/// anything changes; afterwards the store is locked: unlock with the export's password.
#[utoipa::path(post, path = "/api/v1/setup/import", tag = "setup",
    params(("X-Setup-Code" = String, Header, description = "The first-run setup code")),
    request_body(content = Archive, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Restored; the store is locked", body = ImportInfo),
        (status = 400, description = "Missing setup code header", body = ErrorBody),
        (status = 401, description = "Wrong setup code", body = ErrorBody),
        (status = 409, description = "Already initialised", body = ErrorBody),
        (status = 422, description = "Archive rejected; nothing changed", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
    ))]
pub async fn setup_import(
    State(state): State<SharedState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let code = headers
        .get("x-setup-code")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("the X-Setup-Code header is required".into()))?;
    if state.backend.lock_state() != LockState::Uninitialised {
        return Err(ApiError::AlreadyInitialised);
    }
    state.limiter.check(client.ip())?;
    if !state.setup.matches(code) {
        state.limiter.failure(client.ip());
        tracing::warn!(client = %client.ip(), "wrong setup code (restore)");
        return Err(ApiError::WrongCredentials("wrong setup code"));
    }
    let data = body.into_data_stream().map(|r| r.map_err(io::Error::other));
    let reader = SyncIoBridge::new(StreamReader::new(data));
    let info = blocking(&state, move |b| {
        let mut reader = reader;
        b.import(&mut reader)
    })
    .await?;
    if state.backend.lock_state() != LockState::Uninitialised {
        state.setup.consume();
    }
    tracing::warn!(client = %client.ip(), kind = ?info.kind, "fresh box restored from an export; store locked");
    state.publish(Event::lock(state.backend.lock_state()));
    Ok(json(StatusCode::OK, info))
}
