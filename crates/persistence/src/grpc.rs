// SPDX-License-Identifier: Apache-2.0
//! [`GrpcBroker`]: the real backend, the broker's Volumes and Tpm services over its socket.
//!
//! Limitation: tonic takes the request by value and encodes it into its own buffers, so the
//! copy of a key inside an in-flight request is not zeroed by us; it lives only for the call.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use piccolo_keyset::{ExportKind, ExportSummary, ImportLimits, ImportReport, Secret};
use piccolo_proto::v1;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
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

    fn archive(&self) -> v1::archive_client::ArchiveClient<Channel> {
        v1::archive_client::ArchiveClient::new(self.channel.clone())
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
        Code::InvalidArgument => BrokerError::Rejected(msg),
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

    fn export_archive<'a>(
        &'a self,
        kind: ExportKind,
        volume_ids: &'a [String],
        out: File,
    ) -> BoxFuture<'a, Result<(File, ExportSummary), BrokerError>> {
        Box::pin(self.export_to(kind, volume_ids, out))
    }

    fn import_archive<'a>(
        &'a self,
        reader: Box<dyn Read + Send>,
        limits: &'a ImportLimits,
    ) -> BoxFuture<'a, Result<ImportReport, BrokerError>> {
        Box::pin(self.import_from(reader, limits))
    }
}

/// Size of the chunks an import is streamed in.
const IMPORT_CHUNK: usize = 64 << 10;

fn local_io(e: std::io::Error) -> BrokerError {
    BrokerError::Archive(piccolo_keyset::Error::WriteArchive { source: e })
}

fn protocol(message: &str) -> BrokerError {
    BrokerError::Failed { code: "Protocol".into(), message: message.into() }
}

fn kind_pb(kind: ExportKind) -> v1::ExportKind {
    match kind {
        ExportKind::Control => v1::ExportKind::Control,
        ExportKind::Full => v1::ExportKind::Full,
    }
}

fn kind_from_pb(k: i32) -> Result<ExportKind, BrokerError> {
    match v1::ExportKind::try_from(k) {
        Ok(v1::ExportKind::Control) => Ok(ExportKind::Control),
        Ok(v1::ExportKind::Full) => Ok(ExportKind::Full),
        _ => Err(protocol("the broker answered an unknown export kind")),
    }
}

/// Export and import go through the broker's Archive service: it reads and replaces the
/// root-owned ciphertext, this side only moves bytes (and checks them against the summary).
impl GrpcBroker {
    async fn export_to(
        &self,
        kind: ExportKind,
        volume_ids: &[String],
        out: File,
    ) -> Result<(File, ExportSummary), BrokerError> {
        let req = v1::ExportArchiveRequest { kind: kind_pb(kind) as i32, volume_ids: volume_ids.to_vec() };
        let mut stream = self.archive().export_archive(req).await.map_err(from_status)?.into_inner();
        let mut file = tokio::fs::File::from_std(out);
        let (mut hasher, mut bytes) = (Sha256::new(), 0u64);
        use v1::export_archive_response::Msg;
        loop {
            match stream.message().await.map_err(from_status)?.and_then(|m| m.msg) {
                Some(Msg::Chunk(c)) => {
                    hasher.update(&c);
                    bytes += c.len() as u64;
                    file.write_all(&c).await.map_err(local_io)?;
                }
                Some(Msg::Summary(s)) => {
                    // Only a stream that ends in a summary matching what arrived is an archive.
                    if s.archive_bytes != bytes || s.archive_sha256 != hex::encode(hasher.finalize()) {
                        return Err(protocol("the export stream does not match its summary"));
                    }
                    file.flush().await.map_err(local_io)?;
                    let summary = ExportSummary {
                        kind: kind_from_pb(s.kind)?,
                        volumes: s.volume_ids,
                        key_id: s.key_id,
                        files: s.files,
                        dirs: s.dirs,
                        symlinks: s.symlinks,
                        content_bytes: s.content_bytes,
                        archive_bytes: s.archive_bytes,
                        archive_sha256: s.trailer_sha256,
                    };
                    return Ok((file.into_std().await, summary));
                }
                None => return Err(protocol("the export stream ended without a summary")),
            }
        }
    }

    async fn import_from(
        &self,
        reader: Box<dyn Read + Send>,
        limits: &ImportLimits,
    ) -> Result<ImportReport, BrokerError> {
        use v1::import_archive_request::Msg;
        // The broker's policy decides on the volume ids before it reads the archive, so they
        // are declared up front from the manifest (the broker checks they match it).
        let max = limits.max_manifest_bytes;
        let (mut reader, info, prefix) = tokio::task::spawn_blocking(move || {
            let mut reader = reader;
            piccolo_keyset::peek_manifest(&mut reader, max).map(|(info, prefix)| (reader, info, prefix))
        })
        .await
        .map_err(|e| protocol(&e.to_string()))?
        .map_err(BrokerError::Archive)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let header = v1::ImportArchiveHeader { volume_ids: info.volumes };
        let feeder = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let send = |msg| tx.blocking_send(v1::ImportArchiveRequest { msg: Some(msg) }).is_ok();
            if !send(Msg::Header(header)) {
                return Ok(());
            }
            for c in prefix.chunks(IMPORT_CHUNK) {
                if !send(Msg::Chunk(c.to_vec())) {
                    return Ok(());
                }
            }
            let mut buf = vec![0u8; IMPORT_CHUNK];
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                // A closed channel: the broker answered early (refusal); its status says why.
                if !send(Msg::Chunk(buf[..n].to_vec())) {
                    return Ok(());
                }
            }
        });
        let result = self.archive().import_archive(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        let fed = feeder.await.map_err(|e| protocol(&e.to_string()))?;
        let r = match (result, fed) {
            (Ok(r), _) => r.into_inner(),
            // The archive ended early because our reader failed: that is the cause to report.
            (Err(_), Err(e)) => return Err(BrokerError::Archive(piccolo_keyset::Error::ReadArchive { source: e })),
            (Err(s), Ok(())) => return Err(from_status(s)),
        };
        Ok(ImportReport {
            kind: kind_from_pb(r.kind)?,
            volumes: r.volume_ids,
            created: r.created,
            key_id: r.key_id,
            files: r.files,
            bytes: r.bytes,
            keyset_replaced: r.keyset_replaced,
            orphaned_volumes: r.orphaned_volumes,
            requires_unlock: true,
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
