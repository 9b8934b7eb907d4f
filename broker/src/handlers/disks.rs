// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Disks`: list disks, plan an installation, install an OS image.
//!
//! `InstallToDisk` is a bidirectional stream: the first request message names the target
//! (the value the policy's `disks` constraint is checked against), the image and its
//! digest; streamed images follow in chunks. Progress goes back while the install runs; the
//! final result (or error) is sent only after the outcome is in the audit log.

use std::pin::Pin;

use futures_util::Stream;
use piccolo_bootctl as bootctl;
use piccolo_proto::Rpc;
use piccolo_proto::v1::disks_server::Disks;
use piccolo_proto::v1::install_to_disk_request::Msg;
use piccolo_proto::v1::{
    self as pb, InstallHeader, InstallToDiskRequest, InstallToDiskResponse, ListDisksRequest, ListDisksResponse,
    PlanInstallRequest, PlanInstallResponse, image, install_to_disk_response,
};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::boot::{HEADER_TIMEOUT, blocking, digest_arg, forward_chunks, host, stream_error};
use crate::config::BootConfig;
use crate::error::Error;
use crate::guard::{AuditArgs, Shared, guard, run};
use crate::identity::Identity;

/// Progress messages are sent at most every this many bytes (and at each phase's end).
const PROGRESS_STEP: u64 = 8 << 20;

fn disk_config(cfg: &BootConfig) -> bootctl::DiskConfig {
    bootctl::DiskConfig {
        host: host(cfg),
        os_disks: cfg.os_disk.iter().cloned().collect(),
        image_dirs: cfg.image_dirs.clone(),
    }
}

fn disk_pb(d: &bootctl::DiskInfo) -> pb::Disk {
    pb::Disk {
        name: d.name.clone(),
        size_bytes: d.size_bytes,
        model: d.model.clone(),
        removable: d.removable,
        rotational: d.rotational,
        transport: d.transport.clone(),
        holds_running_system: d.holds_running_system,
    }
}

fn image_spec(image: &Option<pb::Image>) -> Result<bootctl::ImageSpec, Error> {
    match image.as_ref().and_then(|i| i.source.as_ref()) {
        Some(image::Source::Path(p)) => Ok(bootctl::ImageSpec::File(p.into())),
        Some(image::Source::StreamSize(n)) => Ok(bootctl::ImageSpec::Stream { len: *n }),
        None => Err(Error::InvalidArgument("image: give a path or a stream size".into())),
    }
}

fn image_arg(image: &Option<pb::Image>) -> serde_json::Value {
    match image.as_ref().and_then(|i| i.source.as_ref()) {
        Some(image::Source::Path(p)) => json!({ "path": p.chars().take(4096).collect::<String>() }),
        Some(image::Source::StreamSize(n)) => json!({ "stream_size": n }),
        None => serde_json::Value::Null,
    }
}

/// Disk names are checked by the library; the audit copy is bounded anyway.
fn target_arg(t: &str) -> String {
    t.chars().take(64).collect()
}

impl AuditArgs for ListDisksRequest {}
impl AuditArgs for PlanInstallRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "target": target_arg(&self.target), "image": image_arg(&self.image) })
    }
}

/// The `Disks` service.
pub struct DisksSvc {
    ctx: Shared,
}

impl DisksSvc {
    /// Wraps the shared state.
    pub fn new(ctx: Shared) -> Self {
        DisksSvc { ctx }
    }
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<InstallToDiskResponse, Status>> + Send>>;

fn progress_msg(p: bootctl::Progress) -> InstallToDiskResponse {
    let phase = match p.phase {
        bootctl::Phase::Checking => "checking",
        bootctl::Phase::Writing => "writing",
        bootctl::Phase::Verifying => "verifying",
    };
    InstallToDiskResponse {
        msg: Some(install_to_disk_response::Msg::Progress(pb::InstallProgress {
            phase: phase.into(),
            done: p.done,
            total: p.total,
        })),
    }
}

/// Runs the install on a blocking thread, sending throttled progress to `tx`.
async fn install(
    ctx: Shared,
    header: InstallHeader,
    stream: Streaming<InstallToDiskRequest>,
    tx: mpsc::Sender<Result<InstallToDiskResponse, Status>>,
) -> Result<pb::InstallResult, Error> {
    let digest = bootctl::parse_sha256(&header.sha256)?;
    let spec = image_spec(&header.image)?;
    let cfg = disk_config(&ctx.config.file.boot);
    let (mut reader, fwd) = forward_chunks(stream, |m: InstallToDiskRequest| match m.msg {
        Some(Msg::Chunk(c)) => Some(c),
        _ => None,
    });
    let r = blocking(move || {
        let source = match spec {
            bootctl::ImageSpec::File(p) => bootctl::ImageSource::File(p),
            bootctl::ImageSpec::Stream { len } => bootctl::ImageSource::Stream { reader: &mut reader, len },
        };
        let mut last: Option<bootctl::Progress> = None;
        let mut progress = |p: bootctl::Progress| {
            let due = match last {
                Some(l) => l.phase != p.phase || p.done >= l.done + PROGRESS_STEP || p.done == p.total,
                None => true,
            };
            if due {
                last = Some(p);
                // A caller that went away does not stop the install (nor its audit outcome).
                let _ = tx.blocking_send(Ok(progress_msg(p)));
            }
        };
        bootctl::install_to_disk(&cfg, &header.target, source, &digest, &mut progress).map_err(stream_error)
    })
    .await;
    fwd.abort();
    let report = r?;
    Ok(pb::InstallResult { target: report.target, bytes: report.bytes, sha256: hex::encode(report.sha256) })
}

#[tonic::async_trait]
impl Disks for DisksSvc {
    async fn list_disks(&self, req: Request<ListDisksRequest>) -> Result<Response<ListDisksResponse>, Status> {
        guard(&self.ctx, Rpc::ListDisks, req, |ctx, _, _| async move {
            let cfg = disk_config(&ctx.config.file.boot);
            let disks = blocking(move || Ok(bootctl::list_disks(&cfg)?)).await?;
            Ok(ListDisksResponse { disks: disks.iter().map(disk_pb).collect() })
        })
        .await
    }

    async fn plan_install(&self, req: Request<PlanInstallRequest>) -> Result<Response<PlanInstallResponse>, Status> {
        guard(&self.ctx, Rpc::PlanInstall, req, |ctx, _, r| async move {
            let spec = image_spec(&r.image)?;
            let cfg = disk_config(&ctx.config.file.boot);
            let plan = blocking(move || Ok(bootctl::plan_install(&cfg, &r.target, &spec)?)).await?;
            let (wiped_offset, wiped_length) = plan.wiped_after_image.unwrap_or((0, 0));
            Ok(PlanInstallResponse {
                target: Some(disk_pb(&plan.target)),
                image_bytes: plan.image_bytes,
                image_path: plan.image_path.map(|p| p.display().to_string()).unwrap_or_default(),
                partitions: plan
                    .partitions
                    .iter()
                    .map(|p| pb::PlannedPartition {
                        number: p.number,
                        name: p.name.clone(),
                        start: p.start,
                        size: p.size,
                        fully_overwritten: p.fully_overwritten,
                    })
                    .collect(),
                has_gpt: plan.has_gpt,
                wiped_offset,
                wiped_length,
            })
        })
        .await
    }

    type InstallToDiskStream = ProgressStream;

    async fn install_to_disk(
        &self,
        req: Request<Streaming<InstallToDiskRequest>>,
    ) -> Result<Response<Self::InstallToDiskStream>, Status> {
        let identity = Identity::of_request(&req)?;
        let mut stream = req.into_inner();
        let header = match tokio::time::timeout(HEADER_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(InstallToDiskRequest { msg: Some(Msg::Header(h)) }))) => Ok(h),
            Ok(Err(s)) => Err(Error::InvalidArgument(format!("client stream: {}", s.message()))),
            Err(_) => Err(Error::InvalidArgument("no header within 30 s".into())),
            Ok(_) => Err(Error::InvalidArgument("the first message must be the header (target, image, sha256)".into())),
        };
        // Without a header there is no target for the `disks` constraint: the policy refuses.
        let (args, constraint) = match &header {
            Ok(h) => (
                json!({ "target": target_arg(&h.target), "image": image_arg(&h.image), "sha256": digest_arg(&h.sha256) }),
                Some(h.target.clone()),
            ),
            Err(e) => (json!({ "header": e.to_string() }), None),
        };
        let (tx, rx) = mpsc::channel(16);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let progress = tx.clone();
            let result = run(&ctx, Rpc::InstallToDisk, identity, args, constraint, move |ctx, _| async move {
                install(ctx, header?, stream, progress).await
            })
            .await;
            let last = result.map(|r| InstallToDiskResponse { msg: Some(install_to_disk_response::Msg::Result(r)) });
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
