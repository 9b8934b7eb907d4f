// SPDX-License-Identifier: Apache-2.0
//! The one error type of the control store. Messages name the failed step and never carry
//! stored values (the store holds signing keys and session data).

use std::path::PathBuf;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a store call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control volume is not unlocked: no store is open. HTTP maps this to 423.
    #[error("the control store is locked")]
    Locked,
    /// This node is a follower: the store is open read-only and refuses mutations.
    #[error("this node is not the leader: the control store is read-only")]
    NotLeader,
    /// [`crate::Store::open`] was called on a handle that is already open.
    #[error("the control store is already open at {path}")]
    AlreadyOpen {
        /// The open database.
        path: PathBuf,
    },
    /// Opening the database file failed.
    #[error("cannot open the control store at {path}")]
    Open {
        /// The database path.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A connection pragma could not be set or did not take effect.
    #[error("cannot set PRAGMA {pragma} on the control store")]
    Pragma {
        /// The pragma.
        pragma: &'static str,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// `journal_mode` did not switch to WAL (e.g. the filesystem lacks shared memory support).
    #[error("the control store refused WAL mode (journal_mode is {found})")]
    NotWal {
        /// The journal mode SQLite reported.
        found: String,
    },
    /// A schema migration failed; the database stays at the previous version.
    #[error("schema migration to version {version} failed")]
    Migrate {
        /// The version that was being applied.
        version: u32,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer build (its `user_version` is unknown here).
    #[error("the control store has schema version {found}, this build knows up to {supported}")]
    SchemaTooNew {
        /// `PRAGMA user_version` of the file.
        found: u32,
        /// The newest version this build can migrate to.
        supported: u32,
    },
    /// A follower found a schema older than this build's (only the leader migrates).
    #[error("the control store has schema version {found}; a follower cannot migrate it to {expected}")]
    FollowerSchemaOutdated {
        /// `PRAGMA user_version` of the file.
        found: u32,
        /// The version this build needs.
        expected: u32,
    },
    /// A query or statement failed.
    #[error("control store: {op} failed")]
    Query {
        /// The repository operation (e.g. `write_app`).
        op: &'static str,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored or given value could not be (de)serialised.
    #[error("control store: {op}: cannot encode or decode the value")]
    Codec {
        /// The repository operation.
        op: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// An argument is out of range (empty name, over-long actor, ...).
    #[error("control store: {op}: {reason}")]
    InvalidInput {
        /// The repository operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The object to change does not exist.
    #[error("control store: {what} {key:?} does not exist")]
    NotFound {
        /// The kind of object.
        what: &'static str,
        /// Its key.
        key: String,
    },
    /// `PRAGMA quick_check` (or `integrity_check`) reported problems.
    #[error("control store integrity check failed: {}", problems.join("; "))]
    IntegrityCheck {
        /// SQLite's messages (at most a few).
        problems: Vec<String>,
    },
    /// A WAL checkpoint could not complete (readers held the log, or it failed).
    #[error("WAL checkpoint incomplete: {checkpointed} of {wal_frames} frames copied (busy: {busy})")]
    CheckpointIncomplete {
        /// SQLite's busy flag.
        busy: bool,
        /// Frames in the WAL.
        wal_frames: i64,
        /// Frames copied back into the database.
        checkpointed: i64,
    },
    /// The revision journal's checksum chain does not verify at `revision`.
    #[error("revision journal broken at revision {revision}: {reason}")]
    JournalBroken {
        /// The first revision that does not verify.
        revision: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Closing the database failed (the handle is locked regardless).
    #[error("closing the control store failed")]
    Close {
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The blocking task running the query panicked or was cancelled.
    #[error("control store worker task failed")]
    Task {
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl Error {
    /// A closure that wraps a SQLite error as [`Error::Query`] for `op`.
    pub(crate) fn query(op: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
        move |source| Error::Query { op, source }
    }
}
