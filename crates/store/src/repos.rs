// SPDX-License-Identifier: Apache-2.0
//! Repositories: auth state, remote configuration, app inventory. Every `write_*` runs in one
//! IMMEDIATE transaction that also appends its revision row; every `read_*` only reads.

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::journal::{self, ChangeKind, Revision, payload_digest};

/// Longest app name, key id or session id accepted.
pub const MAX_NAME_LEN: usize = 128;
/// Largest app spec or remote configuration document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// A JWT signing key of the API. The secret lives only inside the encrypted control volume.
pub struct SigningKey {
    /// Public identifier (the JWT `kid`).
    pub key_id: String,
    /// Algorithm name (e.g. `HS256`, `EdDSA`).
    pub algorithm: String,
    /// Key material; zeroed on drop, never in `Debug`.
    pub secret: Zeroizing<Vec<u8>>,
    /// RFC 3339 creation time (set by the store on write).
    pub created: String,
    /// RFC 3339 retirement time; `None` while the key signs new tokens.
    pub retired: Option<String>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .field("algorithm", &self.algorithm)
            .field("secret", &"<redacted>")
            .field("created", &self.created)
            .field("retired", &self.retired)
            .finish()
    }
}

/// A login session. The store keeps only the SHA-256 of the session id, so a stolen database
/// copy does not yield usable session ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionRecord {
    /// SHA-256 (hex) of the session id.
    pub session_hash: String,
    /// Who logged in.
    pub subject: String,
    /// RFC 3339 creation time.
    pub created: String,
    /// RFC 3339 expiry time.
    pub expires: String,
    /// Revoked sessions stay until purged.
    pub revoked: bool,
}

/// The remote-access configuration as one JSON document (the remote worker owns its fields).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoteConfigRecord {
    /// The document.
    pub document: serde_json::Value,
    /// RFC 3339 time of the last write.
    pub updated: String,
    /// The revision that wrote it.
    pub revision: u64,
}

/// What a caller writes for an app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppWrite {
    /// Unique app name.
    pub name: String,
    /// The declarative app definition (opaque text, e.g. YAML).
    pub spec: String,
    /// Whether the app should run.
    pub enabled: bool,
    /// Last known status (opaque short text).
    pub status: String,
}

/// An app in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppRecord {
    /// Unique app name.
    pub name: String,
    /// The declarative app definition.
    pub spec: String,
    /// Whether the app should run.
    pub enabled: bool,
    /// Last known status.
    pub status: String,
    /// RFC 3339 time of the last write.
    pub updated: String,
    /// The revision that last wrote it.
    pub revision: u64,
}

/// SHA-256 hex of a session id, as stored.
pub fn session_hash(session_id: &str) -> String {
    hex::encode(Sha256::new().chain_update(b"piccolo-store session v1\0").chain_update(session_id).finalize())
}

fn check_name(op: &'static str, what: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(Error::InvalidInput { op, reason: format!("{what} must be 1..={MAX_NAME_LEN} printable bytes") });
    }
    Ok(())
}

fn check_doc(op: &'static str, len: usize) -> Result<()> {
    if len > MAX_DOCUMENT_BYTES {
        return Err(Error::InvalidInput { op, reason: format!("document over {MAX_DOCUMENT_BYTES} bytes") });
    }
    Ok(())
}

fn rev_i64(r: &Revision) -> i64 {
    i64::try_from(r.revision).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

// ---- auth: signing keys ---------------------------------------------------------------

fn check_signing_key(op: &'static str, key_id: &str, algorithm: &str, secret: &[u8]) -> Result<()> {
    check_name(op, "key id", key_id)?;
    check_name(op, "algorithm", algorithm)?;
    if secret.is_empty() || secret.len() > 16 * 1024 {
        return Err(Error::InvalidInput { op, reason: "key material must be 1..=16384 bytes".into() });
    }
    Ok(())
}

/// Adds `key` as the active signing key under revision `rev`; an existing id is invalid input.
fn insert_signing_key(
    tx: &Transaction<'_>,
    op: &'static str,
    (key_id, algorithm, secret): (&str, &str, &[u8]),
    at: &str,
    rev: &Revision,
) -> Result<()> {
    tx.execute(
        "INSERT INTO auth_signing_keys (key_id, algorithm, secret, created, retired, revision)
         VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
        params![key_id, algorithm, secret, at, rev_i64(rev)],
    )
    .map_err(|source| match source.sqlite_error_code() {
        Some(rusqlite::ErrorCode::ConstraintViolation) => {
            Error::InvalidInput { op, reason: format!("signing key {key_id:?} already exists") }
        }
        _ => Error::Query { op, source },
    })?;
    Ok(())
}

pub(crate) fn write_signing_key(
    tx: &Transaction<'_>,
    at: &str,
    actor: &str,
    key_id: &str,
    algorithm: &str,
    secret: &[u8],
) -> Result<Revision> {
    let op = "write_signing_key";
    check_signing_key(op, key_id, algorithm, secret)?;
    // The payload digest covers public fields only: the journal never commits to a secret.
    let digest = payload_digest(op, &(key_id, algorithm, at))?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::SigningKeyWrite, key_id, digest)?;
    insert_signing_key(tx, op, (key_id, algorithm, secret), at, &rev)?;
    Ok(rev)
}

pub(crate) fn write_signing_key_retired(tx: &Transaction<'_>, at: &str, actor: &str, key_id: &str) -> Result<Revision> {
    let op = "write_signing_key_retired";
    let digest = payload_digest(op, &(key_id, at))?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::SigningKeyRetire, key_id, digest)?;
    let n = tx
        .execute(
            "UPDATE auth_signing_keys SET retired = ?2, revision = ?3 WHERE key_id = ?1 AND retired IS NULL",
            params![key_id, at, rev_i64(&rev)],
        )
        .map_err(Error::query(op))?;
    if n == 0 {
        return Err(Error::NotFound { what: "active signing key", key: key_id.to_string() });
    }
    Ok(rev)
}

/// What [`write_signing_key_rotated`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeyRotation {
    /// The one journal row of the rotation.
    pub revision: Revision,
    /// Key ids that were active and are retired now.
    pub retired: Vec<String>,
    /// Key ids deleted because they were retired before the cutoff.
    pub pruned: Vec<String>,
}

/// One rotation in one transaction with one journal row: deletes the keys retired before
/// `prune_retired_before` (RFC 3339 UTC, the stored format), retires every active key and
/// adds `key_id`. Pruning comes first, so a key retired by this rotation always survives it.
pub(crate) fn write_signing_key_rotated(
    tx: &Transaction<'_>,
    at: &str,
    actor: &str,
    key: (&str, &str, &[u8]),
    prune_retired_before: &str,
) -> Result<SigningKeyRotation> {
    let op = "write_signing_key_rotated";
    let (key_id, algorithm, secret) = key;
    check_signing_key(op, key_id, algorithm, secret)?;
    let ids = |sql: &str, arg: &str| -> Result<Vec<String>> {
        let mut stmt = tx.prepare_cached(sql).map_err(Error::query(op))?;
        let rows = stmt.query_map([arg], |r| r.get::<_, String>(0)).map_err(Error::query(op))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::query(op))
    };
    let pruned = ids(
        "SELECT key_id FROM auth_signing_keys WHERE retired IS NOT NULL AND retired < ?1 ORDER BY key_id",
        prune_retired_before,
    )?;
    let retired =
        ids("SELECT key_id FROM auth_signing_keys WHERE retired IS NULL AND key_id != ?1 ORDER BY key_id", key_id)?;
    // Public fields only, as for write_signing_key: the journal never commits to a secret.
    let digest = payload_digest(op, &(key_id, algorithm, at, &retired, &pruned, prune_retired_before))?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::SigningKeyRotate, key_id, digest)?;
    tx.execute("DELETE FROM auth_signing_keys WHERE retired IS NOT NULL AND retired < ?1", [prune_retired_before])
        .map_err(Error::query(op))?;
    tx.execute(
        "UPDATE auth_signing_keys SET retired = ?1, revision = ?2 WHERE retired IS NULL",
        params![at, rev_i64(&rev)],
    )
    .map_err(Error::query(op))?;
    insert_signing_key(tx, op, (key_id, algorithm, secret), at, &rev)?;
    Ok(SigningKeyRotation { revision: rev, retired, pruned })
}

fn signing_key_row(r: &Row<'_>) -> rusqlite::Result<SigningKey> {
    Ok(SigningKey {
        key_id: r.get(0)?,
        algorithm: r.get(1)?,
        secret: Zeroizing::new(r.get(2)?),
        created: r.get(3)?,
        retired: r.get(4)?,
    })
}

pub(crate) fn read_signing_keys(conn: &Connection) -> Result<Vec<SigningKey>> {
    let op = "read_signing_keys";
    let mut stmt = conn
        .prepare_cached(
            "SELECT key_id, algorithm, secret, created, retired FROM auth_signing_keys ORDER BY created, key_id",
        )
        .map_err(Error::query(op))?;
    let rows = stmt.query_map([], signing_key_row).map_err(Error::query(op))?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::query(op))
}

// ---- auth: sessions -------------------------------------------------------------------

pub(crate) fn write_session(
    tx: &Transaction<'_>,
    at: &str,
    actor: &str,
    session_id: &str,
    subject: &str,
    expires: &str,
) -> Result<(Revision, SessionRecord)> {
    let op = "write_session";
    check_name(op, "session id", session_id)?;
    check_name(op, "subject", subject)?;
    let record = SessionRecord {
        session_hash: session_hash(session_id),
        subject: subject.to_string(),
        created: at.to_string(),
        expires: expires.to_string(),
        revoked: false,
    };
    let digest = payload_digest(op, &record)?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::SessionWrite, &record.session_hash, digest)?;
    tx.execute(
        "INSERT INTO auth_sessions (session_hash, subject, created, expires, revoked, revision)
         VALUES (?1, ?2, ?3, ?4, 0, ?5)",
        params![record.session_hash, record.subject, record.created, record.expires, rev_i64(&rev)],
    )
    .map_err(Error::query(op))?;
    Ok((rev, record))
}

pub(crate) fn write_session_revoked(tx: &Transaction<'_>, at: &str, actor: &str, session_id: &str) -> Result<Revision> {
    let op = "write_session_revoked";
    let hash = session_hash(session_id);
    let digest = payload_digest(op, &(&hash, at))?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::SessionRevoke, &hash, digest)?;
    let n = tx
        .execute(
            "UPDATE auth_sessions SET revoked = 1, revision = ?2 WHERE session_hash = ?1 AND revoked = 0",
            params![hash, rev_i64(&rev)],
        )
        .map_err(Error::query(op))?;
    if n == 0 {
        return Err(Error::NotFound { what: "active session", key: hash });
    }
    Ok(rev)
}

/// Deletes sessions that expired before `now` (RFC 3339 strings of one format compare in time
/// order). Returns the revision and how many were purged; no revision when nothing expired.
pub(crate) fn write_expired_sessions_purged(
    tx: &Transaction<'_>,
    at: &str,
    actor: &str,
    now: &str,
) -> Result<(Option<Revision>, u64)> {
    let op = "write_expired_sessions_purged";
    let n = tx.execute("DELETE FROM auth_sessions WHERE expires <= ?1", [now]).map_err(Error::query(op))?;
    if n == 0 {
        return Ok((None, 0));
    }
    let digest = payload_digest(op, &(now, n))?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::SessionPurge, "sessions", digest)?;
    Ok((Some(rev), u64::try_from(n).unwrap_or(u64::MAX)))
}

pub(crate) fn read_session(conn: &Connection, session_id: &str) -> Result<Option<SessionRecord>> {
    conn.query_row(
        "SELECT session_hash, subject, created, expires, revoked FROM auth_sessions WHERE session_hash = ?1",
        [session_hash(session_id)],
        |r| {
            Ok(SessionRecord {
                session_hash: r.get(0)?,
                subject: r.get(1)?,
                created: r.get(2)?,
                expires: r.get(3)?,
                revoked: r.get::<_, i64>(4)? != 0,
            })
        },
    )
    .optional()
    .map_err(Error::query("read_session"))
}

// ---- remote configuration -------------------------------------------------------------

pub(crate) fn write_remote_config(
    tx: &Transaction<'_>,
    at: &str,
    actor: &str,
    document: &serde_json::Value,
) -> Result<Revision> {
    let op = "write_remote_config";
    let text = serde_json::to_string(document).map_err(|source| Error::Codec { op, source })?;
    check_doc(op, text.len())?;
    let digest = hex::encode(Sha256::digest(text.as_bytes()));
    let rev = journal::append(tx, op, at, actor, ChangeKind::RemoteConfigWrite, "remote", digest)?;
    tx.execute(
        "INSERT INTO remote_config (id, document, updated, revision) VALUES (1, ?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET document = excluded.document, updated = excluded.updated,
                                       revision = excluded.revision",
        params![text, at, rev_i64(&rev)],
    )
    .map_err(Error::query(op))?;
    Ok(rev)
}

pub(crate) fn read_remote_config(conn: &Connection) -> Result<Option<RemoteConfigRecord>> {
    let op = "read_remote_config";
    let row: Option<(String, String, i64)> = conn
        .query_row("SELECT document, updated, revision FROM remote_config WHERE id = 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
        .map_err(Error::query(op))?;
    row.map(|(doc, updated, revision)| {
        let document = serde_json::from_str(&doc).map_err(|source| Error::Codec { op, source })?;
        Ok(RemoteConfigRecord { document, updated, revision: to_u64(revision) })
    })
    .transpose()
}

// ---- app inventory --------------------------------------------------------------------

pub(crate) fn write_app(tx: &Transaction<'_>, at: &str, actor: &str, app: &AppWrite) -> Result<Revision> {
    let op = "write_app";
    check_name(op, "app name", &app.name)?;
    check_doc(op, app.spec.len() + app.status.len())?;
    let digest = payload_digest(op, app)?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::AppWrite, &app.name, digest)?;
    tx.execute(
        "INSERT INTO apps (name, spec, enabled, status, updated, revision) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, enabled = excluded.enabled,
             status = excluded.status, updated = excluded.updated, revision = excluded.revision",
        params![app.name, app.spec, app.enabled, app.status, at, rev_i64(&rev)],
    )
    .map_err(Error::query(op))?;
    Ok(rev)
}

pub(crate) fn write_app_deletion(tx: &Transaction<'_>, at: &str, actor: &str, name: &str) -> Result<Revision> {
    let op = "write_app_deletion";
    let digest = payload_digest(op, &name)?;
    let rev = journal::append(tx, op, at, actor, ChangeKind::AppDelete, name, digest)?;
    let n = tx.execute("DELETE FROM apps WHERE name = ?1", [name]).map_err(Error::query(op))?;
    if n == 0 {
        return Err(Error::NotFound { what: "app", key: name.to_string() });
    }
    Ok(rev)
}

fn app_row(r: &Row<'_>) -> rusqlite::Result<AppRecord> {
    Ok(AppRecord {
        name: r.get(0)?,
        spec: r.get(1)?,
        enabled: r.get(2)?,
        status: r.get(3)?,
        updated: r.get(4)?,
        revision: to_u64(r.get(5)?),
    })
}

const APP_SELECT: &str = "SELECT name, spec, enabled, status, updated, revision FROM apps";

pub(crate) fn read_app(conn: &Connection, name: &str) -> Result<Option<AppRecord>> {
    conn.query_row(&format!("{APP_SELECT} WHERE name = ?1"), [name], app_row)
        .optional()
        .map_err(Error::query("read_app"))
}

pub(crate) fn read_apps(conn: &Connection) -> Result<Vec<AppRecord>> {
    let op = "read_apps";
    let mut stmt = conn.prepare_cached(&format!("{APP_SELECT} ORDER BY name")).map_err(Error::query(op))?;
    let rows = stmt.query_map([], app_row).map_err(Error::query(op))?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::query(op))
}
