// SPDX-License-Identifier: Apache-2.0
//! The crate's one error enum; variants are named after the step that failed.

use std::path::PathBuf;

/// Why an update step failed. Messages never contain a device token.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read or parsed.
    #[error("cannot read config {path}: {reason}")]
    Config {
        /// File.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The broker socket could not be reached.
    #[error("{0}")]
    BrokerConnect(#[from] piccolo_proto::client::ConnectError),
    /// The broker refused or failed a call.
    #[error("broker {rpc} failed: {code:?}: {message}")]
    Broker {
        /// RPC name.
        rpc: &'static str,
        /// gRPC code.
        code: tonic::Code,
        /// Broker's message.
        message: String,
    },
    /// Getting a device token failed.
    #[error("cannot get a device token: {0}")]
    Token(String),
    /// The update server could not be reached or answered badly (transport level).
    #[error("update server request to {url} failed: {reason}")]
    Http {
        /// URL (never with credentials).
        url: String,
        /// What happened.
        reason: String,
    },
    /// The update server answered with an unexpected HTTP status.
    #[error("update server answered {status} for {url}")]
    HttpStatus {
        /// URL.
        url: String,
        /// HTTP status code.
        status: u16,
    },
    /// The manifest is malformed or its signature does not verify.
    #[error("manifest rejected: {0}")]
    Manifest(String),
    /// The payload did not arrive whole.
    #[error("download of {version} failed after {bytes} of {total} bytes: {reason}")]
    Download {
        /// Version.
        version: String,
        /// Bytes received.
        bytes: u64,
        /// Announced size.
        total: u64,
        /// Why.
        reason: String,
    },
    /// The payload's SHA-256 is not the manifest's.
    #[error("payload digest mismatch: manifest says {expected}, received {actual}")]
    Digest {
        /// From the manifest.
        expected: String,
        /// Computed.
        actual: String,
    },
    /// The durable record could not be read or written.
    #[error("state file {path}")]
    State {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The operation was cancelled by the operator.
    #[error("cancelled by the operator")]
    Cancelled,
    /// Another job holds the engine.
    #[error("busy: {0}")]
    Busy(String),
    /// A request that does not fit the current state.
    #[error("{0}")]
    Precondition(String),
    /// A bad argument.
    #[error("{0}")]
    InvalidArgument(String),
    /// Binding the control socket failed.
    #[error("cannot bind control socket {path}")]
    Socket {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Turns a broker status into an error naming the RPC.
    pub fn broker(rpc: &'static str, s: tonic::Status) -> Error {
        Error::Broker { rpc, code: s.code(), message: s.message().to_owned() }
    }
}

/// The one mapping to gRPC for the control socket.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        use tonic::Code;
        let code = match &e {
            Error::Busy(_) | Error::Precondition(_) => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Cancelled => Code::Cancelled,
            Error::Broker { code, .. } => *code,
            Error::BrokerConnect(_) => Code::Unavailable,
            _ => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
