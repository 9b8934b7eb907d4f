// SPDX-License-Identifier: Apache-2.0
//! `piccolo-health`: the boot health gate. Checks that the broker answers `GetInfo`, that the
//! workers' sockets accept connections and that the control store is present, each retried
//! until a deadline; only when every required check passes does it call the broker's
//! `MarkBootSuccessful`. Otherwise it exits non-zero and leaves the slot unmarked, so GRUB
//! falls back on the next boot. `update-engine.service` is ordered after (and requires) the
//! unit that runs this, so update_engine's unconditional "good root" never runs first.
//!
//! Config (`/etc/piccolo/health.toml`, every key optional):
//! `broker_socket`, `require_broker` (default true), `sockets` (paths that must accept a
//! connection), `control_store` (file that must exist; a SQLite file is checked for its
//! header), `timeout_seconds` (default 60), `mark` (default true).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::error::Error;

/// Default config file.
pub const DEFAULT_CONFIG: &str = "/etc/piccolo/health.toml";

/// Which checks are required.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// The broker's socket.
    pub broker_socket: PathBuf,
    /// Require the broker's GetInfo to answer.
    pub require_broker: bool,
    /// Unix sockets that must accept a connection (the workers).
    pub sockets: Vec<PathBuf>,
    /// The control store: must exist and be readable (SQLite header checked when it is a file).
    pub control_store: Option<PathBuf>,
    /// How long each check may take to pass (services start in parallel with this).
    pub timeout_seconds: u64,
    /// Call MarkBootSuccessful when everything passed.
    pub mark: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            broker_socket: PathBuf::from(piccolo_proto::paths::BROKER_SOCKET),
            require_broker: true,
            sockets: Vec::new(),
            control_store: None,
            timeout_seconds: 60,
            mark: true,
        }
    }
}

impl HealthConfig {
    /// Reads `path`; a missing default file means the defaults.
    pub fn load(path: &Path, must_exist: bool) -> Result<HealthConfig, Error> {
        match std::fs::read_to_string(path) {
            Ok(t) => toml::from_str(&t).map_err(|e| Error::Config { path: path.to_path_buf(), reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => Ok(HealthConfig::default()),
            Err(e) => Err(Error::Config { path: path.to_path_buf(), reason: e.to_string() }),
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// What was checked.
    pub name: String,
    /// None: passed; Some: why not.
    pub failure: Option<String>,
    /// Detail on success.
    pub detail: String,
}

async fn broker_info(socket: &Path) -> Result<String, String> {
    use piccolo_proto::v1::GetInfoRequest;
    use piccolo_proto::v1::broker_client::BrokerClient;
    let ch = piccolo_proto::client::connect_unix(socket).await.map_err(|e| e.to_string())?;
    let i = BrokerClient::new(ch)
        .get_info(GetInfoRequest {})
        .await
        .map_err(|s| format!("GetInfo: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(format!("version {}, up {} s", i.version, i.uptime_seconds))
}

fn control_store(path: &Path) -> Result<String, String> {
    let md = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if md.is_dir() {
        std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        return Ok("directory readable".into());
    }
    let mut head = [0u8; 16];
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use std::io::Read;
    let n = (&f).take(16).read(&mut head).map_err(|e| format!("{}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "db" || e == "sqlite") && (n < 16 || &head != b"SQLite format 3\0") {
        return Err(format!("{} is not a SQLite database", path.display()));
    }
    Ok(format!("{} bytes", md.len()))
}

/// Retries `f` every 250 ms until it passes or `deadline`.
async fn until<F, Fut>(deadline: Instant, mut f: F) -> Result<String, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    loop {
        match f().await {
            Ok(d) => return Ok(d),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Runs every configured check (in parallel in time: one shared deadline).
pub async fn run_checks(cfg: &HealthConfig) -> Vec<CheckResult> {
    let deadline = Instant::now() + Duration::from_secs(cfg.timeout_seconds);
    let mut out = Vec::new();
    let mut push = |name: String, r: Result<String, String>| {
        let (failure, detail) = match r {
            Ok(d) => (None, d),
            Err(e) => (Some(e), String::new()),
        };
        out.push(CheckResult { name, failure, detail });
    };
    if cfg.require_broker {
        let r = until(deadline, || broker_info(&cfg.broker_socket)).await;
        push(format!("broker {}", cfg.broker_socket.display()), r);
    }
    for s in &cfg.sockets {
        let r = until(deadline, || async {
            tokio::net::UnixStream::connect(s)
                .await
                .map(|_| "accepts connections".to_string())
                .map_err(|e| e.to_string())
        })
        .await;
        push(format!("socket {}", s.display()), r);
    }
    if let Some(p) = &cfg.control_store {
        let r = until(deadline, || async { control_store(p) }).await;
        push(format!("control store {}", p.display()), r);
    }
    out
}

/// Marks the booted slot good through the broker; returns the slot's label.
pub async fn mark_good(socket: &Path) -> Result<String, Error> {
    let st = crate::boot::BrokerBoot::new(socket.to_path_buf()).mark_good().await?;
    Ok(crate::boot::slot_label(st.booted).to_owned())
}
