// SPDX-License-Identifier: Apache-2.0
//! The broker's audit log: append-only JSON Lines, each record hash-chained to the one before.
//!
//! Owns: the record format and its canonical encoding, the writer (one thread, group commit,
//! fsync before any caller is told its record is durable, size rotation that keeps the chain),
//! the reader and the verifier used by `piccoloctl audit`.
//! Must never: hold secrets (callers pass summaries, sizes and digests), rewrite or delete a
//! durable record, or acknowledge a record before it is on disk.

mod canonical;
mod error;
mod files;
mod record;
mod verify;
mod writer;

pub use error::{AuditError, VerifyError};
pub use files::{ChainState, Checkpoint, chain_files, read_chain_state, read_log, read_records, state_path};
pub use record::{Caller, Decision, Entry, GENESIS, Kind, Outcome, Record};
pub use verify::{VerifySummary, verify_files};
pub use writer::{AuditConfig, AuditLog, PREALLOCATE};
