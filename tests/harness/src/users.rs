// SPDX-License-Identifier: Apache-2.0
//! Real system users and groups for peer-credential tests (tests run as root).
//!
//! Creation is idempotent and serialised across test processes with a lock file, since
//! `useradd`/`groupadd` themselves fail when two run at once.

use std::path::Path;
use std::process::{Command, Output};

fn lock() -> nix::fcntl::Flock<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/piccolo-testkit-users.lock")
        .expect("open user lock");
    // Dropping the Flock releases the lock.
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).expect("lock users")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn user tool");
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Ensures system group `name` exists; returns its gid.
pub fn ensure_group(name: &str) -> u32 {
    let _l = lock();
    if let Some(g) = nix::unistd::Group::from_name(name).ok().flatten() {
        return g.gid.as_raw();
    }
    run(Command::new("groupadd").args(["--system", name]));
    nix::unistd::Group::from_name(name).ok().flatten().expect("group created").gid.as_raw()
}

/// Ensures system user `name` exists (no home, nologin) and is in `groups`; returns its uid.
pub fn ensure_user(name: &str, groups: &[&str]) -> u32 {
    for g in groups {
        ensure_group(g);
    }
    let _l = lock();
    if nix::unistd::User::from_name(name).ok().flatten().is_none() {
        run(Command::new("useradd").args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ]));
    }
    for g in groups {
        run(Command::new("usermod").args(["-a", "-G", g, name]));
    }
    nix::unistd::User::from_name(name).ok().flatten().expect("user created").uid.as_raw()
}

/// Creates every group, user and membership a `sysusers.d` file declares.
pub fn apply_sysusers(file: &Path) {
    let text = std::fs::read_to_string(file).expect("read sysusers file");
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["g", name, ..] => {
                ensure_group(name);
            }
            ["u", name, ..] => {
                ensure_user(name, &[]);
            }
            ["m", user, group, ..] => {
                ensure_user(user, &[group]);
            }
            _ => panic!("unsupported sysusers line: {line}"),
        }
    }
}

/// Runs `program args` as `user` (real uid/gid and that user's groups) via `setpriv`.
pub fn run_as(user: &str, program: &Path, args: &[&str]) -> Output {
    let u = nix::unistd::User::from_name(user).ok().flatten().unwrap_or_else(|| panic!("no user {user}"));
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", u.uid))
        .arg(format!("--regid={}", u.gid))
        .arg("--init-groups")
        .arg(program)
        .args(args);
    cmd.output().expect("run setpriv")
}
