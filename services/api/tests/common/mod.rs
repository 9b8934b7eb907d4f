// SPDX-License-Identifier: Apache-2.0
//! Test support: the whole local stack on a temp dir. A real `piccolo-broker` (production
//! policy `policy/broker.toml`, Volumes over real gocryptfs/FUSE, optionally swtpm) and the
//! real `piccolo-api` binary running as system user `piccolo-api` (no capabilities), both on
//! one state dir; and a small HTTP/1.1 client (hyper) that can bind its source address
//! (127.0.0.x) to act as different clients. Tests run as root (they create system users).

#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::swtpm::Swtpm;

/// How to start the stack.
#[derive(Default)]
pub struct StackOptions {
    /// Extra `piccolo-api` flags.
    pub api_args: Vec<String>,
    /// Extra broker config (e.g. a `[boot]` section).
    pub broker_config: String,
    /// Start swtpm and point the broker's `[tpm]` at it.
    pub tpm: bool,
    /// Run the worker as root instead of `piccolo-api` (only to exercise export/import
    /// end to end while `ciphertext/` is root-only; see ARCHITECTURE.md).
    pub as_root: bool,
}

/// The running stack: broker + `piccolo-api` as `piccolo-api`. On drop the worker is killed,
/// every FUSE mount under the state dir detached, then the broker stopped.
pub struct Api {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub broker: Broker,
    pub tpm: Option<Swtpm>,
    child: Option<Child>,
    args: Vec<String>,
    as_root: bool,
}

/// The password tests set at first run.
pub const PASSWORD: &str = "first password 1";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Whether something is mounted on `mp`.
pub fn mounted(mp: &Path) -> bool {
    let target = mp.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo").unwrap().lines().any(|l| l.split(' ').nth(4) == Some(&target))
}

fn chown_to(path: &Path, user: &nix::unistd::User, mode: u32) {
    std::fs::create_dir_all(path).unwrap();
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

impl Api {
    /// The stack with `extra` API flags (fast test KDF).
    pub fn start(extra: &[&str]) -> Api {
        Api::start_opts(StackOptions { api_args: extra.iter().map(|s| s.to_string()).collect(), ..Default::default() })
    }

    /// The stack as `opts` says. The state dir layout follows production (tmpfiles.d): the
    /// dir itself and the broker's `ciphertext/`, `mounts/` are root's; `crypto/`,
    /// `volumes/`, `exports/` and the runtime dir are piccolo-api's (0700).
    pub fn start_opts(opts: StackOptions) -> Api {
        piccolo_testkit::users::apply_sysusers(&repo().join("systemd/sysusers.d/piccolo.conf"));
        let user = nix::unistd::User::from_name("piccolo-api").unwrap().unwrap();
        let dir = tempfile::Builder::new().prefix("piccolo-api-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        for sub in ["crypto", "volumes", "exports"] {
            chown_to(&state.join(sub), &user, 0o700);
        }
        chown_to(&dir.path().join("run"), &user, 0o700);
        let tpm = opts.tpm.then(Swtpm::start);
        let mut broker_config = format!("[volumes]\nstate_dir = {:?}\n", state.display().to_string());
        if let Some(t) = &tpm {
            broker_config.push_str(&format!("[tpm]\ntcti = {:?}\n", t.tcti()));
        }
        broker_config.push_str(&opts.broker_config);
        let mut policy = std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap();
        if opts.as_root {
            policy.push_str(
                "\n[[rule]]\nrpcs = [\"CreateVolume\", \"MountVolume\", \"UnmountVolume\", \"VolumeStatus\"]\n\
                 users = [\"root\"]\nvolumes = [\"control\", \"bootstrap\"]\n\
                 reason = \"test: the worker runs as root for the export/import round trip\"\n",
            );
        }
        let broker = Broker::start(BrokerOptions {
            policy,
            socket_group: Some("piccolo-broker".into()),
            audit_group: Some("piccolo-audit".into()),
            extra_config: broker_config,
            ..Default::default()
        });
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args: Vec<String> = vec![
            "--listen".into(),
            addr.to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--runtime-dir".into(),
            dir.path().join("run").display().to_string(),
            "--broker-socket".into(),
            broker.socket.display().to_string(),
            "--kdf-memory-kib".into(),
            "8192".into(),
            "--kdf-passes".into(),
            "1".into(),
        ];
        args.extend(opts.api_args);
        let mut api = Api { dir, addr, broker, tpm, child: None, args, as_root: opts.as_root };
        api.spawn();
        api
    }

    fn spawn(&mut self) {
        let pw = nix::unistd::User::from_name("piccolo-api").unwrap().unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("api.log")).unwrap();
        let mut cmd = Command::new("setpriv");
        if !self.as_root {
            cmd.arg(format!("--reuid={}", pw.uid)).arg(format!("--regid={}", pw.gid)).arg("--init-groups");
        }
        cmd.arg("--no-new-privs")
            .arg(piccolo_testkit::bins::bin("piccolo-api"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(self.addr).is_ok() {
                break;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("piccolo-api exited ({st}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "piccolo-api did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the worker with SIGTERM (it locks on the way out) and starts it again.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            let st = c.wait().unwrap();
            assert!(st.success(), "piccolo-api did not stop cleanly ({st}): {}", self.log());
        }
        self.spawn();
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn mountpoint(&self, id: &str) -> PathBuf {
        self.state_dir().join("mounts").join(id)
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

    /// The worker's pid (the setpriv child execs the worker, so it is the same process).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
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
        assert_eq!(r.status, 201, "{} / {}", r.text(), self.log());
        r.json()["recovery_key"].as_str().unwrap().to_string()
    }

    /// Logs in; returns the session.
    pub async fn login(&self, password: &str) -> Session {
        let r = self.post_json("/api/v1/auth/login", &serde_json::json!({"password": password}), &[]).await;
        assert_eq!(r.status, 200, "{}", r.text());
        Session::from_response(&r)
    }

    pub async fn state(&self) -> String {
        self.get("/api/v1/crypto/status", &[]).await.json()["state"].as_str().unwrap().to_string()
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // The gocryptfs daemons outlive the broker by design (KillMode=process): detach every
        // mount so the temp dir can go.
        if let Ok(items) = std::fs::read_dir(self.state_dir().join("mounts")) {
            for item in items.flatten() {
                if mounted(&item.path()) {
                    let _ = Command::new("fusermount3").arg("-uz").arg(item.path()).status();
                }
            }
        }
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
    pub fn clone_resp(&self) -> Resp {
        Resp { status: self.status, headers: self.headers.clone(), body: self.body.clone() }
    }
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
