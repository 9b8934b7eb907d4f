// SPDX-License-Identifier: Apache-2.0
//! The socket, the connection cap, signals, readiness and draining.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

use crate::guard::Shared;
use crate::identity::PeerInfo;
use crate::notify;

/// How long SIGTERM waits for in-flight calls before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Creating or securing the socket directory failed.
    #[error("cannot prepare socket directory {path}")]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another broker answers on the socket.
    #[error("another broker is already listening on {0}")]
    InUse(PathBuf),
    /// bind(2) failed.
    #[error("cannot bind {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// chmod/chown of the socket failed.
    #[error("cannot set owner and mode of {path}")]
    Permissions {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket: directory 0750 and socket 0660, both group `gid`, set before the
/// listener is handed to the server (and so before readiness is signalled).
pub async fn bind_socket(path: &Path, gid: Option<u32>) -> Result<UnixListener, SocketError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let dir_err = |source| SocketError::Dir { path: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(dir_err)?;
    chown_chmod(dir, gid, 0o750).map_err(dir_err)?;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|source| SocketError::Bind { path: path.to_path_buf(), source })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind { path: path.to_path_buf(), source })?;
    chown_chmod(path, gid, 0o660).map_err(|source| SocketError::Permissions { path: path.to_path_buf(), source })?;
    Ok(listener)
}

fn chown_chmod(path: &Path, gid: Option<u32>, mode: u32) -> std::io::Result<()> {
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A client connection holding one slot of the connection cap, and its peer as read at accept.
struct Conn {
    io: UnixStream,
    peer: PeerInfo,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves until SIGTERM/SIGINT, reloading the policy on SIGHUP. Returns after draining.
pub async fn serve(ctx: Shared, listener: UnixListener) -> Result<(), tonic::transport::Error> {
    let slots = Arc::new(Semaphore::new(ctx.config.max_connections));
    // Over the cap, a connection is closed at once instead of waiting in the backlog.
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(move |r| {
        let slots = slots.clone();
        async move {
            match r {
                Ok(io) => match slots.try_acquire_owned() {
                    Ok(slot) => {
                        let peer = PeerInfo::new(io.connect_info());
                        Some(Ok::<_, std::io::Error>(Conn { io, peer, _slot: slot }))
                    }
                    Err(_) => {
                        tracing::warn!("connection cap reached; closing a new connection");
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    None
                }
            }
        }
    });

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(signals(ctx.clone(), stop_tx));

    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(64))
        .concurrency_limit_per_connection(64)
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_routes(crate::handlers::routes(&ctx))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });

    let status =
        format!("READY=1\nSTATUS=serving on {} (policy {})", ctx.config.socket.display(), &ctx.policy().sha256()[..12]);
    notify::notify(&status);
    // Pings start only after READY=1, so the first message systemd sees is the readiness.
    if let Some(every) = notify::watchdog_interval() {
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                notify::notify("WATCHDOG=1");
            }
        });
    }
    tracing::info!(socket = %ctx.config.socket.display(), "serving");

    let mut server = std::pin::pin!(server);
    tokio::select! {
        r = &mut server => r,
        () = drain_deadline(&ctx) => {
            tracing::warn!("in-flight calls did not finish within {DRAIN_TIMEOUT:?}; exiting");
            Ok(())
        }
    }
}

/// Resolves DRAIN_TIMEOUT after shutdown began; pending forever before that.
async fn drain_deadline(ctx: &Shared) {
    ctx.stopping.notified().await;
    tokio::time::sleep(DRAIN_TIMEOUT).await;
}

async fn signals(ctx: Shared, stop: tokio::sync::oneshot::Sender<()>) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => crate::reload::reload_policy(&ctx).await,
        }
    }
    notify::notify("STOPPING=1\nSTATUS=draining in-flight calls");
    tracing::info!("shutting down: draining in-flight calls");
    ctx.stopping.notify_waiters();
    let _ = stop.send(());
}
