// SPDX-License-Identifier: Apache-2.0
//! The contract between the broker and everything that talks to it.
//!
//! Owns: the generated gRPC code for package `piccolo.broker.v1`, the table of
//! RPCs the policy may name ([`rpc::RPCS`]), default paths, and the Unix-socket
//! client constructor. Must never contain behaviour: no I/O beyond connecting.

pub mod client;
pub mod paths;
pub mod rpc;

/// Generated messages and services of `piccolo.broker.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("piccolo.broker.v1");
}

/// Generated messages and services of `piccolo.updater.v1` (the update worker's socket).
pub mod updater {
    /// Version 1.
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("piccolo.updater.v1");
    }
}

pub use rpc::{RPCS, Rpc, RpcSpec};
