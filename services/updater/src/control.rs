// SPDX-License-Identifier: Apache-2.0
//! The control socket: `piccolo.updater.v1.Updater` over gRPC on a Unix socket, each call
//! authorised by the caller's SO_PEERCRED uid against [`TABLE`] (the broker's model: the
//! kernel's credentials, a default-deny table with a reason per entry; names resolved once at
//! start). Socket directory 0755 and socket 0660 in the configured group, set before serving.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use piccolo_proto::updater::v1::updater_server::{Updater, UpdaterServer};
use piccolo_proto::updater::v1::{
    ApplyNowRequest, ApplyNowResponse, CancelRequest, CancelResponse, CheckNowRequest, CheckNowResponse,
    RollbackRequest, RollbackResponse, SetWindowRequest, SetWindowResponse, StatusRequest, StatusResponse,
    WatchStatusRequest,
};
use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, JobOptions};
use crate::error::Error;
use crate::window::Window;

/// How long a command right after start waits for recovery before answering "busy".
const RECOVERY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// One RPC of the control socket: who may call it and why.
pub struct Entry {
    /// Method name.
    pub rpc: &'static str,
    /// Users allowed (names, resolved at start).
    pub users: &'static [&'static str],
    /// Why.
    pub reason: &'static str,
}

/// Default deny: a caller whose uid is not listed for the RPC gets PERMISSION_DENIED.
pub const TABLE: &[Entry] = &[
    Entry {
        rpc: "Status",
        users: &["root", "piccolo-api"],
        reason: "operators (piccoloctl update status) and the web API show update progress",
    },
    Entry { rpc: "WatchStatus", users: &["root", "piccolo-api"], reason: "as Status, streamed (--follow, web UI)" },
    Entry { rpc: "CheckNow", users: &["root", "piccolo-api"], reason: "an operator asks for an update check now" },
    Entry {
        rpc: "ApplyNow",
        users: &["root", "piccolo-api"],
        reason: "an operator installs and reboots now, outside the window",
    },
    Entry { rpc: "Cancel", users: &["root", "piccolo-api"], reason: "an operator stops a download or un-stages" },
    Entry { rpc: "Rollback", users: &["root", "piccolo-api"], reason: "an operator goes back to the other slot" },
    Entry { rpc: "SetWindow", users: &["root", "piccolo-api"], reason: "an operator sets the maintenance window" },
];

/// The table with names resolved to uids.
pub struct Authz {
    grants: Vec<(&'static str, BTreeSet<u32>)>,
}

impl Authz {
    /// Resolves [`TABLE`] through NSS; unknown users are left out (and logged).
    pub fn system() -> Authz {
        Authz::resolve(|name| nix::unistd::User::from_name(name).ok().flatten().map(|u| u.uid.as_raw()))
    }

    /// Resolves [`TABLE`] with `uid_of`.
    pub fn resolve(uid_of: impl Fn(&str) -> Option<u32>) -> Authz {
        let grants = TABLE
            .iter()
            .map(|e| {
                let uids = e
                    .users
                    .iter()
                    .filter_map(|u| {
                        let id = uid_of(u);
                        if id.is_none() {
                            tracing::warn!(user = u, rpc = e.rpc, "control table names an unknown user");
                        }
                        id
                    })
                    .collect();
                (e.rpc, uids)
            })
            .collect();
        Authz { grants }
    }

    /// Whether `uid` may call `rpc`.
    pub fn allows(&self, uid: u32, rpc: &str) -> bool {
        self.grants.iter().any(|(r, uids)| *r == rpc && uids.contains(&uid))
    }

    fn check<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<(), Status> {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|c| c.peer_cred)
            .map(|c| c.uid())
            .ok_or_else(|| Status::permission_denied(format!("{rpc}: no peer credentials")))?;
        if self.allows(uid, rpc) {
            tracing::info!(rpc, uid, "allowed");
            Ok(())
        } else {
            tracing::info!(rpc, uid, "denied");
            Err(Status::permission_denied(format!("{rpc}: permission denied")))
        }
    }
}

/// The service.
pub struct Control {
    engine: Arc<Engine>,
    authz: Arc<Authz>,
}

impl Control {
    /// A service over `engine`.
    pub fn new(engine: Arc<Engine>, authz: Authz) -> Control {
        Control { engine, authz: Arc::new(authz) }
    }

    /// The tonic server value.
    pub fn server(self) -> UpdaterServer<Control> {
        UpdaterServer::new(self)
    }

    async fn job(&self, opts: JobOptions) -> Result<StatusResponse, Status> {
        self.engine.wait_recovered(RECOVERY_WAIT).await;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.engine.start_job(opts, Some(tx))?;
        match rx.await {
            Ok(r) => r.map_err(Status::from),
            Err(_) => Ok(self.engine.status()),
        }
    }
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<StatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Updater for Control {
    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        self.authz.check(&req, "Status")?;
        Ok(Response::new(self.engine.status()))
    }

    type WatchStatusStream = WatchStream;

    async fn watch_status(&self, req: Request<WatchStatusRequest>) -> Result<Response<WatchStream>, Status> {
        self.authz.check(&req, "WatchStatus")?;
        let _ = self.engine.status();
        let rx = self.engine.board.subscribe();
        let s = tokio_stream::wrappers::WatchStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(s)))
    }

    async fn check_now(&self, req: Request<CheckNowRequest>) -> Result<Response<CheckNowResponse>, Status> {
        self.authz.check(&req, "CheckNow")?;
        let force = req.into_inner().force;
        let status = self.job(JobOptions { force, apply_now: false }).await?;
        Ok(Response::new(CheckNowResponse { status: Some(status) }))
    }

    async fn apply_now(&self, req: Request<ApplyNowRequest>) -> Result<Response<ApplyNowResponse>, Status> {
        self.authz.check(&req, "ApplyNow")?;
        self.engine.wait_recovered(RECOVERY_WAIT).await;
        self.engine.apply_now(req.into_inner().force)?;
        Ok(Response::new(ApplyNowResponse { status: Some(self.engine.status()) }))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        self.authz.check(&req, "Cancel")?;
        self.engine.cancel().await?;
        Ok(Response::new(CancelResponse { status: Some(self.engine.status()) }))
    }

    async fn rollback(&self, req: Request<RollbackRequest>) -> Result<Response<RollbackResponse>, Status> {
        self.authz.check(&req, "Rollback")?;
        self.engine.rollback().await?;
        Ok(Response::new(RollbackResponse { status: Some(self.engine.status()) }))
    }

    async fn set_window(&self, req: Request<SetWindowRequest>) -> Result<Response<SetWindowResponse>, Status> {
        self.authz.check(&req, "SetWindow")?;
        let w = req.into_inner().window.ok_or_else(|| Status::invalid_argument("window is required"))?;
        let w = Window::parse(&w.start, &w.end).map_err(|e| Status::from(Error::InvalidArgument(e)))?;
        self.engine.set_window(w)?;
        Ok(Response::new(SetWindowResponse { status: Some(self.engine.status()) }))
    }
}

use tokio_stream::StreamExt as _;

/// Binds the control socket (directory 0755, socket 0660 owned by `gid`), replacing a stale one.
pub async fn bind(path: &Path, gid: Option<u32>) -> Result<UnixListener, Error> {
    let err = |source| Error::Socket { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(err)?;
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another updater is listening")));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let l = UnixListener::bind(path).map_err(err)?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g)).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_default_deny() {
        let a = Authz::resolve(|n| match n {
            "root" => Some(0),
            "piccolo-api" => Some(901),
            _ => None,
        });
        for e in TABLE {
            assert!(a.allows(0, e.rpc) && a.allows(901, e.rpc), "{}", e.rpc);
            assert!(!a.allows(902, e.rpc), "{}", e.rpc);
            assert!(!e.reason.is_empty());
        }
        assert!(!a.allows(0, "RunCommand"));
    }
}
