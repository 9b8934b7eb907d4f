// SPDX-License-Identifier: Apache-2.0
//! TLS termination for the `https` listeners (rustls, ring provider): the certificate from
//! `--tls-cert`/`--tls-key` (the ACME worker's files, later) or, without them, a self-signed
//! one made at start and held in memory only. Also what differs between the schemes: cookies
//! answered over TLS are marked `Secure`, and plain HTTP sends browsers to https.

use std::convert::Infallible;
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::listen::ListenError;

/// A client that has not finished its handshake by then is dropped (it holds a task and a
/// socket until then).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this (slow clients hold a connection, not more).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the served certificate came from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// `--tls-cert`/`--tls-key`.
    Files {
        /// The certificate chain file.
        cert: PathBuf,
    },
    /// Made at start, in memory only: a new key and certificate at every restart.
    SelfSigned,
}

/// What the `https` listeners serve with.
#[derive(Clone)]
pub struct Tls {
    /// The handshake side of rustls.
    pub acceptor: TlsAcceptor,
    /// Where the certificate came from.
    pub source: CertSource,
    /// SHA-256 of the leaf certificate's DER, `AB:CD:...` as browsers show it.
    pub fingerprint: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("source", &self.source).field("fingerprint", &self.fingerprint).finish()
    }
}

/// The rustls provider: ring only (no aws-lc-rs, no C toolchain in the image build).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Tls {
    /// From `cert` and `key` files if given (both or neither), else a fresh self-signed
    /// certificate for `names` (DNS names or IP addresses).
    pub fn load(files: Option<(&Path, &Path)>, names: &[String]) -> Result<Tls, ListenError> {
        let (chain, key, source) = match files {
            Some((cert, key)) => {
                let chain = read_chain(cert)?;
                let key = read_key(key)?;
                (chain, key, CertSource::Files { cert: cert.to_path_buf() })
            }
            None => {
                let (cert, key) = self_signed(names)?;
                (vec![cert], key, CertSource::SelfSigned)
            }
        };
        let fingerprint = fingerprint(&chain[0]);
        // with_single_cert also checks that the key belongs to the leaf certificate.
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        // HTTP/1.1 only, like the plain listener (axum's http2 feature is off).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls { acceptor: TlsAcceptor::from(Arc::new(config)), source, fingerprint })
    }
}

/// SHA-256 of a certificate, as colon-separated upper-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, ListenError> {
    let bytes = std::fs::read(path).map_err(|source| ListenError::TlsRead {
        what: "certificate",
        path: path.into(),
        source,
    })?;
    let pem_err = |detail: String| ListenError::TlsPem { what: "certificate", path: path.to_path_buf(), detail };
    let chain =
        CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(|e| pem_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err("no CERTIFICATE section".into()));
    }
    Ok(chain)
}

/// Reads the key, refusing a file any user may access (checked on the opened file, so the
/// mode and the contents are of the same file).
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ListenError> {
    let read_err = |source| ListenError::TlsRead { what: "key", path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(read_err)?;
    let mode = file.metadata().map_err(read_err)?.permissions().mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(ListenError::TlsKeyWorldReadable { path: path.to_path_buf(), mode });
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    file.read_to_end(&mut bytes).map_err(read_err)?;
    // The parser's error names the PEM structure only, never key bytes.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| ListenError::TlsPem {
        what: "key",
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// A self-signed ECDSA P-256 certificate for `names`. rcgen's default validity (1975 to
/// 4096) is kept on purpose: an appliance without a real-time clock may start in 1970, and a
/// browser warns about this certificate anyway; the fingerprint is what a user checks.
fn self_signed(names: &[String]) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), ListenError> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "piccolo (self-signed, new at every restart)");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key)?;
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    Ok((cert.der().clone(), key))
}

/// Names for the self-signed certificate: this host's name (and `NAME.local`, mDNS),
/// `localhost`, and every specific address an https socket is bound to.
pub fn self_signed_names(bound: &[SocketAddr]) -> Vec<String> {
    let mut names = Vec::new();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    // Only plain DNS labels: anything else would make the certificate invalid.
    if !host.is_empty() && host.len() <= 63 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        names.push(host.to_string());
        names.push(format!("{host}.local"));
    }
    names.push("localhost".to_string());
    for a in bound {
        let ip: IpAddr = a.ip();
        if !ip.is_unspecified() && !names.contains(&ip.to_string()) {
            names.push(ip.to_string());
        }
    }
    names
}

/// Serves `app` over TLS on `listener` until `stop`; then waits for open connections to
/// finish (the caller bounds that wait).
pub async fn serve(listener: tokio::net::TcpListener, tls: Tls, app: axum::Router, stop: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning (as axum::serve does).
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tls.acceptor.clone();
        let app = app.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(client = %peer, "TLS handshake timed out");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                // The same peer address extractor the plain listener provides (attempt limits).
                req.extensions_mut().insert(ConnectInfo(peer));
                let app = app.clone();
                async move {
                    let mut resp = app.oneshot(req).await?;
                    mark_cookies_secure(resp.headers_mut());
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(client = %peer, error = %e, "TLS connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}

/// Adds `Secure` to every `Set-Cookie` that lacks it: a cookie set over TLS must never be
/// sent back over plain HTTP. Handlers need not know which listener they answer on.
pub fn mark_cookies_secure(headers: &mut HeaderMap) {
    if !headers.contains_key(header::SET_COOKIE) {
        return;
    }
    let cookies: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| {
            let secure = v
                .to_str()
                .map(|s| s.split(';').skip(1).any(|attr| attr.trim().eq_ignore_ascii_case("secure")))
                .unwrap_or(false);
            if secure {
                return v.clone();
            }
            let mut bytes = v.as_bytes().to_vec();
            bytes.extend_from_slice(b"; Secure");
            HeaderValue::from_bytes(&bytes).unwrap_or_else(|_| v.clone())
        })
        .collect();
    headers.remove(header::SET_COOKIE);
    for c in cookies {
        headers.append(header::SET_COOKIE, c);
    }
}

/// Paths plain HTTP always answers itself: local health checks must not depend on TLS.
const HEALTH_PREFIX: &str = "/api/v1/health/";

/// Middleware for the plain listeners while an https listener exists: a browser navigating
/// to any page but the health endpoints is sent to the same host and path over https (307,
/// not cached: the https port may go away again). API clients (no `text/html` in `Accept`,
/// no `Sec-Fetch-Mode: navigate`) are served as before.
pub async fn redirect_browsers(State(https_port): State<u16>, req: Request, next: Next) -> Response {
    let navigation = matches!(*req.method(), Method::GET | Method::HEAD) && is_navigation(req.headers());
    if !navigation || req.uri().path().starts_with(HEALTH_PREFIX) {
        return next.run(req).await;
    }
    match https_location(req.headers(), req.uri(), https_port) {
        Some(location) => (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response(),
        // No usable Host header: nothing to redirect to; serve it as asked.
        None => next.run(req).await,
    }
}

fn is_navigation(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, needle: &str| {
        headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(|s| s.to_ascii_lowercase().contains(needle)))
    };
    has(header::HeaderName::from_static("sec-fetch-mode"), "navigate") || has(header::ACCEPT, "text/html")
}

/// `https://HOST[:PORT]/path?query` from the request's Host header (its port dropped).
fn https_location(headers: &HeaderMap, uri: &axum::http::Uri, https_port: u16) -> Option<HeaderValue> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    // Authority parsing refuses anything that is not a host[:port] (no injection into Location).
    let authority: axum::http::uri::Authority = host.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let host = authority.host();
    let port = if https_port == 443 { String::new() } else { format!(":{https_port}") };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    HeaderValue::from_str(&format!("https://{host}{port}{path}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_is_added_once_to_each_cookie() {
        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("a=1; Path=/; HttpOnly"));
        h.append(header::SET_COOKIE, HeaderValue::from_static("b=2; Path=/; secure"));
        mark_cookies_secure(&mut h);
        let got: Vec<_> = h.get_all(header::SET_COOKIE).iter().map(|v| v.to_str().unwrap().to_string()).collect();
        assert_eq!(got, ["a=1; Path=/; HttpOnly; Secure", "b=2; Path=/; secure"]);
        // A cookie *named* like the attribute is not the attribute.
        let mut h = HeaderMap::new();
        h.append(header::SET_COOKIE, HeaderValue::from_static("Secure=x"));
        mark_cookies_secure(&mut h);
        assert_eq!(h[header::SET_COOKIE], "Secure=x; Secure");
    }

    #[test]
    fn location_keeps_host_and_path_and_drops_the_http_port() {
        let uri: axum::http::Uri = "/x/y?z=1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("box.local:80"));
        assert_eq!(https_location(&h, &uri, 443).unwrap(), "https://box.local/x/y?z=1");
        h.insert(header::HOST, HeaderValue::from_static("[fe80::1]:8080"));
        assert_eq!(https_location(&h, &uri, 8443).unwrap(), "https://[fe80::1]:8443/x/y?z=1");
        h.insert(header::HOST, HeaderValue::from_static("evil.example/path"));
        assert!(https_location(&h, &uri, 443).is_none());
        h.insert(header::HOST, HeaderValue::from_static("user@evil.example"));
        assert!(https_location(&h, &uri, 443).is_none());
    }

    #[test]
    fn self_signed_certificate_is_usable_by_rustls_and_differs_per_call() {
        let names = self_signed_names(&["127.0.0.1:443".parse().unwrap()]);
        assert!(names.contains(&"localhost".to_string()) && names.contains(&"127.0.0.1".to_string()), "{names:?}");
        let a = Tls::load(None, &names).unwrap();
        let b = Tls::load(None, &names).unwrap();
        assert_ne!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 32 * 3 - 1);
    }
}
