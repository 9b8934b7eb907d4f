// SPDX-License-Identifier: Apache-2.0
//! Opening the database: connection pragmas and schema migrations by `PRAGMA user_version`.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::Role;
use crate::error::{Error, Result};

/// How long a statement waits for a lock held by another connection before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The WAL is truncated back to this size after a checkpoint (`journal_size_limit`).
pub const WAL_SIZE_LIMIT_BYTES: i64 = 64 << 20;

/// Migration `i` takes the schema from version `i` to `i + 1`. Append only: never edit a
/// released migration, add a new one.
const MIGRATIONS: &[&str] = &[
    // 1: revision journal, auth state, remote configuration, app inventory.
    "CREATE TABLE revisions (
        revision       INTEGER PRIMARY KEY AUTOINCREMENT,
        at             TEXT NOT NULL,
        actor          TEXT NOT NULL,
        kind           TEXT NOT NULL,
        subject        TEXT NOT NULL,
        payload_sha256 TEXT NOT NULL,
        checksum       TEXT NOT NULL
    ) STRICT;
    CREATE TABLE auth_signing_keys (
        key_id     TEXT PRIMARY KEY,
        algorithm  TEXT NOT NULL,
        secret     BLOB NOT NULL,
        created    TEXT NOT NULL,
        retired    TEXT,
        revision   INTEGER NOT NULL REFERENCES revisions(revision)
    ) STRICT;
    CREATE TABLE auth_sessions (
        session_hash TEXT PRIMARY KEY,
        subject      TEXT NOT NULL,
        created      TEXT NOT NULL,
        expires      TEXT NOT NULL,
        revoked      INTEGER NOT NULL DEFAULT 0,
        revision     INTEGER NOT NULL REFERENCES revisions(revision)
    ) STRICT;
    CREATE INDEX auth_sessions_expires ON auth_sessions(expires);
    CREATE TABLE remote_config (
        id        INTEGER PRIMARY KEY CHECK (id = 1),
        document  TEXT NOT NULL,
        updated   TEXT NOT NULL,
        revision  INTEGER NOT NULL REFERENCES revisions(revision)
    ) STRICT;
    CREATE TABLE apps (
        name      TEXT PRIMARY KEY,
        spec      TEXT NOT NULL,
        enabled   INTEGER NOT NULL,
        status    TEXT NOT NULL,
        updated   TEXT NOT NULL,
        revision  INTEGER NOT NULL REFERENCES revisions(revision)
    ) STRICT;",
];

/// The schema version this build migrates to (the number of migrations; a test checks it).
pub const SCHEMA_VERSION: u32 = 1;

/// Opens `path` for `role`: a leader creates and migrates the file, a follower opens it
/// read-only and requires the current schema.
pub(crate) fn open(path: &Path, role: Role) -> Result<Connection> {
    let open_err = |source| Error::Open { path: path.to_path_buf(), source };
    let flags = match role {
        Role::Leader => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        Role::Follower => OpenFlags::SQLITE_OPEN_READ_ONLY,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|source| Error::Pragma { pragma: "busy_timeout", source })?;
    if role == Role::Leader {
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|source| Error::Pragma { pragma: "journal_mode", source })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::NotWal { found: mode });
        }
        set(&conn, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
    }
    // FULL: every commit fsyncs the WAL, so an acknowledged write survives power loss.
    set(&conn, "synchronous", "FULL")?;
    set(&conn, "foreign_keys", "ON")?;
    // Temp tables and sort spills stay in memory: on disk they would land outside the
    // encrypted control volume (SQLite's temp directory is /var/tmp or /tmp).
    set(&conn, "temp_store", "MEMORY")?;
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .map_err(|source| Error::Pragma { pragma: "synchronous", source })?;
    if sync != 2 {
        return Err(Error::Pragma { pragma: "synchronous", source: rusqlite::Error::InvalidQuery });
    }
    let found = user_version(&conn)?;
    if found > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew { found, supported: SCHEMA_VERSION });
    }
    match role {
        Role::Leader => migrate(&mut conn, found)?,
        Role::Follower if found != SCHEMA_VERSION => {
            return Err(Error::FollowerSchemaOutdated { found, expected: SCHEMA_VERSION });
        }
        Role::Follower => {}
    }
    Ok(conn)
}

fn set<V: rusqlite::ToSql>(conn: &Connection, pragma: &'static str, value: V) -> Result<()> {
    conn.pragma_update(None, pragma, value).map_err(|source| Error::Pragma { pragma, source })
}

/// `PRAGMA user_version`.
pub(crate) fn user_version(conn: &Connection) -> Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|source| Error::Pragma { pragma: "user_version", source })
}

/// Applies every migration after `from`, each in its own IMMEDIATE transaction together with
/// its `user_version` bump, so a crash leaves the schema at a whole version.
fn migrate(conn: &mut Connection, from: u32) -> Result<()> {
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        let version = u32::try_from(index + 1).unwrap_or(u32::MAX);
        let err = |source| Error::Migrate { version, source };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        // Re-read inside the write lock: another connection may have migrated meanwhile.
        if user_version(&tx)? >= version {
            continue;
        }
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version).map_err(err)?;
        tx.commit().map_err(err)?;
        tracing::info!(version, "control store schema migrated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_ordered_and_counted() {
        assert_eq!(SCHEMA_VERSION as usize, MIGRATIONS.len());
    }
}
