// SPDX-License-Identifier: Apache-2.0
//! [`GrpcBroker`]: the real backend, the broker's Volumes and Tpm services over its socket.
//!
//! Limitation: tonic takes the request by value and encodes it into its own buffers, so the
//! copy of a key inside an in-flight request is not zeroed by us; it lives only for the call.

use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use piccolo_keyset::Secret;
use piccolo_proto::v1;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::broker::{BrokerError, SealBackend, VolumeBackend, VolumeClass, VolumeInfo};
use crate::keys::VolumeKey;

/// A connection to `piccolo-broker`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct GrpcBroker {
    channel: Channel,
}

impl GrpcBroker {
    /// Connects to the broker socket (e.g. [`piccolo_proto::client::default_socket`]).
    pub async fn connect(socket: &Path) -> Result<GrpcBroker, BrokerError> {
        let channel =
            piccolo_proto::client::connect_unix(socket).await.map_err(|e| BrokerError::Unavailable(e.to_string()))?;
        Ok(GrpcBroker { channel })
    }

    /// Uses an existing channel (e.g. one whose connector connects as another user in tests).
    pub fn from_channel(channel: Channel) -> GrpcBroker {
        GrpcBroker { channel }
    }

    fn volumes(&self) -> v1::volumes_client::VolumesClient<Channel> {
        v1::volumes_client::VolumesClient::new(self.channel.clone())
    }

    fn tpm(&self) -> v1::tpm_client::TpmClient<Channel> {
        v1::tpm_client::TpmClient::new(self.channel.clone())
    }
}

/// Classifies a broker status. The messages the contract fixes ("wrong volume key",
/// "PCR policy mismatch") select the typed variants.
pub(crate) fn from_status(s: Status) -> BrokerError {
    let msg = s.message().to_string();
    match s.code() {
        Code::AlreadyExists => BrokerError::AlreadyExists(msg),
        Code::PermissionDenied if msg.contains("wrong volume key") => BrokerError::WrongKey(msg),
        Code::PermissionDenied => BrokerError::Denied(msg),
        Code::FailedPrecondition if msg.contains("PCR policy mismatch") => BrokerError::PcrMismatch(msg),
        Code::NotFound => BrokerError::NotFound(msg),
        Code::Unavailable => BrokerError::Unavailable(msg),
        code => BrokerError::Failed { code: format!("{code:?}"), message: msg },
    }
}

fn class_to_proto(c: VolumeClass) -> v1::VolumeClass {
    match c {
        VolumeClass::Bootstrap => v1::VolumeClass::Bootstrap,
        VolumeClass::Control => v1::VolumeClass::Control,
        VolumeClass::Application => v1::VolumeClass::Application,
    }
}

fn class_from_proto(c: i32) -> Option<VolumeClass> {
    match v1::VolumeClass::try_from(c).ok()? {
        v1::VolumeClass::Bootstrap => Some(VolumeClass::Bootstrap),
        v1::VolumeClass::Control => Some(VolumeClass::Control),
        v1::VolumeClass::Application => Some(VolumeClass::Application),
        v1::VolumeClass::Unspecified => None,
    }
}

impl VolumeBackend for GrpcBroker {
    fn create_volume<'a>(
        &'a self,
        volume_id: &'a str,
        class: VolumeClass,
        key: &'a VolumeKey,
        present_as: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let req = v1::CreateVolumeRequest {
                volume_id: volume_id.to_string(),
                class: class_to_proto(class) as i32,
                key: key.expose_secret().to_vec(),
                present_as: present_as.unwrap_or_default().to_string(),
            };
            self.volumes().create_volume(req).await.map_err(from_status)?;
            Ok(())
        })
    }

    fn mount_volume<'a>(
        &'a self,
        volume_id: &'a str,
        key: &'a VolumeKey,
    ) -> BoxFuture<'a, Result<PathBuf, BrokerError>> {
        Box::pin(async move {
            let req = v1::MountVolumeRequest { volume_id: volume_id.to_string(), key: key.expose_secret().to_vec() };
            let resp = self.volumes().mount_volume(req).await.map_err(from_status)?.into_inner();
            Ok(PathBuf::from(resp.mountpoint))
        })
    }

    fn unmount_volume<'a>(&'a self, volume_id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let req = v1::UnmountVolumeRequest { volume_id: volume_id.to_string() };
            self.volumes().unmount_volume(req).await.map_err(from_status)?;
            Ok(())
        })
    }

    fn volume_status<'a>(&'a self, volume_id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<VolumeInfo>, BrokerError>> {
        Box::pin(async move {
            let req = v1::VolumeStatusRequest { volume_id: volume_id.unwrap_or_default().to_string() };
            let resp = self.volumes().volume_status(req).await.map_err(from_status)?.into_inner();
            Ok(resp
                .volumes
                .into_iter()
                .map(|v| VolumeInfo {
                    class: class_from_proto(v.class),
                    volume_id: v.volume_id,
                    mounted: v.mounted,
                    mountpoint: PathBuf::from(v.mountpoint),
                    gocryptfs_pid: v.gocryptfs_pid,
                    needs_repair: v.needs_repair,
                })
                .collect())
        })
    }
}

impl SealBackend for GrpcBroker {
    fn seal_secret<'a>(&'a self, secret: &'a Secret, pcrs: &'a [u32]) -> BoxFuture<'a, Result<Vec<u8>, BrokerError>> {
        Box::pin(async move {
            let req = v1::SealSecretRequest { secret: secret.expose_secret().to_vec(), pcrs: pcrs.to_vec() };
            Ok(self.tpm().seal_secret(req).await.map_err(from_status)?.into_inner().sealed_blob)
        })
    }

    fn unseal_secret<'a>(&'a self, blob: &'a [u8]) -> BoxFuture<'a, Result<Secret, BrokerError>> {
        Box::pin(async move {
            let req = v1::UnsealSecretRequest { sealed_blob: blob.to_vec() };
            Ok(Secret::new(self.tpm().unseal_secret(req).await.map_err(from_status)?.into_inner().secret))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_messages_select_typed_errors() {
        assert!(matches!(from_status(Status::permission_denied("wrong volume key")), BrokerError::WrongKey(_)));
        assert!(matches!(from_status(Status::permission_denied("policy")), BrokerError::Denied(_)));
        assert!(matches!(from_status(Status::failed_precondition("PCR policy mismatch")), BrokerError::PcrMismatch(_)));
        assert!(matches!(from_status(Status::failed_precondition("other")), BrokerError::Failed { .. }));
        assert!(matches!(from_status(Status::already_exists("x")), BrokerError::AlreadyExists(_)));
        assert!(matches!(from_status(Status::unavailable("x")), BrokerError::Unavailable(_)));
    }
}
