// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Boot`: the A/B `/usr` slots of the OS disk, and reboot.
//!
//! Handlers stay thin: identity and policy through the guard, one `piccolo_bootctl` call on
//! a blocking thread, and one `From` impl mapping the crate's errors to gRPC codes. The OS
//! disk and booted slot come from `[boot]` in the config, or from the running `/usr`.

use std::io::{self, Read};
use std::time::Duration;

use piccolo_bootctl as bootctl;
use piccolo_proto::Rpc;
use piccolo_proto::v1::boot_server::Boot;
use piccolo_proto::v1::write_inactive_slot_request::Msg;
use piccolo_proto::v1::{
    self as pb, ActivateInactiveSlotRequest, ActivateInactiveSlotResponse, CancelUpdateRequest, CancelUpdateResponse,
    GetBootStateRequest, GetBootStateResponse, MarkBootSuccessfulRequest, MarkBootSuccessfulResponse,
    PrepareInactiveSlotRequest, PrepareInactiveSlotResponse, RebootRequest, RebootResponse, RollbackToOtherSlotRequest,
    RollbackToOtherSlotResponse, WriteInactiveSlotRequest, WriteInactiveSlotResponse,
};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use crate::config::{BootConfig, BootedSlot};
use crate::error::Error;
use crate::guard::{AuditArgs, Shared, guard, run};
use crate::identity::Identity;

/// How long a streaming call may take to send its first (header) message.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks in flight between the gRPC stream and the blocking writer.
const CHUNKS_IN_FLIGHT: usize = 4;
/// A client that sends nothing for this long is cut off (it holds the disk's lock).
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

impl From<bootctl::Error> for Error {
    /// The one mapping of boot-control errors to gRPC codes (recommended by the crate).
    fn from(e: bootctl::Error) -> Error {
        use tonic::Code;
        let code = match e.grpc_code() {
            bootctl::Code::InvalidArgument => Code::InvalidArgument,
            bootctl::Code::NotFound => Code::NotFound,
            bootctl::Code::FailedPrecondition => Code::FailedPrecondition,
            bootctl::Code::DataLoss => Code::DataLoss,
            bootctl::Code::Aborted => Code::Aborted,
            bootctl::Code::Unavailable => Code::Unavailable,
            bootctl::Code::Internal => Code::Internal,
        };
        // The whole chain: paths and io errors, never secrets (this crate handles none).
        let message = crate::error::chain_message(&e);
        if code == Code::Internal {
            tracing::error!(error = %message, "boot control failed");
        }
        Error::Backend { code, message }
    }
}

/// The host view (sysfs, /dev, mountinfo) from the config.
pub(crate) fn host(cfg: &BootConfig) -> bootctl::Host {
    let sys = bootctl::Host::system();
    bootctl::Host {
        sysfs_root: cfg.sysfs_root.clone().unwrap_or(sys.sysfs_root),
        dev_root: cfg.dev_root.clone().unwrap_or(sys.dev_root),
        mountinfo: cfg.mountinfo.clone().unwrap_or(sys.mountinfo),
    }
}

/// Boot control of the configured OS disk, or of the disk behind the running `/usr`.
fn boot_control(cfg: &BootConfig) -> Result<bootctl::BootControl, Error> {
    match (cfg.booted_slot, &cfg.os_disk) {
        (Some(slot), Some(disk)) => {
            let slot = match slot {
                BootedSlot::A => bootctl::SlotId::A,
                BootedSlot::B => bootctl::SlotId::B,
            };
            Ok(bootctl::BootControl::new(disk.clone(), slot, bootctl::BootedSource::Configured))
        }
        (Some(_), None) => Err(Error::Backend {
            code: tonic::Code::FailedPrecondition,
            message: "boot.booted_slot is set but boot.os_disk is not".into(),
        }),
        (None, disk) => Ok(bootctl::BootControl::from_running_system(&host(cfg), disk.clone())?),
    }
}

/// Blocking work with its result type erased, so tokio's blocking-task code is compiled once,
/// not once per call site (as with the guard's `Answer`).
type BlockingWork = Box<dyn FnOnce() -> Result<Box<dyn std::any::Any + Send>, Error> + Send>;

/// Runs blocking disk work off the async threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, Error> + Send + 'static,
{
    let work: BlockingWork = Box::new(move || f().map(|t| Box::new(t) as Box<dyn std::any::Any + Send>));
    let answer = run_blocking(work).await?;
    // Cannot fail: the answer was boxed from a `T` just above.
    answer.downcast::<T>().map(|t| *t).map_err(|_| Error::Internal("blocking answer type".into()))
}

async fn run_blocking(work: BlockingWork) -> Result<Box<dyn std::any::Any + Send>, Error> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Internal(e.to_string()))?
}

fn slot_pb(s: Option<bootctl::SlotId>) -> i32 {
    (match s {
        None => pb::Slot::Unspecified,
        Some(bootctl::SlotId::A) => pb::Slot::A,
        Some(bootctl::SlotId::B) => pb::Slot::B,
    }) as i32
}

fn state_pb(st: &bootctl::BootState) -> pb::BootState {
    pb::BootState {
        disk: st.disk.display().to_string(),
        slots: st
            .slots
            .iter()
            .map(|s| pb::SlotState {
                slot: slot_pb(Some(s.slot)),
                label: s.label.clone(),
                partition_number: s.partition_number,
                partition_guid: s.partition_guid.to_string(),
                priority: u32::from(s.attrs.priority),
                tries: u32::from(s.attrs.tries),
                successful: s.attrs.successful,
                verified: s.attrs.verified,
                size_bytes: s.size_bytes,
            })
            .collect(),
        booted: slot_pb(Some(st.booted)),
        booted_source: match st.booted_source {
            bootctl::BootedSource::Configured => "configured",
            bootctl::BootedSource::Detected => "detected",
        }
        .into(),
        next_boot: slot_pb(st.next_boot),
        fallback: slot_pb(st.fallback),
    }
}

/// Runs one slot operation on the configured disk and returns the resulting state.
async fn slot_op(
    ctx: &Shared,
    op: fn(&bootctl::BootControl) -> Result<bootctl::BootState, bootctl::Error>,
) -> Result<pb::BootState, Error> {
    let cfg = ctx.config.file.boot.clone();
    blocking(move || Ok(state_pb(&op(&boot_control(&cfg)?)?))).await
}

/// A blocking `Read` over chunks forwarded from a gRPC stream.
pub(crate) struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(Ok(c)) => (self.cur, self.pos) = (c, 0),
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Forwards the data messages of `stream` to a [`ChunkReader`]. A message that is not a
/// chunk, or a chunk above 1 MiB or empty, ends the stream with an `InvalidInput` error,
/// which the handler turns into `INVALID_ARGUMENT`.
pub(crate) fn forward_chunks<M: Send + 'static>(
    mut stream: Streaming<M>,
    chunk_of: fn(M) -> Option<Vec<u8>>,
) -> (ChunkReader, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let task = tokio::spawn(async move {
        loop {
            let next = match tokio::time::timeout(CHUNK_TIMEOUT, stream.message()).await {
                Ok(n) => n,
                Err(_) => Err(Status::deadline_exceeded("no data for 60 s")),
            };
            let item = match next {
                Ok(Some(m)) => match chunk_of(m) {
                    Some(c) if !c.is_empty() && c.len() <= bootctl::CHUNK => Ok(c),
                    Some(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, "chunks must hold 1 byte to 1 MiB")),
                    None => Err(io::Error::new(io::ErrorKind::InvalidInput, "only the first message may be a header")),
                },
                Ok(None) => break,
                Err(s) => {
                    Err(io::Error::new(io::ErrorKind::ConnectionAborted, format!("client stream: {}", s.message())))
                }
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    (ChunkReader { rx, cur: Vec::new(), pos: 0 }, task)
}

/// Protocol errors found by [`forward_chunks`] are the caller's mistake.
pub(crate) fn stream_error(e: bootctl::Error) -> Error {
    match e {
        bootctl::Error::ReadPayload { source } | bootctl::Error::ReadImage { source }
            if source.kind() == io::ErrorKind::InvalidInput =>
        {
            Error::InvalidArgument(source.to_string())
        }
        e => e.into(),
    }
}

/// Bounded summary of a caller-supplied digest for the audit record.
pub(crate) fn digest_arg(s: &str) -> String {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) { s.to_ascii_lowercase() } else { "invalid".into() }
}

/// The `Boot` service.
pub struct BootSvc {
    ctx: Shared,
}

impl BootSvc {
    /// Wraps the shared state.
    pub fn new(ctx: Shared) -> Self {
        BootSvc { ctx }
    }
}

impl AuditArgs for GetBootStateRequest {}
impl AuditArgs for PrepareInactiveSlotRequest {}
impl AuditArgs for ActivateInactiveSlotRequest {}
impl AuditArgs for CancelUpdateRequest {}
impl AuditArgs for RollbackToOtherSlotRequest {}
impl AuditArgs for MarkBootSuccessfulRequest {}
impl AuditArgs for RebootRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "delay_seconds": self.delay_seconds })
    }
}

#[tonic::async_trait]
impl Boot for BootSvc {
    async fn get_boot_state(
        &self,
        req: Request<GetBootStateRequest>,
    ) -> Result<Response<GetBootStateResponse>, Status> {
        guard(&self.ctx, Rpc::GetBootState, req, |ctx, _, _| async move {
            Ok(GetBootStateResponse { state: Some(slot_op(&ctx, bootctl::BootControl::boot_state).await?) })
        })
        .await
    }

    async fn prepare_inactive_slot(
        &self,
        req: Request<PrepareInactiveSlotRequest>,
    ) -> Result<Response<PrepareInactiveSlotResponse>, Status> {
        guard(&self.ctx, Rpc::PrepareInactiveSlot, req, |ctx, _, _| async move {
            Ok(PrepareInactiveSlotResponse {
                state: Some(slot_op(&ctx, bootctl::BootControl::prepare_inactive).await?),
            })
        })
        .await
    }

    async fn write_inactive_slot(
        &self,
        req: Request<Streaming<WriteInactiveSlotRequest>>,
    ) -> Result<Response<WriteInactiveSlotResponse>, Status> {
        let identity = Identity::of_request(&req)?;
        let mut stream = req.into_inner();
        let header = match tokio::time::timeout(HEADER_TIMEOUT, stream.message()).await {
            Ok(Ok(Some(WriteInactiveSlotRequest { msg: Some(Msg::Header(h)) }))) => Ok(h),
            Ok(Err(s)) => Err(Error::InvalidArgument(format!("client stream: {}", s.message()))),
            Err(_) => Err(Error::InvalidArgument("no header within 30 s".into())),
            Ok(_) => Err(Error::InvalidArgument("the first message must be the header (size, sha256)".into())),
        };
        let args = match &header {
            Ok(h) => json!({ "size": h.size, "sha256": digest_arg(&h.sha256) }),
            Err(e) => json!({ "header": e.to_string() }),
        };
        let resp = run(&self.ctx, Rpc::WriteInactiveSlot, identity, args, None, move |ctx, _| async move {
            let header = header?;
            let digest = bootctl::parse_sha256(&header.sha256)?;
            let cfg = ctx.config.file.boot.clone();
            let (mut reader, fwd) = forward_chunks(stream, |m: WriteInactiveSlotRequest| match m.msg {
                Some(Msg::Chunk(c)) => Some(c),
                _ => None,
            });
            let r = blocking(move || {
                let bc = boot_control(&cfg)?;
                let report = bc.write_inactive(&mut reader, header.size, &digest).map_err(stream_error)?;
                Ok((report, bc.boot_state()?))
            })
            .await;
            fwd.abort();
            let (report, st) = r?;
            Ok(WriteInactiveSlotResponse {
                slot: slot_pb(Some(report.slot)),
                bytes: report.bytes,
                sha256: hex::encode(report.sha256),
                state: Some(state_pb(&st)),
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn activate_inactive_slot(
        &self,
        req: Request<ActivateInactiveSlotRequest>,
    ) -> Result<Response<ActivateInactiveSlotResponse>, Status> {
        guard(&self.ctx, Rpc::ActivateInactiveSlot, req, |ctx, _, _| async move {
            Ok(ActivateInactiveSlotResponse {
                state: Some(slot_op(&ctx, bootctl::BootControl::activate_inactive).await?),
            })
        })
        .await
    }

    async fn cancel_update(&self, req: Request<CancelUpdateRequest>) -> Result<Response<CancelUpdateResponse>, Status> {
        guard(&self.ctx, Rpc::CancelUpdate, req, |ctx, _, _| async move {
            Ok(CancelUpdateResponse { state: Some(slot_op(&ctx, bootctl::BootControl::cancel_update).await?) })
        })
        .await
    }

    async fn rollback_to_other_slot(
        &self,
        req: Request<RollbackToOtherSlotRequest>,
    ) -> Result<Response<RollbackToOtherSlotResponse>, Status> {
        guard(&self.ctx, Rpc::RollbackToOtherSlot, req, |ctx, _, _| async move {
            Ok(RollbackToOtherSlotResponse {
                state: Some(slot_op(&ctx, bootctl::BootControl::rollback_to_other).await?),
            })
        })
        .await
    }

    async fn mark_boot_successful(
        &self,
        req: Request<MarkBootSuccessfulRequest>,
    ) -> Result<Response<MarkBootSuccessfulResponse>, Status> {
        guard(&self.ctx, Rpc::MarkBootSuccessful, req, |ctx, _, _| async move {
            Ok(MarkBootSuccessfulResponse {
                state: Some(slot_op(&ctx, bootctl::BootControl::mark_boot_successful).await?),
            })
        })
        .await
    }

    async fn reboot(&self, req: Request<RebootRequest>) -> Result<Response<RebootResponse>, Status> {
        guard(&self.ctx, Rpc::Reboot, req, |ctx, _, r| async move {
            let delay = Duration::from_secs(u64::from(r.delay_seconds));
            bootctl::reboot::check_delay(delay)?;
            let record = ctx.config.file.boot.reboot_record.clone();
            blocking(move || {
                let rebooter: Box<dyn bootctl::Rebooter> = match record {
                    Some(path) => Box::new(bootctl::RecordFileRebooter { path }),
                    None => Box::new(bootctl::SystemRebooter),
                };
                Ok(rebooter.reboot(delay)?)
            })
            .await?;
            tracing::warn!(delay_seconds = r.delay_seconds, "reboot scheduled");
            Ok(RebootResponse { delay_seconds: r.delay_seconds })
        })
        .await
    }
}
