// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Volumes`: gocryptfs volumes under `[volumes] state_dir`.
//!
//! The caller names a volume id only; the policy's `volumes` constraint decides which ids it
//! may touch, and `piccolo_volumes` builds every path from the state dir and the validated
//! id. Keys are moved out of the decoded request into zeroize-on-drop buffers before the
//! guard runs (so a denied request's key is wiped too), are summarised in the audit record
//! by their length only, and reach gocryptfs on stdin. A mount presents files as the
//! creator's own uid:gid, or as the `present_as` user given at creation, which the rule
//! granting the CreateVolume must name (application volumes: created and mounted by the
//! persistence owner, presented as the apps worker).

use std::sync::Arc;

use piccolo_proto::Rpc;
use piccolo_proto::v1::volumes_server::Volumes;
use piccolo_proto::v1::{
    self as pb, CreateVolumeRequest, CreateVolumeResponse, MountVolumeRequest, MountVolumeResponse,
    UnmountVolumeRequest, UnmountVolumeResponse, VolumeStatusRequest, VolumeStatusResponse,
};
use piccolo_volumes::{self as vol, Class, Key, VolumeId};
use serde_json::json;
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::boot::blocking;
use crate::config::VolumesConfig;
use crate::error::Error;
use crate::guard::{AuditArgs, Shared, guard};

impl From<vol::Error> for Error {
    /// The one mapping of volume errors to gRPC codes (chosen by the crate, next to its
    /// variants). Messages carry ids, paths and exit codes; the crate never puts keys in them.
    fn from(e: vol::Error) -> Error {
        use tonic::Code;
        let code = match e.grpc_code() {
            vol::Code::InvalidArgument => Code::InvalidArgument,
            vol::Code::NotFound => Code::NotFound,
            vol::Code::AlreadyExists => Code::AlreadyExists,
            vol::Code::PermissionDenied => Code::PermissionDenied,
            vol::Code::FailedPrecondition => Code::FailedPrecondition,
            vol::Code::Internal => Code::Internal,
        };
        let message = crate::error::chain_message(&e);
        if code == Code::Internal {
            tracing::error!(error = %message, "volume operation failed");
        }
        Error::Backend { code, message }
    }
}

/// The id as audited: at most 64 characters of whatever was sent.
fn id_arg(id: &str) -> String {
    id.chars().take(64).collect()
}

fn class_name(c: i32) -> &'static str {
    match pb::VolumeClass::try_from(c) {
        Ok(pb::VolumeClass::Bootstrap) => "bootstrap",
        Ok(pb::VolumeClass::Control) => "control",
        Ok(pb::VolumeClass::Application) => "application",
        _ => "unspecified",
    }
}

fn class_of(c: i32) -> Result<Class, vol::Error> {
    match pb::VolumeClass::try_from(c) {
        Ok(pb::VolumeClass::Bootstrap) => Ok(Class::Bootstrap),
        Ok(pb::VolumeClass::Control) => Ok(Class::Control),
        Ok(pb::VolumeClass::Application) => Ok(Class::Application),
        _ => Err(vol::Error::InvalidClass("give bootstrap, control or application".into())),
    }
}

fn class_pb(c: Class) -> pb::VolumeClass {
    match c {
        Class::Bootstrap => pb::VolumeClass::Bootstrap,
        Class::Control => pb::VolumeClass::Control,
        Class::Application => pb::VolumeClass::Application,
    }
}

/// `CreateVolumeRequest` with its key moved into a zeroizing buffer.
struct CreateArgs {
    volume_id: String,
    class: i32,
    key: Zeroizing<Vec<u8>>,
    present_as: String,
}

impl From<CreateVolumeRequest> for CreateArgs {
    fn from(mut r: CreateVolumeRequest) -> Self {
        CreateArgs {
            key: Zeroizing::new(std::mem::take(&mut r.key)),
            volume_id: r.volume_id,
            class: r.class,
            present_as: r.present_as,
        }
    }
}

impl AuditArgs for CreateArgs {
    fn audit_args(&self) -> serde_json::Value {
        json!({
            "volume_id": id_arg(&self.volume_id),
            "class": class_name(self.class),
            "key_len": self.key.len(),
            "present_as": id_arg(&self.present_as),
        })
    }
    fn constraint(&self) -> Option<String> {
        Some(self.volume_id.clone())
    }
    fn present_as(&self) -> Option<String> {
        Some(self.present_as.clone())
    }
}

/// `MountVolumeRequest` with its key moved into a zeroizing buffer.
struct MountArgs {
    volume_id: String,
    key: Zeroizing<Vec<u8>>,
}

impl From<MountVolumeRequest> for MountArgs {
    fn from(mut r: MountVolumeRequest) -> Self {
        MountArgs { key: Zeroizing::new(std::mem::take(&mut r.key)), volume_id: r.volume_id }
    }
}

impl AuditArgs for MountArgs {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "volume_id": id_arg(&self.volume_id), "key_len": self.key.len() })
    }
    fn constraint(&self) -> Option<String> {
        Some(self.volume_id.clone())
    }
}

impl AuditArgs for UnmountVolumeRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "volume_id": id_arg(&self.volume_id) })
    }
    fn constraint(&self) -> Option<String> {
        Some(self.volume_id.clone())
    }
}

impl AuditArgs for VolumeStatusRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "volume_id": id_arg(&self.volume_id) })
    }
    /// "" for the list of all volumes: only a rule allowing `*` matches it.
    fn constraint(&self) -> Option<String> {
        Some(self.volume_id.clone())
    }
}

fn info(s: &vol::Status) -> pb::VolumeInfo {
    pb::VolumeInfo {
        volume_id: s.id.to_string(),
        class: class_pb(s.class).into(),
        mounted: s.mounted,
        mountpoint: s.mountpoint.display().to_string(),
        gocryptfs_pid: s.pid.unwrap_or(0),
        needs_repair: s.needs_repair,
        owner_uid: s.owner_uid.unwrap_or(0),
    }
}

/// The `Volumes` service.
pub struct VolumesSvc {
    ctx: Shared,
    vols: Arc<vol::Volumes>,
}

impl VolumesSvc {
    /// The volumes of `[volumes]` in the config.
    pub fn new(ctx: Shared) -> Self {
        let cfg: &VolumesConfig = &ctx.config.file.volumes;
        let runner = vol::Runner { program: cfg.gocryptfs.clone(), scrypt_n: cfg.scrypt_n, ..Default::default() };
        let vols = Arc::new(vol::Volumes::new(cfg.state_dir.clone(), runner));
        VolumesSvc { ctx, vols }
    }

    /// The volumes (and their lock), shared with the Archive service.
    pub fn volumes(&self) -> Arc<vol::Volumes> {
        self.vols.clone()
    }
}

#[tonic::async_trait]
impl Volumes for VolumesSvc {
    async fn create_volume(&self, req: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let vols = self.vols.clone();
        guard(&self.ctx, Rpc::CreateVolume, req.map(CreateArgs::from), |_, who, r| async move {
            blocking(move || {
                let id = VolumeId::parse(&r.volume_id)?;
                let class = class_of(r.class)?;
                let key = Key::from_slice(&r.key)?;
                // The guard has checked `present_as` against the policy; the user may only
                // have vanished since, which changes nothing.
                let presented = if r.present_as.is_empty() {
                    None
                } else {
                    let u = nix::unistd::User::from_name(&r.present_as).ok().flatten().ok_or_else(|| {
                        Error::InvalidArgument(format!("present_as: no user {:?}", id_arg(&r.present_as)))
                    })?;
                    Some((u.uid.as_raw(), u.gid.as_raw()))
                };
                // The presented user's name is recorded too: an import on other hardware
                // re-resolves its uid:gid by name.
                let presented = presented.map(|(u, g)| (u, g, Some(r.present_as.as_str())));
                vols.create_presented_as(&id, class, &key, (who.uid, who.gid), presented)?;
                Ok(CreateVolumeResponse {})
            })
            .await
        })
        .await
    }

    async fn mount_volume(&self, req: Request<MountVolumeRequest>) -> Result<Response<MountVolumeResponse>, Status> {
        let vols = self.vols.clone();
        guard(&self.ctx, Rpc::MountVolume, req.map(MountArgs::from), |_, who, r| async move {
            blocking(move || {
                let id = VolumeId::parse(&r.volume_id)?;
                let key = Key::from_slice(&r.key)?;
                let (mnt, pid) = vols.mount(&id, &key, who.uid)?;
                Ok(MountVolumeResponse { mountpoint: mnt.display().to_string(), gocryptfs_pid: pid.unwrap_or(0) })
            })
            .await
        })
        .await
    }

    async fn unmount_volume(
        &self,
        req: Request<UnmountVolumeRequest>,
    ) -> Result<Response<UnmountVolumeResponse>, Status> {
        let vols = self.vols.clone();
        guard(&self.ctx, Rpc::UnmountVolume, req, |_, _, r| async move {
            blocking(move || {
                vols.unmount(&VolumeId::parse(&r.volume_id)?)?;
                Ok(UnmountVolumeResponse {})
            })
            .await
        })
        .await
    }

    async fn volume_status(&self, req: Request<VolumeStatusRequest>) -> Result<Response<VolumeStatusResponse>, Status> {
        let vols = self.vols.clone();
        guard(&self.ctx, Rpc::VolumeStatus, req, |ctx, who, r| async move {
            blocking(move || {
                let list = if r.volume_id.is_empty() {
                    let policy = ctx.policy();
                    vols.list()?
                        .into_iter()
                        .filter(|s| policy.allows(&who, Rpc::VolumeStatus, Some(s.id.as_str())))
                        .collect()
                } else {
                    vec![vols.status(&VolumeId::parse(&r.volume_id)?)?]
                };
                Ok(VolumeStatusResponse { volumes: list.iter().map(info).collect() })
            })
            .await
        })
        .await
    }
}
