// SPDX-License-Identifier: Apache-2.0
//! piccolo-updater: the unprivileged update worker, and `piccolo-health`.
//!
//! Owns: the update check (device JWT from the broker's TPM, no device id or subscription in
//! the URL), verification of the signed manifest against a pinned Ed25519 key, the download
//! (HTTP/1 with Range resume) streamed into the broker's `WriteInactiveSlot`, activation, the
//! maintenance window, the durable record of attempts in its state dir, and its own control
//! socket (peer-credential authorised).
//! Must never: download anything before the manifest signature checks out, write a disk or
//! reboot except through the broker, retry automatically a version the box fell back from,
//! or log a device token.

#![forbid(unsafe_code)]

pub mod boot;
pub mod config;
pub mod control;
pub mod durable;
pub mod engine;
pub mod error;
pub mod health;
pub mod http;
pub mod manifest;
pub mod record;
pub mod status;
pub mod token;
pub mod window;

pub use error::Error;
