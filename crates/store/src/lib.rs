// SPDX-License-Identifier: Apache-2.0
//! The SQLite control store at `mounts/control/control.db`, inside the gocryptfs control volume.
//!
//! **Owns:** the database file and its schema (migrations by `PRAGMA user_version`), the
//! repositories for auth state (JWT signing keys, sessions), the remote configuration, the app
//! inventory, and the revision journal: one row per committed change (revision, time, actor,
//! kind, subject, payload digest, chained checksum), written in the same transaction as the
//! change, so history can be read back and verified.
//!
//! **Must never:** open a database outside the (encrypted) control volume in production; write
//! temp files outside it (`temp_store=MEMORY`); put a stored value (key material, session ids,
//! documents) in an error or a log line; swallow a failed integrity check or checkpoint (they
//! are returned and sent as [`StoreEvent::MaintenanceFailed`]); mutate as a follower.
//!
//! # Gating
//! A [`Store`] is locked until [`Store::open`] and after [`Store::close`]: every call then
//! returns [`Error::Locked`] (HTTP 423). Opened with [`Role::Follower`] the file is opened
//! read-only and every `write_*` returns [`Error::NotLeader`]. `read_*` methods only read;
//! `write_*` methods commit exactly one transaction, which appends exactly one revision row
//! (except [`Store::write_expired_sessions_purged`] when nothing expired, and the maintenance
//! writes, which change no data).
//!
//! # Durability
//! WAL, `synchronous=FULL` (every commit fsyncs the WAL before the call returns), busy timeout
//! [`BUSY_TIMEOUT`], `journal_size_limit` [`WAL_SIZE_LIMIT_BYTES`]. [`Store::spawn_maintenance`]
//! runs `PRAGMA quick_check` and `wal_checkpoint(TRUNCATE)` periodically. The crash test
//! (`tests/crash.rs`) kills a writer with SIGKILL mid-stream 100 times and checks
//! `integrity_check` and every acknowledged write.

mod error;
mod journal;
mod repos;
mod schema;
mod store;

pub use error::{Error, Result};
pub use journal::{ChangeKind, JournalCheck, MAX_ACTOR_LEN, Revision};
pub use repos::{
    AppRecord, AppWrite, MAX_DOCUMENT_BYTES, MAX_NAME_LEN, RemoteConfigRecord, SessionRecord, SigningKey,
    SigningKeyRotation, session_hash,
};
pub use schema::{BUSY_TIMEOUT, SCHEMA_VERSION, WAL_SIZE_LIMIT_BYTES};
pub use store::{MaintenanceReport, Store, StoreEvent, error_chain};

/// The database file name inside the control volume's mount.
pub const CONTROL_DB_NAME: &str = "control.db";

/// Whether this node may write (from configuration for now; leader election comes later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-write.
    Leader,
    /// Read-only; mutations return [`Error::NotLeader`].
    Follower,
}
