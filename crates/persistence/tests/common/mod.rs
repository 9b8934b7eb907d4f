// SPDX-License-Identifier: Apache-2.0
//! Test backends. [`LocalGocryptfs`] is a real [`VolumeBackend`]: it runs gocryptfs over FUSE
//! directly (the tests run as root), with the same state-dir layout and the same contract as
//! the broker's Volumes service (key on stdin, wrong key refused, idempotent unmount, a dead
//! gocryptfs reported as needs_repair). The broker's own implementation is exercised by the
//! broker-backed tests in `tests/tests/`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use piccolo_keyset::{KdfParams, Password};
use piccolo_persistence::{BrokerError, VolumeBackend, VolumeClass, VolumeInfo, VolumeKey};

pub const FAST: KdfParams = KdfParams { m_cost_kib: KdfParams::MIN_M_COST_KIB, t_cost: 1, p_cost: 1 };
pub const PASSWORD: &str = "correct horse battery";

pub fn pw(s: &str) -> Password {
    Password::new(s.to_string()).unwrap()
}

/// gocryptfs run directly, one `-fg` child per mount.
pub struct LocalGocryptfs {
    state_dir: PathBuf,
    children: Mutex<HashMap<String, Child>>,
    /// Mount in a private mount namespace of its own (`unshare -m`): the broken propagation a
    /// sandboxed unit would see. The daemon keeps that namespace alive; see [`Self::kill_hidden`].
    pub hide_mounts: std::sync::atomic::AtomicBool,
}

fn failed(code: &str, message: impl Into<String>) -> BrokerError {
    BrokerError::Failed { code: code.into(), message: message.into() }
}

/// Whether `mp` is a mount point in this mount namespace.
pub fn is_mounted(mp: &Path) -> bool {
    let target = mp.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

impl LocalGocryptfs {
    pub fn new(state_dir: &Path) -> LocalGocryptfs {
        LocalGocryptfs {
            state_dir: state_dir.to_path_buf(),
            children: Mutex::new(HashMap::new()),
            hide_mounts: Default::default(),
        }
    }

    fn cipher(&self, id: &str) -> PathBuf {
        self.state_dir.join("ciphertext").join(id)
    }

    fn mountpoint(&self, id: &str) -> PathBuf {
        self.state_dir.join("mounts").join(id)
    }

    /// SIGKILLs the gocryptfs process serving `id` (its mount stays behind, dead).
    pub fn kill_gocryptfs(&self, id: &str) {
        let mut children = self.children.lock().unwrap();
        let child = children.get_mut(id).expect("volume is mounted by us");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn create(&self, id: &str, key: &VolumeKey) -> Result<(), BrokerError> {
        let dir = self.cipher(id);
        if dir.exists() {
            return Err(BrokerError::AlreadyExists(format!("volume {id} exists")));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| failed("Internal", e.to_string()))?;
        let mut child = Command::new("gocryptfs")
            .args(["-init", "-q", "-nosyslog", "-scryptn", "10"])
            .arg(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed("Internal", e.to_string()))?;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", hex::encode(key.expose_secret())).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            return Err(failed("Internal", String::from_utf8_lossy(&out.stderr).to_string()));
        }
        Ok(())
    }

    /// Kills the daemons of hidden mounts (their namespaces go with them).
    pub fn kill_hidden(&self) {
        // gocryptfs daemonises by re-executing itself with -notifypid; the visible mounts
        // (run with -fg by this backend) never carry it.
        let pattern = format!("gocryptfs -fg -notifypid=.*{}", self.state_dir.display());
        let _ = Command::new("pkill").arg("-f").arg(pattern).status();
    }

    fn mount_hidden(&self, dir: &Path, mp: &Path, key: &VolumeKey) -> Result<PathBuf, BrokerError> {
        let mut child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "gocryptfs", "-q", "-nosyslog"])
            .arg(dir)
            .arg(mp)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| failed("Internal", e.to_string()))?;
        writeln!(child.stdin.take().unwrap(), "{}", hex::encode(key.expose_secret())).unwrap();
        // Without -fg gocryptfs exits 0 once the mount is up (in the private namespace).
        match child.wait().unwrap().success() {
            true => Ok(mp.to_path_buf()),
            false => Err(failed("Internal", "hidden gocryptfs mount failed")),
        }
    }

    fn mount(&self, id: &str, key: &VolumeKey) -> Result<PathBuf, BrokerError> {
        let dir = self.cipher(id);
        if !dir.join("gocryptfs.conf").exists() {
            return Err(BrokerError::NotFound(format!("volume {id}")));
        }
        let mp = self.mountpoint(id);
        if self.hide_mounts.load(std::sync::atomic::Ordering::SeqCst) {
            std::fs::create_dir_all(&mp).map_err(|e| failed("Internal", e.to_string()))?;
            return self.mount_hidden(&dir, &mp, key);
        }
        if is_mounted(&mp) {
            return Err(failed("FailedPrecondition", format!("volume {id} is already mounted")));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&mp)
            .map_err(|e| failed("Internal", e.to_string()))?;
        let mut child = Command::new("gocryptfs")
            .args(["-fg", "-q", "-nosyslog"])
            .arg(&dir)
            .arg(&mp)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed("Internal", e.to_string()))?;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", hex::encode(key.expose_secret())).unwrap();
        drop(stdin);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if is_mounted(&mp) {
                self.children.lock().unwrap().insert(id.to_string(), child);
                return Ok(mp);
            }
            if let Some(st) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                // gocryptfs exits 12 on a wrong password (here: a wrong volume key).
                return Err(if st.code() == Some(12) {
                    BrokerError::WrongKey("wrong volume key".into())
                } else {
                    failed("Internal", format!("gocryptfs exited {st}: {err}"))
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(failed("DeadlineExceeded", "gocryptfs did not mount"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn unmount(&self, id: &str) -> Result<(), BrokerError> {
        let mp = self.mountpoint(id);
        if is_mounted(&mp) {
            let out = Command::new("fusermount3").arg("-u").arg(&mp).output().unwrap();
            if !out.status.success() {
                // A dead mount (its gocryptfs is gone) can only be detached lazily.
                let dead = self.children.lock().unwrap().get_mut(id).is_none_or(|c| c.try_wait().unwrap().is_some());
                if !dead {
                    return Err(failed("FailedPrecondition", String::from_utf8_lossy(&out.stderr).to_string()));
                }
                let out = Command::new("fusermount3").arg("-uz").arg(&mp).output().unwrap();
                if !out.status.success() {
                    return Err(failed("Internal", String::from_utf8_lossy(&out.stderr).to_string()));
                }
            }
        }
        if let Some(mut child) = self.children.lock().unwrap().remove(id) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    fn status(&self, only: Option<&str>) -> Result<Vec<VolumeInfo>, BrokerError> {
        let mut out = Vec::new();
        let Ok(items) = std::fs::read_dir(self.state_dir.join("ciphertext")) else { return Ok(out) };
        let mut ids: Vec<String> = items.filter_map(|i| i.ok()?.file_name().into_string().ok()).collect();
        ids.sort();
        let mut children = self.children.lock().unwrap();
        for id in ids {
            if only.is_some_and(|o| o != id) {
                continue;
            }
            let mp = self.mountpoint(&id);
            let mounted = is_mounted(&mp);
            let alive = children.get_mut(&id).and_then(|c| c.try_wait().unwrap().is_none().then(|| c.id()));
            let dead_fuse = std::fs::metadata(&mp).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN);
            out.push(VolumeInfo {
                class: None,
                volume_id: id,
                mounted,
                mountpoint: mp,
                gocryptfs_pid: alive.unwrap_or(0),
                needs_repair: mounted && (alive.is_none() || dead_fuse),
            });
        }
        Ok(out)
    }
}

impl Drop for LocalGocryptfs {
    fn drop(&mut self) {
        let ids: Vec<String> = self.children.lock().unwrap().keys().cloned().collect();
        for id in ids {
            let _ = Command::new("fusermount3").arg("-uz").arg(self.mountpoint(&id)).output();
        }
        for (_, mut c) in self.children.lock().unwrap().drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl VolumeBackend for LocalGocryptfs {
    fn create_volume<'a>(
        &'a self,
        id: &'a str,
        _class: VolumeClass,
        key: &'a VolumeKey,
        // Ownership is the broker's business; this root stand-in presents files as root.
        _present_as: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.create(id, key) })
    }
    fn mount_volume<'a>(&'a self, id: &'a str, key: &'a VolumeKey) -> BoxFuture<'a, Result<PathBuf, BrokerError>> {
        Box::pin(async move { self.mount(id, key) })
    }
    fn unmount_volume<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move { self.unmount(id) })
    }
    fn volume_status<'a>(&'a self, id: Option<&'a str>) -> BoxFuture<'a, Result<Vec<VolumeInfo>, BrokerError>> {
        Box::pin(async move { self.status(id) })
    }
    // Root stand-in: the archive code runs in-process on the state dir (the broker runs the
    // same functions as root in production).
    fn export_archive<'a>(
        &'a self,
        kind: piccolo_keyset::ExportKind,
        ids: &'a [String],
        out: std::fs::File,
    ) -> BoxFuture<'a, Result<(std::fs::File, piccolo_keyset::ExportSummary), BrokerError>> {
        let (dir, ids) = (self.state_dir.clone(), ids.to_vec());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut w = std::io::BufWriter::new(out);
                let summary = piccolo_keyset::write_export(&dir, kind, &ids, &mut w).map_err(BrokerError::Archive)?;
                let file = w.into_inner().map_err(|e| failed("Internal", e.to_string()))?;
                Ok((file, summary))
            })
            .await
            .unwrap()
        })
    }
    fn import_archive<'a>(
        &'a self,
        reader: Box<dyn std::io::Read + Send>,
        limits: &'a piccolo_keyset::ImportLimits,
    ) -> BoxFuture<'a, Result<piccolo_keyset::ImportReport, BrokerError>> {
        let (dir, limits) = (self.state_dir.clone(), limits.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                piccolo_keyset::import(reader, &dir, &limits).map_err(BrokerError::Archive)
            })
            .await
            .unwrap()
        })
    }
}

/// Every file under `root` (not following symlinks, skipping `skip`) whose bytes contain `needle`.
pub fn files_containing(root: &Path, needle: &[u8], skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if skip.contains(&dir) {
            continue;
        }
        for item in std::fs::read_dir(&dir).unwrap() {
            let item = item.unwrap();
            let path = item.path();
            let ft = item.file_type().unwrap();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path);
                }
            }
        }
    }
    hits
}

/// Entries inside a directory (an unmounted mountpoint must have none).
pub fn entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(items) => items.map(|i| i.unwrap().file_name().to_string_lossy().to_string()).collect(),
        Err(_) => Vec::new(),
    }
}

/// SealSecret/UnsealSecret the way the broker's Tpm service does them (PCR-7 policy seal),
/// with tpm2-tools against a real swtpm.
pub struct ToolsSealer {
    pub tpm: piccolo_testkit::swtpm::Swtpm,
}

impl ToolsSealer {
    fn run(&self, cwd: &Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let mut child = Command::new(args[0])
            .args(&args[1..])
            .current_dir(cwd)
            .env("TPM2TOOLS_TCTI", self.tpm.tcti())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        if args[0] != "tpm2_flushcontext" {
            self.run(cwd, &["tpm2_flushcontext", "-t"], b"");
            self.run(cwd, &["tpm2_flushcontext", "-s"], b"");
        }
        out
    }

    fn ok(&self, cwd: &Path, args: &[&str], stdin: &[u8]) -> Result<Vec<u8>, BrokerError> {
        let out = self.run(cwd, args, stdin);
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(failed("Internal", format!("{}: {}", args[0], String::from_utf8_lossy(&out.stderr))))
        }
    }

    fn seal(&self, secret: &[u8], pcrs: &[u32]) -> Result<Vec<u8>, BrokerError> {
        assert_eq!(pcrs, [7], "the persistence layer seals to PCR 7");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        self.ok(d, &["tpm2_createprimary", "-Q", "-C", "o", "-c", "prim.ctx"], b"")?;
        self.ok(d, &["tpm2_pcrread", "-Q", "sha256:7", "-o", "pcr.bin"], b"")?;
        self.ok(
            d,
            &["tpm2_createpolicy", "-Q", "--policy-pcr", "-l", "sha256:7", "-f", "pcr.bin", "-L", "pol.dig"],
            b"",
        )?;
        let attrs = "fixedtpm|fixedparent|noda|adminwithpolicy";
        let args = [
            "tpm2_create",
            "-Q",
            "-C",
            "prim.ctx",
            "-L",
            "pol.dig",
            "-a",
            attrs,
            "-i",
            "-",
            "-u",
            "seal.pub",
            "-r",
            "seal.priv",
        ];
        self.ok(d, &args, secret)?;
        let public = std::fs::read(d.join("seal.pub")).unwrap();
        let private = std::fs::read(d.join("seal.priv")).unwrap();
        let mut blob = u16::try_from(public.len()).unwrap().to_be_bytes().to_vec();
        blob.extend_from_slice(&public);
        blob.extend_from_slice(&private);
        Ok(blob)
    }

    fn unseal(&self, blob: &[u8]) -> Result<piccolo_keyset::Secret, BrokerError> {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let len = usize::from(u16::from_be_bytes([blob[0], blob[1]]));
        std::fs::write(d.join("seal.pub"), &blob[2..2 + len]).unwrap();
        std::fs::write(d.join("seal.priv"), &blob[2 + len..]).unwrap();
        self.ok(d, &["tpm2_createprimary", "-Q", "-C", "o", "-c", "prim.ctx"], b"")?;
        self.ok(d, &["tpm2_load", "-Q", "-C", "prim.ctx", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx"], b"")?;
        let out = self.run(d, &["tpm2_unseal", "-c", "seal.ctx", "-p", "pcr:sha256:7"], b"");
        if out.status.success() {
            return Ok(piccolo_keyset::Secret::new(out.stdout));
        }
        let stderr = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
        if stderr.contains("0x99d") {
            // What the broker answers: FAILED_PRECONDITION "PCR policy mismatch".
            Err(BrokerError::PcrMismatch("PCR policy mismatch".into()))
        } else {
            Err(failed("Internal", stderr))
        }
    }
}

impl piccolo_persistence::SealBackend for ToolsSealer {
    fn seal_secret<'a>(
        &'a self,
        secret: &'a piccolo_keyset::Secret,
        pcrs: &'a [u32],
    ) -> BoxFuture<'a, Result<Vec<u8>, BrokerError>> {
        Box::pin(async move { self.seal(secret.expose_secret(), pcrs) })
    }
    fn unseal_secret<'a>(&'a self, blob: &'a [u8]) -> BoxFuture<'a, Result<piccolo_keyset::Secret, BrokerError>> {
        Box::pin(async move { self.unseal(blob) })
    }
}
