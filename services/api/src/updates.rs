// SPDX-License-Identifier: Apache-2.0
//! The update worker's control socket (`piccolo.updater.v1.Updater` on
//! `/run/piccolo-updater/updater.sock`) as JSON, and the watcher that turns its
//! `WatchStatus` stream into `update` events.
//!
//! The updater authorises this worker by its SO_PEERCRED uid (`piccolo-api`), so nothing here
//! carries a credential. Every call opens its own connection: a restarted updater needs no
//! reconnect logic, and a Unix-socket connect costs microseconds.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use piccolo_proto::updater::v1::updater_client::UpdaterClient;
use piccolo_proto::updater::v1::{
    self as pb, ApplyNowRequest, CancelRequest, CheckNowRequest, RollbackRequest, SetWindowRequest, StatusRequest,
    WatchStatusRequest,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tonic::transport::Channel;
use utoipa::ToSchema;

use crate::error::{ApiError, UpdaterStatus};
use crate::events::Event;

/// How long a status read may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a command may take: CheckNow answers once the check has a result (the updater
/// may first wait up to 30 s for its start-up recovery, then fetch a device token and ask the
/// update server), and Cancel waits for a running download to wind down (up to 60 s).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Reconnect back-off of the watcher: first retry, and the cap.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(250);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// A `HH:MM` (UTC) pattern, the updater's own rule.
pub const HHMM_PATTERN: &str = "^([01][0-9]|2[0-3]):[0-5][0-9]$";

/// Where the update state machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdatePhase {
    /// Nothing running.
    Idle,
    /// Asking the update server.
    Checking,
    /// Streaming the payload into the inactive slot (`bytes_done` of `bytes_total`).
    Downloading,
    /// The broker checks the digest and reads the slot back.
    Verifying,
    /// Written, verified and activated: the next boot tries it.
    Staged,
    /// Staged; the reboot waits for the maintenance window.
    WaitingForWindow,
    /// A reboot was requested.
    Rebooting,
    /// The last job failed (`message` says why).
    Failed,
    /// A phase this API version does not know.
    Unknown,
}

impl From<i32> for UpdatePhase {
    fn from(v: i32) -> UpdatePhase {
        match pb::Phase::try_from(v) {
            Ok(pb::Phase::Idle) => UpdatePhase::Idle,
            Ok(pb::Phase::Checking) => UpdatePhase::Checking,
            Ok(pb::Phase::Downloading) => UpdatePhase::Downloading,
            Ok(pb::Phase::Verifying) => UpdatePhase::Verifying,
            Ok(pb::Phase::Staged) => UpdatePhase::Staged,
            Ok(pb::Phase::WaitingForWindow) => UpdatePhase::WaitingForWindow,
            Ok(pb::Phase::Rebooting) => UpdatePhase::Rebooting,
            Ok(pb::Phase::Failed) => UpdatePhase::Failed,
            Ok(pb::Phase::Unspecified) | Err(_) => UpdatePhase::Unknown,
        }
    }
}

/// The maintenance window: `HH:MM` UTC; equal times mean any time; may wrap midnight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWindow {
    /// Opens (`HH:MM`, UTC).
    #[schema(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$", example = "02:00")]
    pub start: String,
    /// Closes (`HH:MM`, UTC).
    #[schema(pattern = "^([01][0-9]|2[0-3]):[0-5][0-9]$", example = "05:00")]
    pub end: String,
}

/// A version the updater has tried (its durable record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UpdateAttempt {
    /// Version.
    pub version: String,
    /// `downloading`, `written`, `activating`, `staged`, `booted`, `succeeded`, `failed` or
    /// `cancelled`.
    pub state: String,
    /// Download attempts.
    pub attempts: u32,
    /// Why it failed or was cancelled (empty otherwise).
    pub reason: String,
    /// Unix seconds of the last change.
    pub updated_at: i64,
    /// Slot label it was written to (`USR-A`/`USR-B`; empty if none).
    pub slot: String,
}

/// The update worker's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct UpdateStatus {
    /// Where the state machine is.
    pub phase: UpdatePhase,
    /// Version being handled (empty when idle with nothing available).
    pub version: String,
    /// Payload bytes written so far (downloading, verifying).
    pub bytes_done: u64,
    /// Payload size (0 when no download runs).
    pub bytes_total: u64,
    /// Failure reason, or the last check's "up to date" / "not yet" detail.
    pub message: String,
    /// The version running now.
    pub current_version: String,
    /// The maintenance window (absent if the updater did not say).
    pub window: Option<UpdateWindow>,
    /// Unix seconds of the last completed check (0: never).
    pub last_check: i64,
    /// Unix seconds of the next automatic check.
    pub next_check: i64,
    /// The durable record, newest first (at most 16).
    pub attempts: Vec<UpdateAttempt>,
    /// Increases on every change within one updater run (restarts begin again).
    pub seq: u64,
}

impl From<pb::StatusResponse> for UpdateStatus {
    fn from(s: pb::StatusResponse) -> UpdateStatus {
        UpdateStatus {
            phase: UpdatePhase::from(s.phase),
            version: s.version,
            bytes_done: s.bytes_done,
            bytes_total: s.bytes_total,
            message: s.message,
            current_version: s.current_version,
            window: s.window.map(|w| UpdateWindow { start: w.start, end: w.end }),
            last_check: s.last_check,
            next_check: s.next_check,
            attempts: s
                .attempts
                .into_iter()
                .map(|a| UpdateAttempt {
                    version: a.version,
                    state: a.state,
                    attempts: a.attempts,
                    reason: a.reason,
                    updated_at: a.updated_at,
                    slot: a.slot,
                })
                .collect(),
            seq: s.seq,
        }
    }
}

/// Checks a window before it is sent (`HH:MM`, 00:00 to 23:59): the updater checks again, but
/// a malformed value never leaves this process.
pub fn validate_window(w: &UpdateWindow) -> Result<(), ApiError> {
    fn hhmm(s: &str) -> bool {
        let b = s.as_bytes();
        b.len() == 5
            && b[2] == b':'
            && [0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_digit())
            && (b[0] - b'0') * 10 + (b[1] - b'0') <= 23
            && b[3] <= b'5'
    }
    for (name, v) in [("start", &w.start), ("end", &w.end)] {
        if !hhmm(v) {
            return Err(ApiError::BadRequest(format!("window {name} must be HH:MM (00:00 to 23:59, UTC)")));
        }
    }
    Ok(())
}

/// The updater's control socket.
#[derive(Debug, Clone)]
pub struct Updater {
    socket: PathBuf,
}

fn unreachable(e: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %e, "updater unreachable");
    ApiError::Unavailable("the update worker is unreachable".into())
}

impl Updater {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Updater {
        Updater { socket: socket.into() }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn call<T, F, Fut>(&self, limit: Duration, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(UpdaterClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let call = async {
            let ch = piccolo_proto::client::connect_unix(&self.socket).await.map_err(unreachable)?;
            f(UpdaterClient::new(ch)).await.map(tonic::Response::into_inner).map_err(|s| UpdaterStatus(s).into())
        };
        tokio::time::timeout(limit, call)
            .await
            .unwrap_or_else(|_| Err(ApiError::Unavailable("the update worker did not answer in time".into())))
    }

    /// The status now.
    pub async fn status(&self) -> Result<UpdateStatus, ApiError> {
        self.call(STATUS_TIMEOUT, |mut c| async move { c.status(StatusRequest {}).await }).await.map(UpdateStatus::from)
    }

    /// Checks now; an update found is installed and then waits for the window.
    pub async fn check(&self, force: bool) -> Result<UpdateStatus, ApiError> {
        let r = self.call(COMMAND_TIMEOUT, |mut c| async move { c.check_now(CheckNowRequest { force }).await }).await?;
        status_of(r.status)
    }

    /// Installs (if needed) and reboots now.
    pub async fn apply(&self, force: bool) -> Result<UpdateStatus, ApiError> {
        let r = self.call(COMMAND_TIMEOUT, |mut c| async move { c.apply_now(ApplyNowRequest { force }).await }).await?;
        status_of(r.status)
    }

    /// Stops a download, or un-stages an activated update.
    pub async fn cancel(&self) -> Result<UpdateStatus, ApiError> {
        let r = self.call(COMMAND_TIMEOUT, |mut c| async move { c.cancel(CancelRequest {}).await }).await?;
        status_of(r.status)
    }

    /// Boots the other slot (if it would boot) and reboots.
    pub async fn rollback(&self) -> Result<UpdateStatus, ApiError> {
        let r = self.call(COMMAND_TIMEOUT, |mut c| async move { c.rollback(RollbackRequest {}).await }).await?;
        status_of(r.status)
    }

    /// Replaces the maintenance window (validated first).
    pub async fn set_window(&self, w: UpdateWindow) -> Result<UpdateStatus, ApiError> {
        validate_window(&w)?;
        let req = SetWindowRequest { window: Some(pb::Window { start: w.start, end: w.end }) };
        let r = self.call(STATUS_TIMEOUT, |mut c| async move { c.set_window(req).await }).await?;
        status_of(r.status)
    }

    /// Follows `WatchStatus` forever, publishing each changed status as an `update` event;
    /// reconnects with back-off (250 ms doubling to 5 s) when the updater is down or restarts.
    pub async fn watch(self, events: broadcast::Sender<Event>) {
        let mut last: Option<UpdateStatus> = None;
        let mut retry = WATCH_RETRY_MIN;
        let mut was_down = false;
        loop {
            let mut received = false;
            let r = self.follow(&events, &mut last, &mut received).await;
            if received {
                retry = WATCH_RETRY_MIN;
            }
            match r {
                Ok(()) => tracing::info!("updater status stream ended; reconnecting"),
                // One line per outage, not per retry.
                Err(e) if !was_down || received => tracing::info!(error = %e, "updater status stream unavailable"),
                Err(e) => tracing::debug!(error = %e, "updater status stream still unavailable"),
            }
            was_down = true;
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(WATCH_RETRY_MAX);
        }
    }

    async fn follow(
        &self,
        events: &broadcast::Sender<Event>,
        last: &mut Option<UpdateStatus>,
        received: &mut bool,
    ) -> Result<(), String> {
        let ch = piccolo_proto::client::connect_unix(&self.socket).await.map_err(|e| e.to_string())?;
        let mut stream = UpdaterClient::new(ch)
            .watch_status(WatchStatusRequest {})
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner();
        while let Some(msg) = stream.message().await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))? {
            *received = true;
            let status = UpdateStatus::from(msg);
            // A reconnect starts with the current status again: send it only if it differs.
            if last.as_ref() != Some(&status) {
                *last = Some(status.clone());
                let _ = events.send(Event::Update { update: status });
            }
        }
        Ok(())
    }
}

fn status_of(s: Option<pb::StatusResponse>) -> Result<UpdateStatus, ApiError> {
    s.map(UpdateStatus::from)
        .ok_or_else(|| ApiError::UpdateFailed("the update worker answered without a status".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(a: &str, b: &str) -> UpdateWindow {
        UpdateWindow { start: a.into(), end: b.into() }
    }

    #[test]
    fn windows_are_hh_mm() {
        for ok in [("00:00", "23:59"), ("02:00", "05:30"), ("23:00", "01:00"), ("12:34", "12:34")] {
            assert!(validate_window(&w(ok.0, ok.1)).is_ok(), "{ok:?}");
        }
        for bad in ["24:00", "2:00", "02:60", "0200", " 02:00", "02:00 ", "ab:cd", "", "02:0", "002:00", "٠٢:٠٠"] {
            let e = validate_window(&w(bad, "05:00")).unwrap_err();
            assert_eq!(e.status_and_code().0, axum::http::StatusCode::BAD_REQUEST, "{bad:?}");
            assert!(validate_window(&w("05:00", bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_pattern_in_the_schema_is_the_rule_in_the_code() {
        // The OpenAPI pattern is written out in the schema attribute; keep both in step.
        let schema = serde_json::to_value(<UpdateWindow as utoipa::PartialSchema>::schema()).unwrap();
        assert_eq!(schema["properties"]["start"]["pattern"], HHMM_PATTERN);
        assert_eq!(schema["properties"]["end"]["pattern"], HHMM_PATTERN);
    }

    #[test]
    fn phases_map_by_name() {
        assert_eq!(UpdatePhase::from(pb::Phase::Downloading as i32), UpdatePhase::Downloading);
        assert_eq!(UpdatePhase::from(pb::Phase::WaitingForWindow as i32), UpdatePhase::WaitingForWindow);
        assert_eq!(UpdatePhase::from(0), UpdatePhase::Unknown);
        assert_eq!(UpdatePhase::from(99), UpdatePhase::Unknown);
        assert_eq!(serde_json::to_value(UpdatePhase::WaitingForWindow).unwrap(), "waiting_for_window");
    }

    #[test]
    fn updater_statuses_map_to_http() {
        use axum::http::StatusCode as H;
        use tonic::{Code, Status};
        let cases = [
            (
                Status::failed_precondition("busy: another update job is running (PHASE_DOWNLOADING 1.1.0)"),
                H::CONFLICT,
                "busy",
            ),
            (Status::failed_precondition("nothing to cancel (PHASE_IDLE)"), H::CONFLICT, "conflict"),
            (Status::cancelled("cancelled by the operator"), H::CONFLICT, "conflict"),
            (Status::invalid_argument("\"25:00\" is not HH:MM"), H::BAD_REQUEST, "bad_request"),
            (Status::unavailable("broker down"), H::SERVICE_UNAVAILABLE, "unavailable"),
            (Status::deadline_exceeded("slow"), H::SERVICE_UNAVAILABLE, "unavailable"),
            (Status::permission_denied("CheckNow: permission denied"), H::SERVICE_UNAVAILABLE, "unavailable"),
            (Status::internal("update server request to http://x failed"), H::BAD_GATEWAY, "update_failed"),
            (Status::new(Code::DataLoss, "digest mismatch"), H::BAD_GATEWAY, "update_failed"),
        ];
        for (s, status, code) in cases {
            let what = format!("{:?} {}", s.code(), s.message());
            let e = ApiError::from(UpdaterStatus(s));
            assert_eq!(e.status_and_code(), (status, code), "{what}");
        }
        // A permission problem is the deployment's, and its detail stays in the log.
        let e = ApiError::from(UpdaterStatus(Status::permission_denied("CheckNow: permission denied uid 5")));
        assert!(!e.to_string().contains("uid"), "{e}");
    }

    #[test]
    fn status_conversion_keeps_every_field() {
        let s = pb::StatusResponse {
            phase: pb::Phase::Downloading as i32,
            version: "1.1.0".into(),
            bytes_done: 10,
            bytes_total: 20,
            message: "m".into(),
            current_version: "1.0.0".into(),
            window: Some(pb::Window { start: "02:00".into(), end: "05:00".into() }),
            last_check: 7,
            next_check: 8,
            attempts: vec![pb::Attempt {
                version: "1.1.0".into(),
                state: "downloading".into(),
                attempts: 1,
                reason: String::new(),
                updated_at: 9,
                slot: "USR-B".into(),
            }],
            seq: 42,
        };
        let v = serde_json::to_value(UpdateStatus::from(s)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"phase": "downloading", "version": "1.1.0", "bytes_done": 10, "bytes_total": 20,
                "message": "m", "current_version": "1.0.0", "window": {"start": "02:00", "end": "05:00"},
                "last_check": 7, "next_check": 8, "seq": 42,
                "attempts": [{"version": "1.1.0", "state": "downloading", "attempts": 1, "reason": "",
                    "updated_at": 9, "slot": "USR-B"}]})
        );
    }

    #[tokio::test]
    async fn an_absent_updater_is_503() {
        let dir = tempfile::tempdir().unwrap();
        let u = Updater::new(dir.path().join("none.sock"));
        let e = u.status().await.unwrap_err();
        assert_eq!(e.status_and_code().1, "unavailable");
        // A bad window is refused before any connection is tried (400, not 503).
        let e = u.set_window(w("25:00", "01:00")).await.unwrap_err();
        assert_eq!(e.status_and_code().1, "bad_request");
    }
}
