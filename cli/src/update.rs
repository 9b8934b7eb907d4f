// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl update status [--follow]|check|apply|cancel|rollback|window`: the update
//! worker's control socket (not the broker's).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use piccolo_proto::updater::v1::updater_client::UpdaterClient;
use piccolo_proto::updater::v1::{
    ApplyNowRequest, CancelRequest, CheckNowRequest, Phase, RollbackRequest, SetWindowRequest, StatusRequest,
    StatusResponse, WatchStatusRequest, Window,
};
use tonic::transport::Channel;

use crate::Failure;
use crate::output::{connect_failure, status_failure, table};

/// `piccoloctl update ...`
#[derive(Subcommand)]
pub enum UpdateCmd {
    /// The update state machine, the window and the record of attempts.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print every change until the running (or next) job ends.
        #[arg(long)]
        follow: bool,
    },
    /// Check the update server now (an update is downloaded, activated, then waits for the window).
    Check {
        /// Also retry a version that failed or was cancelled.
        #[arg(long)]
        force: bool,
    },
    /// Install now and reboot at once, outside the window.
    Apply {
        /// Also retry a version that failed or was cancelled.
        #[arg(long)]
        force: bool,
    },
    /// Stop a download, or un-stage an activated update.
    Cancel,
    /// Boot the other slot (if it would boot) and reboot.
    Rollback,
    /// Set the maintenance window (HH:MM HH:MM, UTC; equal times mean any time).
    Window {
        /// Opens.
        start: String,
        /// Closes.
        end: String,
    },
}

/// The socket: `--updater-socket`, `$PICCOLO_UPDATER_SOCKET`, or the default.
pub fn socket(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(piccolo_proto::paths::UPDATER_SOCKET_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(piccolo_proto::paths::UPDATER_SOCKET))
}

async fn client(socket: &Path) -> Result<UpdaterClient<Channel>, Failure> {
    let ch = piccolo_proto::client::connect_unix(socket).await.map_err(|e| connect_failure(&e))?;
    Ok(UpdaterClient::new(ch))
}

fn phase(s: &StatusResponse) -> Phase {
    Phase::try_from(s.phase).unwrap_or(Phase::Unspecified)
}

fn phase_name(s: &StatusResponse) -> String {
    phase(s).as_str_name().trim_start_matches("PHASE_").to_ascii_lowercase()
}

fn progress(s: &StatusResponse) -> String {
    if s.bytes_total == 0 {
        return String::new();
    }
    let pct = s.bytes_done.saturating_mul(100) / s.bytes_total;
    format!("{pct}% ({} of {} bytes)", s.bytes_done, s.bytes_total)
}

fn json(s: &StatusResponse) -> serde_json::Value {
    let attempts: Vec<_> = s
        .attempts
        .iter()
        .map(|a| {
            serde_json::json!({"version": a.version, "state": a.state, "attempts": a.attempts,
                "reason": a.reason, "slot": a.slot, "updated_at": a.updated_at})
        })
        .collect();
    let w = s.window.clone().unwrap_or_default();
    serde_json::json!({
        "phase": phase_name(s), "version": s.version, "bytes_done": s.bytes_done, "bytes_total": s.bytes_total,
        "message": s.message, "current_version": s.current_version, "window": {"start": w.start, "end": w.end},
        "last_check": s.last_check, "next_check": s.next_check, "attempts": attempts, "seq": s.seq,
    })
}

fn print(s: &StatusResponse) {
    let w = s.window.clone().unwrap_or_default();
    println!("phase      {}", phase_name(s));
    if !s.version.is_empty() {
        println!("version    {}", s.version);
    }
    if s.bytes_total > 0 {
        println!("progress   {}", progress(s));
    }
    if !s.message.is_empty() {
        println!("message    {}", s.message);
    }
    println!("running    {}", s.current_version);
    let any = if w.start == w.end { " (any time)" } else { "" };
    println!("window     {}-{} UTC{any}", w.start, w.end);
    if !s.attempts.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = s
            .attempts
            .iter()
            .map(|a| vec![a.version.clone(), a.state.clone(), a.attempts.to_string(), a.slot.clone(), a.reason.clone()])
            .collect();
        table(&["VERSION", "STATE", "ATTEMPTS", "SLOT", "REASON"], &rows);
    }
}

fn line(s: &StatusResponse) -> String {
    let mut l = phase_name(s);
    for part in [s.version.clone(), progress(s), s.message.clone()] {
        if !part.is_empty() {
            l.push_str("  ");
            l.push_str(&part);
        }
    }
    l
}

async fn follow(c: &mut UpdaterClient<Channel>, as_json: bool) -> Result<(), Failure> {
    let mut stream = c.watch_status(WatchStatusRequest {}).await.map_err(|s| status_failure(&s))?.into_inner();
    let busy = |p: Phase| matches!(p, Phase::Checking | Phase::Downloading | Phase::Verifying | Phase::Staged);
    let mut seen_busy = false;
    let mut last = String::new();
    let mut last_pct = u64::MAX;
    loop {
        let s = match stream.message().await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(Failure::new(4, "the updater closed the status stream")),
            Err(st) => return Err(status_failure(&st)),
        };
        let p = phase(&s);
        let pct = s.bytes_done.saturating_mul(100).checked_div(s.bytes_total).unwrap_or(u64::MAX);
        let key = format!("{}|{}|{}", s.phase, s.version, s.message);
        if key != last || pct != last_pct {
            if as_json {
                println!("{}", json(&s));
            } else {
                println!("{}", line(&s));
            }
            last = key;
            last_pct = pct;
        }
        seen_busy |= busy(p);
        if seen_busy && !busy(p) {
            return if p == Phase::Failed {
                Err(Failure::new(1, format!("update failed: {}", s.message)))
            } else {
                Ok(())
            };
        }
    }
}

fn st<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Result<T, Failure> {
    r.map(tonic::Response::into_inner).map_err(|s| status_failure(&s))
}

/// Runs an `update` subcommand against the updater socket.
pub async fn run(socket: &Path, cmd: UpdateCmd) -> Result<(), Failure> {
    let mut c = client(socket).await?;
    let status = match cmd {
        UpdateCmd::Status { json: j, follow: true } => return follow(&mut c, j).await,
        UpdateCmd::Status { json: j, follow: false } => {
            let s: StatusResponse = st(c.status(StatusRequest {}).await)?;
            if j {
                println!("{}", json(&s));
            } else {
                print(&s);
            }
            return Ok(());
        }
        UpdateCmd::Check { force } => st(c.check_now(CheckNowRequest { force }).await)?.status,
        UpdateCmd::Apply { force } => st(c.apply_now(ApplyNowRequest { force }).await)?.status,
        UpdateCmd::Cancel => st(c.cancel(CancelRequest {}).await)?.status,
        UpdateCmd::Rollback => st(c.rollback(RollbackRequest {}).await)?.status,
        UpdateCmd::Window { start, end } => {
            st(c.set_window(SetWindowRequest { window: Some(Window { start, end }) }).await)?.status
        }
    };
    let status = status.ok_or_else(|| Failure::new(1, "the updater sent no status"))?;
    print(&status);
    Ok(())
}
