// SPDX-License-Identifier: Apache-2.0
//! The crate's one error type. No variant ever carries a secret: passwords, recovery keys,
//! derived keys and the SDEK never reach a message, a field or a source error.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the key set, the export writer and the importer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // ---- key set -------------------------------------------------------------------------
    /// `crypto/keyset.json` could not be read.
    #[error("cannot read key set {path}")]
    ReadKeyset {
        /// The key-set path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The key set is not valid JSON of the expected shape.
    #[error("key set {path} is malformed")]
    ParseKeyset {
        /// The key-set path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The key set was written by a format version this build does not understand.
    #[error("key set {path} has unsupported format {format:?} version {version}")]
    UnsupportedKeysetVersion {
        /// The key-set path.
        path: PathBuf,
        /// The `format` field found.
        format: String,
        /// The `version` field found.
        version: u64,
    },
    /// The key set parsed but a field is out of range or inconsistent.
    #[error("key set {path} is invalid: {reason}")]
    InvalidKeyset {
        /// The key-set path.
        path: PathBuf,
        /// What is wrong (never secret material).
        reason: String,
    },
    /// Argon2id parameters outside the range this crate accepts.
    #[error("KDF parameters out of range: m={m_cost_kib} KiB, t={t_cost}, p={p_cost}")]
    KdfParamsOutOfRange {
        /// Memory in KiB.
        m_cost_kib: u32,
        /// Iterations.
        t_cost: u32,
        /// Lanes.
        p_cost: u32,
    },
    /// The Argon2id computation itself failed (bad parameters or allocation).
    #[error("key derivation failed: {reason}")]
    DeriveKey {
        /// The argon2 crate's description (contains no input material).
        reason: String,
    },
    /// `create` refused to overwrite an existing key set.
    #[error("key set {path} already exists")]
    KeysetExists {
        /// The key-set path.
        path: PathBuf,
    },
    /// Creating the key-set directory or writing the key set durably failed.
    #[error("cannot write key set {path}")]
    WriteKeyset {
        /// The path being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The OS random number generator failed.
    #[error("OS random number generator failed")]
    Random {
        /// The cause.
        #[source]
        source: getrandom::Error,
    },
    /// A new password is shorter than [`crate::MIN_NEW_PASSWORD_CHARS`].
    #[error("new password is too short (at least {min} characters)")]
    PasswordTooShort {
        /// The minimum.
        min: usize,
    },
    /// A password is longer than [`crate::MAX_PASSWORD_BYTES`].
    #[error("password is too long (at most {max} bytes)")]
    PasswordTooLong {
        /// The maximum.
        max: usize,
    },
    /// The password did not open the password wrap.
    #[error("wrong password")]
    WrongPassword,
    /// The recovery key is well formed (checksum ok) but does not open the recovery wrap.
    #[error("wrong recovery key")]
    WrongRecoveryKey,
    /// The recovery key has a wrong length, a character outside the alphabet, or a bad
    /// checksum: it was mistyped.
    #[error("recovery key mistyped: {reason}")]
    RecoveryKeyMistyped {
        /// Which check failed (never the key or part of it).
        reason: &'static str,
    },
    /// The SDEK handed in does not belong to this key set.
    #[error("the given SDEK does not belong to key set {path}")]
    SdekMismatch {
        /// The key-set path.
        path: PathBuf,
    },
    /// `unlock_with_tpm` on a key set without a TPM-sealed SDEK.
    #[error("TPM unlock is not enrolled in key set {path}")]
    TpmNotEnrolled {
        /// The key-set path.
        path: PathBuf,
    },
    /// The TPM refused to unseal because PCR 7 differs from the sealed policy.
    #[error("TPM unlock failed: PCR 7 changed")]
    TpmPcrChanged,
    /// The TPM unseal failed for another reason.
    #[error("TPM unlock failed")]
    TpmUnseal {
        /// The cause reported by the unseal callback.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The TPM unsealed something that is not this key set's SDEK.
    #[error("TPM unlock failed: the unsealed secret is not this key set's SDEK")]
    TpmWrongSecret,
    /// The TPM blob exceeds [`crate::MAX_TPM_BLOB_BYTES`] or is empty.
    #[error("TPM-sealed blob size {size} is outside 1..={max} bytes")]
    TpmBlobSize {
        /// The size given.
        size: usize,
        /// The maximum.
        max: usize,
    },

    // ---- export ----------------------------------------------------------------------------
    /// A volume id is not in the allowed syntax, is repeated, or the list is empty/too long.
    #[error("invalid volume id list: {reason}")]
    VolumeIds {
        /// What is wrong.
        reason: String,
    },
    /// A volume named for export has no `ciphertext/<id>` directory.
    #[error("volume {id} has no ciphertext directory at {path}")]
    MissingVolume {
        /// The volume id.
        id: String,
        /// The expected directory.
        path: PathBuf,
    },
    /// Walking or reading the tree to export failed.
    #[error("cannot read {path} for export")]
    ReadTree {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tree holds something the archive format cannot carry (device, fifo, socket,
    /// symlink whose target is not a single encrypted name, non-UTF-8 name).
    #[error("cannot export {path}: {reason}")]
    UnsupportedFile {
        /// The offending path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// A file changed between the hashing pass and the streaming pass: the tree was not quiesced.
    #[error("{path} changed during export; quiesce the volumes and retry")]
    TreeChanged {
        /// The file that changed.
        path: PathBuf,
    },
    /// Writing the archive to the caller's writer failed.
    #[error("cannot write export archive")]
    WriteArchive {
        /// The cause.
        #[source]
        source: io::Error,
    },

    // ---- import ----------------------------------------------------------------------------
    /// Reading the archive stream failed (including a truncated stream or a bad tar header).
    #[error("cannot read import archive")]
    ReadArchive {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive is structurally wrong (missing manifest or trailer, unexpected entry,
    /// entry out of manifest order, trailing data).
    #[error("import archive rejected: {reason}")]
    ArchiveRejected {
        /// What is wrong.
        reason: String,
    },
    /// The archive was written by a format version this build does not understand.
    #[error("import archive has unsupported format {format:?} version {version}")]
    UnsupportedArchiveVersion {
        /// The `format` field found.
        format: String,
        /// The `version` field found.
        version: u64,
    },
    /// A path in the manifest or a tar header is absolute, has `..`, or is outside the
    /// exportable layout.
    #[error("import archive rejected: path {path:?} {reason}")]
    PathRejected {
        /// The path (truncated to a printable length).
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// A tar entry is a symlink, hard link, device, fifo or another non-regular type.
    #[error("import archive rejected: entry {path:?} has forbidden type {kind}")]
    EntryTypeRejected {
        /// The path (truncated to a printable length).
        path: String,
        /// The entry type.
        kind: String,
    },
    /// A file's content does not match the SHA-256 in the manifest.
    #[error("import archive rejected: {path} does not match its manifest digest")]
    DigestMismatch {
        /// The archive path.
        path: String,
    },
    /// The archive bytes do not match the overall checksum in the trailer.
    #[error("import archive rejected: overall archive checksum mismatch")]
    ChecksumMismatch,
    /// A size or count cap from [`crate::ImportLimits`] was exceeded.
    #[error("import archive rejected: {what} exceeds the limit of {limit}")]
    LimitExceeded {
        /// Which limit.
        what: &'static str,
        /// Its value.
        limit: u64,
    },
    /// A control import whose key-set id does not match the live key set (or none exists).
    #[error("import archive rejected: it was made under a different key set than the live one")]
    KeysetMismatch,
    /// A volume to be replaced is still mounted.
    #[error("import refused: {path} is a mount point; lock the store first")]
    VolumeMounted {
        /// The mountpoint.
        path: PathBuf,
    },
    /// Creating or writing the staging area failed; live state is untouched.
    #[error("cannot stage import at {path}")]
    Stage {
        /// The staging path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An [`crate::ImportHooks`] callback refused the import (policy, ownership); live state is
    /// untouched. The source is the hook's own error, for the caller to downcast.
    #[error(transparent)]
    Refused(Box<dyn std::error::Error + Send + Sync>),
    /// Swapping staged content into place failed (see `recover_interrupted_import`).
    #[error("cannot swap imported {path} into place")]
    Swap {
        /// The path being swapped.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Convenience alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether this refuses an archive (or the key set inside one) for what it contains:
    /// the caller sent something bad, nothing on this side failed. The broker maps these to
    /// INVALID_ARGUMENT and the API to 422, from this one list.
    pub fn is_archive_rejection(&self) -> bool {
        matches!(
            self,
            Error::ReadArchive { .. }
                | Error::ArchiveRejected { .. }
                | Error::UnsupportedArchiveVersion { .. }
                | Error::PathRejected { .. }
                | Error::EntryTypeRejected { .. }
                | Error::DigestMismatch { .. }
                | Error::ChecksumMismatch
                | Error::LimitExceeded { .. }
                | Error::KeysetMismatch
                | Error::UnsupportedKeysetVersion { .. }
                | Error::ParseKeyset { .. }
                | Error::InvalidKeyset { .. }
                | Error::KdfParamsOutOfRange { .. }
        )
    }
}
