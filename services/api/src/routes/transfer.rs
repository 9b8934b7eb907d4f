// SPDX-License-Identifier: Apache-2.0
//! Export download and import upload, both streamed (constant memory in the archive size).

use std::io;
use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio_util::io::{ReaderStream, StreamReader, SyncIoBridge};
use utoipa::ToSchema;

use super::json;
use crate::auth::Auth;
use crate::backend::{ExportKind, ImportInfo, LockState};
use crate::error::{ApiError, ErrorBody};
use crate::state::SharedState;

/// A `piccolo-export` archive (POSIX tar).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Archive(#[allow(dead_code)] Vec<u8>);

/// Read size when streaming the export file.
const CHUNK_BYTES: usize = 256 * 1024;

/// Streams an export archive: `control` (the control volume's ciphertext, restores onto this
/// key set) or `full` (every volume and the sealed key set, restores on new hardware with the
/// password or the recovery key). The persistence layer writes it to `exports/<kind>/` with
/// the volumes quiesced (store-backed requests get 423 meanwhile) and reopens them; the file
/// is then unlinked and streamed from the open descriptor, so nothing accumulates on disk and
/// a client that goes away leaves nothing behind.
#[utoipa::path(get, path = "/api/v1/export/{kind}", tag = "transfer", security(("bearer" = []), ("cookie" = [])),
    params(("kind" = ExportKind, Path, description = "control or full")),
    responses(
        (status = 200, description = "The archive, streamed", body = Archive, content_type = "application/x-tar",
            headers(("Content-Length" = u64, description = "Archive length"))),
        (status = 400, description = "Unknown kind", body = ErrorBody),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 409, description = "Another lock-state transition is running", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "The broker is unreachable or refused a volume operation", body = ErrorBody),
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
    let (path, summary) = state.persistence.export(kind.into()).await?;
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        tracing::error!(error = %e, path = %path.display(), "cannot open the written export");
        ApiError::Internal
    })?;
    if let Err(e) = tokio::fs::remove_file(&path).await {
        tracing::warn!(error = %e, path = %path.display(), "cannot unlink the streamed export");
    }
    tracing::info!(kind = ?kind, bytes = summary.archive_bytes, sha256 = %summary.archive_sha256, "export written; streaming");
    let body = Body::from_stream(ReaderStream::with_capacity(file, CHUNK_BYTES));
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(summary.archive_bytes));
    let name = match kind {
        ExportKind::Control => "attachment; filename=\"piccolo-control.pcv\"",
        ExportKind::Full => "attachment; filename=\"piccolo-full.pcv\"",
    };
    h.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static(name));
    Ok(resp)
}

/// Runs the persistence import on the streamed request body.
async fn import_body(state: &SharedState, body: Body) -> Result<ImportInfo, ApiError> {
    let data = body.into_data_stream().map(|r| r.map_err(io::Error::other));
    // The importer reads synchronously on the blocking pool; the bridge pulls the body.
    let reader = SyncIoBridge::new(StreamReader::new(data));
    let report = state.persistence.import(reader).await?;
    Ok(ImportInfo::new(report, state.lock_state()))
}

/// Imports an archive (streamed). The persistence layer locks first (store closed, every
/// volume unmounted, keys zeroed), then validates all of it (format, paths, sizes, every
/// digest, the overall checksum, the key set) in a staging dir before anything is swapped
/// in. A rejected archive changes no file, but the store stays locked: unlock with the live
/// password. On success every session ends: unlock with the export's password.
#[utoipa::path(post, path = "/api/v1/import", tag = "transfer", security(("bearer" = []), ("cookie" = [])),
    request_body(content = Archive, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Imported; the store is locked", body = ImportInfo),
        (status = 401, description = "Not logged in", body = ErrorBody),
        (status = 403, description = "Missing CSRF token", body = ErrorBody),
        (status = 409, description = "Another lock-state transition is running", body = ErrorBody),
        (status = 422, description = "Archive rejected; no file changed, the store is locked", body = ErrorBody),
        (status = 423, description = "Locked", body = ErrorBody),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "The broker is unreachable or refused a volume operation", body = ErrorBody),
    ))]
pub async fn import(State(state): State<SharedState>, _auth: Auth, body: Body) -> Result<Response, ApiError> {
    let info = import_body(&state, body).await?;
    state.sessions.clear();
    tracing::warn!(kind = ?info.kind, volumes = ?info.volumes, "import done; store locked");
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
        (status = 409, description = "Already initialised, or another transition is running", body = ErrorBody),
        (status = 422, description = "Archive rejected; nothing changed", body = ErrorBody),
        (status = 429, description = "Too many attempts", body = ErrorBody, headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 500, description = "Internal error", body = ErrorBody),
        (status = 503, description = "The broker is unreachable", body = ErrorBody),
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
    if state.lock_state() != LockState::Uninitialised {
        return Err(ApiError::AlreadyInitialised);
    }
    state.limiter.check(client.ip())?;
    if !state.setup.matches(code) {
        state.limiter.failure(client.ip());
        tracing::warn!(client = %client.ip(), "wrong setup code (restore)");
        return Err(ApiError::WrongCredentials("wrong setup code"));
    }
    let info = import_body(&state, body).await?;
    if state.lock_state() != LockState::Uninitialised {
        state.setup.consume();
    }
    tracing::warn!(client = %client.ip(), kind = ?info.kind, "fresh box restored from an export; store locked");
    Ok(json(StatusCode::OK, info))
}
