// SPDX-License-Identifier: Apache-2.0
//! HTTPS on the real `piccolo-api` binary with a real TLS client (hyper over tokio-rustls):
//! the self-signed certificate pinned by the fingerprint the worker prints, a configured
//! certificate verified against a CA made here with rcgen, `Secure` cookies on TLS only,
//! browsers redirected from plain HTTP (health stays there), key files refused at start, and
//! socket activation with two named descriptors through `systemd-socket-activate`.
//! Self-contained on purpose (no `common`): that module is being rewritten elsewhere.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::json;

mod common;

const PASSWORD: &str = "first password 1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A running worker (or `systemd-socket-activate` exec'ing into it); SIGKILLed on drop.
struct Proc {
    dir: tempfile::TempDir,
    child: Child,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("api.log")).unwrap_or_default()
    }
    /// The fingerprint the worker printed for its self-signed certificate.
    fn fingerprint(&self) -> String {
        printed_fingerprint(&|| self.log())
    }
    /// Waits for the process to exit; its status.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "still running: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The fingerprint a worker printed for its self-signed certificate (waits for it).
fn printed_fingerprint(log: &dyn Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = log();
        if let Some(fp) = log.split("SHA-256 fingerprint ").nth(1) {
            return fp.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no fingerprint printed: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `a` accepts connections.
fn wait_port(a: SocketAddr, log: &dyn Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(a).is_err() {
        assert!(Instant::now() < deadline, "piccolo-api did not listen on {a}: {}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the worker (behind `wrapper` if given) with a fast KDF and `extra` flags.
fn spawn(wrapper: &[String], extra: &[String]) -> Proc {
    let dir = tempfile::Builder::new().prefix("piccolo-api-tls-").tempdir().unwrap();
    let bin = piccolo_testkit::bins::bin("piccolo-api");
    let log = std::fs::File::create(dir.path().join("api.log")).unwrap();
    let p = |s: &str| dir.path().join(s).display().to_string();
    let mut argv: Vec<String> = wrapper.to_vec();
    argv.push(bin.display().to_string());
    argv.extend(
        ["--state-dir", &p("state"), "--runtime-dir", &p("run"), "--broker-socket", &p("no-broker.sock")]
            .map(String::from),
    );
    argv.extend(["--kdf-memory-kib", "8192", "--kdf-passes", "1", "--boot-poll-secs", "0"].map(String::from));
    argv.extend(extra.iter().cloned());
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Proc { dir, child }
}

fn wait_connectable(p: &Proc, a: SocketAddr) {
    wait_port(a, &|| p.log());
}

/// Accepts exactly the certificate whose SHA-256 is `fingerprint` (signatures still checked).
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

fn sha256_colon_hex(der: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if sha256_colon_hex(end_entity) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pinned_client(fingerprint: &str) -> Arc<rustls::ClientConfig> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned { fingerprint: fingerprint.into(), provider: provider() }))
        .with_no_client_auth();
    Arc::new(cfg)
}

fn ca_client(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: hyper::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One HTTP/1.1 request on a fresh connection: over TLS with `tls` (SNI `host`), else plain.
async fn request(
    to: SocketAddr,
    tls: Option<(Arc<rustls::ClientConfig>, &str)>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<serde_json::Value>,
) -> Result<Resp, String> {
    let tcp = tokio::net::TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", to.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            serde_json::to_vec(&b).unwrap()
        }
        None => Vec::new(),
    };
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    macro_rules! send {
        ($io:expr) => {{
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new($io))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            sender.send_request(req).await.map_err(|e| e.to_string())?
        }};
    }
    let resp = match tls {
        Some((cfg, host)) => {
            let name = ServerName::try_from(host.to_string()).unwrap();
            let stream = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await.map_err(|e| e.to_string())?;
            send!(stream)
        }
        None => send!(tcp),
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    Ok(Resp { status, headers, body })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[test]
fn self_signed_https_pinned_login_sets_secure_cookie_and_plain_http_does_not() {
    // Setup needs the whole stack (broker, gocryptfs volumes, the worker as piccolo-api).
    let sp = free_port();
    let api = common::Api::start_opts(common::StackOptions {
        api_args: vec!["--listen-tls".into(), addr(sp).to_string()],
        ..Default::default()
    });
    let hp = api.addr.port();
    wait_port(addr(sp), &|| api.log());
    let fp = printed_fingerprint(&|| api.log());
    rt().block_on(async {
        let tls = || Some((pinned_client(&fp), "localhost"));
        let r = request(addr(sp), tls(), "GET", "/api/v1/health/live", &[], None).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r);
        // The pin holds: another fingerprint is refused in the handshake.
        let wrong = fp.replace(&fp[..2], if &fp[..2] == "00" { "01" } else { "00" });
        let e = request(addr(sp), Some((pinned_client(&wrong), "localhost")), "GET", "/api/v1/health/live", &[], None)
            .await
            .unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        // The TLS port speaks only TLS.
        assert!(request(addr(sp), None, "GET", "/api/v1/health/live", &[], None).await.is_err());

        let r = request(
            addr(sp),
            tls(),
            "POST",
            "/api/v1/setup",
            &[],
            Some(json!({"setup_code": api.setup_code(), "password": PASSWORD})),
        )
        .await
        .unwrap();
        assert_eq!(r.status, 201, "{:?}", r);
        let login = json!({"password": PASSWORD});
        let r = request(addr(sp), tls(), "POST", "/api/v1/auth/login", &[], Some(login.clone())).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r);
        let cookie = r.header("set-cookie").unwrap().to_string();
        assert!(cookie.ends_with("; Secure") && cookie.contains("HttpOnly"), "{cookie}");
        let session = cookie.split(';').next().unwrap().to_string();
        let r = request(addr(sp), tls(), "GET", "/api/v1/auth/session", &[("cookie", &session)], None).await.unwrap();
        assert_eq!((r.status, r.json()["via"].clone()), (200, json!("cookie")));

        // Plain HTTP: an API client is served, its cookie is not Secure.
        let r = request(addr(hp), None, "POST", "/api/v1/auth/login", &[], Some(login)).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r);
        let cookie = r.header("set-cookie").unwrap();
        assert!(!cookie.contains("Secure"), "{cookie}");
        // A browser navigation is sent to https (same host, path, the TLS port) ...
        let browser = [("accept", "text/html,application/xhtml+xml,*/*;q=0.8")];
        let r = request(addr(hp), None, "GET", "/api/v1/crypto/status?x=1", &browser, None).await.unwrap();
        assert_eq!(r.status, 307, "{:?}", r);
        assert_eq!(r.header("location"), Some(format!("https://127.0.0.1:{sp}/api/v1/crypto/status?x=1").as_str()));
        // ... except the health endpoints, which stay on plain HTTP for local checks.
        for path in ["/api/v1/health/live", "/api/v1/health/ready"] {
            let r = request(addr(hp), None, "GET", path, &browser, None).await.unwrap();
            assert_eq!(r.status, 200, "{path}: {:?}", r);
        }
    });
    assert!(!api.log().contains(PASSWORD));
}

#[test]
fn configured_certificate_is_served_and_verified_against_its_ca() {
    // A CA and a leaf for piccolo.test made here; the worker gets the leaf chain and key.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "piccolo test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["piccolo.test".to_string()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();

    let files = tempfile::tempdir().unwrap();
    let cert_path = files.path().join("cert.pem");
    let key_path = files.path().join("key.pem");
    std::fs::write(&cert_path, pem("CERTIFICATE", leaf.der()) + &pem("CERTIFICATE", ca_cert.der())).unwrap();
    std::fs::write(&key_path, pem("PRIVATE KEY", &leaf_key.serialize_der())).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o640)).unwrap();

    let (hp, sp) = (free_port(), free_port());
    let api = spawn(
        &[],
        &[
            "--listen".into(),
            addr(hp).to_string(),
            "--listen-tls".into(),
            addr(sp).to_string(),
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
        ],
    );
    // Both sockets: the https one is bound just after the http one.
    wait_connectable(&api, addr(hp));
    wait_connectable(&api, addr(sp));
    rt().block_on(async {
        let ca = ca_cert.der().clone();
        let r = request(addr(sp), Some((ca_client(&ca), "piccolo.test")), "GET", "/api/v1/health/live", &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r);
        // Real verification: the wrong name fails, so does another CA.
        let e = request(addr(sp), Some((ca_client(&ca), "other.test")), "GET", "/api/v1/health/live", &[], None)
            .await
            .unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        let other = rcgen::generate_simple_self_signed(vec!["piccolo.test".to_string()]).unwrap();
        let e = request(
            addr(sp),
            Some((ca_client(other.cert.der()), "piccolo.test")),
            "GET",
            "/api/v1/health/live",
            &[],
            None,
        )
        .await
        .unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
    });
    assert!(!api.log().contains("self-signed"), "{}", api.log());
}

fn start_with_key(key_path: &Path, cert_path: &Path) -> Proc {
    let sp = free_port();
    spawn(
        &[],
        &[
            "--listen".into(),
            addr(free_port()).to_string(),
            "--listen-tls".into(),
            addr(sp).to_string(),
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
        ],
    )
}

#[test]
fn world_readable_or_missing_key_is_refused_at_start() {
    let c = rcgen::generate_simple_self_signed(vec!["piccolo.test".to_string()]).unwrap();
    let files = tempfile::tempdir().unwrap();
    let cert_path = files.path().join("cert.pem");
    let key_path = files.path().join("key.pem");
    std::fs::write(&cert_path, pem("CERTIFICATE", c.cert.der())).unwrap();
    std::fs::write(&key_path, pem("PRIVATE KEY", &c.signing_key.serialize_der())).unwrap();

    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut api = start_with_key(&key_path, &cert_path);
    assert!(!api.wait_exit().success());
    let log = api.log();
    assert!(log.contains("is accessible to every user (mode 0644)") && log.contains("key.pem"), "{log}");
    assert!(!log.contains("BEGIN"), "key material in the log: {log}");

    let missing = files.path().join("missing.pem");
    let mut api = start_with_key(&missing, &cert_path);
    assert!(!api.wait_exit().success());
    let log = api.log();
    assert!(log.contains("cannot read TLS key") && log.contains("missing.pem"), "{log}");
    assert!(log.contains("No such file"), "{log}");

    // A key that does not belong to the certificate.
    let other = rcgen::KeyPair::generate().unwrap();
    let other_path = files.path().join("other.pem");
    std::fs::write(&other_path, pem("PRIVATE KEY", &other.serialize_der())).unwrap();
    std::fs::set_permissions(&other_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut api = start_with_key(&other_path, &cert_path);
    assert!(!api.wait_exit().success());
    assert!(api.log().contains("TLS configuration refused"), "{}", api.log());

    // The same key at 0600 starts (the refusal above was about the mode).
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut api = start_with_key(&key_path, &cert_path);
    std::thread::sleep(Duration::from_secs(1));
    assert!(api.child.try_wait().unwrap().is_none(), "exited: {}", api.log());
}

fn socket_activate(names: &str, ports: &[u16]) -> Proc {
    let mut wrapper = vec!["systemd-socket-activate".to_string()];
    for p in ports {
        wrapper.push(format!("--listen={}", addr(*p)));
    }
    wrapper.push(format!("--fdname={names}"));
    // The development flags must be ignored when sockets are passed.
    spawn(&wrapper, &["--listen".into(), "127.0.0.1:1".into(), "--listen-tls".into(), "127.0.0.1:2".into()])
}

#[test]
fn socket_activation_serves_http_and_https_by_descriptor_name() {
    let (hp, sp) = (free_port(), free_port());
    let api = socket_activate("http:https", &[hp, sp]);
    wait_connectable(&api, addr(hp));
    rt().block_on(async {
        // The first connection makes systemd-socket-activate exec the worker with both fds.
        let r = request(addr(hp), None, "GET", "/api/v1/health/live", &[], None).await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r);
        let fp = api.fingerprint();
        let r = request(addr(sp), Some((pinned_client(&fp), "localhost")), "GET", "/api/v1/health/live", &[], None)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{:?}", r);
        // Each descriptor speaks only its own scheme.
        assert!(request(addr(sp), None, "GET", "/api/v1/health/live", &[], None).await.is_err());
        assert!(
            request(addr(hp), Some((pinned_client(&fp), "localhost")), "GET", "/api/v1/health/live", &[], None)
                .await
                .is_err()
        );
    });
    // No development socket was bound (flags ignored under socket activation).
    assert!(api.log().contains(&format!("127.0.0.1:{sp}")), "{}", api.log());
    assert!(!api.log().contains("127.0.0.1:2\""), "{}", api.log());
}

#[test]
fn socket_activation_refuses_an_unknown_descriptor_name() {
    let (hp, xp) = (free_port(), free_port());
    let mut api = socket_activate("http:admin", &[hp, xp]);
    wait_connectable(&api, addr(hp));
    // Trigger the exec; the worker must refuse to start.
    let _ = std::net::TcpStream::connect(addr(hp));
    assert!(!api.wait_exit().success());
    let log = api.log();
    assert!(
        log.contains("descriptor 1 is named \\\"admin\\\"") || log.contains("descriptor 1 is named \"admin\""),
        "{log}"
    );
}
