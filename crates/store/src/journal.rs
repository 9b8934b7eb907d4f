// SPDX-License-Identifier: Apache-2.0
//! The revision journal: one row per committed change, written in the same transaction as the
//! change, chained by SHA-256 so an edited, deleted or reordered row is detectable.
//!
//! `checksum(n) = SHA-256("piccolo-store revision v1\0" ‖ checksum(n-1) ‖ n ‖ at ‖ actor ‖ kind
//! ‖ subject ‖ payload_sha256)` with NUL separators and `checksum(0)` = 64 zeros.
//! `payload_sha256` is the SHA-256 of the canonical payload of the change (for secrets: of
//! public fields only, never of the secret).

use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The checksum that precedes revision 1.
const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Longest accepted actor name.
pub const MAX_ACTOR_LEN: usize = 128;

/// What a committed change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A JWT signing key was added.
    SigningKeyWrite,
    /// A JWT signing key was retired.
    SigningKeyRetire,
    /// One rotation: a new signing key, the active ones retired, long-retired ones deleted.
    SigningKeyRotate,
    /// A session was created.
    SessionWrite,
    /// A session was revoked.
    SessionRevoke,
    /// Expired sessions were purged.
    SessionPurge,
    /// The remote configuration was replaced.
    RemoteConfigWrite,
    /// An app was added or changed.
    AppWrite,
    /// An app was removed.
    AppDelete,
}

impl ChangeKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::SigningKeyWrite => "auth.signing_key.write",
            ChangeKind::SigningKeyRetire => "auth.signing_key.retire",
            ChangeKind::SigningKeyRotate => "auth.signing_key.rotate",
            ChangeKind::SessionWrite => "auth.session.write",
            ChangeKind::SessionRevoke => "auth.session.revoke",
            ChangeKind::SessionPurge => "auth.session.purge",
            ChangeKind::RemoteConfigWrite => "remote_config.write",
            ChangeKind::AppWrite => "app.write",
            ChangeKind::AppDelete => "app.delete",
        }
    }
}

/// One journal row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revision {
    /// Monotonic, starts at 1, never reused.
    pub revision: u64,
    /// Commit time, RFC 3339 UTC.
    pub at: String,
    /// Who made the change (e.g. `admin`, `piccolo-remote`).
    pub actor: String,
    /// What kind of change (see [`ChangeKind::as_str`]).
    pub kind: String,
    /// What it changed (an app name, a key id, `remote`).
    pub subject: String,
    /// SHA-256 (hex) of the change's canonical payload.
    pub payload_sha256: String,
    /// Chained checksum (hex), see the module docs.
    pub checksum: String,
}

impl Revision {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Revision> {
        Ok(Revision {
            revision: r.get::<_, i64>(0)?.try_into().unwrap_or(0),
            at: r.get(1)?,
            actor: r.get(2)?,
            kind: r.get(3)?,
            subject: r.get(4)?,
            payload_sha256: r.get(5)?,
            checksum: r.get(6)?,
        })
    }

    fn expected_checksum(&self, prev: &str) -> String {
        chain(prev, self.revision, &self.at, &self.actor, &self.kind, &self.subject, &self.payload_sha256)
    }
}

/// Result of [`crate::Store::read_journal_verification`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalCheck {
    /// Rows verified.
    pub rows: u64,
    /// The newest revision, if any.
    pub head: Option<Revision>,
}

fn chain(prev: &str, revision: u64, at: &str, actor: &str, kind: &str, subject: &str, payload: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"piccolo-store revision v1\0");
    for part in [prev.as_bytes(), &revision.to_be_bytes(), at.as_bytes(), actor.as_bytes(), kind.as_bytes()] {
        h.update(part);
        h.update(b"\0");
    }
    h.update(subject.as_bytes());
    h.update(b"\0");
    h.update(payload.as_bytes());
    hex::encode(h.finalize())
}

/// SHA-256 hex of a payload's canonical JSON (serde_json with struct field order).
pub(crate) fn payload_digest<T: Serialize>(op: &'static str, payload: &T) -> Result<String> {
    let bytes = serde_json::to_vec(payload).map_err(|source| Error::Codec { op, source })?;
    Ok(hex::encode(Sha256::digest(bytes)))
}

pub(crate) fn check_actor(op: &'static str, actor: &str) -> Result<()> {
    if actor.is_empty() || actor.len() > MAX_ACTOR_LEN || actor.chars().any(char::is_control) {
        return Err(Error::InvalidInput { op, reason: format!("actor must be 1..={MAX_ACTOR_LEN} printable bytes") });
    }
    Ok(())
}

/// Appends one row inside `tx` (the change's own transaction) and returns it.
pub(crate) fn append(
    tx: &Transaction<'_>,
    op: &'static str,
    at: &str,
    actor: &str,
    kind: ChangeKind,
    subject: &str,
    payload_sha256: String,
) -> Result<Revision> {
    check_actor(op, actor)?;
    let prev: Option<(i64, String)> = tx
        .query_row("SELECT revision, checksum FROM revisions ORDER BY revision DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(Error::query(op))?;
    // AUTOINCREMENT never reuses a number, even after the last row was deleted; the chain
    // continues from the last row present.
    let next: i64 = tx
        .query_row("SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'revisions'), 0) + 1", [], |r| {
            r.get(0)
        })
        .map_err(Error::query(op))?;
    let prev_sum = prev.map(|(_, c)| c).unwrap_or_else(|| GENESIS.to_string());
    let revision = u64::try_from(next).unwrap_or(0);
    let checksum = chain(&prev_sum, revision, at, actor, kind.as_str(), subject, &payload_sha256);
    tx.execute(
        "INSERT INTO revisions (revision, at, actor, kind, subject, payload_sha256, checksum)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![next, at, actor, kind.as_str(), subject, payload_sha256, checksum],
    )
    .map_err(Error::query(op))?;
    Ok(Revision {
        revision,
        at: at.to_string(),
        actor: actor.to_string(),
        kind: kind.as_str().to_string(),
        subject: subject.to_string(),
        payload_sha256,
        checksum,
    })
}

const SELECT: &str = "SELECT revision, at, actor, kind, subject, payload_sha256, checksum FROM revisions";

/// Up to `limit` rows with `revision > after`, oldest first.
pub(crate) fn read_after(conn: &rusqlite::Connection, after: u64, limit: u32) -> Result<Vec<Revision>> {
    let op = "read_revisions";
    let after = i64::try_from(after).unwrap_or(i64::MAX);
    let mut stmt = conn
        .prepare_cached(&format!("{SELECT} WHERE revision > ?1 ORDER BY revision LIMIT ?2"))
        .map_err(Error::query(op))?;
    let rows = stmt.query_map(params![after, limit], Revision::from_row).map_err(Error::query(op))?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::query(op))
}

/// The newest row.
pub(crate) fn read_head(conn: &rusqlite::Connection) -> Result<Option<Revision>> {
    conn.query_row(&format!("{SELECT} ORDER BY revision DESC LIMIT 1"), [], Revision::from_row)
        .optional()
        .map_err(Error::query("read_head_revision"))
}

/// One row by number.
pub(crate) fn read_one(conn: &rusqlite::Connection, revision: u64) -> Result<Option<Revision>> {
    let revision = i64::try_from(revision).unwrap_or(i64::MAX);
    conn.query_row(&format!("{SELECT} WHERE revision = ?1"), [revision], Revision::from_row)
        .optional()
        .map_err(Error::query("read_revision"))
}

/// Walks the whole chain, checking numbering and every checksum.
pub(crate) fn verify(conn: &rusqlite::Connection) -> Result<JournalCheck> {
    let op = "read_journal_verification";
    let mut stmt = conn.prepare(&format!("{SELECT} ORDER BY revision")).map_err(Error::query(op))?;
    let mut rows = stmt.query([]).map_err(Error::query(op))?;
    let mut prev = GENESIS.to_string();
    let mut last: Option<Revision> = None;
    let mut count = 0u64;
    while let Some(row) = rows.next().map_err(Error::query(op))? {
        let rev = Revision::from_row(row).map_err(Error::query(op))?;
        if let Some(l) = &last
            && rev.revision != l.revision + 1
        {
            return Err(Error::JournalBroken { revision: rev.revision, reason: "a revision is missing before it" });
        }
        if rev.expected_checksum(&prev) != rev.checksum {
            return Err(Error::JournalBroken { revision: rev.revision, reason: "checksum does not match the chain" });
        }
        prev = rev.checksum.clone();
        count += 1;
        last = Some(rev);
    }
    Ok(JournalCheck { rows: count, head: last })
}
