// SPDX-License-Identifier: Apache-2.0
//! Is a TPM reachable behind a TCTI string? Answered in bounded time and without the TSS
//! libraries, so the broker can report it (`GetInfo`) without linking the TPM stack, and the
//! TPM helper can fail fast before it opens a TSS context.
//!
//! Owns: parsing the TCTI strings piccolo accepts (`device:PATH`, `swtpm:`/`mssim:` with
//! `host=`/`port=`) far enough to probe them. Must never: send a TPM command, or wait on an
//! absent TPM for longer than [`CONNECT_TIMEOUT`] per address.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

/// How long a TCP TCTI (swtpm, mssim) may take to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why nothing answers behind a TCTI; the message names the device, address or option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unreachable(pub String);

/// Checks that something answers behind `tcti` without waiting long: the device node
/// exists, or the TCP port accepts within [`CONNECT_TIMEOUT`]. Other TCTIs (tabrmd, ...)
/// have no cheap probe and pass; opening a TSS context reports their failure.
pub fn probe(tcti: &str) -> Result<(), Unreachable> {
    let (driver, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    match driver {
        "device" => {
            let path = if conf.is_empty() { "/dev/tpm0" } else { conf };
            if Path::new(path).exists() { Ok(()) } else { Err(Unreachable(format!("{path} not present"))) }
        }
        "swtpm" | "mssim" => {
            let (host, port) = tcp_address(tcti, conf)?;
            let addrs = (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| Unreachable(format!("cannot resolve {host}: {e}")))?;
            for a in addrs {
                if TcpStream::connect_timeout(&a, CONNECT_TIMEOUT).is_ok() {
                    return Ok(());
                }
            }
            Err(Unreachable(format!("nothing listening on {host}:{port}")))
        }
        _ => Ok(()),
    }
}

/// Host and port of a `swtpm:`/`mssim:` configuration (defaults: localhost, 2321).
fn tcp_address(tcti: &str, conf: &str) -> Result<(String, u16), Unreachable> {
    let (mut host, mut port) = ("localhost".to_owned(), 2321u16);
    for kv in conf.split(',').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("host", h)) => h.clone_into(&mut host),
            Some(("port", p)) => port = p.parse().map_err(|_| Unreachable(format!("bad port in TCTI {tcti:?}")))?,
            _ => return Err(Unreachable(format!("unknown TCTI option {kv:?}"))),
        }
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_nodes_are_checked_by_path() {
        let dir = std::env::temp_dir();
        assert_eq!(probe(&format!("device:{}", dir.display())), Ok(()));
        let e = probe("device:/nonexistent/tpmrm9").unwrap_err();
        assert_eq!(e.0, "/nonexistent/tpmrm9 not present");
    }

    #[test]
    fn tcp_tctis_need_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(probe(&format!("swtpm:host=127.0.0.1,port={port}")), Ok(()));
        drop(l);
        let e = probe(&format!("mssim:host=127.0.0.1,port={port}")).unwrap_err();
        assert_eq!(e.0, format!("nothing listening on 127.0.0.1:{port}"));
    }

    #[test]
    fn bad_options_are_named() {
        assert_eq!(probe("swtpm:port=x").unwrap_err().0, "bad port in TCTI \"swtpm:port=x\"");
        assert_eq!(probe("swtpm:colour=blue").unwrap_err().0, "unknown TCTI option \"colour=blue\"");
        assert_eq!(tcp_address("swtpm:", "").unwrap(), ("localhost".to_owned(), 2321));
    }
}
