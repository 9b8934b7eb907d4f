// SPDX-License-Identifier: Apache-2.0
//! gRPC service implementations. Handlers are thin: each RPC goes through
//! [`crate::guard::guard`] and calls one backend function.
//!
//! Adding a service: a module here and one `serve!` line in [`routes`].

pub mod archive;
pub mod boot;
pub mod broker_svc;
pub mod disks;
pub mod efi;
pub mod tpm;
pub mod update_engine;
pub mod volumes;

use piccolo_proto::paths::MAX_MESSAGE_BYTES;
use piccolo_proto::v1;
use tonic::service::{Routes, RoutesBuilder};

use crate::guard::Shared;

/// Every service the broker serves, with the message-size bound applied.
pub fn routes(ctx: &Shared) -> Routes {
    let mut b = RoutesBuilder::default();
    // The generated servers share no trait for the size bounds, hence a macro.
    macro_rules! serve {
        ($server:expr) => {
            b.add_service(
                $server.max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
        };
    }
    serve!(v1::broker_server::BrokerServer::new(broker_svc::BrokerSvc::new(ctx.clone())));
    serve!(v1::boot_server::BootServer::new(boot::BootSvc::new(ctx.clone())));
    serve!(v1::disks_server::DisksServer::new(disks::DisksSvc::new(ctx.clone())));
    serve!(v1::efi_server::EfiServer::new(efi::EfiSvc::new(ctx.clone())));
    let vols = volumes::VolumesSvc::new(ctx.clone());
    let shared_vols = vols.volumes();
    serve!(v1::volumes_server::VolumesServer::new(vols));
    serve!(v1::archive_server::ArchiveServer::new(archive::ArchiveSvc::new(ctx.clone(), shared_vols)));
    serve!(v1::update_engine_server::UpdateEngineServer::new(update_engine::UpdateEngineSvc::new(ctx.clone())));
    serve!(v1::tpm_server::TpmServer::new(tpm::TpmSvc::new(ctx.clone())));
    b.routes()
}
