// SPDX-License-Identifier: Apache-2.0
//! Sessions, bearer tokens, CSRF, and the [`Auth`] extractor every protected handler takes.
//!
//! A login creates one server-side session and hands it out twice: as the `piccolo_session`
//! cookie (HttpOnly, SameSite=Strict, Secure when configured for TLS) for browsers, whose
//! unsafe requests must also carry the session's CSRF token in `X-CSRF-Token`; and as a
//! bearer JWT (HS256, `kid` header, `sid` claim) for API clients. A JWT is only accepted
//! while its session exists, so logout and a password change revoke it at once.
//!
//! The signing key lives in the control store (`auth_signing_keys`, inside the encrypted
//! control volume) and is rotated on password change and reset: a new key is written, the
//! old ones are marked retired, every session ends. A copy stays in memory while locked, so
//! a valid session gets 423 (not 401) until the store is unlocked again.
//!
//! Sessions are held in memory only (bounded; oldest evicted; ids hashed), not in the
//! store's sessions table: see ARCHITECTURE.md ("Sessions do not persist") for why. A worker
//! restart, an import, a password change and a reset end every session; a lock does not.

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

use crate::backend::{LockState, Persistence};
use crate::error::ApiError;
use crate::state::SharedState;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "piccolo_session";
/// Header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// Algorithm name recorded with the signing keys in the control store.
const JWT_ALG: &str = "HS256";
/// Actor recorded in the control store's revision journal.
const ACTOR: &str = "piccolo-api";
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
    key: RwLock<Option<TokenKey>>,
}

/// The signing key in use: its store id (`kid`) and secret.
struct TokenKey {
    id: String,
    secret: Zeroizing<Vec<u8>>,
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn random_bytes(n: usize) -> Result<Vec<u8>, ApiError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(|e| {
        tracing::error!(error = %e, "OS random number generator failed");
        ApiError::Internal
    })?;
    Ok(b)
}

fn random_token(bytes: usize) -> Result<String, ApiError> {
    let b = Zeroizing::new(random_bytes(bytes)?);
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

    /// Loads the newest active signing key from the control store, creating one if there is
    /// none (first unlock, or a store without one). Call after every unlock and setup.
    pub async fn load_key(&self, store: &piccolo_store::Store) -> Result<(), ApiError> {
        let keys = store.read_signing_keys().await?;
        let active =
            keys.into_iter().rev().find(|k| k.retired.is_none() && k.algorithm == JWT_ALG && k.secret.len() >= 32);
        match active {
            Some(k) => {
                self.set_key(TokenKey { id: k.key_id, secret: k.secret });
                Ok(())
            }
            None => self.rotate_key(store).await,
        }
    }

    /// Writes a new signing key to the control store, retires every older one and uses it:
    /// every JWT signed before stops verifying (on password change and reset). In the same
    /// transaction, keys retired more than one session lifetime ago are deleted: a token
    /// lives at most `ttl`, so they cannot verify a live one, and without this every
    /// password change would leave one more secret behind for good.
    pub async fn rotate_key(&self, store: &piccolo_store::Store) -> Result<(), ApiError> {
        let secret = Zeroizing::new(random_bytes(32)?);
        let id = hex::encode(random_bytes(8)?);
        let done = store.write_signing_key_rotated(ACTOR, &id, JWT_ALG, secret.clone(), self.ttl).await?;
        if !done.pruned.is_empty() {
            tracing::info!(pruned = done.pruned.len(), "deleted signing keys retired over a session lifetime ago");
        }
        self.set_key(TokenKey { id, secret });
        Ok(())
    }

    fn set_key(&self, key: TokenKey) {
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
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
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.id.clone());
        let token = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&key.secret)).map_err(|e| {
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
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(&key.secret), &v).ok().map(|d| d.claims.sid)
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

/// 423 unless the store is unlocked (the first check of every store-backed endpoint):
/// `setup_required` before setup, `locked` in every other state (locked, or a transition).
pub fn require_unlocked(p: &Persistence) -> Result<(), ApiError> {
    match crate::backend::lock_state(p) {
        LockState::Unlocked => Ok(()),
        LockState::Uninitialised => Err(ApiError::SetupRequired),
        _ => Err(ApiError::Locked),
    }
}

impl FromRequestParts<SharedState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Auth, ApiError> {
        // Order: a missing or invalid credential is 401 whatever the state; a bad CSRF token
        // 403; a valid session while the store is locked 423 (sessions survive a lock, so the
        // client unlocks and carries on).
        let auth = authenticate(parts, state)?;
        require_unlocked(&state.persistence)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn store() -> (tempfile::TempDir, piccolo_store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = piccolo_store::Store::locked();
        store.open(&dir.path().join("control.db"), piccolo_store::Role::Leader).await.unwrap();
        (dir, store)
    }

    fn ids(keys: &[piccolo_store::SigningKey]) -> Vec<(String, bool)> {
        keys.iter().map(|k| (k.key_id.clone(), k.retired.is_some())).collect()
    }

    /// Password changes rotate the key: the old token stops verifying at once, the retired
    /// key rows stay for one session lifetime and are deleted by the first rotation after it.
    #[tokio::test]
    async fn rotation_prunes_keys_retired_over_a_session_lifetime_ago() {
        let (_dir, store) = store().await;
        let sessions = Sessions::new(Duration::from_secs(1));
        sessions.load_key(&store).await.unwrap();
        let first = store.read_signing_keys().await.unwrap();
        assert_eq!(first.len(), 1);
        let old = sessions.issue().unwrap();
        assert!(sessions.sid_from_jwt(&old.token).is_some());

        sessions.rotate_key(&store).await.unwrap();
        assert!(sessions.sid_from_jwt(&old.token).is_none(), "a token of the retired key still verifies");
        let fresh = sessions.issue().unwrap();
        assert!(sessions.sid_from_jwt(&fresh.token).is_some());
        sessions.rotate_key(&store).await.unwrap();
        let keys = store.read_signing_keys().await.unwrap();
        assert_eq!(keys.len(), 3, "within a session lifetime nothing is deleted: {:?}", ids(&keys));
        assert_eq!(keys.iter().filter(|k| k.retired.is_none()).count(), 1);

        // Over a lifetime later (1 s, compared to the second): both long-retired keys go, the
        // one this rotation retires stays, the new one is active and loads after a reopen.
        tokio::time::sleep(Duration::from_millis(2100)).await;
        let before = store.read_signing_keys().await.unwrap();
        sessions.rotate_key(&store).await.unwrap();
        let after = store.read_signing_keys().await.unwrap();
        assert_eq!(after.len(), 2, "{:?}", ids(&after));
        assert_eq!(after[0].key_id, before[2].key_id, "the key retired just now is kept");
        assert!(after[0].retired.is_some() && after[1].retired.is_none());
        let token = sessions.issue().unwrap().token;
        let reloaded = Sessions::new(Duration::from_secs(1));
        reloaded.load_key(&store).await.unwrap();
        assert!(reloaded.sid_from_jwt(&token).is_some(), "the active key did not come back from the store");
    }
}
