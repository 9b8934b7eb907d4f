// SPDX-License-Identifier: Apache-2.0
//! Stand-in for Flatcar's update_engine, for tests only.
//!
//! Owns: the name `com.coreos.update1` and the object `/com/coreos/update1` with interface
//! `com.coreos.update1.Manager` (`GetStatus` → `(xdssx)`, `AttemptUpdate`, `ResetStatus`,
//! signal `StatusUpdate`) with update_engine's quirks:
//! - the status is broadcast once at start-up, and on every state change;
//! - while DOWNLOADING a progress change is broadcast only from 1 % up (no 10 s timer here);
//! - `AttemptUpdate` always succeeds and silently skips unless IDLE (then CHECKING_FOR_UPDATE);
//! - `ResetStatus` is a no-op in IDLE, goes UPDATED_NEED_REBOOT → IDLE (removing the
//!   "update completed" marker), and is refused (a D-Bus error) in any other state;
//! - at start the state is UPDATED_NEED_REBOOT if the marker exists, else IDLE.
//!
//! Tests drive the state through a Unix control socket (`--control`), one command per line:
//! `set OP [PROGRESS [VERSION [SIZE]]]` (answers `ok broadcast` or `ok quiet`), `burst N`
//! (N state changes at once), `status`, `calls`. Nothing test-only is on the bus.
//!
//! Must never: run on a real system's bus next to a real update_engine.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use zbus::{Connection, interface};

const SERVICE: &str = "com.coreos.update1";
const PATH: &str = "/com/coreos/update1";
const INTERFACE: &str = "com.coreos.update1.Manager";
const IDLE: &str = "UPDATE_STATUS_IDLE";
const CHECKING: &str = "UPDATE_STATUS_CHECKING_FOR_UPDATE";
const NEED_REBOOT: &str = "UPDATE_STATUS_UPDATED_NEED_REBOOT";
/// `kDeltaPercent`.
const DELTA_PROGRESS: f64 = 0.01;

#[derive(Parser)]
#[command(about = "stand-in for update_engine (tests only)")]
struct Args {
    /// D-Bus address to serve on (default: the system bus).
    #[arg(long)]
    address: Option<String>,
    /// Unix socket the tests drive the state through.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Stands in for /var/run/update_engine_autoupdate_completed.
    #[arg(long)]
    completed_marker: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
struct Status {
    last_checked_time: i64,
    progress: f64,
    op: String,
    new_version: String,
    new_size: i64,
}

type Wire = (i64, f64, String, String, i64);

impl Status {
    fn wire(&self) -> Wire {
        (self.last_checked_time, self.progress, self.op.clone(), self.new_version.clone(), self.new_size)
    }
}

#[derive(Default)]
struct Calls {
    get: u64,
    attempt: u64,
    attempt_skipped: u64,
    reset: u64,
    reset_refused: u64,
}

struct State {
    status: Status,
    calls: Calls,
    marker: Option<PathBuf>,
}

type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

async fn broadcast(conn: &Connection, w: &Wire) {
    if let Err(e) = conn.emit_signal(None::<&str>, PATH, INTERFACE, "StatusUpdate", w).await {
        eprintln!("standin: StatusUpdate not sent: {e}");
    }
}

/// Applies a new status; returns what to broadcast (update_engine's rules), if anything.
fn apply(st: &mut State, new: Status) -> Option<Wire> {
    let old = std::mem::replace(&mut st.status, new);
    let s = &st.status;
    if s.op == NEED_REBOOT
        && let Some(m) = &st.marker
        && let Err(e) = std::fs::write(m, b"")
    {
        eprintln!("standin: marker {}: {e}", m.display());
    }
    let changed = old.op != s.op
        || old.new_version != s.new_version
        || old.new_size != s.new_size
        || old.last_checked_time != s.last_checked_time;
    let progressed = (s.progress - old.progress).abs() >= DELTA_PROGRESS;
    // Progress only moves while DOWNLOADING (BytesReceived), where steps under 1 % are not
    // broadcast; every other change is a state change and is.
    (changed || progressed).then(|| s.wire())
}

struct Manager {
    state: Shared,
}

#[interface(name = "com.coreos.update1.Manager")]
impl Manager {
    async fn get_status(&self) -> Wire {
        let mut st = lock(&self.state);
        st.calls.get += 1;
        st.status.wire()
    }

    async fn attempt_update(&self, #[zbus(connection)] conn: &Connection) {
        let send = {
            let mut st = lock(&self.state);
            st.calls.attempt += 1;
            if st.status.op == IDLE {
                let new = Status { op: CHECKING.into(), last_checked_time: now(), ..st.status.clone() };
                apply(&mut st, new)
            } else {
                st.calls.attempt_skipped += 1;
                eprintln!("standin: Skipping update check because current status is {}", st.status.op);
                None
            }
        };
        if let Some(w) = send {
            broadcast(conn, &w).await;
        }
    }

    async fn reset_status(&self, #[zbus(connection)] conn: &Connection) -> zbus::fdo::Result<()> {
        let send = {
            let mut st = lock(&self.state);
            st.calls.reset += 1;
            let op = st.status.op.clone();
            match op.as_str() {
                IDLE => None,
                NEED_REBOOT => {
                    if let Some(m) = &st.marker {
                        let _ = std::fs::remove_file(m);
                    }
                    let new = Status {
                        op: IDLE.into(),
                        progress: 0.0,
                        new_version: "0.0.0".into(),
                        new_size: 0,
                        ..st.status.clone()
                    };
                    apply(&mut st, new)
                }
                other => {
                    st.calls.reset_refused += 1;
                    return Err(zbus::fdo::Error::Failed(format!("ResetStatus: cannot reset in state {other}")));
                }
            }
        };
        if let Some(w) = send {
            broadcast(conn, &w).await;
        }
        Ok(())
    }
}

/// One control command; returns the answer line.
async fn command(line: &str, state: &Shared, conn: &Connection) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["set", op, rest @ ..] => {
            let send = {
                let mut st = lock(state);
                let mut new = Status { op: (*op).to_owned(), ..st.status.clone() };
                if let Some(p) = rest.first() {
                    match p.parse() {
                        Ok(p) => new.progress = p,
                        Err(_) => return format!("error bad progress {p}"),
                    }
                }
                if let Some(v) = rest.get(1) {
                    new.new_version = (*v).to_owned();
                }
                if let Some(n) = rest.get(2) {
                    match n.parse() {
                        Ok(n) => new.new_size = n,
                        Err(_) => return format!("error bad size {n}"),
                    }
                }
                apply(&mut st, new)
            };
            match send {
                Some(w) => {
                    broadcast(conn, &w).await;
                    "ok broadcast".into()
                }
                None => "ok quiet".into(),
            }
        }
        ["burst", n] => {
            // n state changes as fast as the bus takes them (for slow-watcher tests).
            let Ok(n) = n.parse::<u32>() else { return format!("error bad count {n}") };
            for i in 0..n {
                let w = {
                    let mut st = lock(state);
                    let op = if i % 2 == 0 { "UPDATE_STATUS_VERIFYING" } else { "UPDATE_STATUS_FINALIZING" };
                    let new = Status { op: op.into(), ..st.status.clone() };
                    apply(&mut st, new)
                };
                if let Some(w) = w {
                    broadcast(conn, &w).await;
                }
            }
            "ok broadcast".into()
        }
        ["status"] => {
            let (t, p, op, v, n) = lock(state).status.wire();
            format!("{t} {p} {op} {v} {n}")
        }
        ["calls"] => {
            let st = lock(state);
            let c = &st.calls;
            format!(
                "get={} attempt={} attempt_skipped={} reset={} reset_refused={}",
                c.get, c.attempt, c.attempt_skipped, c.reset, c.reset_refused
            )
        }
        _ => format!("error unknown command: {line}"),
    }
}

async fn control(listener: tokio::net::UnixListener, state: Shared, conn: Connection) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let (state, conn) = (state.clone(), conn.clone());
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut answer = command(&line, &state, &conn).await;
                answer.push('\n');
                if w.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn serve(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let need_reboot = args.completed_marker.as_ref().is_some_and(|m| m.exists());
    let status = Status {
        last_checked_time: 0,
        progress: 0.0,
        op: if need_reboot { NEED_REBOOT } else { IDLE }.into(),
        new_version: "0.0.0".into(),
        new_size: 0,
    };
    let state: Shared = Arc::new(Mutex::new(State { status, calls: Calls::default(), marker: args.completed_marker }));
    // Bound before READY is printed, so a test may drive the state as soon as it sees READY.
    let listener = match &args.control {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            Some(tokio::net::UnixListener::bind(path)?)
        }
        None => None,
    };
    let builder = match &args.address {
        Some(a) => zbus::connection::Builder::address(a.as_str())?,
        None => zbus::connection::Builder::system()?,
    };
    let conn = builder.serve_at(PATH, Manager { state: state.clone() })?.name(SERVICE)?.build().await?;
    // update_engine: g_idle_add(&BroadcastStatus...) right after taking the name.
    let w = lock(&state).status.wire();
    broadcast(&conn, &w).await;
    println!("READY {}", conn.unique_name().map(|n| n.to_string()).unwrap_or_default());
    match listener {
        Some(l) => control(l, state, conn).await?,
        None => std::future::pending::<()>().await,
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("standin: runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("standin: {e}");
            std::process::ExitCode::from(3)
        }
    }
}
