// SPDX-License-Identifier: Apache-2.0
//! Listening sockets: from systemd socket activation (`LISTEN_FDS`, in production: ports 80
//! and 443 are bound by systemd, never by this unprivileged worker) or bound here (development).

use std::net::SocketAddr;

/// Why no listener could be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// `LISTEN_FDS` named a descriptor that is not a TCP listener.
    #[error("socket-activated descriptor {0} is not a TCP listening socket")]
    NotTcp(usize, #[source] std::io::Error),
    /// Binding a development address failed.
    #[error("cannot bind {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// Making a socket non-blocking failed.
    #[error("cannot configure listening socket")]
    Configure(#[source] std::io::Error),
}

/// The sockets systemd passed, if any; otherwise `addrs` bound here.
pub async fn listeners(addrs: &[SocketAddr]) -> Result<Vec<tokio::net::TcpListener>, ListenError> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    if fds.len() > 0 {
        for i in 0..fds.len() {
            let l = fds.take_tcp_listener(i).map_err(|e| ListenError::NotTcp(i, e))?;
            let Some(l) = l else { continue };
            l.set_nonblocking(true).map_err(ListenError::Configure)?;
            out.push(tokio::net::TcpListener::from_std(l).map_err(ListenError::Configure)?);
        }
        return Ok(out);
    }
    for a in addrs {
        out.push(tokio::net::TcpListener::bind(a).await.map_err(|e| ListenError::Bind(*a, e))?);
    }
    Ok(out)
}

/// sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET`; no-op outside systemd.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        } else {
            sock.send_to(state.as_bytes(), &path)?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
