// SPDX-License-Identifier: Apache-2.0
//! Errors of the audit writer and verifier.

use std::path::PathBuf;

/// A failure to write the audit log. Callers must treat any of these as "not durable".
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log file could not be opened for appending.
    #[error("cannot open audit log {path} for appending")]
    Open {
        /// The log path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The existing log's last record could not be read to continue the chain.
    #[error("cannot continue the audit chain from {path}: {reason}")]
    Recover {
        /// The log path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// Writing or syncing a batch failed; the batch was rolled back.
    #[error("cannot append to audit log {path}")]
    Append {
        /// The log path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Rotating to a new file failed.
    #[error("cannot rotate audit log {path}")]
    Rotate {
        /// The log path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An earlier failure left the writer unable to guarantee the chain; every append fails.
    #[error("audit log is unavailable after an earlier write failure")]
    Poisoned,
    /// The writer thread is gone (broker shutting down).
    #[error("audit writer stopped")]
    Stopped,
}

/// The first problem found while verifying a chain.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct VerifyError {
    /// File holding the bad record.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// Sequence number of the bad record when it could be read.
    pub seq: Option<u64>,
    /// Why the chain is broken.
    pub reason: String,
}
