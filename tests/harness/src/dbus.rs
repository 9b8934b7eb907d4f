// SPDX-License-Identifier: Apache-2.0
//! A private `dbus-daemon` with a system-bus-like policy, and the update_engine stand-in
//! (`tests/update-engine-standin`) on it. Both are killed on drop.
//!
//! The policy follows update_engine's `com.coreos.update1.conf` and the project's environment
//! notes: anyone may connect, only root may own `com.coreos.update1` or call it, replies and
//! signals flow, and everyone may talk to the bus itself (Hello, AddMatch, GetNameOwner).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The bus configuration; `{socket}` is replaced by the listen path.
pub const SYSTEM_LIKE_POLICY: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
  </policy>
  <policy user="root">
    <allow own="com.coreos.update1"/>
    <allow send_destination="com.coreos.update1"/>
  </policy>
</busconfig>
"#;

fn wait_line(child: &mut Child, what: &str, prefix: &str) -> String {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let _ = tx.send(r.read_line(&mut line).map(|_| line));
        // Keep reading so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(l)) if l.starts_with(prefix) => l.trim_end().to_owned(),
        other => {
            let _ = child.kill();
            let st = child.wait();
            panic!("{what} did not start ({other:?}, exit {st:?})");
        }
    }
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A private system-like bus.
pub struct SystemBus {
    dir: tempfile::TempDir,
    socket: PathBuf,
    child: Option<Child>,
}

impl SystemBus {
    /// Starts `dbus-daemon` and waits until it prints its address.
    pub fn start() -> SystemBus {
        let dir = tempfile::Builder::new().prefix("piccolo-dbus-").tempdir().expect("tempdir");
        // Other users must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let socket = dir.path().join("system_bus_socket");
        let conf = dir.path().join("sysbus.conf");
        std::fs::write(&conf, SYSTEM_LIKE_POLICY.replace("{socket}", &socket.display().to_string()))
            .expect("write bus config");
        let mut b = SystemBus { dir, socket, child: None };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let mut child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", self.dir.path().join("sysbus.conf").display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn dbus-daemon (package dbus)");
        wait_line(&mut child, "dbus-daemon", "unix:");
        self.child = Some(child);
    }

    /// The address clients connect to (`unix:path=...`).
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }

    /// Kills the bus (every connection on it breaks).
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts the bus again on the same address (after [`SystemBus::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill first");
        self.spawn();
    }

    /// Runs `dbus-send --bus=<this bus> args...` as `user`.
    pub fn dbus_send_as(&self, user: &str, args: &[&str]) -> Output {
        let bus = format!("--bus={}", self.address());
        let mut full = vec![bus.as_str()];
        full.extend_from_slice(args);
        crate::users::run_as(user, Path::new("/usr/bin/dbus-send"), &full)
    }
}

impl Drop for SystemBus {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The update_engine stand-in, running as root on a [`SystemBus`].
pub struct UpdateEngineStandin {
    dir: tempfile::TempDir,
    address: String,
    child: Option<Child>,
    unique_name: String,
}

impl UpdateEngineStandin {
    /// Starts the stand-in and waits until it owns `com.coreos.update1` and has broadcast
    /// its start-up status.
    pub fn start(bus: &SystemBus) -> UpdateEngineStandin {
        let dir = tempfile::Builder::new().prefix("piccolo-ue-").tempdir().expect("tempdir");
        let mut s = UpdateEngineStandin { dir, address: bus.address(), child: None, unique_name: String::new() };
        s.spawn();
        s
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(crate::bins::bin("piccolo-update-engine-standin"));
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--control")
            .arg(self.control_path())
            .arg("--completed-marker")
            .arg(self.marker());
        cmd
    }

    fn spawn(&mut self) {
        let mut child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn stand-in");
        let line = wait_line(&mut child, "update_engine stand-in", "READY ");
        self.unique_name = line.trim_start_matches("READY ").to_owned();
        self.child = Some(child);
    }

    fn control_path(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// The "update completed" marker (stands in for /var/run/update_engine_autoupdate_completed).
    pub fn marker(&self) -> PathBuf {
        self.dir.path().join("update_engine_autoupdate_completed")
    }

    /// The stand-in's unique bus name.
    pub fn unique_name(&self) -> &str {
        &self.unique_name
    }

    /// Sends one control command and returns the answer line.
    pub fn control(&self, line: &str) -> String {
        let mut s = UnixStream::connect(self.control_path()).expect("connect stand-in control");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        writeln!(s, "{line}").expect("write control");
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).expect("read control");
        let answer = answer.trim_end().to_owned();
        assert!(!answer.starts_with("error"), "stand-in: {line}: {answer}");
        answer
    }

    /// Sets the state (`set OP PROGRESS VERSION SIZE`); true if it broadcast `StatusUpdate`.
    pub fn set(&self, op: &str, progress: f64, version: &str, size: i64) -> bool {
        self.control(&format!("set {op} {progress} {version} {size}")) == "ok broadcast"
    }

    /// The current `current_operation`.
    pub fn operation(&self) -> String {
        self.control("status").split_whitespace().nth(2).expect("status has an operation").to_owned()
    }

    /// Call counters (`get=N attempt=N attempt_skipped=N reset=N reset_refused=N`).
    pub fn calls(&self) -> String {
        self.control("calls")
    }

    /// Kills the stand-in (SIGKILL: update_engine crashing); its name leaves the bus.
    pub fn kill(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again (after [`UpdateEngineStandin::kill`]); state restarts from the marker.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill first");
        self.spawn();
    }

    /// Runs the stand-in as `user` on `bus` for at most `limit`: returns `None` if it was
    /// still running (it took the name), or its output if it exited.
    pub fn try_as(user: &str, bus: &SystemBus, limit: Duration) -> Option<Output> {
        let u = nix::unistd::User::from_name(user).ok().flatten().unwrap_or_else(|| panic!("no user {user}"));
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={}", u.uid))
            .arg(format!("--regid={}", u.gid))
            .arg("--init-groups")
            .arg(crate::bins::bin("piccolo-update-engine-standin"))
            .arg("--address")
            .arg(bus.address())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn stand-in as user");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if child.try_wait().expect("try_wait").is_some() {
                return Some(child.wait_with_output().expect("output"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for UpdateEngineStandin {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
