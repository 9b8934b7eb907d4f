// SPDX-License-Identifier: Apache-2.0
//! Updates through the HTTP API, end to end with real processes: swtpm, the broker on a disk
//! image, the test update server, `piccolo-updater` as `piccolo-updater` and `piccolo-api` as
//! `piccolo-api` (the updater's control table admits it by SO_PEERCRED uid), over real HTTP:
//! status → check finds an update → the event stream shows the download → staged (waiting for
//! the window) → busy 409, bad window 400, no session 401, no CSRF 403, not 423 while locked
//! → cancel → nothing to cancel 409 → rollback refused 409 → apply reboots → updater down 503
//! → the event stream reconnects when the updater is back.

mod updater_rig;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use piccolo_testkit::disks::{USR_B, cgpt_show};
use serde_json::{Value, json};
use updater_rig::*;

/// `piccolo-api` as user `piccolo-api`; killed on drop.
struct Api {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Child,
}

impl Api {
    /// A state dir laid out as tmpfiles.d does in production: the dir and the broker's
    /// `ciphertext/`, `mounts/` root's; `crypto/`, `volumes/`, `exports/` and the runtime dir
    /// piccolo-api's. Made before the broker, which is told to use it.
    fn prepare() -> tempfile::TempDir {
        use std::os::unix::fs::PermissionsExt;
        updater_rig::system_users();
        let dir = tempfile::Builder::new().prefix("piccolo-api-updates-").tempdir().unwrap();
        let u = nix::unistd::User::from_name("piccolo-api").unwrap().expect("user piccolo-api");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(dir.path().join("state")).unwrap();
        std::fs::set_permissions(dir.path().join("state"), std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in ["state/crypto", "state/volumes", "state/exports", "run"] {
            let p = dir.path().join(sub);
            std::fs::create_dir(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700)).unwrap();
            nix::unistd::chown(&p, Some(u.uid), Some(u.gid)).unwrap();
        }
        dir
    }

    /// The broker policy and configuration the persistence owner needs on the rig's broker.
    fn broker_extras(dir: &Path) -> (String, String) {
        let policy = "\n[[rule]]\nrpcs = [\"CreateVolume\", \"MountVolume\", \"UnmountVolume\", \"VolumeStatus\"]\n\
                      users = [\"piccolo-api\"]\nvolumes = [\"control\", \"bootstrap\"]\n\
                      reason = \"test: the API worker owns persistence\"\n";
        let config = format!("[volumes]\nstate_dir = {:?}\n", dir.join("state").display().to_string());
        (policy.to_string(), config)
    }

    fn start(dir: tempfile::TempDir, broker: &Path, updater: &Path) -> Api {
        let u = nix::unistd::User::from_name("piccolo-api").unwrap().expect("user piccolo-api");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.path().join("api.log")).unwrap();
        let child = Command::new("setpriv")
            .arg(format!("--reuid={}", u.uid))
            .arg(format!("--regid={}", u.gid))
            .arg("--init-groups")
            .arg("--no-new-privs")
            .arg(piccolo_testkit::bins::bin("piccolo-api"))
            .args(["--listen", &addr.to_string(), "--kdf-memory-kib", "8192", "--kdf-passes", "1"])
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--runtime-dir")
            .arg(dir.path().join("run"))
            .arg("--broker-socket")
            .arg(broker)
            .arg("--updater-socket")
            .arg(updater)
            .args(["--boot-poll-secs", "0"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let api = Api { dir, addr, child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "piccolo-api did not start: {}", api.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        api
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("api.log")).unwrap_or_default()
    }

    fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> (u16, Value) {
        let (status, body) = http(self.addr, method, path, headers, body.map(|b| b.to_string()));
        let v = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
        (status, v)
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).expect("status line").parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    (status, headers)
}

/// Reads one chunk of a chunked body (None at the end).
fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let n = usize::from_str_radix(line.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut buf = vec![0u8; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: Option<String>) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(150))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(head.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let (status, hdrs) = read_head(&mut r);
    let mut out = Vec::new();
    if hdrs.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        while let Some(c) = read_chunk(&mut r) {
            out.extend(c);
        }
    } else {
        r.read_to_end(&mut out).unwrap();
    }
    (status, out)
}

/// Follows `GET /api/v1/events` in a thread; every (event, data) lands in the returned list.
fn follow_events(addr: SocketAddr, bearer: &str) -> Arc<Mutex<Vec<(String, Value)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(format!("GET /api/v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {bearer}\r\n\r\n").as_bytes())
        .unwrap();
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    assert_eq!(status, 200);
    std::thread::spawn(move || {
        let mut buf = String::new();
        while let Some(c) = read_chunk(&mut r) {
            buf.push_str(&String::from_utf8_lossy(&c));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let mut ev = String::new();
                let mut data = String::new();
                for l in frame.lines() {
                    if let Some(v) = l.strip_prefix("event:") {
                        ev = v.trim().to_string();
                    } else if let Some(v) = l.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !ev.is_empty() {
                    out.lock().unwrap().push((ev, serde_json::from_str(&data).unwrap_or(Value::Null)));
                }
            }
        }
    });
    seen
}

fn updates(seen: &Mutex<Vec<(String, Value)>>) -> Vec<Value> {
    seen.lock().unwrap().iter().filter(|(e, _)| e == "update").map(|(_, d)| d["update"].clone()).collect()
}

fn wait_status(api: &Api, auth: &[(&str, &str)], secs: u64, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, s) = api.req("GET", "/api/v1/updates", auth, None);
        assert_eq!(code, 200, "{s}");
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last {s}\n{}", api.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn updates_through_the_api() {
    // A one-minute window that is not now: a staged update waits for it.
    let m = (piccolo_updater::window::now() % 86400) / 60;
    let open = (m + 120) % 1440;
    let hhmm = |x: u64| format!("{:02}:{:02}", x / 60, x % 60);
    let (ws, we) = (hhmm(open), hhmm((open + 1) % 1440));
    let dir = Api::prepare();
    let (policy, config) = Api::broker_extras(dir.path());
    let mut r = Rig::start_with(Some((&ws, &we)), &policy, &config);
    let api = Api::start(dir, &r.broker.socket, &r.updater.socket);

    // First run, login.
    let code = std::fs::read_to_string(api.dir.path().join("run/setup-code")).unwrap();
    let (c, b) =
        api.req("POST", "/api/v1/setup", &[], Some(&json!({"setup_code": code.trim(), "password": "updates pw 1"})));
    assert_eq!(c, 201, "{b}");
    let (status, head_and_body) = {
        let mut s = TcpStream::connect(api.addr).unwrap();
        let body = json!({"password": "updates pw 1"}).to_string();
        s.write_all(
            format!(
                "POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        (out.split_whitespace().nth(1).unwrap().to_string(), out)
    };
    assert_eq!(status, "200", "{head_and_body}");
    let (head, body) = head_and_body.split_once("\r\n\r\n").unwrap();
    let login: Value = serde_json::from_str(body).unwrap();
    let bearer = format!("Bearer {}", login["token"].as_str().unwrap());
    let csrf = login["csrf_token"].as_str().unwrap().to_string();
    let cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: ").or_else(|| l.strip_prefix("Set-Cookie: ")))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let auth: &[(&str, &str)] = &[("Authorization", &bearer)];

    // No session: 401 for every operation, before the updater is asked.
    for (m, p) in [
        ("GET", "/api/v1/updates"),
        ("POST", "/api/v1/updates/check"),
        ("POST", "/api/v1/updates/apply"),
        ("POST", "/api/v1/updates/cancel"),
        ("POST", "/api/v1/updates/rollback"),
        ("PUT", "/api/v1/updates/window"),
    ] {
        let (c, b) = api.req(m, p, &[], None);
        assert_eq!(c, 401, "{m} {p}: {b}");
        assert_eq!(b["error"]["code"], "unauthenticated", "{b}");
    }
    // A cookie session without its CSRF token: 403; with it, the command goes through.
    let (c, b) = api.req("POST", "/api/v1/updates/check", &[("Cookie", &cookie)], None);
    assert_eq!((c, b["error"]["code"].as_str()), (403, Some("csrf")), "{b}");

    // Status through the worker.
    let (c, s) = api.req("GET", "/api/v1/updates", auth, None);
    assert_eq!(c, 200, "{s} {}", api.log());
    assert_eq!(s["phase"], "idle", "{s}");
    assert_eq!(s["current_version"], "1.0.0", "{s}");
    assert_eq!(s["window"], json!({"start": ws, "end": we}), "{s}");

    // The window: malformed → 400 (the updater keeps the old one); a good one is stored.
    for bad in
        [json!({"start": "25:00", "end": "01:00"}), json!({"start": "2:00", "end": "03:00"}), json!({"start": "02:00"})]
    {
        let (c, b) = api.req("PUT", "/api/v1/updates/window", auth, Some(&bad));
        assert_eq!((c, b["error"]["code"].as_str()), (400, Some("bad_request")), "{bad}: {b}");
    }
    let (ws2, we2) = (hhmm((open + 2) % 1440), hhmm((open + 3) % 1440));
    let (c, s) = api.req(
        "PUT",
        "/api/v1/updates/window",
        &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)],
        Some(&json!({"start": ws2, "end": we2})),
    );
    assert_eq!(c, 200, "{s}");
    assert_eq!(s["window"], json!({"start": ws2, "end": we2}), "{s}");

    // A slow payload, so the download is seen in progress.
    let mut sc = available(&r.payload, "1.1.0");
    sc["rate_bytes_per_sec"] = json!(1_200_000);
    r.server.set_scenario(&sc);
    let events = follow_events(api.addr, &bearer);
    std::thread::sleep(Duration::from_millis(300));

    let (c, s) = api.req("POST", "/api/v1/updates/check", auth, None);
    assert_eq!(c, 200, "{s} {}", api.log());
    assert_eq!(s["version"], "1.1.0", "{s}");
    // A second job while one runs: 409 busy.
    let (c, b) = api.req("POST", "/api/v1/updates/check", auth, Some(&json!({"force": false})));
    assert_eq!((c, b["error"]["code"].as_str()), (409, Some("busy")), "{b}");
    let (c, b) = api.req("POST", "/api/v1/updates/check", auth, Some(&json!({"force": "yes"})));
    assert_eq!(c, 400, "{b}");

    let s = wait_status(&api, auth, 60, "waiting for the window", |s| s["phase"] == "waiting_for_window");
    assert_eq!(s["version"], "1.1.0");
    assert_eq!(cgpt_show(&r.img, USR_B).1, 1, "USR-B activated with one try");
    assert!(r.reboot_requests().is_empty(), "outside the window: no reboot");

    // The event stream showed the job: downloading with progress, verifying, staged.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !updates(&events).iter().any(|u| u["phase"] == "waiting_for_window") {
        assert!(Instant::now() < deadline, "no staged update event: {:?}", events.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    let ups = updates(&events);
    let total = PAYLOAD_LEN as u64;
    let progress: Vec<u64> = ups
        .iter()
        .filter(|u| u["phase"] == "downloading" && u["bytes_total"] == total)
        .map(|u| u["bytes_done"].as_u64().unwrap())
        .collect();
    assert!(progress.iter().any(|&d| d > 0 && d < total), "no partial progress: {progress:?}");
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "progress goes forward: {progress:?}");
    let phases: Vec<&str> = ups.iter().map(|u| u["phase"].as_str().unwrap()).collect();
    let pos = |p: &str| phases.iter().position(|x| *x == p).unwrap_or_else(|| panic!("no {p} in {phases:?}"));
    assert!(pos("downloading") < pos("verifying") && pos("verifying") < pos("waiting_for_window"), "{phases:?}");
    assert_eq!(events.lock().unwrap()[0].0, "lock", "the lock state comes first");

    // Locked store: updates are not gated (no 423), store-backed endpoints are.
    let (c, b) = api.req("POST", "/api/v1/crypto/lock", auth, None);
    assert_eq!(c, 200, "{b}");
    let (c, b) = api.req("GET", "/api/v1/auth/session", auth, None);
    assert_eq!(c, 423, "{b}");
    let (c, s) = api.req("GET", "/api/v1/updates", auth, None);
    assert_eq!((c, s["phase"].as_str()), (200, Some("waiting_for_window")), "{s}");

    // Cancel un-stages; a second cancel has nothing to do; rollback to the cancelled slot is
    // refused by the broker.
    let (c, s) = api.req("POST", "/api/v1/updates/cancel", &[("Cookie", &cookie), ("X-CSRF-Token", &csrf)], None);
    assert_eq!(c, 200, "{s}");
    assert_eq!(s["phase"], "idle", "{s}");
    let a = s["attempts"].as_array().unwrap().iter().find(|a| a["version"] == "1.1.0").unwrap();
    assert_eq!(a["state"], "cancelled", "{s}");
    assert_eq!(cgpt_show(&r.img, USR_B).1, 0, "USR-B has no tries left");
    let (c, b) = api.req("POST", "/api/v1/updates/cancel", auth, None);
    assert_eq!((c, b["error"]["code"].as_str()), (409, Some("conflict")), "{b}");
    let (c, b) = api.req("POST", "/api/v1/updates/rollback", auth, None);
    assert_eq!((c, b["error"]["code"].as_str()), (409, Some("conflict")), "{b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("would not boot"), "{b}");
    assert!(r.reboot_requests().is_empty());

    // Apply (forced: the version was cancelled) installs and reboots at once.
    r.server.set_scenario(&available(&r.payload, "1.1.0"));
    let (c, s) = api.req("POST", "/api/v1/updates/apply", auth, Some(&json!({"force": true})));
    assert_eq!(c, 200, "{s}");
    wait_status(&api, auth, 60, "rebooting", |s| {
        s["phase"] == "rebooting" && s["message"].as_str().is_some_and(|m| m.contains("reboot requested"))
    });
    assert_eq!(r.reboot_requests(), "delay=0\n");

    // The updater goes away: 503; the event stream reconnects once it is back.
    let before = updates(&events).len();
    r.updater.stop();
    let (c, b) = api.req("GET", "/api/v1/updates", auth, None);
    assert_eq!((c, b["error"]["code"].as_str()), (503, Some("unavailable")), "{b}");
    let (c, b) = api.req("POST", "/api/v1/updates/check", auth, None);
    assert_eq!(c, 503, "{b}");
    r.updater.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while updates(&events).len() == before {
        assert!(Instant::now() < deadline, "no update event after the updater restarted\n{}", api.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The window set through the API survived the restart (the updater's durable record).
    let (c, s) = api.req("GET", "/api/v1/updates", auth, None);
    assert_eq!(c, 200, "{s}");
    assert_eq!(s["window"], json!({"start": ws2, "end": we2}), "{s}");
}
