// SPDX-License-Identifier: Apache-2.0
//! piccolo-broker: the only process of piccolo that runs as root.
//!
//! Owns: the broker socket, the policy in force, the audit log, and the privileged verbs
//! (each one narrow RPC with validated arguments, see `handlers`).
//! Must never: run a caller-supplied command, open a caller-supplied path, answer before
//! the call's audit record is durable, or put a secret in a log, audit record or error.

pub mod backends;
pub mod caps;
pub mod config;
pub mod error;
pub mod guard;
pub mod handlers;
pub mod identity;
pub mod notify;
pub mod policy;
pub mod reload;
pub mod server;
pub mod tpm_helper;
