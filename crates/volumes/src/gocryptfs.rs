// SPDX-License-Identifier: Apache-2.0
//! Running gocryptfs: `-init` and mount, the password (hex of the key) on stdin only.
//!
//! stdout goes to /dev/null; stderr to an anonymous memfd (no path on any filesystem) so
//! the error text of a failed run can be read back after the foreground process exits.
//! The mount daemon inherits that memfd and keeps writing its (rare, `-q`) warnings there:
//! a pipe would kill the daemon with SIGPIPE once the broker restarts, a file would need a
//! path. The environment is cleared; the key is never in argv or the environment.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::memfd::{MFdFlags, memfd_create};

use crate::{Error, Key};

/// gocryptfs's exit code for a wrong password.
const EXIT_PASSWORD_INCORRECT: i32 = 12;
/// How much of stderr goes into an error message.
const STDERR_TAIL: usize = 2048;

/// How to run gocryptfs.
#[derive(Debug, Clone)]
pub struct Runner {
    /// The gocryptfs binary.
    pub program: PathBuf,
    /// `-scryptn` for `-init`: log2 of scrypt's cost. The password is a uniformly random
    /// 256-bit key, so scrypt adds no strength; a low cost keeps mounts fast and cheap in
    /// memory on small boards (N = 2^16, gocryptfs's default, needs 64 MiB per mount).
    pub scrypt_n: u8,
    /// How long a mount or `-init` may take.
    pub timeout: Duration,
}

impl Default for Runner {
    fn default() -> Self {
        Runner { program: PathBuf::from("/usr/bin/gocryptfs"), scrypt_n: 10, timeout: Duration::from_secs(30) }
    }
}

/// Outcome of one gocryptfs run.
struct Run {
    status: ExitStatus,
    stderr: String,
}

impl Runner {
    /// `gocryptfs -init` of `cipher_dir` (an existing empty directory).
    pub fn init(&self, cipher_dir: &Path, key: &Key) -> Result<(), Error> {
        let scrypt = self.scrypt_n.to_string();
        let mut args = vec!["-init".as_ref(), "-q".as_ref(), "-nosyslog".as_ref(), "-scryptn".as_ref()];
        args.push(scrypt.as_ref());
        args.push("--".as_ref());
        args.push(cipher_dir.as_os_str());
        let r = self.run(&args, key)?;
        if r.status.success() {
            Ok(())
        } else {
            Err(Error::Gocryptfs { step: "init", status: r.status.to_string(), stderr: r.stderr })
        }
    }

    /// Mounts `cipher_dir` on `mount_point`, presenting every file as `uid:gid`. Returns
    /// when the foreground gocryptfs exits, i.e. after its daemon has mounted (or failed).
    pub fn mount(&self, cipher_dir: &Path, mount_point: &Path, uid: u32, gid: u32, key: &Key) -> Result<(), Error> {
        let owner = format!("{uid}:{gid}");
        // -allow_other: the mount is made by root, and FUSE lets only the mounting user in
        // without it; gocryptfs adds default_permissions with it, so the kernel enforces
        // the 0700 root and each file's mode for everyone else.
        let args: Vec<&std::ffi::OsStr> = vec![
            "-q".as_ref(),
            "-nosyslog".as_ref(),
            "-allow_other".as_ref(),
            "-force_owner".as_ref(),
            owner.as_ref(),
            "--".as_ref(),
            cipher_dir.as_os_str(),
            mount_point.as_os_str(),
        ];
        let r = self.run(&args, key)?;
        match r.status.code() {
            Some(0) => Ok(()),
            Some(EXIT_PASSWORD_INCORRECT) => Err(Error::WrongKey),
            _ => Err(Error::Gocryptfs { step: "mount", status: r.status.to_string(), stderr: r.stderr }),
        }
    }

    fn run(&self, args: &[&std::ffi::OsStr], key: &Key) -> Result<Run, Error> {
        let spawn_err = |source| Error::Spawn { program: self.program.clone(), source };
        let memfd =
            memfd_create("gocryptfs-stderr", MFdFlags::MFD_CLOEXEC).map_err(|e| spawn_err(std::io::Error::from(e)))?;
        let errfile = std::fs::File::from(memfd);
        let mut child = Command::new(&self.program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(errfile.try_clone().map_err(spawn_err)?)
            .spawn()
            .map_err(spawn_err)?;
        {
            let mut stdin = child.stdin.take().ok_or_else(|| spawn_err(std::io::Error::other("no stdin pipe")))?;
            let line = key.password_line();
            // A gocryptfs that dies before reading gets EPIPE here; its exit status says why.
            let _ = stdin.write_all(&line);
            // `line` is zeroed on drop; closing stdin marks the end of the password.
        }
        let deadline = Instant::now() + self.timeout;
        let status = loop {
            match child.try_wait().map_err(spawn_err)? {
                Some(st) => break st,
                None if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let st = child.wait().map_err(spawn_err)?;
                    return Ok(Run { status: st, stderr: format!("timed out after {:?}", self.timeout) });
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        let mut buf = vec![0u8; 64 << 10];
        let n = errfile.read_at(&mut buf, 0).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        let text = text.trim();
        let start = text.len().saturating_sub(STDERR_TAIL);
        let start = (start..text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
        Ok(Run { status, stderr: text[start..].replace('\n', "; ") })
    }
}
