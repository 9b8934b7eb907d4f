// SPDX-License-Identifier: Apache-2.0
//! A real `piccolo-broker` process on a temp dir: socket, policy, audit log, config.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running broker; killed (SIGKILL) on drop if still running.
pub struct Broker {
    /// Temp dir holding everything.
    pub dir: tempfile::TempDir,
    /// Socket path.
    pub socket: PathBuf,
    /// Policy path (rewrite + [`Broker::reload`] to change it).
    pub policy: PathBuf,
    /// Audit log path.
    pub audit: PathBuf,
    /// Config file path.
    pub config: PathBuf,
    child: Option<Child>,
    stderr: PathBuf,
    env: Vec<(String, String)>,
}

/// How to start a broker.
#[derive(Default, Clone)]
pub struct BrokerOptions {
    /// Policy text.
    pub policy: String,
    /// Socket group name.
    pub socket_group: Option<String>,
    /// Audit group name.
    pub audit_group: Option<String>,
    /// Extra config-file TOML appended verbatim (backend sections).
    pub extra_config: String,
    /// Audit rotation size.
    pub audit_max_bytes: Option<u64>,
    /// Extra environment for the broker process (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
}

impl Broker {
    /// Starts a broker and waits until its socket answers.
    pub fn start(opts: BrokerOptions) -> Broker {
        let dir = tempfile::Builder::new().prefix("piccolo-broker-").tempdir().expect("tempdir");
        // Other users must reach the socket dir inside: make the temp dir traversable.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let socket = dir.path().join("run/broker.sock");
        let policy = dir.path().join("broker.toml");
        let audit = dir.path().join("log/audit.jsonl");
        let config = dir.path().join("broker-config.toml");
        std::fs::create_dir_all(audit.parent().expect("parent")).expect("mkdir log");
        std::fs::write(&policy, &opts.policy).expect("write policy");
        let mut cfg = format!(
            "socket = {:?}\npolicy = {:?}\naudit_log = {:?}\n",
            socket.display().to_string(),
            policy.display().to_string(),
            audit.display().to_string()
        );
        if let Some(g) = &opts.socket_group {
            cfg.push_str(&format!("socket_group = {g:?}\n"));
        }
        if let Some(g) = &opts.audit_group {
            cfg.push_str(&format!("audit_group = {g:?}\n"));
        }
        if let Some(n) = opts.audit_max_bytes {
            cfg.push_str(&format!("audit_max_bytes = {n}\n"));
        }
        cfg.push_str(&opts.extra_config);
        std::fs::write(&config, cfg).expect("write config");
        let stderr = dir.path().join("broker.stderr");
        let mut b = Broker { socket, policy, audit, config, child: None, stderr, dir, env: opts.env };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let child = Command::new(crate::bins::broker())
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.stderr).expect("stderr file"))
            .spawn()
            .expect("spawn broker");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(c) = &mut self.child
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!("broker exited during start ({st}): {}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker did not come up: {}", self.stderr_text());
    }

    /// The broker's pid.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().expect("running").id()).expect("pid fits")
    }

    /// Everything the broker wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("kill");
    }

    /// SIGHUP and wait until the audit log shows the reload's event.
    pub fn reload(&self) {
        let before = self.audit_text().matches("broker.policy_reload").count();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.audit_text().matches("broker.policy_reload").count() == before {
            assert!(Instant::now() < deadline, "no reload event: {}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for exit; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut c = self.child.take().expect("running");
        c.wait().expect("wait broker")
    }

    /// Waits for a broker that was already signalled to exit.
    pub fn stop_wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("running").wait().expect("wait broker")
    }

    /// Starts the broker again with the same files (after [`Broker::stop`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop first");
        self.spawn();
    }

    /// The audit log's records as text (live file only, without the preallocated zeros).
    pub fn audit_text(&self) -> String {
        piccolo_audit::read_log(&self.audit).unwrap_or_default()
    }

    /// Runs `piccoloctl --socket <socket> args...` as `user` (root: as is).
    pub fn ctl_as(&self, user: &str, args: &[&str]) -> Output {
        let socket = self.socket.display().to_string();
        let mut full = vec!["--socket", socket.as_str()];
        full.extend_from_slice(args);
        crate::users::run_as(user, &crate::bins::piccoloctl(), &full)
    }

    /// Path inside the temp dir.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `piccolo-broker --check-policy file`.
pub fn check_policy(file: &Path) -> Output {
    Command::new(crate::bins::broker()).arg("--check-policy").arg(file).output().expect("run broker")
}
