// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.UpdateEngine`: Flatcar's update_engine over D-Bus.
//!
//! One client (one bus connection, made on first use and remade after it broke) serves
//! every call and watcher of this broker process. A watcher's events are read from the bus
//! as they come, whatever the gRPC client does, so a slow reader can never stall the bus
//! connection: its own queue is bounded and drops the oldest events (and says how many).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use futures_util::Stream;
use piccolo_proto::Rpc;
use piccolo_proto::v1::update_engine_event::Kind;
use piccolo_proto::v1::update_engine_server::UpdateEngine;
use piccolo_proto::v1::{
    Backend, GetUpdateEngineStatusRequest, GetUpdateEngineStatusResponse, ResetUpdateEngineRequest,
    ResetUpdateEngineResponse, UpdateEngineEvent, UpdateEngineStatus, UpdateOperation, WatchUpdateEngineRequest,
};
use piccolo_update_engine as ue;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::backends::{Kind as BackendKind, available, unavailable};
use crate::error::Error;
use crate::guard::{AuditArgs, Ctx, Shared, guard};

/// Simultaneous `WatchUpdateEngine` streams per broker.
const MAX_WATCHERS: usize = 32;
/// Events queued per watcher before the oldest are dropped.
const WATCH_QUEUE: usize = 64;

impl From<ue::Error> for Error {
    /// The one mapping of update_engine errors to gRPC codes.
    fn from(e: ue::Error) -> Error {
        use tonic::Code;
        let code = match e.code() {
            ue::Code::Unavailable => Code::Unavailable,
            ue::Code::FailedPrecondition => Code::FailedPrecondition,
            ue::Code::Internal => Code::Internal,
        };
        // The chain (bus address, io error); update_engine's messages carry no secrets.
        let message = crate::error::chain_message(&e);
        if code == Code::Internal {
            tracing::error!(error = %message, "update_engine call failed");
        }
        Error::Backend { code, message }
    }
}

/// The broker's client, for the configured bus (the system bus by default).
fn client(ctx: &Ctx) -> &'static ue::UpdateEngine {
    static CLIENT: OnceLock<ue::UpdateEngine> = OnceLock::new();
    CLIENT.get_or_init(|| ue::UpdateEngine::new(ctx.config.file.update_engine.bus_address.clone()))
}

/// `GetInfo`'s entry for a status update_engine gave.
fn up(c: &ue::UpdateEngine, st: &ue::Status) -> Backend {
    available("update_engine", format!("{} on {}: {}", ue::SERVICE, c.bus(), st.operation))
}

fn down(e: &ue::Error) -> Backend {
    unavailable("update_engine", e.to_string())
}

/// The refresher's probe: is update_engine answering now (one `GetStatus`, 1 s deadline).
pub async fn probe(ctx: &Ctx) -> Backend {
    let c = client(ctx);
    match c.probe().await {
        Ok(st) => up(c, &st),
        Err(e) => down(&e),
    }
}

/// Records what a call begun at `seen` says about update_engine: it answered (available, in
/// the state it reported), or it or its bus is gone (unavailable). Other errors (a refused
/// reset) came from update_engine, but carry no state: the entry stays as it was.
fn note(ctx: &Ctx, seen: Instant, r: Result<&ue::Status, &ue::Error>) {
    let c = client(ctx);
    let backend = match r {
        Ok(st) => up(c, st),
        Err(e) if e.code() == ue::Code::Unavailable => down(e),
        Err(_) => return,
    };
    ctx.backends.observe(BackendKind::UpdateEngine, seen, backend);
}

/// Keeps `GetInfo`'s update_engine entry current from the bus's own events: holds a watch
/// (`NameOwnerChanged` for `com.coreos.update1` and its `StatusUpdate` signals) and records
/// each event as it arrives. Without a bus or update_engine, tries again every
/// [`REFRESH`](crate::backends::REFRESH) (the refresher's probes notice it meanwhile).
pub async fn follow(ctx: Shared) {
    let c = client(&ctx);
    loop {
        let seen = Instant::now();
        match c.watch().await {
            Ok(mut w) => {
                ctx.backends.observe(BackendKind::UpdateEngine, seen, up(c, w.initial()));
                loop {
                    let ev = w.next().await;
                    let now = Instant::now();
                    match ev {
                        Ok(ue::Event::Status(st)) => ctx.backends.observe(BackendKind::UpdateEngine, now, up(c, &st)),
                        Ok(ue::Event::Vanished) => ctx.backends.observe(
                            BackendKind::UpdateEngine,
                            now,
                            down(&ue::Error::NotRunning { bus: c.bus() }),
                        ),
                        // The new owner's start-up StatusUpdate follows and says its state.
                        Ok(ue::Event::Appeared) => {}
                        Err(e) => {
                            ctx.backends.observe(BackendKind::UpdateEngine, now, down(&e));
                            break;
                        }
                    }
                }
            }
            Err(e) => note(&ctx, seen, Err(&e)),
        }
        tokio::time::sleep(crate::backends::REFRESH).await;
    }
}

fn status_pb(s: &ue::Status) -> UpdateEngineStatus {
    use ue::Operation as O;
    let operation = match &s.operation {
        O::Idle => UpdateOperation::Idle,
        O::CheckingForUpdate => UpdateOperation::CheckingForUpdate,
        O::UpdateAvailable => UpdateOperation::UpdateAvailable,
        O::Downloading => UpdateOperation::Downloading,
        O::Verifying => UpdateOperation::Verifying,
        O::Finalizing => UpdateOperation::Finalizing,
        O::UpdatedNeedReboot => UpdateOperation::UpdatedNeedReboot,
        O::ReportingErrorEvent => UpdateOperation::ReportingErrorEvent,
        O::Other(_) => UpdateOperation::Unspecified,
    };
    UpdateEngineStatus {
        last_checked_time: s.last_checked_time,
        progress: s.progress,
        current_operation: s.operation.to_string(),
        operation: operation as i32,
        new_version: s.new_version.clone(),
        new_size: s.new_size,
    }
}

fn event_pb(kind: Kind, status: Option<&ue::Status>) -> UpdateEngineEvent {
    UpdateEngineEvent { kind: kind as i32, status: status.map(status_pb), dropped: 0 }
}

impl AuditArgs for GetUpdateEngineStatusRequest {}
impl AuditArgs for WatchUpdateEngineRequest {}
impl AuditArgs for ResetUpdateEngineRequest {}

type EventStream = Pin<Box<dyn Stream<Item = Result<UpdateEngineEvent, Status>> + Send>>;

/// The `UpdateEngine` service.
pub struct UpdateEngineSvc {
    ctx: Shared,
    watchers: Arc<Semaphore>,
}

impl UpdateEngineSvc {
    /// Wraps the shared state.
    pub fn new(ctx: Shared) -> Self {
        UpdateEngineSvc { ctx, watchers: Arc::new(Semaphore::new(MAX_WATCHERS)) }
    }
}

/// Moves one watcher's events from the bus to its gRPC stream until either side ends or
/// the broker stops.
async fn forward(
    ctx: Shared,
    mut watch: ue::Watch,
    tx: mpsc::Sender<Result<UpdateEngineEvent, Status>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let stopping = ctx.stopping.notified();
    tokio::pin!(stopping);
    let mut queue = VecDeque::from([event_pb(Kind::Current, Some(watch.initial()))]);
    let mut dropped: u32 = 0;
    let end = loop {
        tokio::select! {
            () = &mut stopping => break Some(Status::unavailable("the broker is stopping")),
            () = tx.closed() => break None,
            permit = tx.reserve(), if !queue.is_empty() => match (permit, queue.pop_front()) {
                (Ok(p), Some(mut ev)) => {
                    ev.dropped = std::mem::take(&mut dropped);
                    p.send(Ok(ev));
                }
                _ => break None,
            },
            ev = watch.next() => match ev {
                Ok(ev) => {
                    if queue.len() >= WATCH_QUEUE {
                        queue.pop_front();
                        dropped = dropped.saturating_add(1);
                    }
                    queue.push_back(match &ev {
                        ue::Event::Status(s) => event_pb(Kind::Signal, Some(s)),
                        ue::Event::Vanished => event_pb(Kind::Vanished, None),
                        ue::Event::Appeared => event_pb(Kind::Appeared, None),
                    });
                }
                Err(e) => break Some(Status::from(Error::from(e))),
            },
        }
    };
    if let Some(status) = end {
        for ev in queue {
            let _ = tx.try_send(Ok(ev));
        }
        let _ = tx.try_send(Err(status));
    }
}

#[tonic::async_trait]
impl UpdateEngine for UpdateEngineSvc {
    async fn get_update_engine_status(
        &self,
        req: Request<GetUpdateEngineStatusRequest>,
    ) -> Result<Response<GetUpdateEngineStatusResponse>, Status> {
        guard(&self.ctx, Rpc::GetUpdateEngineStatus, req, |ctx, _, _| async move {
            let seen = Instant::now();
            let st = client(&ctx).status().await;
            note(&ctx, seen, st.as_ref());
            let st = st?;
            Ok(GetUpdateEngineStatusResponse { status: Some(status_pb(&st)) })
        })
        .await
    }

    type WatchUpdateEngineStream = EventStream;

    async fn watch_update_engine(
        &self,
        req: Request<WatchUpdateEngineRequest>,
    ) -> Result<Response<Self::WatchUpdateEngineStream>, Status> {
        let watchers = self.watchers.clone();
        // Read-only: one audit record, written when the stream is opened (or refused).
        guard(&self.ctx, Rpc::WatchUpdateEngine, req, |ctx, _, _| async move {
            let slot = watchers.try_acquire_owned().map_err(|_| Error::Backend {
                code: tonic::Code::ResourceExhausted,
                message: format!("at most {MAX_WATCHERS} update_engine watchers"),
            })?;
            let seen = Instant::now();
            let watch = client(&ctx).watch().await;
            note(&ctx, seen, watch.as_ref().map(ue::Watch::initial));
            let watch = watch?;
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(forward(ctx, watch, tx, slot));
            Ok(Box::pin(ReceiverStream::new(rx)) as EventStream)
        })
        .await
    }

    async fn reset_update_engine(
        &self,
        req: Request<ResetUpdateEngineRequest>,
    ) -> Result<Response<ResetUpdateEngineResponse>, Status> {
        guard(&self.ctx, Rpc::ResetUpdateEngine, req, |ctx, _, _| async move {
            let seen = Instant::now();
            let st = client(&ctx).reset_status().await;
            note(&ctx, seen, st.as_ref());
            let st = st?;
            tracing::info!(state = %st.operation, "update_engine status reset");
            Ok(ResetUpdateEngineResponse { status: Some(status_pb(&st)) })
        })
        .await
    }
}
