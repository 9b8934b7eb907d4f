// SPDX-License-Identifier: Apache-2.0
//! The crate's one error type. Variants are named after the step that failed; messages
//! carry ids, paths and exit codes, never key material.

use std::path::PathBuf;

/// What went wrong with a volume operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The volume id does not match `[a-z0-9][a-z0-9-]{0,62}`.
    #[error("invalid volume id {0:?}: use 1-63 characters a-z, 0-9, '-', not starting with '-'")]
    InvalidId(String),
    /// The key is not 32 bytes.
    #[error("volume key must be 32 bytes, got {0}")]
    InvalidKeyLength(usize),
    /// The class is missing or does not fit the id.
    #[error("invalid volume class: {0}")]
    InvalidClass(String),
    /// `ciphertext/<id>` already exists.
    #[error("volume {0} already exists")]
    AlreadyExists(String),
    /// `ciphertext/<id>` does not exist.
    #[error("volume {0} does not exist")]
    NotFound(String),
    /// The key does not open the volume (key check or gocryptfs refused it).
    #[error("wrong volume key")]
    WrongKey,
    /// The caller is not the volume's owner.
    #[error("volume {id} belongs to uid {owner}")]
    NotOwner {
        /// Volume id.
        id: String,
        /// The owner recorded at creation.
        owner: u32,
    },
    /// The volume is mounted for another user.
    #[error("volume {id} is mounted for uid {owner}")]
    MountedForOther {
        /// Volume id.
        id: String,
        /// uid the mount presents files as.
        owner: u32,
    },
    /// `mounts/<id>` holds files while nothing is mounted on it (refusing to hide them).
    #[error("mountpoint {0} is not empty while unmounted")]
    MountpointNotEmpty(PathBuf),
    /// Something is still using the mount (open files, a working directory).
    #[error("volume {0} is busy (open files or working directories inside it)")]
    Busy(String),
    /// A path that must be a real directory is a symlink or another kind of file.
    #[error("{0} is not a directory (symlink or other file type)")]
    NotADirectory(PathBuf),
    /// The volume's metadata file is unreadable or malformed.
    #[error("volume metadata {path} is invalid: {reason}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// gocryptfs could not be started.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// gocryptfs ran but failed (`-init` or mount).
    #[error("gocryptfs {step} failed ({status}): {stderr}")]
    Gocryptfs {
        /// `init` or `mount`.
        step: &'static str,
        /// Exit status.
        status: String,
        /// The tail of its stderr (gocryptfs never prints the password).
        stderr: String,
    },
    /// gocryptfs reported success but the mount is not in the mount table.
    #[error("gocryptfs exited 0 but {0} is not a gocryptfs mount")]
    MountMissing(PathBuf),
    /// unmount(2) failed.
    #[error("cannot unmount {path}")]
    Unmount {
        /// The mountpoint.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// A filesystem step failed.
    #[error("{step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// The gRPC code a broker should answer with; the one mapping, kept next to the variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Bad id, key length or class.
    InvalidArgument,
    /// No such volume.
    NotFound,
    /// Volume exists.
    AlreadyExists,
    /// Wrong key.
    PermissionDenied,
    /// Wrong state (mounted for someone else, busy, stray files).
    FailedPrecondition,
    /// Everything else.
    Internal,
}

impl Error {
    /// The gRPC code this error maps to.
    pub fn grpc_code(&self) -> Code {
        match self {
            Error::InvalidId(_) | Error::InvalidKeyLength(_) | Error::InvalidClass(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::WrongKey | Error::NotOwner { .. } => Code::PermissionDenied,
            Error::MountedForOther { .. } | Error::MountpointNotEmpty(_) | Error::Busy(_) => Code::FailedPrecondition,
            Error::NotADirectory(_)
            | Error::Metadata { .. }
            | Error::Spawn { .. }
            | Error::Gocryptfs { .. }
            | Error::MountMissing(_)
            | Error::Unmount { .. }
            | Error::Io { .. } => Code::Internal,
        }
    }

    pub(crate) fn io(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { step, path, source }
    }
}
