// SPDX-License-Identifier: Apache-2.0
//! The crate's one error type. Variants are named after the step that failed and keep the
//! path and the io error; messages never repeat the source (print the chain to see it).
//! Variable data never appears in a message.

use std::io;
use std::path::PathBuf;

/// A gRPC status code, as recommended for each error (the broker owns the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The caller's argument is wrong (name, GUID, attributes, data size).
    InvalidArgument,
    /// The variable does not exist.
    NotFound,
    /// The machine has no EFI variables, or the variable is not something we can handle.
    FailedPrecondition,
    /// The file changed under us (replaced between two opens): nothing was written.
    Aborted,
    /// The variable's stored content is not in the efivarfs format.
    DataLoss,
    /// The firmware's variable store is full.
    ResourceExhausted,
    /// Anything else: an unexpected io failure.
    Internal,
}

/// Everything that can fail reading, writing or deleting a variable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The efivarfs root does not exist, is not a directory, or has no efivarfs mounted.
    #[error("no EFI: {root} {reason}")]
    NoEfi {
        /// The configured root.
        root: PathBuf,
        /// Why it is not usable.
        reason: &'static str,
    },
    /// The root exists but could not be opened or examined.
    #[error("cannot open the efivarfs root {root}")]
    OpenRoot {
        /// The configured root.
        root: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The variable name is not acceptable.
    #[error("invalid EFI variable name: {reason}")]
    InvalidName {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The vendor GUID is not `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex.
    #[error("invalid vendor GUID: expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex)")]
    InvalidGuid,
    /// The attribute word would be refused by the kernel or the UEFI rules.
    #[error("invalid attributes {attributes:#x}: {reason}")]
    InvalidAttributes {
        /// The word.
        attributes: u32,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A write with no data (which would delete the variable).
    #[error("variable data is empty (deleting is a separate call)")]
    EmptyData,
    /// More data than [`crate::MAX_DATA_BYTES`].
    #[error("variable data is {len} bytes, more than the {max}-byte bound")]
    DataTooLarge {
        /// Bytes given.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A variable file shorter than its 4-byte attribute word.
    #[error("malformed variable: {len} bytes, fewer than the 4-byte attribute word")]
    Malformed {
        /// Bytes found.
        len: usize,
    },
    /// Data that does not decode as the expected value type.
    #[error("malformed {kind} value ({len} bytes)")]
    MalformedValue {
        /// The expected type.
        kind: &'static str,
        /// Bytes found.
        len: usize,
    },
    /// The variable does not exist.
    #[error("EFI variable {path} does not exist")]
    NotFound {
        /// Its file.
        path: PathBuf,
    },
    /// The name exists but is not a regular file (only possible on a plain directory).
    #[error("{path} is not a regular file")]
    NotRegularFile {
        /// Its file.
        path: PathBuf,
    },
    /// A stored variable larger than the read bound.
    #[error("EFI variable {path} is larger than the {max}-byte bound")]
    VariableTooLarge {
        /// Its file.
        path: PathBuf,
        /// The data bound.
        max: usize,
    },
    /// An operation only a real efivarfs can do (append writes).
    #[error("{what} needs a real efivarfs; {root} is a plain directory")]
    Unsupported {
        /// The operation.
        what: &'static str,
        /// The root.
        root: PathBuf,
    },
    /// Opening the variable for reading failed.
    #[error("cannot open {path} for reading")]
    OpenRead {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the variable failed.
    #[error("cannot read {path}")]
    Read {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `fstat`/`fstatat` of the variable failed.
    #[error("cannot stat {path}")]
    Stat {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// `FS_IOC_GETFLAGS` failed.
    #[error("cannot read the inode flags of {path}")]
    GetFlags {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Clearing `FS_IMMUTABLE_FL` with `FS_IOC_SETFLAGS` failed.
    #[error("cannot clear the immutable flag of {path}")]
    ClearImmutable {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Putting the original flags back failed; `written` says whether the new content (or
    /// the deletion) took effect before that.
    #[error("cannot restore the immutable flag of {path} (variable {})", if *written { "was written" } else { "is unchanged" })]
    RestoreFlags {
        /// Its file.
        path: PathBuf,
        /// Whether the write went through.
        written: bool,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Opening the variable for writing (or creating it exclusively) failed.
    #[error("cannot open {path} for writing")]
    OpenWrite {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The file was replaced between the read-only and the write open: nothing written.
    #[error("{path} was replaced while it was being written; nothing was written")]
    Replaced {
        /// Its file.
        path: PathBuf,
    },
    /// The single `write()` of attributes and data failed.
    #[error("cannot write {path}")]
    Write {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The `write()` took fewer bytes than the variable.
    #[error("short write to {path}: {written} of {len} bytes")]
    ShortWrite {
        /// Its file.
        path: PathBuf,
        /// Bytes taken.
        written: usize,
        /// Bytes given.
        len: usize,
    },
    /// The write failed and the file it had just created could not be removed.
    #[error("cannot remove {path} after its write failed ({write})")]
    Cleanup {
        /// Its file.
        path: PathBuf,
        /// Why the write failed.
        write: Box<Error>,
        /// Why the removal failed.
        #[source]
        source: io::Error,
    },
    /// Cutting a plain-directory file to the new length, or syncing it, failed.
    #[error("cannot truncate or sync {path}")]
    Truncate {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Removing the variable failed.
    #[error("cannot delete {path}")]
    Unlink {
        /// Its file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The recommended gRPC code.
    pub fn grpc_code(&self) -> Code {
        use Error::*;
        match self {
            InvalidName { .. }
            | InvalidGuid
            | InvalidAttributes { .. }
            | EmptyData
            | DataTooLarge { .. }
            | MalformedValue { .. } => Code::InvalidArgument,
            NotFound { .. } => Code::NotFound,
            NoEfi { .. } | NotRegularFile { .. } | VariableTooLarge { .. } | Unsupported { .. } => {
                Code::FailedPrecondition
            }
            Replaced { .. } => Code::Aborted,
            Malformed { .. } => Code::DataLoss,
            // The kernel answers EINVAL when the firmware refuses the variable, ENOSPC when
            // its store is full.
            Write { source, .. } if source.raw_os_error() == Some(libc::EINVAL) => Code::InvalidArgument,
            Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => Code::ResourceExhausted,
            // Created (EEXIST) or deleted (ENOENT) by someone else between our two opens.
            OpenWrite { source, .. } if matches!(source.raw_os_error(), Some(libc::EEXIST | libc::ENOENT)) => {
                Code::Aborted
            }
            Cleanup { write, .. } => write.grpc_code(),
            OpenRoot { .. }
            | OpenRead { .. }
            | Read { .. }
            | Stat { .. }
            | GetFlags { .. }
            | ClearImmutable { .. }
            | RestoreFlags { .. }
            | OpenWrite { .. }
            | Write { .. }
            | ShortWrite { .. }
            | Truncate { .. }
            | Unlink { .. } => Code::Internal,
        }
    }
}
