// SPDX-License-Identifier: Apache-2.0
//! HTTPS on the real `piccolo-api` binary, checked with real TLS clients (`openssl s_client`,
//! `curl` verifying against the served or configured certificate, never `-k`): the
//! self-signed certificate's fingerprint matches what the worker prints, configured
//! certificate files are served, a world-readable or missing key stops the start with a
//! clear message, browsers on plain HTTP are sent to https while health checks are not, and
//! socket activation with descriptors named `http` and `https` serves each scheme on its own
//! socket (`systemd-socket-activate`).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `piccolo-api` (killed on drop) with its stdout/stderr in `dir/api.log`.
struct Api {
    dir: tempfile::TempDir,
    child: Child,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Api {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("api.log")).unwrap_or_default()
    }
}

fn api_command(dir: &Path, args: &[String]) -> Command {
    let mut cmd = Command::new(piccolo_testkit::bins::bin("piccolo-api"));
    cmd.arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--runtime-dir")
        .arg(dir.join("run"))
        .arg("--broker-socket")
        .arg(dir.join("no-broker.sock"))
        .args(["--kdf-memory-kib", "8192", "--kdf-passes", "1", "--boot-poll-secs", "0"])
        .args(args);
    let log = std::fs::File::create(dir.join("api.log")).unwrap();
    cmd.stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null());
    cmd
}

fn start(args: &[String], wait_for: &str) -> Api {
    let dir = tempfile::Builder::new().prefix("piccolo-api-tls-").tempdir().unwrap();
    let child = api_command(dir.path(), args).spawn().unwrap();
    let api = Api { dir, child };
    wait_log(&api, wait_for);
    api
}

fn wait_log(api: &Api, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api.log().contains(needle) {
        assert!(Instant::now() < deadline, "piccolo-api never logged {needle:?}:\n{}", api.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `port` accepts TCP connections.
fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// The leaf certificate the server on `port` presents, as PEM (no verification: the caller
/// compares or pins it).
fn served_cert_pem(port: u16) -> String {
    let out = run(Command::new("openssl").args([
        "s_client",
        "-connect",
        &format!("127.0.0.1:{port}"),
        "-servername",
        "localhost",
    ]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let begin = text.find("-----BEGIN CERTIFICATE-----").unwrap_or_else(|| panic!("no certificate served:\n{text}"));
    let end = text.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----".len();
    format!("{}\n", &text[begin..end])
}

fn fingerprint_of(pem: &Path) -> String {
    let out = run(Command::new("openssl").args(["x509", "-noout", "-fingerprint", "-sha256", "-in"]).arg(pem));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s = String::from_utf8(out.stdout).unwrap();
    s.trim().split_once('=').unwrap().1.to_string()
}

/// `curl` over https to `localhost:port`, verifying against `ca` only (not the system store).
/// Returns (status, headers, body).
fn curl_https(port: u16, ca: &Path, path: &str, extra: &[&str]) -> (u16, String, String) {
    curl(
        &format!("https://localhost:{port}{path}"),
        &["--cacert", ca.to_str().unwrap(), "--resolve", &format!("localhost:{port}:127.0.0.1")],
        extra,
    )
}

fn curl(url: &str, tls: &[&str], extra: &[&str]) -> (u16, String, String) {
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "20", "-D", "-", "-o", "-", "-w", "\n%{http_code}"])
        .args(tls)
        .args(extra)
        .arg(url));
    assert!(out.status.success(), "curl {url} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (rest, code) = text.rsplit_once('\n').unwrap();
    let (headers, body) = rest.split_once("\r\n\r\n").unwrap_or((rest, ""));
    (code.trim().parse().unwrap(), headers.to_string(), body.to_string())
}

#[test]
fn self_signed_certificate_is_served_and_matches_the_printed_fingerprint() {
    let (http, https) = (free_port(), free_port());
    let api = start(
        &[
            "--listen".into(),
            format!("127.0.0.1:{http}"),
            "--listen-tls".into(),
            format!("127.0.0.1:{https}"),
        ],
        "SHA-256 fingerprint",
    );
    wait_port(https);
    let log = api.log();
    let printed = log.split("SHA-256 fingerprint ").nth(1).unwrap().lines().next().unwrap().trim().to_string();
    let pem = api.dir.path().join("served.pem");
    std::fs::write(&pem, served_cert_pem(https)).unwrap();
    assert_eq!(fingerprint_of(&pem), printed, "the served certificate is not the one whose fingerprint was printed");

    // curl verifies the chain and the name (localhost) against that certificate alone.
    let (code, _, body) = curl_https(https, &pem, "/api/v1/health/live", &[]);
    assert_eq!(code, 200, "{body}");
    // The first-run setup code URL points at https.
    assert!(log.contains(&format!("open https://127.0.0.1:{https}/")), "{log}");

    // Plain HTTP: health stays there, API clients are served, a browser navigation is sent
    // to https on the same host and path.
    let (code, _, _) = curl(&format!("http://127.0.0.1:{http}/api/v1/health/live"), &[], &["-H", "Accept: text/html"]);
    assert_eq!(code, 200);
    let (code, _, _) = curl(&format!("http://127.0.0.1:{http}/api/v1/crypto/status"), &[], &[]);
    assert_ne!(code, 307, "an API client was redirected");
    let (code, headers, _) = curl(&format!("http://127.0.0.1:{http}/some/page?x=1"), &[], &["-H", "Accept: text/html"]);
    assert_eq!(code, 307, "{headers}");
    let location = headers
        .lines()
        .find_map(|l| l.strip_prefix("location: ").or_else(|| l.strip_prefix("Location: ")))
        .unwrap_or_else(|| panic!("no Location in {headers}"));
    assert_eq!(location.trim(), format!("https://127.0.0.1:{https}/some/page?x=1"));

    // A client that does not trust the certificate is refused by its own TLS check: the
    // certificate really is what curl verified above, not something curl skips.
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "--resolve", &format!("localhost:{https}:127.0.0.1")])
        .arg(format!("https://localhost:{https}/api/v1/health/live")));
    assert!(!out.status.success(), "an untrusted self-signed certificate was accepted");
}

/// A certificate and key made with openssl for `localhost`; key mode `key_mode`.
fn make_cert(dir: &Path, key_mode: u32) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(key_mode)).unwrap();
    (cert, key)
}

#[test]
fn configured_certificate_files_are_served() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(certs.path(), 0o600);
    let https = free_port();
    let api = start(
        &[
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--listen-tls".into(),
            format!("127.0.0.1:{https}"),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
        "piccolo-api serving",
    );
    assert!(!api.log().contains("self-signed certificate made for this run"), "{}", api.log());
    let (code, _, body) = curl_https(https, &cert, "/api/v1/health/live", &[]);
    assert_eq!(code, 200, "{body}");
    let pem = certs.path().join("served.pem");
    std::fs::write(&pem, served_cert_pem(https)).unwrap();
    assert_eq!(fingerprint_of(&pem), fingerprint_of(&cert));
}

fn start_fails(args: &[String]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut child = api_command(dir.path(), args).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("piccolo-api kept running with {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    std::fs::read_to_string(dir.path().join("api.log")).unwrap()
}

#[test]
fn world_readable_or_missing_key_stops_the_start() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = make_cert(certs.path(), 0o644);
    let args = |key: &Path| {
        vec![
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--listen-tls".into(),
            format!("127.0.0.1:{}", free_port()),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]
    };
    let log = start_fails(&args(&key));
    assert!(log.contains(&key.display().to_string()) && log.contains("readable"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "key material in the message: {log}");
    let missing = certs.path().join("missing.pem");
    let log = start_fails(&args(&missing));
    assert!(log.contains(&missing.display().to_string()), "{log}");
}

#[test]
fn socket_activation_serves_http_and_https_descriptors_by_name() {
    let (http, https) = (free_port(), free_port());
    let dir = tempfile::Builder::new().prefix("piccolo-api-tls-").tempdir().unwrap();
    // systemd-socket-activate binds both ports, then execs the worker with LISTEN_FDS=2 and
    // LISTEN_FDNAMES=http:https, as piccolo-api.socket + piccolo-api-tls.socket would.
    let inner = api_command(dir.path(), &[]);
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &format!("127.0.0.1:{http}"), "-l", &format!("127.0.0.1:{https}")])
        .args(["--fdname=http:https"])
        .arg(inner.get_program())
        .args(inner.get_args());
    let log = std::fs::File::create(dir.path().join("api.log")).unwrap();
    cmd.stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null());
    let api = Api { child: cmd.spawn().unwrap(), dir };
    wait_port(https);
    // systemd-socket-activate accepts lazily: the worker starts on the first connection.
    let pem = api.dir.path().join("served.pem");
    std::fs::write(&pem, served_cert_pem(https)).unwrap();
    wait_log(&api, "piccolo-api serving");
    let (code, _, body) = curl_https(https, &pem, "/api/v1/health/live", &[]);
    assert_eq!(code, 200, "{body}\n{}", api.log());
    let (code, _, _) = curl(&format!("http://127.0.0.1:{http}/api/v1/health/live"), &[], &[]);
    assert_eq!(code, 200);
    // The http descriptor does not speak TLS, and the https one does not speak plain HTTP.
    let out = run(Command::new("curl").args(["-sS", "--max-time", "10", "-k"]).arg(format!("https://127.0.0.1:{http}/")));
    assert!(!out.status.success(), "TLS answered on the http descriptor");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", https)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "plain HTTP answered on https");
}
