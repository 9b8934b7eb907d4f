// SPDX-License-Identifier: Apache-2.0
//! Listening sockets: from systemd socket activation (`LISTEN_FDS`, in production: ports 80
//! and 443 are bound by systemd, never by this unprivileged worker) or bound here (development).
//! A socket-activated descriptor's name (`LISTEN_FDNAMES`, the unit's `FileDescriptorName=`)
//! says whether it speaks plain HTTP (`http`, or no name) or TLS (`https`).

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why no listener (or no TLS set-up) could be had.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// `LISTEN_FDS` named a descriptor that is not a TCP listener.
    #[error("socket-activated descriptor {0} is not a TCP listening socket")]
    NotTcp(usize, #[source] std::io::Error),
    /// `LISTEN_FDNAMES` gave a descriptor a name we do not serve.
    #[error(
        "socket-activated descriptor {index} is named {name:?}; expected \"http\" or \"https\" (FileDescriptorName= in the socket unit)"
    )]
    UnknownName {
        /// Position in `LISTEN_FDS`.
        index: usize,
        /// The name systemd passed.
        name: String,
    },
    /// Binding a development address failed.
    #[error("cannot bind {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    /// Making a socket non-blocking failed.
    #[error("cannot configure listening socket")]
    Configure(#[source] std::io::Error),
    /// A configured certificate or key file could not be read.
    #[error("cannot read TLS {what} {}", path.display())]
    TlsRead {
        /// "certificate" or "key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file can be read by any user: the key must be treated as leaked.
    #[error(
        "TLS key {} is accessible to every user (mode {mode:04o}); refusing to use it: make it 0600 (or 0640 for a group) and replace the key if others may have read it",
        path.display()
    )]
    TlsKeyWorldReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A certificate or key file holds no usable PEM section.
    #[error("TLS {what} {} holds no PEM {what} ({detail})", path.display())]
    TlsPem {
        /// "certificate" or "key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's words (never key material).
        detail: String,
    },
    /// rustls refused the certificate/key pair (e.g. the key does not match the certificate).
    #[error("TLS configuration refused")]
    Tls(#[from] rustls::Error),
    /// The self-signed certificate could not be made.
    #[error("cannot generate the self-signed TLS certificate")]
    SelfSigned(#[from] rcgen::Error),
    /// `/proc/self/mountinfo` could not be read (start-up check of `mounts::check`).
    #[error("cannot read /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    /// Mounts the broker makes under the state dir would never reach this process.
    #[error(
        "{} is on a private mount ({}) in this process's mount namespace: the broker's volume mounts would not appear here and the control store would be written, unencrypted, to the bare directory; refusing to start (the unit's MountFlags= must be slave or shared, not private)",
        dir.display(), mountpoint.display()
    )]
    MountsNotPropagated {
        /// `<state dir>/mounts`.
        dir: PathBuf,
        /// The mount holding it.
        mountpoint: PathBuf,
    },
}

/// What a listening socket speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (port 80).
    Http,
    /// HTTP over TLS, terminated in this process (port 443).
    Https,
}

/// One listening socket and what it speaks.
#[derive(Debug)]
pub struct Listener {
    /// Plain or TLS.
    pub scheme: Scheme,
    /// The socket.
    pub socket: tokio::net::TcpListener,
}

impl Listener {
    /// The bound address, if the kernel tells.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket.local_addr().ok()
    }
}

/// The scheme a socket-activated descriptor's name stands for. systemd names a socket without
/// `FileDescriptorName=` "unknown" (older units, `systemd-socket-activate` without `--fdname`):
/// that stays plain HTTP, as before names were read.
fn scheme_of(index: usize, name: &str) -> Result<Scheme, ListenError> {
    match name {
        "http" | "unknown" | "" => Ok(Scheme::Http),
        "https" => Ok(Scheme::Https),
        other => Err(ListenError::UnknownName { index, name: other.to_string() }),
    }
}

/// The sockets systemd passed, if any (flags are then ignored); otherwise `http` and `https`
/// bound here.
pub async fn listeners(http: &[SocketAddr], https: &[SocketAddr]) -> Result<Vec<Listener>, ListenError> {
    // Read before ListenFd::from_env, which clears LISTEN_FDS/LISTEN_PID (not the names).
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let names: Vec<&str> = names.split(':').collect();
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    if fds.len() > 0 {
        for i in 0..fds.len() {
            let scheme = scheme_of(i, names.get(i).copied().unwrap_or(""))?;
            let l = fds.take_tcp_listener(i).map_err(|e| ListenError::NotTcp(i, e))?;
            let Some(l) = l else { continue };
            l.set_nonblocking(true).map_err(ListenError::Configure)?;
            let socket = tokio::net::TcpListener::from_std(l).map_err(ListenError::Configure)?;
            out.push(Listener { scheme, socket });
        }
        return Ok(out);
    }
    let wanted = http.iter().map(|a| (Scheme::Http, a)).chain(https.iter().map(|a| (Scheme::Https, a)));
    for (scheme, a) in wanted {
        let socket = tokio::net::TcpListener::bind(a).await.map_err(|e| ListenError::Bind(*a, e))?;
        out.push(Listener { scheme, socket });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_schemes_and_unknown_names_are_refused() {
        assert_eq!(scheme_of(0, "http").unwrap(), Scheme::Http);
        assert_eq!(scheme_of(0, "unknown").unwrap(), Scheme::Http);
        assert_eq!(scheme_of(0, "").unwrap(), Scheme::Http);
        assert_eq!(scheme_of(1, "https").unwrap(), Scheme::Https);
        let e = scheme_of(2, "HTTPS").unwrap_err().to_string();
        assert!(e.contains("descriptor 2") && e.contains("\"HTTPS\""), "{e}");
    }
}
