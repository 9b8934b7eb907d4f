// SPDX-License-Identifier: Apache-2.0
//! The test update server and a real `piccolo-updater` process running as the system user
//! `piccolo-updater`, each on its own temp dir; both are killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running `piccolo-test-update-server`.
pub struct UpdateServer {
    /// Its directory (device.jwk, release.key, scenario.json, requests.jsonl).
    pub dir: tempfile::TempDir,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Hex Ed25519 public key of the release key (pin this in the updater).
    pub release_pub: String,
    child: Child,
}

impl UpdateServer {
    /// Starts the server trusting `device_jwk` for device tokens, signing with `seed`.
    pub fn start(device_jwk: &str, seed: [u8; 32], scenario: &serde_json::Value) -> UpdateServer {
        let dir = tempfile::Builder::new().prefix("piccolo-update-server-").tempdir().expect("tempdir");
        std::fs::write(dir.path().join("device.jwk"), device_jwk).expect("jwk");
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.path().join("release.key"), hex).expect("seed");
        std::fs::write(dir.path().join("scenario.json"), scenario.to_string()).expect("scenario");
        let child = Command::new(crate::bins::bin("piccolo-test-update-server"))
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr"))
            .spawn()
            .expect("spawn update server");
        let port_file = dir.path().join("port");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !port_file.exists() {
            assert!(Instant::now() < deadline, "update server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        let port = std::fs::read_to_string(&port_file).expect("port").trim().parse().expect("port number");
        let release_pub = std::fs::read_to_string(dir.path().join("release.pub")).expect("release.pub");
        UpdateServer { dir, port, release_pub, child }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Replaces the scenario (read by the server on every request).
    pub fn set_scenario(&self, v: &serde_json::Value) {
        let tmp = self.dir.path().join(".scenario.tmp");
        std::fs::write(&tmp, v.to_string()).expect("scenario");
        std::fs::rename(&tmp, self.dir.path().join("scenario.json")).expect("rename scenario");
    }

    /// Replaces the device key the server trusts.
    pub fn set_device_jwk(&self, jwk: &str) {
        std::fs::write(self.dir.path().join("device.jwk"), jwk).expect("jwk");
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("request log line"))
            .collect()
    }

    /// Requests for payloads so far.
    pub fn payload_requests(&self) -> Vec<serde_json::Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["path"].as_str().is_some_and(|p| p.starts_with("/payloads/")))
            .collect()
    }
}

impl Drop for UpdateServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start the updater.
#[derive(Clone, Default)]
pub struct UpdaterOptions {
    /// Broker socket.
    pub broker_socket: PathBuf,
    /// Update server URL.
    pub server: String,
    /// Hex Ed25519 key to pin.
    pub manifest_key: String,
    /// Version in the version file at start.
    pub version: String,
    /// Extra TOML appended to the config (top-level keys before any table).
    pub extra_config: String,
    /// Window (start, end); None: any time.
    pub window: Option<(String, String)>,
}

/// A running `piccolo-updater` as user `piccolo-updater`.
pub struct Updater {
    /// Temp dir holding config, state, socket, version file.
    pub dir: tempfile::TempDir,
    /// Control socket.
    pub socket: PathBuf,
    /// State dir.
    pub state_dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// The version file (rewrite it to "boot" another version).
    pub version_file: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    stderr: PathBuf,
    run: u32,
}

impl Updater {
    /// Writes the config and starts the worker; waits for its socket.
    pub fn start(opts: &UpdaterOptions) -> Updater {
        let u = nix::unistd::User::from_name("piccolo-updater").ok().flatten().expect("user piccolo-updater");
        let dir = tempfile::Builder::new().prefix("piccolo-updater-").tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let state_dir = dir.path().join("state");
        let run = dir.path().join("run");
        for d in [&state_dir, &run] {
            std::fs::create_dir(d).expect("mkdir");
            nix::unistd::chown(d.as_path(), Some(u.uid), Some(u.gid)).expect("chown");
        }
        let socket = run.join("updater.sock");
        let version_file = dir.path().join("os-release");
        std::fs::write(&version_file, format!("NAME=Piccolo\nVERSION_ID={}\n", opts.version)).expect("version");
        let mut cfg = format!(
            "server = {:?}\nmanifest_public_key = {:?}\nstate_dir = {:?}\nsocket = {:?}\nbroker_socket = {:?}\n\
             version_file = {:?}\ncheck_interval_seconds = 86400\ninitial_check_delay_seconds = 86400\n\
             boot_poll_seconds = 1\nreboot_delay_seconds = 0\nhttp_timeout_seconds = 3\ndownload_retries = 3\n",
            opts.server,
            opts.manifest_key,
            state_dir.display().to_string(),
            socket.display().to_string(),
            opts.broker_socket.display().to_string(),
            version_file.display().to_string(),
        );
        cfg.push_str(&opts.extra_config);
        if let Some((a, b)) = &opts.window {
            cfg.push_str(&format!("[window]\nstart = {a:?}\nend = {b:?}\n"));
        }
        let config = dir.path().join("updater.toml");
        std::fs::write(&config, cfg).expect("config");
        let stderr = dir.path().join("updater.stderr");
        let mut up =
            Updater { dir, socket, state_dir, config, version_file, env: Vec::new(), child: None, stderr, run: 0 };
        up.spawn();
        up
    }

    /// Sets extra environment for the next (re)start.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    fn spawn(&mut self) {
        let u = nix::unistd::User::from_name("piccolo-updater").ok().flatten().expect("user piccolo-updater");
        self.run += 1;
        let err = std::fs::OpenOptions::new().create(true).append(true).open(&self.stderr).expect("stderr file");
        let child = Command::new("setpriv")
            .arg(format!("--reuid={}", u.uid))
            .arg(format!("--regid={}", u.gid))
            .arg("--init-groups")
            .arg(crate::bins::bin("piccolo-updater"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn updater");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(c) = &mut self.child
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("updater exited during start ({st}): {}", self.stderr_text());
            }
            assert!(Instant::now() < deadline, "updater did not come up: {}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the worker wrote to stderr (all runs).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILL (power loss, as far as the worker is concerned) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // setpriv execs the worker, so the child pid is the worker's.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid"));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    /// Starts again with the same files.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop first");
        self.spawn();
    }

    /// Writes the version file (what the booted `/usr` says).
    pub fn set_version(&self, v: &str) {
        std::fs::write(&self.version_file, format!("NAME=Piccolo\nVERSION_ID={v}\n")).expect("version");
    }

    /// `piccoloctl update --updater-socket <socket> args...` as `user`.
    pub fn ctl_as(&self, user: &str, args: &[&str]) -> Output {
        let socket = self.socket.display().to_string();
        let mut full = vec!["update", "--updater-socket", socket.as_str()];
        full.extend_from_slice(args);
        crate::users::run_as(user, &crate::bins::piccoloctl(), &full)
    }

    /// `update status --json` as root.
    pub fn status(&self) -> serde_json::Value {
        let o = self.ctl_as("root", &["status", "--json"]);
        assert!(o.status.success(), "status: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("status JSON")
    }

    /// Polls the status until `pred` holds (panics with the last status after `secs`).
    pub fn wait_for(&self, secs: u64, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; last status {s}\n{}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a line on stderr (crash points).
    pub fn wait_stderr(&self, needle: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !self.stderr_text().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} on stderr: {}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Path inside the temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Updater {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `piccolo-health --config <file>` as `user`.
pub fn health_as(user: &str, config: &Path) -> Output {
    let c = config.display().to_string();
    crate::users::run_as(user, &crate::bins::bin("piccolo-health"), &["--config", &c])
}
