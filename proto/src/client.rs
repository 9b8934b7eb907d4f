// SPDX-License-Identifier: Apache-2.0
//! Connect to a gRPC server on a Unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why a connection could not be made; keeps the path so messages can name it.
#[derive(Debug)]
pub struct ConnectError {
    /// The socket path that was tried.
    pub path: PathBuf,
    /// The underlying error (e.g. `NotFound`, `PermissionDenied`).
    pub source: std::io::Error,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.source.kind() {
            std::io::ErrorKind::NotFound => {
                write!(f, "broker socket {} does not exist (is piccolo-broker running?)", self.path.display())
            }
            std::io::ErrorKind::PermissionDenied => write!(
                f,
                "permission denied on socket {} (the caller must be in the socket's group)",
                self.path.display()
            ),
            std::io::ErrorKind::ConnectionRefused => {
                write!(f, "nothing is listening on {} (stale socket?)", self.path.display())
            }
            _ => write!(f, "cannot connect to {}: {}", self.path.display(), self.source),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Opens a channel to the gRPC server listening on `path`.
///
/// Connects eagerly once so that a missing socket or a permission problem is
/// reported here, with the path, rather than on the first call.
pub async fn connect_unix(path: &Path) -> Result<Channel, ConnectError> {
    let err = |source| ConnectError { path: path.to_path_buf(), source };
    // Probe first: tonic folds connect errors into an opaque transport error.
    drop(tokio::net::UnixStream::connect(path).await.map_err(err)?);
    let owned = path.to_path_buf();
    // The URI is required by the API but unused: the connector ignores it.
    Endpoint::from_static("http://broker.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let p = owned.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|e| err(std::io::Error::other(e)))
}

/// The socket path clients should use: `$PICCOLO_BROKER_SOCKET` or the default.
pub fn default_socket() -> PathBuf {
    std::env::var_os(crate::paths::SOCKET_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(crate::paths::BROKER_SOCKET))
}
