// SPDX-License-Identifier: Apache-2.0
//! What the HTTP layer needs from persistence, as one narrow trait.
//!
//! The API worker is the single owner of the key set, the control store and the lock state.
//! [`Persistence`] is everything the handlers ask of that state; [`keyset::KeysetBackend`]
//! implements it over `crates/keyset` directly (and an interim encrypted key-value file, see
//! its docs) until `crates/persistence` (volumes over the broker, SQLite store) lands, which
//! will implement the same trait. Every method blocks (Argon2id, fsync, archive streaming):
//! call them from `spawn_blocking`.

pub mod keyset;
mod store;

use std::io::{Read, Write};

use piccolo_keyset::{Password, RecoveryKey};
use serde::Serialize;
use utoipa::ToSchema;

/// Lock state of the control store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    /// No key set yet: first-run setup is pending.
    Uninitialised,
    /// Key set present, SDEK not in memory: the control store is sealed.
    Locked,
    /// SDEK in memory: the control store is open.
    Unlocked,
}

/// Which export archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    /// Every volume's ciphertext, without the key set (restores onto this key set only).
    Control,
    /// Ciphertext plus the sealed key set (restores on new hardware with the export's password).
    Full,
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ExportInfo {
    /// Volumes in the archive.
    pub volumes: Vec<String>,
    /// Archive length in bytes.
    pub archive_bytes: u64,
    /// SHA-256 (hex) recorded in the archive trailer.
    pub archive_sha256: String,
}

/// What an import replaced.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImportInfo {
    /// `control` or `full`.
    pub kind: ExportKind,
    /// The volumes replaced.
    pub volumes: Vec<String>,
    /// When the export was made (RFC 3339).
    pub created: String,
    /// Whether the key set was replaced (full exports): unlock with the export's password.
    pub keyset_replaced: bool,
    /// Live volumes whose key is gone after a full import.
    pub orphaned_volumes: Vec<String>,
}

/// Why a persistence call failed. Messages carry no secret.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No key set yet.
    #[error("not initialised")]
    NotInitialised,
    /// Setup ran twice.
    #[error("already initialised")]
    AlreadyInitialised,
    /// The call needs the unlocked store.
    #[error("locked")]
    Locked,
    /// The password did not open the key set.
    #[error("wrong password")]
    WrongPassword,
    /// The recovery key is well formed but does not open the key set.
    #[error("wrong recovery key")]
    WrongRecoveryKey,
    /// Input refused before any work (weak password, mistyped recovery key, ...).
    #[error("{0}")]
    InvalidInput(String),
    /// An import archive failed validation; nothing was changed.
    #[error("{0}")]
    ImportRejected(String),
    /// Anything else (I/O, corrupt key set, ...): logged, answered as 500.
    #[error("internal persistence error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Result alias.
pub type BackendResult<T> = Result<T, BackendError>;

/// The persistence operations the HTTP API needs. Implementations serialise state changes
/// internally; `lock_state` must not block behind a running key derivation.
pub trait Persistence: Send + Sync + 'static {
    /// Current lock state (cheap, never blocks on a derivation).
    fn lock_state(&self) -> LockState;
    /// First run: creates the key set under `password`, leaves the store unlocked and returns
    /// the recovery key (to be shown once).
    fn initialise(&self, password: &Password) -> BackendResult<RecoveryKey>;
    /// Checks the admin password without changing the lock state.
    fn verify_password(&self, password: &Password) -> BackendResult<()>;
    /// Unlocks the store with the admin password.
    fn unlock_with_password(&self, password: &Password) -> BackendResult<()>;
    /// Unlocks the store with the recovery key.
    fn unlock_with_recovery_key(&self, key: &RecoveryKey) -> BackendResult<()>;
    /// Seals the store (drops the SDEK). Idempotent.
    fn lock(&self) -> BackendResult<()>;
    /// Rewraps the key set under `new` after checking `current`; atomic (old or new works).
    fn change_password(&self, current: &Password, new: &Password) -> BackendResult<()>;
    /// Replaces the recovery key after checking `password`; returns the new one (shown once).
    fn rotate_recovery_key(&self, password: &Password) -> BackendResult<RecoveryKey>;
    /// Sets a new password with the recovery key; leaves the store unlocked.
    fn reset_password(&self, key: &RecoveryKey, new: &Password) -> BackendResult<()>;
    /// Streams an export archive into `out` (store must be unlocked).
    fn export(&self, kind: ExportKind, out: &mut dyn Write) -> BackendResult<ExportInfo>;
    /// Validates the whole archive from `input`, then replaces the state; on success the store
    /// is locked (unlock with the export's password). On failure nothing changed, lock state
    /// included.
    fn import(&self, input: &mut dyn Read) -> BackendResult<ImportInfo>;
    /// Reads a value from the control store (`Locked` while locked).
    fn store_get(&self, key: &str) -> BackendResult<Option<Vec<u8>>>;
    /// Writes a value to the control store durably (`Locked` while locked).
    fn store_put(&self, key: &str, value: &[u8]) -> BackendResult<()>;
}
