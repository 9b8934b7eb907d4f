// SPDX-License-Identifier: Apache-2.0
//! Client for Flatcar update_engine (`com.coreos.update1`) over D-Bus.
//!
//! Owns: the one connection to the bus that update_engine lives on (the system bus unless
//! an address is configured), reconnecting after the bus or update_engine went away; the
//! `com.coreos.update1.Manager` calls (`GetStatus`, `ResetStatus`, `AttemptUpdate`) and the
//! `StatusUpdate` signal, with `current_operation` matched by its string.
//!
//! Must never: start update_engine through D-Bus activation (starting it starts its 45 s
//! "mark this boot good" timer, which piccolo gates behind its health unit; every call
//! carries `NO_AUTO_START`), accept a `StatusUpdate` from anyone but the current owner of
//! `com.coreos.update1`, or hang a caller: every bus operation has a deadline.
//!
//! Facts about the interface (signatures, quirks) are in the project's protocol notes (C1).

mod client;
mod error;
mod status;
mod watch;

pub use client::{CALL_TIMEOUT, UpdateEngine};
pub use error::{Code, Error};
pub use status::{Operation, Status};
pub use watch::{Event, Watch};

/// Well-known bus name of update_engine.
pub const SERVICE: &str = "com.coreos.update1";
/// The object path update_engine registers (not the `/Manager` path of its XML).
pub const PATH: &str = "/com/coreos/update1";
/// The interface.
pub const INTERFACE: &str = "com.coreos.update1.Manager";
/// The signal sent on every state change and once at start-up.
pub const SIGNAL: &str = "StatusUpdate";
