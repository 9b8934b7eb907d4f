// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl update-engine status|watch|reset`: Flatcar's update_engine through the broker.

use std::path::Path;

use clap::Subcommand;
use piccolo_proto::v1::update_engine_client::UpdateEngineClient;
use piccolo_proto::v1::update_engine_event::Kind;
use piccolo_proto::v1::{
    GetUpdateEngineStatusRequest, ResetUpdateEngineRequest, UpdateEngineEvent, UpdateEngineStatus,
    WatchUpdateEngineRequest,
};

use crate::Failure;
use crate::broker::channel;
use crate::output::status_failure;

/// `piccoloctl update-engine ...`
#[derive(Subcommand)]
pub enum UpdateEngineCmd {
    /// update_engine's current status.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow update_engine's status changes (one line per event) until interrupted.
    Watch {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Stop after this many events (the first is the current status).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Reset update_engine's status (from UPDATED_NEED_REBOOT to IDLE). Does not undo the
    /// partition table changes of an update: use `piccoloctl boot rollback` for that.
    Reset,
}

/// update_engine being away is not the broker being away (exit 4): say which it is.
fn failure(s: &tonic::Status) -> Failure {
    if s.code() == tonic::Code::Unavailable && s.message().contains("update_engine") {
        return Failure::new(1, format!("update_engine unavailable: {}", s.message()));
    }
    if s.code() == tonic::Code::FailedPrecondition {
        return Failure::new(1, format!("refused: {}", s.message()));
    }
    status_failure(s)
}

fn status_json(s: &UpdateEngineStatus) -> serde_json::Value {
    serde_json::json!({
        "current_operation": s.current_operation, "progress": s.progress,
        "new_version": s.new_version, "new_size": s.new_size, "last_checked_time": s.last_checked_time,
    })
}

fn print_status(s: &UpdateEngineStatus, json: bool) {
    if json {
        println!("{}", status_json(s));
        return;
    }
    println!("operation     {}", s.current_operation);
    println!("progress      {:.2}", s.progress);
    println!("new version   {}", s.new_version);
    println!("new size      {}", s.new_size);
    println!(
        "last checked  {}",
        if s.last_checked_time == 0 { "never".into() } else { s.last_checked_time.to_string() }
    );
}

fn kind_name(k: i32) -> &'static str {
    match Kind::try_from(k) {
        Ok(Kind::Current) => "current",
        Ok(Kind::Signal) => "signal",
        Ok(Kind::Vanished) => "vanished",
        Ok(Kind::Appeared) => "appeared",
        _ => "unknown",
    }
}

fn print_event(e: &UpdateEngineEvent, json: bool) {
    if json {
        let mut v = serde_json::json!({ "kind": kind_name(e.kind), "dropped": e.dropped });
        if let Some(s) = &e.status {
            v["status"] = status_json(s);
        }
        println!("{v}");
        return;
    }
    match &e.status {
        Some(s) => println!(
            "{:<8} {} progress={:.2} version={} size={}",
            kind_name(e.kind),
            s.current_operation,
            s.progress,
            s.new_version,
            s.new_size
        ),
        None => println!("{}", kind_name(e.kind)),
    }
    if e.dropped > 0 {
        println!("(missed {} events: reading too slowly)", e.dropped);
    }
}

/// Runs an `update-engine` subcommand.
pub async fn run(socket: &Path, cmd: UpdateEngineCmd) -> Result<(), Failure> {
    use std::io::Write;
    let mut c = UpdateEngineClient::new(channel(socket).await?);
    match cmd {
        UpdateEngineCmd::Status { json } => {
            let r = c.get_update_engine_status(GetUpdateEngineStatusRequest {}).await.map_err(|s| failure(&s))?;
            let st = r.into_inner().status.ok_or_else(|| Failure::new(1, "the broker sent no status"))?;
            print_status(&st, json);
        }
        UpdateEngineCmd::Reset => {
            let r = c.reset_update_engine(ResetUpdateEngineRequest {}).await.map_err(|s| failure(&s))?;
            let st = r.into_inner().status.ok_or_else(|| Failure::new(1, "the broker sent no status"))?;
            print_status(&st, false);
        }
        UpdateEngineCmd::Watch { json, count } => {
            let mut stream =
                c.watch_update_engine(WatchUpdateEngineRequest {}).await.map_err(|s| failure(&s))?.into_inner();
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                match stream.message().await.map_err(|s| failure(&s))? {
                    Some(e) => print_event(&e, json),
                    None => break,
                }
                let _ = std::io::stdout().flush();
                seen += 1;
            }
        }
    }
    Ok(())
}
