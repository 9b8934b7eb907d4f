// SPDX-License-Identifier: Apache-2.0
//! Lock states and the events every transition emits (a tokio broadcast channel; other
//! workers will receive them over the API worker's socket).

use std::fmt;
use std::path::PathBuf;

use piccolo_keyset::ExportKind;
use serde::Serialize;

/// Where the state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    /// No key in memory; the control store and application volumes are closed and unmounted.
    Locked,
    /// An unlock (or setup) is in progress.
    Unlocking,
    /// Keys in memory, control and desired application volumes mounted, store open.
    Unlocked,
    /// A lock is in progress.
    Locking,
    /// Volumes are quiesced for an export (the store is closed, calls return Locked).
    Exporting,
    /// An import is in progress (fully locked).
    Importing,
}

impl fmt::Display for LockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockState::Locked => "locked",
            LockState::Unlocking => "unlocking",
            LockState::Unlocked => "unlocked",
            LockState::Locking => "locking",
            LockState::Exporting => "exporting",
            LockState::Importing => "importing",
        })
    }
}

/// How an unlock was authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnlockMethod {
    /// First-time setup with a new password.
    Setup,
    /// The admin password.
    Password,
    /// The recovery key.
    RecoveryKey,
    /// The TPM-sealed SDEK (PCR 7 policy).
    Tpm,
}

/// Why the state machine became locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LockReason {
    /// Someone asked for it.
    Requested,
    /// An unlock failed half-way and was rolled back.
    Rollback,
    /// An import replaced the state; unlock with the export's password.
    Import,
    /// Re-opening after an export failed.
    ExportResumeFailed,
}

/// One event. Carries ids, states and messages only: never a key or password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// An unlock started.
    Unlocking {
        /// How.
        method: UnlockMethod,
    },
    /// Unlocked: store open, volumes mounted.
    Unlocked {
        /// How.
        method: UnlockMethod,
    },
    /// An unlock failed; the state is locked again.
    UnlockFailed {
        /// How it was attempted.
        method: UnlockMethod,
        /// The error message (e.g. "TPM unlock failed: PCR 7 changed").
        reason: String,
    },
    /// A lock started.
    Locking,
    /// Locked.
    Locked {
        /// Why.
        reason: LockReason,
    },
    /// A volume was mounted.
    VolumeMounted {
        /// The volume id.
        volume: String,
    },
    /// A volume was unmounted.
    VolumeUnmounted {
        /// The volume id.
        volume: String,
    },
    /// A volume's gocryptfs process is gone (or its mount is dead): it needs repair.
    VolumeNeedsRepair {
        /// The volume id.
        volume: String,
    },
    /// A volume could not be brought to its desired state.
    VolumeFailed {
        /// The volume id.
        volume: String,
        /// The error message.
        reason: String,
    },
    /// An export started; volumes are quiesced.
    ExportStarted {
        /// `control` or `full`.
        kind: ExportKind,
    },
    /// An export was written.
    ExportFinished {
        /// `control` or `full`.
        kind: ExportKind,
        /// The archive file.
        path: PathBuf,
        /// Its size.
        archive_bytes: u64,
    },
    /// An export failed; nothing was written.
    ExportFailed {
        /// `control` or `full`.
        kind: ExportKind,
        /// The error message.
        reason: String,
    },
    /// An import replaced volumes (and, for `full`, the key set). Still locked.
    Imported {
        /// `control` or `full`.
        kind: ExportKind,
        /// The replaced volumes.
        volumes: Vec<String>,
    },
    /// TPM auto-unlock was enrolled (the SDEK is sealed to PCR 7).
    TpmEnrolled,
    /// TPM auto-unlock was removed.
    TpmRemoved,
}
