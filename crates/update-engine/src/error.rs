// SPDX-License-Identifier: Apache-2.0
//! Errors, named after the step that failed, and the gRPC-style class each belongs to.

use std::time::Duration;

/// Everything that can go wrong talking to update_engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to the bus (no bus at that address, or the handshake failed).
    #[error("cannot connect to D-Bus {bus}")]
    Connect {
        /// "system bus" or the configured address.
        bus: String,
        /// Cause.
        #[source]
        source: Box<zbus::Error>,
    },
    /// Connecting took longer than the deadline.
    #[error("connecting to D-Bus {bus} took longer than {after:?}")]
    ConnectTimeout {
        /// "system bus" or the configured address.
        bus: String,
        /// The deadline.
        after: Duration,
    },
    /// Nobody owns `com.coreos.update1` on the bus.
    #[error("update_engine is not running (nobody owns com.coreos.update1 on {bus})")]
    NotRunning {
        /// "system bus" or the configured address.
        bus: String,
    },
    /// The bus's policy refused the broker (it must run as root on the system bus).
    #[error("{method}: the D-Bus policy refused the call: {message}")]
    BusDenied {
        /// The method.
        method: &'static str,
        /// The bus's message.
        message: String,
    },
    /// update_engine did not answer in time.
    #[error("{method}: update_engine did not answer within {after:?}")]
    Timeout {
        /// The method.
        method: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// `ResetStatus` refused: update_engine only resets from IDLE or UPDATED_NEED_REBOOT.
    #[error("ResetStatus refused in state {state}: only IDLE and UPDATED_NEED_REBOOT can be reset")]
    ResetRefused {
        /// The state update_engine reported after refusing.
        state: String,
    },
    /// update_engine (or whatever owns its name) answered a call with a D-Bus error.
    #[error("{method} failed: {name}: {message}")]
    Call {
        /// The method.
        method: &'static str,
        /// The D-Bus error name.
        name: String,
        /// Its message.
        message: String,
    },
    /// The connection broke during a call or a watch; the next call reconnects.
    #[error("{step}: the D-Bus connection was lost")]
    Disconnected {
        /// What was being done.
        step: &'static str,
        /// Cause.
        #[source]
        source: Box<zbus::Error>,
    },
    /// The reply did not have the documented signature.
    #[error("{method}: reply does not match com.coreos.update1.Manager")]
    BadReply {
        /// The method.
        method: &'static str,
        /// Cause.
        #[source]
        source: Box<zbus::Error>,
    },
}

/// How a caller should treat an error (the broker maps these to gRPC codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Try again later: no bus, update_engine not running, timed out, connection lost.
    Unavailable,
    /// The request does not fit update_engine's current state or configuration.
    FailedPrecondition,
    /// update_engine misbehaved.
    Internal,
}

impl Error {
    /// The class of this error.
    pub fn code(&self) -> Code {
        match self {
            Error::Connect { .. }
            | Error::ConnectTimeout { .. }
            | Error::NotRunning { .. }
            | Error::Timeout { .. }
            | Error::Disconnected { .. } => Code::Unavailable,
            Error::ResetRefused { .. } | Error::BusDenied { .. } => Code::FailedPrecondition,
            Error::Call { .. } | Error::BadReply { .. } => Code::Internal,
        }
    }

    /// Whether the cached connection should be dropped (the next call reconnects).
    pub(crate) fn broke_connection(&self) -> bool {
        matches!(self, Error::Disconnected { .. } | Error::Timeout { .. })
    }
}

/// The D-Bus error name and message of a method error reply, if `e` is one.
pub(crate) fn dbus_error(e: &zbus::Error) -> Option<(String, String)> {
    use zbus::DBusError;
    match e {
        zbus::Error::MethodError(name, msg, _) => Some((name.to_string(), msg.clone().unwrap_or_default())),
        zbus::Error::FDO(f) => Some((f.name().to_string(), f.description().unwrap_or_default().to_owned())),
        _ => None,
    }
}

/// Classifies a failed method call to update_engine.
pub(crate) fn call_error(method: &'static str, bus: &str, e: zbus::Error) -> Error {
    match dbus_error(&e) {
        Some((name, _))
            if name == "org.freedesktop.DBus.Error.ServiceUnknown"
                || name == "org.freedesktop.DBus.Error.NameHasNoOwner" =>
        {
            Error::NotRunning { bus: bus.to_owned() }
        }
        Some((name, message)) if name == "org.freedesktop.DBus.Error.AccessDenied" => {
            Error::BusDenied { method, message }
        }
        Some((name, _))
            if name == "org.freedesktop.DBus.Error.NoReply" || name == "org.freedesktop.DBus.Error.Timeout" =>
        {
            Error::Timeout { method, after: crate::CALL_TIMEOUT }
        }
        Some((name, message)) => Error::Call { method, name, message },
        None => match e {
            zbus::Error::Variant(_) | zbus::Error::InvalidReply | zbus::Error::InvalidField => {
                Error::BadReply { method, source: Box::new(e) }
            }
            e => Error::Disconnected { step: method, source: Box::new(e) },
        },
    }
}
