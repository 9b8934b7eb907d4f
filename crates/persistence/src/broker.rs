// SPDX-License-Identifier: Apache-2.0
//! What the state machine needs from the broker, as two small traits: [`VolumeBackend`]
//! (CreateVolume / MountVolume / UnmountVolume / VolumeStatus) and [`SealBackend`]
//! (SealSecret / UnsealSecret). [`crate::GrpcBroker`] implements both over the broker socket;
//! tests may use any other real implementation (e.g. gocryptfs run directly as root).

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use futures_util::future::BoxFuture;
use piccolo_keyset::{ExportKind, ExportSummary, ImportLimits, ImportReport, Secret};

use crate::keys::VolumeKey;

/// The class of a volume (mirrors the proto enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VolumeClass {
    /// Mounted even while locked (portal TLS, remote config); never unmounted by a lock.
    Bootstrap,
    /// The control store.
    Control,
    /// One per application.
    Application,
}

/// A volume as the broker observes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// The volume id.
    pub volume_id: String,
    /// Its class, if the broker knows it.
    pub class: Option<VolumeClass>,
    /// Whether a mount exists at its mountpoint.
    pub mounted: bool,
    /// The plaintext mountpoint.
    pub mountpoint: PathBuf,
    /// The gocryptfs process, 0 if none.
    pub gocryptfs_pid: u32,
    /// Mounted but the gocryptfs process is gone.
    pub needs_repair: bool,
}

/// A failed broker call, classified by what the caller can do about it.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The object already exists (CreateVolume of an existing volume).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// MountVolume with a key that does not open the volume.
    #[error("wrong volume key: {0}")]
    WrongKey(String),
    /// UnsealSecret refused: the PCR policy no longer matches (PCR 7 changed).
    #[error("PCR policy mismatch: {0}")]
    PcrMismatch(String),
    /// The broker's policy refused the call.
    #[error("denied by the broker: {0}")]
    Denied(String),
    /// The broker refused an argument or an import archive (INVALID_ARGUMENT).
    #[error("rejected by the broker: {0}")]
    Rejected(String),
    /// The archive code itself failed (a backend that runs it in-process, or the local side
    /// of a streamed import: reading the manifest, the client's reader).
    #[error(transparent)]
    Archive(piccolo_keyset::Error),
    /// The object does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The broker is unreachable or not serving.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// Anything else; `code` is the gRPC code name (or the backend's own).
    #[error("{code}: {message}")]
    Failed {
        /// gRPC code name.
        code: String,
        /// The broker's message.
        message: String,
    },
}

impl From<BrokerError> for piccolo_keyset::TpmUnsealError {
    fn from(e: BrokerError) -> piccolo_keyset::TpmUnsealError {
        match e {
            BrokerError::PcrMismatch(_) => piccolo_keyset::TpmUnsealError::PcrMismatch,
            other => piccolo_keyset::TpmUnsealError::Failed(Box::new(other)),
        }
    }
}

/// Volume operations (the broker's Volumes service). Keys are borrowed for the call only.
pub trait VolumeBackend: Send + Sync + 'static {
    /// Creates (gocryptfs -init) `volume_id` under `key`, its files presented as user
    /// `present_as` when mounted (`None`: the caller). [`BrokerError::AlreadyExists`] if it
    /// exists.
    fn create_volume<'a>(
        &'a self,
        volume_id: &'a str,
        class: VolumeClass,
        key: &'a VolumeKey,
        present_as: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Mounts `volume_id` with `key` (verified by the backend) and returns the mountpoint.
    fn mount_volume<'a>(
        &'a self,
        volume_id: &'a str,
        key: &'a VolumeKey,
    ) -> BoxFuture<'a, Result<PathBuf, BrokerError>>;

    /// Unmounts `volume_id`; an unmounted volume is not an error.
    fn unmount_volume<'a>(&'a self, volume_id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// The observed state of one volume, or of all the caller may see (`None`).
    fn volume_status<'a>(&'a self, volume_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<VolumeInfo>, BrokerError>>;

    /// Writes a `kind` export of the (unmounted) `volume_ids` into `out`, a new empty file,
    /// and hands it back with the summary; the caller makes it durable and renames it. On
    /// error what was written is not an archive.
    fn export_archive<'a>(
        &'a self,
        kind: ExportKind,
        volume_ids: &'a [String],
        out: File,
    ) -> BoxFuture<'a, Result<(File, ExportSummary), BrokerError>>;

    /// Imports the archive `reader` yields (volumes unmounted). `limits` bound what this side
    /// reads itself; the broker applies its own configured caps.
    fn import_archive<'a>(
        &'a self,
        reader: Box<dyn Read + Send>,
        limits: &'a ImportLimits,
    ) -> BoxFuture<'a, Result<ImportReport, BrokerError>>;
}

/// TPM sealing (the broker's Tpm service).
pub trait SealBackend: Send + Sync + 'static {
    /// Seals `secret` to the current values of `pcrs` and returns the opaque blob.
    fn seal_secret<'a>(&'a self, secret: &'a Secret, pcrs: &'a [u32]) -> BoxFuture<'a, Result<Vec<u8>, BrokerError>>;

    /// Unseals a blob; a PCR change is [`BrokerError::PcrMismatch`].
    fn unseal_secret<'a>(&'a self, blob: &'a [u8]) -> BoxFuture<'a, Result<Secret, BrokerError>>;
}
