// SPDX-License-Identifier: Apache-2.0
//! The one error type of the persistence state machine. Messages name the failed step; none
//! carries a password, recovery key, SDEK or volume key.

use std::path::PathBuf;

use crate::broker::BrokerError;
use crate::events::LockState;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a persistence call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The call needs the unlocked state (HTTP 423).
    #[error("persistence is locked")]
    Locked,
    /// Unlock or setup was asked for while already unlocked (or mid-transition).
    #[error("persistence is not locked (state: {state})")]
    NotLocked {
        /// The current state.
        state: LockState,
    },
    /// Setup found an existing key set.
    #[error("persistence is already set up (a key set exists)")]
    AlreadySetUp,
    /// Setup cannot resume an earlier attempt: its volumes exist, but the password given does
    /// not open that attempt's pending key set (or the key set is gone).
    #[error(
        "an earlier setup attempt created volume(s) {} under another password: retry setup with that \
         password, or remove them as root (ciphertext/<id>; a setup that never finished holds no data)",
        volumes.join(", ")
    )]
    SetupInterrupted {
        /// The volumes the earlier attempt created.
        volumes: Vec<String>,
    },
    /// Unlock found no key set: run setup (or import a full export) first.
    #[error("persistence is not set up (no key set)")]
    NotSetUp,
    /// A key-set step failed (wrong password, mistyped recovery key, PCR 7 changed, ...).
    /// Its message is the key set's own, e.g. "TPM unlock failed: PCR 7 changed".
    #[error(transparent)]
    Keyset(#[from] piccolo_keyset::Error),
    /// The control store failed.
    #[error(transparent)]
    Store(#[from] piccolo_store::Error),
    /// A broker call for a volume failed.
    #[error("{step} of volume {volume} failed")]
    Volume {
        /// `create`, `mount`, `unmount` or `status`.
        step: &'static str,
        /// The volume id.
        volume: String,
        /// What the broker said.
        #[source]
        source: BrokerError,
    },
    /// A TPM call through the broker failed (sealing, or unsealing other than a PCR change).
    #[error("TPM {step} through the broker failed")]
    Tpm {
        /// `seal` or `unseal`.
        step: &'static str,
        /// What the broker said.
        #[source]
        source: BrokerError,
    },
    /// No TPM backend was configured.
    #[error("TPM auto-unlock is not available (no TPM backend configured)")]
    TpmUnavailable,
    /// The broker said a volume is mounted somewhere else than the state-dir layout expects.
    #[error("volume {volume} is mounted at {found}, expected {expected}")]
    UnexpectedMountpoint {
        /// The volume id.
        volume: String,
        /// What the broker reported.
        found: PathBuf,
        /// `$PICCOLO_STATE_DIR/mounts/<id>`.
        expected: PathBuf,
    },
    /// The broker reports a volume mounted, but this process's mount namespace shows no FUSE
    /// mount there (broken mount propagation into a sandboxed unit). Nothing is written
    /// through it: it would land in plaintext on the state file system.
    #[error(
        "volume {volume} is mounted by the broker but not visible at {mountpoint} in this process's mount \
         namespace (check the unit's mount propagation)"
    )]
    MountNotVisible {
        /// The volume id.
        volume: String,
        /// The canonical mountpoint.
        mountpoint: PathBuf,
    },
    /// A volume id is not `[a-z0-9][a-z0-9-]*` or is reserved for this call.
    #[error("invalid volume id {id:?}: {reason}")]
    InvalidVolumeId {
        /// The id as given.
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An application volume that was never created.
    #[error("volume {volume} does not exist")]
    UnknownVolume {
        /// The volume id.
        volume: String,
    },
    /// Reading or writing `volumes/<id>/state.json` failed.
    #[error("volume journal {path}")]
    Journal {
        /// The journal file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Creating a state-dir directory failed.
    #[error("cannot prepare {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Lock finished (keys zeroed, store closed) but some volumes could not be unmounted.
    #[error("locked, but {} volume(s) could not be unmounted: {}", volumes.len(), volumes.join(", "))]
    LockIncomplete {
        /// The volumes still mounted.
        volumes: Vec<String>,
    },
    /// An export finished, but the volumes could not be brought back: persistence is locked.
    #[error("the export succeeded but re-opening failed; persistence is locked")]
    ResumeAfterExport {
        /// Why resuming failed.
        #[source]
        source: Box<Error>,
    },
    /// A blocking task (key derivation, export, import) panicked or was cancelled.
    #[error("a background task failed")]
    Task {
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

impl Error {
    pub(crate) fn volume(step: &'static str, volume: &str) -> impl FnOnce(BrokerError) -> Error {
        let volume = volume.to_string();
        move |source| Error::Volume { step, volume, source }
    }
}
