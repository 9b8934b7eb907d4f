// SPDX-License-Identifier: Apache-2.0
//! The router: every endpoint under `/api/v1`, its OpenAPI description (generated from the
//! handlers' `#[utoipa::path]` attributes), the JSON extractor with our error shape, and the
//! 404/405 fallbacks.

mod auth;
mod crypto;
mod system;
mod transfer;
mod updates;

use std::net::{IpAddr, SocketAddr};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, OptionalFromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::backend::Persistence;
use crate::error::ApiError;
use crate::state::SharedState;

/// The document's fixed parts; paths and schemas come from the handlers.
#[derive(OpenApi)]
#[openapi(
    info(title = "piccolo API", description = "The HTTP API of the piccolo control plane. Every error is `{\"error\": {\"code\", \"message\"}}`."),
    modifiers(&SecurityAddon),
    components(schemas(crate::events::Event)),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "setup", description = "First-run setup"),
        (name = "auth", description = "Login, sessions, password"),
        (name = "crypto", description = "Lock state of the control store"),
        (name = "transfer", description = "Export and import"),
        (name = "system", description = "Boot state and events"),
        (name = "updates", description = "Updates through the update worker (admin; not gated on the lock state, so never 423)"),
    )
)]
struct ApiDoc;

struct SecurityAddon;

impl Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
        components.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::with_description(
                crate::auth::SESSION_COOKIE,
                "Session cookie; unsafe methods also need the X-CSRF-Token header",
            ))),
        );
    }
}

/// The router with state applied, and the OpenAPI document it serves.
pub fn router(state: SharedState) -> (axum::Router, utoipa::openapi::OpenApi) {
    let max_json = state.cfg.max_json_bytes;
    let (router, openapi) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(system::live))
        .routes(routes!(system::ready))
        .routes(routes!(auth::setup))
        .routes(routes!(auth::login))
        .routes(routes!(auth::logout))
        .routes(routes!(auth::session))
        .routes(routes!(auth::change_password))
        .routes(routes!(auth::reset_password))
        .routes(routes!(crypto::status))
        .routes(routes!(crypto::unlock))
        .routes(routes!(crypto::lock))
        .routes(routes!(crypto::recovery_key))
        .routes(routes!(crypto::tpm))
        .routes(routes!(transfer::export))
        .routes(routes!(transfer::import))
        .routes(routes!(transfer::setup_import))
        .routes(routes!(system::boot_state))
        .routes(routes!(system::events))
        .routes(routes!(updates::status))
        .routes(routes!(updates::check))
        .routes(routes!(updates::apply))
        .routes(routes!(updates::cancel))
        .routes(routes!(updates::rollback))
        .routes(routes!(updates::set_window))
        .split_for_parts();
    let doc = openapi.clone();
    let router = router
        .route("/api/v1/openapi.json", axum::routing::get(move || async move { Json(doc) }))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(max_json))
        .with_state(state);
    (router, openapi)
}

/// `Json<T>` whose rejections use our error shape (400, or 413 over the body limit).
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<ApiJson<T>, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge),
            Err(r) => Err(ApiError::BadRequest(r.body_text())),
        }
    }
}

/// An optional JSON body: none without a `Content-Type` header, else as [`ApiJson`].
impl<S, T> OptionalFromRequest<S> for ApiJson<T>
where
    Json<T>: OptionalFromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<ApiJson<T>>, ApiError> {
        match <Json<T> as OptionalFromRequest<S>>::from_request(req, state).await {
            Ok(v) => Ok(v.map(|Json(v)| ApiJson(v))),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::PayloadTooLarge),
            Err(r) => Err(ApiError::BadRequest(r.body_text())),
        }
    }
}

/// A JSON success response with a status.
pub(crate) fn json<T: serde::Serialize>(status: StatusCode, body: T) -> Response {
    (status, Json(body)).into_response()
}

/// Whether a persistence error is a wrong credential (counted by the attempt limits).
fn wrong_credential(e: &piccolo_persistence::Error) -> bool {
    matches!(
        e,
        piccolo_persistence::Error::Keyset(
            piccolo_keyset::Error::WrongPassword | piccolo_keyset::Error::WrongRecoveryKey
        )
    )
}

/// A credential check under the attempt limits: refused with 429 during a back-off (before
/// the credential is looked at), at most a few Argon2id derivations at once, counted as a
/// failure when the credential is wrong and cleared on success.
pub(crate) async fn checked<T>(
    state: &SharedState,
    client: SocketAddr,
    call: impl Future<Output = Result<T, piccolo_persistence::Error>>,
) -> Result<T, ApiError> {
    let ip: IpAddr = client.ip();
    state.limiter.check(ip)?;
    let _permit = state.limiter.kdf_permit()?;
    let res = call.await;
    match &res {
        Err(e) if wrong_credential(e) => {
            tracing::warn!(client = %ip, "failed credential check");
            state.limiter.failure(ip);
        }
        Ok(_) => state.limiter.success(ip),
        Err(_) => {}
    }
    res.map_err(ApiError::from)
}

/// Checks the admin password against the key set without changing the lock state (login,
/// and re-entering the password for a sensitive operation). Argon2id on the blocking pool.
pub(crate) async fn verify_password(
    p: &Persistence,
    password: piccolo_keyset::Password,
) -> Result<(), piccolo_persistence::Error> {
    let dir = p.state_dir().to_path_buf();
    let res = tokio::task::spawn_blocking(move || {
        piccolo_keyset::Keyset::read(&dir)?.unlock_with_password(&password).map(drop)
    })
    .await
    .map_err(|source| piccolo_persistence::Error::Task { source })?;
    Ok(res?)
}

/// Checks a submitted password against the schema's bounds (characters, like JSON Schema).
pub(crate) fn password(field: &str, value: String, min_chars: usize) -> Result<piccolo_keyset::Password, ApiError> {
    let n = value.chars().count();
    if n < min_chars || n > MAX_PASSWORD_CHARS {
        return Err(ApiError::BadRequest(format!("{field} must be {min_chars} to {MAX_PASSWORD_CHARS} characters")));
    }
    piccolo_keyset::Password::new(value).map_err(|e| ApiError::BadRequest(format!("{field}: {e}")))
}

/// Longest password accepted, in characters (4 bytes each at most: within the key set's
/// 1024-byte bound).
pub(crate) const MAX_PASSWORD_CHARS: usize = 256;
