// SPDX-License-Identifier: Apache-2.0
//! The HTTP layer's view of `crates/persistence`: the one [`Persistence`] state machine (key
//! set, gocryptfs volumes through the broker, SQLite control store), the lock state as the API
//! reports it, the broker connection, and the start-up sequence.
//!
//! The API worker is the single owner of the key set, the control store and the lock state;
//! handlers call [`Persistence`] directly (it is async and serialises its transitions) and
//! the control store through [`Persistence::store`], which answers `Locked` while locked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use piccolo_keyset::ImportReport;
pub use piccolo_persistence::{GrpcBroker, Persistence};
use serde::Serialize;
use tonic::transport::{Endpoint, Uri};
use utoipa::ToSchema;

/// Lock state of the control store, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    /// No key set yet: first-run setup is pending.
    Uninitialised,
    /// Key set present, no key in memory: the control store is closed, volumes unmounted.
    Locked,
    /// An unlock (or setup) is in progress.
    Unlocking,
    /// Keys in memory, volumes mounted, the control store open.
    Unlocked,
    /// A lock is in progress.
    Locking,
    /// Volumes are quiesced for an export (store-backed endpoints answer 423 meanwhile).
    Exporting,
    /// An import is in progress.
    Importing,
}

/// The API's lock state of `p`: the state machine's, plus `uninitialised` before setup.
pub fn lock_state(p: &Persistence) -> LockState {
    use piccolo_persistence::LockState as S;
    match p.state() {
        S::Unlocked => LockState::Unlocked,
        S::Locked if !p.is_set_up() => LockState::Uninitialised,
        S::Locked => LockState::Locked,
        S::Unlocking => LockState::Unlocking,
        S::Locking => LockState::Locking,
        S::Exporting => LockState::Exporting,
        S::Importing => LockState::Importing,
    }
}

/// Which export archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    /// The control volume's ciphertext, without the key set (restores onto this key set only).
    Control,
    /// Every volume's ciphertext plus the sealed key set (restores on new hardware with the
    /// export's password or recovery key).
    Full,
}

impl From<ExportKind> for piccolo_keyset::ExportKind {
    fn from(k: ExportKind) -> piccolo_keyset::ExportKind {
        match k {
            ExportKind::Control => piccolo_keyset::ExportKind::Control,
            ExportKind::Full => piccolo_keyset::ExportKind::Full,
        }
    }
}

impl From<piccolo_keyset::ExportKind> for ExportKind {
    fn from(k: piccolo_keyset::ExportKind) -> ExportKind {
        match k {
            piccolo_keyset::ExportKind::Control => ExportKind::Control,
            piccolo_keyset::ExportKind::Full => ExportKind::Full,
        }
    }
}

/// What an import replaced.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImportInfo {
    /// `control` or `full`.
    pub kind: ExportKind,
    /// The volumes replaced.
    pub volumes: Vec<String>,
    /// When the export was made (RFC 3339).
    pub created: String,
    /// Whether the key set was replaced (full exports): unlock with the export's password.
    pub keyset_replaced: bool,
    /// Live volumes whose key is gone after a full import.
    pub orphaned_volumes: Vec<String>,
    /// Lock state afterwards (always locked: unlock with the export's password).
    pub state: LockState,
}

impl ImportInfo {
    /// The report of `piccolo_keyset::import`, with the state afterwards.
    pub fn new(r: ImportReport, state: LockState) -> ImportInfo {
        ImportInfo {
            kind: r.kind.into(),
            volumes: r.volumes,
            created: r.created,
            keyset_replaced: r.keyset_replaced,
            orphaned_volumes: r.orphaned_volumes,
            state,
        }
    }
}

/// A broker client over `socket` that connects on first use and reconnects after a broker
/// restart, so the worker starts (and answers 503 for volume operations) while the broker
/// is down, and needs no restart when it comes back.
pub fn broker(socket: &Path) -> Result<Arc<GrpcBroker>, tonic::transport::Error> {
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by the API but unused: the connector ignores it.
    let channel = Endpoint::from_static("http://broker.invalid")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let p = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
        }));
    Ok(Arc::new(GrpcBroker::from_channel(channel)))
}

/// What the start-up sequence found.
#[derive(Debug, Default)]
pub struct Startup {
    /// TPM auto-unlock succeeded.
    pub tpm_unlocked: bool,
    /// Why TPM auto-unlock failed (e.g. "TPM unlock failed: PCR 7 changed").
    pub tpm_error: Option<String>,
}

/// Start-up: reconcile the volume journals with the broker (unmounts whatever a crash left
/// mounted), then try TPM auto-unlock. Failures are reported, never fatal: the worker serves
/// locked and the admin unlocks with the password.
pub async fn start(p: &Persistence) -> Startup {
    if let Err(e) = p.reconcile().await {
        tracing::error!(error = %piccolo_store::error_chain(&e), "start-up reconciliation failed");
    }
    match p.auto_unlock().await {
        Ok(unlocked) => Startup { tpm_unlocked: unlocked, tpm_error: None },
        Err(e) => {
            let msg = e.to_string();
            tracing::warn!(error = %piccolo_store::error_chain(&e), "TPM auto-unlock failed; staying locked");
            Startup { tpm_unlocked: false, tpm_error: Some(msg) }
        }
    }
}

/// Forwards every lock-state transition of the state machine to the SSE fan-out as a `lock`
/// event. Transitions come from the machine's event channel (so none is coalesced away, and
/// one started anywhere, e.g. by the reconciler or TPM auto-unlock, is seen) and from its
/// state watch (which also sees the silent return to `unlocked` after an export).
/// Consecutive duplicates are dropped.
pub fn spawn_lock_events(state: crate::state::SharedState) -> tokio::task::JoinHandle<()> {
    use piccolo_persistence::Event as P;
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = state.persistence.subscribe();
    let mut watch = state.persistence.watch_state();
    tokio::spawn(async move {
        let mut last = state.lock_state();
        loop {
            let view = tokio::select! {
                // Events first: the watch only reports what no event announced.
                biased;
                ev = rx.recv() => match ev {
                    Ok(P::Unlocking { .. }) => LockState::Unlocking,
                    Ok(P::Unlocked { .. }) => LockState::Unlocked,
                    Ok(P::Locking) => LockState::Locking,
                    Ok(P::ExportStarted { .. }) => LockState::Exporting,
                    Ok(P::Locked { .. }) => state.lock_state(),
                    Ok(_) => continue,
                    // Missed events: report where the machine is now.
                    Err(RecvError::Lagged(_)) => state.lock_state(),
                    Err(RecvError::Closed) => return,
                },
                changed = watch.changed() => match changed {
                    Ok(()) => state.lock_state(),
                    Err(_) => return,
                },
            };
            if view != last {
                last = view;
                state.publish(crate::events::Event::lock(view));
            }
        }
    })
}
