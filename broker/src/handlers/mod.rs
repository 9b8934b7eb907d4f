// SPDX-License-Identifier: Apache-2.0
//! gRPC service implementations. Handlers are thin: each RPC goes through
//! [`crate::guard::guard`] and calls one backend function.
//!
//! Adding a service: a module here and one `add_service` line in [`routes`].

pub mod boot;
pub mod broker_svc;
pub mod disks;
pub mod efi;

use piccolo_proto::paths::MAX_MESSAGE_BYTES;
use tonic::service::{Routes, RoutesBuilder};

use crate::guard::Shared;

/// Every service the broker serves, with the message-size bound applied.
pub fn routes(ctx: &Shared) -> Routes {
    use piccolo_proto::v1::broker_server::BrokerServer;
    let mut b = RoutesBuilder::default();
    b.add_service(
        BrokerServer::new(broker_svc::BrokerSvc::new(ctx.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    b.add_service(
        piccolo_proto::v1::boot_server::BootServer::new(boot::BootSvc::new(ctx.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    b.add_service(
        piccolo_proto::v1::disks_server::DisksServer::new(disks::DisksSvc::new(ctx.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    b.add_service(
        piccolo_proto::v1::efi_server::EfiServer::new(efi::EfiSvc::new(ctx.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    b.routes()
}
