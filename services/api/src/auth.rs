// SPDX-License-Identifier: Apache-2.0
//! Sessions, bearer tokens, CSRF, and the [`Auth`] extractor every protected handler takes.
//!
//! A login creates one server-side session and hands it out twice: as the `piccolo_session`
//! cookie (HttpOnly, SameSite=Strict, Secure when configured for TLS) for browsers, whose
//! unsafe requests must also carry the session's CSRF token in `X-CSRF-Token`; and as a
//! bearer JWT (HS256, `sid` claim) for API clients. A JWT is only accepted while its session
//! exists, so logout and a password change revoke it at once; the signing key lives in the
//! control store and is replaced on password change and reset (defence in depth).
//!
//! Sessions are held in memory only (bounded; oldest evicted), with session ids stored as
//! SHA-256 hashes. A worker restart, an import, a password change and a reset end every
//! session; a lock does not: while locked a valid session gets 423 until the store is
//! unlocked again (the signing key stays in memory for that; the SDEK does not).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::backend::{BackendError, LockState, Persistence};
use crate::error::ApiError;
use crate::state::SharedState;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "piccolo_session";
/// Header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Control-store key of the JWT signing key.
const JWT_KEY: &str = "api.jwt_signing_key";
const ISSUER: &str = "piccolo-api";
/// Most sessions held at once.
const MAX_SESSIONS: usize = 256;

/// How the request authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthVia {
    /// Session cookie (+ CSRF token on unsafe methods).
    Cookie,
    /// `Authorization: Bearer <jwt>`.
    Bearer,
}

#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    created: u64,
    expires: u64,
}

/// A freshly issued session, as handed to the client once.
pub struct Issued {
    /// Cookie value (the session id).
    pub session_id: Zeroizing<String>,
    /// CSRF token for cookie-authenticated unsafe requests.
    pub csrf_token: String,
    /// Bearer JWT for API clients.
    pub token: String,
    /// Unix seconds.
    pub expires_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    sid: String,
    iat: u64,
    exp: u64,
}

/// The session table and the signing key.
pub struct Sessions {
    ttl: Duration,
    table: Mutex<HashMap<[u8; 32], Session>>,
    key: RwLock<Option<Zeroizing<Vec<u8>>>>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_token(bytes: usize) -> Result<String, ApiError> {
    let mut b = Zeroizing::new(vec![0u8; bytes]);
    getrandom::fill(&mut b).map_err(|e| {
        tracing::error!(error = %e, "OS random number generator failed");
        ApiError::Internal
    })?;
    Ok(URL_SAFE_NO_PAD.encode(&b[..]))
}

fn hash_sid(sid: &str) -> [u8; 32] {
    Sha256::new().chain_update(b"piccolo-api sid\0").chain_update(sid.as_bytes()).finalize().into()
}

/// Constant-time equality of two byte strings (length is not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Sessions {
    /// An empty table; sessions live `ttl`.
    pub fn new(ttl: Duration) -> Sessions {
        Sessions { ttl, table: Mutex::new(HashMap::new()), key: RwLock::new(None) }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // Entries are inserted/removed whole: a poisoned lock holds a consistent map.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads the signing key from the store, creating one if absent. Call after unlock/setup.
    pub fn load_key(&self, backend: &dyn Persistence) -> Result<(), BackendError> {
        let key = match backend.store_get(JWT_KEY)? {
            Some(k) if k.len() >= 32 => Zeroizing::new(k),
            _ => return self.rotate_key(backend),
        };
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
        Ok(())
    }

    /// Replaces the signing key in the store and in memory (every JWT signed before dies).
    pub fn rotate_key(&self, backend: &dyn Persistence) -> Result<(), BackendError> {
        let mut k = Zeroizing::new(vec![0u8; 32]);
        getrandom::fill(&mut k).map_err(|e| BackendError::Internal(Box::new(std::io::Error::other(e.to_string()))))?;
        backend.store_put(JWT_KEY, &k)?;
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = Some(k);
        Ok(())
    }

    /// Ends every session and forgets the key (on import and reset).
    pub fn clear(&self) {
        self.table().clear();
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Ends every session except `keep`.
    pub fn revoke_all_except(&self, keep: Option<[u8; 32]>) {
        self.table().retain(|k, _| Some(*k) == keep);
    }

    /// Ends session `sid`.
    pub fn revoke(&self, sid: [u8; 32]) {
        self.table().remove(&sid);
    }

    /// Whether session `sid` (hashed) still exists.
    pub fn is_live(&self, sid: &[u8; 32]) -> bool {
        self.table().contains_key(sid)
    }

    /// Number of live sessions.
    pub fn count(&self) -> usize {
        self.table().len()
    }

    /// Creates a session and its bearer token.
    pub fn issue(&self) -> Result<Issued, ApiError> {
        let key_guard = self.key.read().unwrap_or_else(PoisonError::into_inner);
        let key = key_guard.as_ref().ok_or(ApiError::Locked)?;
        let sid = Zeroizing::new(random_token(32)?);
        let csrf = random_token(24)?;
        let now = now_unix();
        let expires = now + self.ttl.as_secs();
        let claims = Claims { iss: ISSUER.into(), sub: "admin".into(), sid: sid.to_string(), iat: now, exp: expires };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key))
            .map_err(|e| {
                tracing::error!(error = %e, "signing a session token failed");
                ApiError::Internal
            })?;
        let mut table = self.table();
        table.retain(|_, s| s.expires > now);
        while table.len() >= MAX_SESSIONS {
            let Some(oldest) = table.iter().min_by_key(|(_, s)| s.created).map(|(k, _)| *k) else { break };
            table.remove(&oldest);
        }
        table.insert(hash_sid(&sid), Session { csrf: csrf.clone(), created: now, expires });
        Ok(Issued { session_id: sid, csrf_token: csrf, token, expires_at: expires })
    }

    fn sid_from_jwt(&self, token: &str) -> Option<String> {
        let guard = self.key.read().unwrap_or_else(PoisonError::into_inner);
        let key = guard.as_ref()?;
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&[ISSUER]);
        v.leeway = 0;
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(key), &v).ok().map(|d| d.claims.sid)
    }

    fn lookup(&self, sid: &str) -> Option<([u8; 32], Session)> {
        let h = hash_sid(sid);
        let now = now_unix();
        let mut table = self.table();
        match table.get(&h) {
            Some(s) if s.expires > now => Some((h, s.clone())),
            Some(_) => {
                table.remove(&h);
                None
            }
            None => None,
        }
    }
}

/// The `Set-Cookie` value for a new session.
pub fn session_cookie(issued: &Issued, secure: bool, ttl: Duration) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!(
        "{SESSION_COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        issued.session_id.as_str(),
        ttl.as_secs()
    )
}

/// The `Set-Cookie` value that deletes the session cookie.
pub fn clear_cookie(secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}")
}

/// An authenticated request: the store is unlocked and the session is live.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The session (hashed id).
    pub session: [u8; 32],
    /// How it authenticated.
    pub via: AuthVia,
    /// The session's CSRF token (cookie sessions need it; returned by session info).
    pub csrf_token: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds.
    pub expires_at: u64,
}

fn cookie_value<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts.headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
    })
}

/// 423 unless the store is unlocked (the first check of every store-backed endpoint).
pub fn require_unlocked(backend: &dyn Persistence) -> Result<(), ApiError> {
    match backend.lock_state() {
        LockState::Unlocked => Ok(()),
        LockState::Locked => Err(ApiError::Locked),
        LockState::Uninitialised => Err(ApiError::SetupRequired),
    }
}

impl FromRequestParts<SharedState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Auth, ApiError> {
        // Order: a missing or invalid credential is 401 whatever the state; a bad CSRF token
        // 403; a valid session while the store is locked 423 (sessions survive a lock, so the
        // client unlocks and carries on).
        let auth = authenticate(parts, state)?;
        require_unlocked(state.backend.as_ref())?;
        Ok(auth)
    }
}

/// An admin request to an endpoint that does not need the control store (updates): the same
/// credential (401) and CSRF (403) checks as [`Auth`], but no 423 while locked.
#[derive(Debug, Clone)]
pub struct AuthAnyLock(pub Auth);

impl FromRequestParts<SharedState> for AuthAnyLock {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<AuthAnyLock, ApiError> {
        authenticate(parts, state).map(AuthAnyLock)
    }
}

/// The credential and CSRF checks shared by [`Auth`] and [`AuthAnyLock`].
fn authenticate(parts: &Parts, state: &SharedState) -> Result<Auth, ApiError> {
    let sessions = &state.sessions;
    let bearer = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").map(str::trim));
    let (via, sid) = if let Some(token) = bearer {
        (AuthVia::Bearer, sessions.sid_from_jwt(token).ok_or(ApiError::Unauthenticated)?)
    } else if let Some(sid) = cookie_value(parts, SESSION_COOKIE) {
        (AuthVia::Cookie, sid.to_string())
    } else {
        return Err(ApiError::Unauthenticated);
    };
    let (hash, session) = sessions.lookup(&sid).ok_or(ApiError::Unauthenticated)?;
    let safe = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    if via == AuthVia::Cookie && !safe {
        let given = parts.headers.get(CSRF_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
        if !ct_eq(given, session.csrf.as_bytes()) {
            return Err(ApiError::Csrf);
        }
    }
    Ok(Auth { session: hash, via, csrf_token: session.csrf, created_at: session.created, expires_at: session.expires })
}
