// SPDX-License-Identifier: Apache-2.0
//! Test support: the real `piccolo-api` binary on a temp state dir, and a small HTTP/1.1
//! client (hyper) that can bind its source address (127.0.0.x) to act as different clients.

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// A running `piccolo-api`; SIGKILLed on drop.
pub struct Api {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Child,
}

/// The password tests set at first run.
pub const PASSWORD: &str = "first password 1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Api {
    /// Starts the binary with a fast KDF and `extra` flags; waits until it answers.
    pub fn start(extra: &[&str]) -> Api {
        Api::start_in(tempfile::Builder::new().prefix("piccolo-api-").tempdir().unwrap(), extra, None)
    }

    /// Same, in `dir`, optionally as system user `user` (via setpriv).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str], user: Option<&str>) -> Api {
        let bin = piccolo_testkit::bins::bin("piccolo-api");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.path().join("api.log")).unwrap();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr.to_string(),
            "--state-dir".into(),
            dir.path().join("state").display().to_string(),
            "--runtime-dir".into(),
            dir.path().join("run").display().to_string(),
            "--kdf-memory-kib".into(),
            "8192".into(),
            "--kdf-passes".into(),
            "1".into(),
        ];
        if !extra.contains(&"--broker-socket") {
            args.push("--broker-socket".into());
            args.push(dir.path().join("no-broker.sock").display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cmd = match user {
            Some(u) => {
                let pw = nix::unistd::User::from_name(u).unwrap().unwrap();
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={}", pw.uid))
                    .arg(format!("--regid={}", pw.gid))
                    .arg("--init-groups")
                    .arg("--no-new-privs")
                    .arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(&args).stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null());
        let child = cmd.spawn().unwrap();
        let api = Api { dir, addr, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "piccolo-api did not start: {}", api.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        api
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("api.log")).unwrap_or_default()
    }

    pub fn setup_code_file(&self) -> PathBuf {
        self.dir.path().join("run/setup-code")
    }

    pub fn setup_code(&self) -> String {
        std::fs::read_to_string(self.setup_code_file()).unwrap().trim().to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The worker's resident set size (VmRSS) in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Runs first-run setup with [`PASSWORD`]; returns the recovery key.
    pub async fn setup(&self) -> String {
        let r = self
            .post_json(
                "/api/v1/setup",
                &serde_json::json!({"setup_code": self.setup_code(), "password": PASSWORD}),
                &[],
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["recovery_key"].as_str().unwrap().to_string()
    }

    /// Logs in; returns the session.
    pub async fn login(&self, password: &str) -> Session {
        let r = self.post_json("/api/v1/auth/login", &serde_json::json!({"password": password}), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        Session::from_response(&r)
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        request(self.addr, None, "GET", path, headers, Vec::new()).await
    }

    pub async fn post_json(&self, path: &str, body: &serde_json::Value, headers: &[(&str, &str)]) -> Resp {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        request(self.addr, None, "POST", path, &h, serde_json::to_vec(body).unwrap()).await
    }

    pub async fn post_json_from(&self, from: Ipv4Addr, path: &str, body: &serde_json::Value) -> Resp {
        request(
            self.addr,
            Some(IpAddr::V4(from)),
            "POST",
            path,
            &[("content-type", "application/json")],
            serde_json::to_vec(body).unwrap(),
        )
        .await
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A login's credentials.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: String,
    pub csrf: String,
    pub cookie: String,
    pub set_cookie: String,
}

impl Session {
    pub fn from_response(r: &Resp) -> Session {
        let j = r.json();
        let set_cookie = r.header("set-cookie").expect("Set-Cookie").to_string();
        let cookie = set_cookie.split(';').next().unwrap().to_string();
        Session {
            token: j["token"].as_str().unwrap().to_string(),
            csrf: j["csrf_token"].as_str().unwrap().to_string(),
            cookie,
            set_cookie,
        }
    }

    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    /// Asserts the one error shape and returns the code.
    pub fn error_code(&self) -> String {
        let j = self.json();
        let code = j["error"]["code"].as_str().unwrap_or_else(|| panic!("no error.code: {}", self.text()));
        assert!(j["error"]["message"].is_string(), "no error.message: {}", self.text());
        assert_eq!(j.as_object().unwrap().len(), 1, "extra fields: {}", self.text());
        code.to_string()
    }
}

/// One HTTP/1.1 request on a fresh connection, optionally from source address `from`.
pub async fn request(
    addr: SocketAddr,
    from: Option<IpAddr>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Resp {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    let stream = sock.connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender.send_request(req.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
    Resp { status, headers, body }
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

pub fn path_mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}
