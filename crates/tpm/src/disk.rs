// SPDX-License-Identifier: Apache-2.0
//! LUKS2 TPM2 enrollment through `systemd-cryptenroll` (systemd 252 on the build host).
//!
//! Every option is pinned: `--tpm2-device=<the broker's TCTI>` (252 accepts `driver:conf`
//! TCTI strings as well as device paths), `--tpm2-pcrs=`, `--tpm2-with-pin=no`,
//! `--tpm2-public-key-pcrs=` (empty: no signed-policy enrollment even if a default public
//! key file exists) and `--unlock-key-file=` naming a 0600 file inside a fresh 0700
//! directory, removed afterwards. The key never appears on argv or in the environment; the
//! tools run with a cleared environment.
//!
//! Partitions are named, never given as paths: a name must match `[a-z][a-z0-9]{0,31}`
//! and resolve to a block device directly inside the configured device directory
//! (`/dev`). The policy's `partitions` constraint decides which names a caller may use.
//!
//! Re-sealing to *expected* PCR values: systemd-cryptenroll 252 seals to the PCRs'
//! current values only (literal values in `--tpm2-pcrs` arrived in later systemd), so
//! [`reseal`] writes the keyslot and `systemd-tpm2` token itself; see there.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::Value;
use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// How long one tool run may take before it is killed.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// LUKS keys the broker accepts (cryptsetup's own passphrase limit is 512 bytes by default).
pub const MAX_UNLOCK_KEY: usize = 512;

/// Where the tools and devices are.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// Directory partition names resolve in (`/dev`).
    pub dev_dir: PathBuf,
    /// `systemd-cryptenroll`.
    pub cryptenroll: PathBuf,
    /// `cryptsetup`.
    pub cryptsetup: PathBuf,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            dev_dir: "/dev".into(),
            cryptenroll: "/usr/bin/systemd-cryptenroll".into(),
            cryptsetup: "/usr/sbin/cryptsetup".into(),
        }
    }
}

/// Result of an enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The new TPM2 keyslot.
    pub keyslot: i32,
    /// TPM2 keyslots wiped (reseal only).
    pub wiped: Vec<i32>,
}

/// Checks a partition name's shape (before the policy looks at it).
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The block device for `name`: `dev_dir/name`, which must be a block device (no symlink).
pub fn resolve(cfg: &DiskConfig, name: &str) -> Result<PathBuf> {
    if !valid_name(name) {
        return Err(Error::InvalidArgument(format!(
            "partition name {:?} must match [a-z][a-z0-9]{{0,31}}",
            name.chars().take(40).collect::<String>()
        )));
    }
    let path = cfg.dev_dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_block_device() => Ok(path),
        Ok(_) => Err(Error::InvalidArgument(format!("{name:?} is not a block device"))),
        Err(_) => Err(Error::PartitionNotFound(name.to_owned())),
    }
}

fn validate_key(key: &[u8]) -> Result<()> {
    if key.is_empty() || key.len() > MAX_UNLOCK_KEY {
        return Err(Error::InvalidArgument(format!("unlock key must be 1..={MAX_UNLOCK_KEY} bytes")));
    }
    Ok(())
}

/// The unlock key in a 0600 file inside a fresh 0700 directory; both removed on drop.
struct KeyFile {
    dir: tempfile::TempDir,
}

impl KeyFile {
    fn new(key: &[u8]) -> Result<KeyFile> {
        let dir = tempfile::Builder::new().prefix("piccolo-tpm-").tempdir().map_err(Error::KeyFile)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode_0600()
            .open(dir.path().join("key"))
            .map_err(Error::KeyFile)?;
        f.write_all(key).map_err(Error::KeyFile)?;
        Ok(KeyFile { dir })
    }
    fn path(&self) -> PathBuf {
        self.dir.path().join("key")
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        // Overwrite before unlinking; the TempDir removes the directory afterwards.
        if let Ok(m) = std::fs::metadata(self.path()) {
            let len = usize::try_from(m.len()).unwrap_or(0);
            let _ = std::fs::write(self.path(), vec![0u8; len]);
        }
        let _ = std::fs::remove_file(self.path());
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

struct Run {
    ok: bool,
    status: String,
    stdout: String,
    stderr: String,
}

/// Runs a tool with a cleared environment, no stdin, and a deadline.
fn run(tool: &'static str, program: &Path, args: &[String]) -> Result<Run> {
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C")
        .env("SYSTEMD_LOG_LEVEL", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn { tool, source })?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait().map_err(|source| Error::Spawn { tool, source })? {
            Some(st) => break st,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Tool { tool, status: "killed after 120 s".into(), stderr: String::new() });
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Ok(Run {
        ok: status.success(),
        status: status.to_string(),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

fn checked(tool: &'static str, r: Run) -> Result<Run> {
    if r.ok { Ok(r) } else { Err(Error::Tool { tool, status: r.status, stderr: tail(&r.stderr) }) }
}

/// LUKS2 metadata of `dev` as JSON.
fn dump(cfg: &DiskConfig, name: &str, dev: &Path) -> Result<Value> {
    let r = run("cryptsetup", &cfg.cryptsetup, &["isLuks".into(), "--type".into(), "luks2".into(), path_arg(dev)])?;
    if !r.ok {
        return Err(Error::NotLuks2(name.to_owned()));
    }
    let r = checked(
        "cryptsetup",
        run("cryptsetup", &cfg.cryptsetup, &["luksDump".into(), "--dump-json-metadata".into(), path_arg(dev)])?,
    )?;
    serde_json::from_str(&r.stdout).map_err(|_| Error::Tool {
        tool: "cryptsetup",
        status: "ok".into(),
        stderr: "luksDump --dump-json-metadata is not JSON".into(),
    })
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

fn keyslots(meta: &Value) -> Vec<i32> {
    let mut v: Vec<i32> =
        meta["keyslots"].as_object().map(|m| m.keys().filter_map(|k| k.parse().ok()).collect()).unwrap_or_default();
    v.sort_unstable();
    v
}

/// Keyslots referenced by `systemd-tpm2` tokens.
pub fn tpm2_keyslots(meta: &Value) -> Vec<i32> {
    let mut v: Vec<i32> = meta["tokens"]
        .as_object()
        .map(|m| {
            m.values()
                .filter(|t| t["type"] == "systemd-tpm2")
                .flat_map(|t| t["keyslots"].as_array().cloned().unwrap_or_default())
                .filter_map(|k| k.as_str().and_then(|s| s.parse().ok()))
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v.dedup();
    v
}

fn check_unlock_key(cfg: &DiskConfig, name: &str, dev: &Path, key: &KeyFile) -> Result<()> {
    let args = ["open".into(), "--test-passphrase".into(), "--key-file".into(), path_arg(&key.path()), path_arg(dev)];
    let r = run("cryptsetup", &cfg.cryptsetup, &args)?;
    if r.ok { Ok(()) } else { Err(Error::UnlockKeyRejected(name.to_owned())) }
}

fn cryptenroll(cfg: &DiskConfig, tcti: &str, dev: &Path, pcrs: &[u32], key: &KeyFile) -> Result<Run> {
    let pcr_list = pcrs.iter().map(u32::to_string).collect::<Vec<_>>().join("+");
    let mut args = vec![
        format!("--tpm2-device={tcti}"),
        format!("--tpm2-pcrs={pcr_list}"),
        "--tpm2-with-pin=no".into(),
        "--tpm2-public-key-pcrs=".into(),
        format!("--unlock-key-file={}", key.path().display()),
    ];
    args.push(path_arg(dev));
    checked("systemd-cryptenroll", run("systemd-cryptenroll", &cfg.cryptenroll, &args)?)
}

/// Enrolls a TPM2 keyslot bound to the current values of `pcrs` (validated by the caller).
pub fn enroll(cfg: &DiskConfig, tcti: &str, name: &str, pcrs: &[u32], unlock_key: &[u8]) -> Result<Enrolled> {
    enroll_inner(cfg, tcti, name, pcrs, unlock_key)
}

fn enroll_inner(cfg: &DiskConfig, tcti: &str, name: &str, pcrs: &[u32], unlock_key: &[u8]) -> Result<Enrolled> {
    validate_key(unlock_key)?;
    let dev = resolve(cfg, name)?;
    let before = dump(cfg, name, &dev)?;
    let key = KeyFile::new(&Zeroizing::new(unlock_key.to_vec()))?;
    check_unlock_key(cfg, name, &dev, &key)?;
    cryptenroll(cfg, tcti, &dev, pcrs, &key)?;
    drop(key);
    let after = dump(cfg, name, &dev)?;
    let (b, a) = (keyslots(&before), keyslots(&after));
    let new: Vec<i32> = a.iter().copied().filter(|k| !b.contains(k)).collect();
    let tpm2_now = tpm2_keyslots(&after);
    match new.as_slice() {
        [k] if tpm2_now.contains(k) => Ok(Enrolled { keyslot: *k, wiped: Vec::new() }),
        _ => Err(Error::Tool {
            tool: "systemd-cryptenroll",
            status: "ok".into(),
            stderr: format!("expected one new systemd-tpm2 keyslot, keyslots before {b:?}, after {a:?}"),
        }),
    }
}

/// What [`reseal`] needs from the TPM: a systemd `tpm2-blob` sealing `secret` to `values`.
pub type SealFn<'a> = &'a mut dyn FnMut(&[u8], &[(u32, [u8; 32])]) -> Result<Vec<u8>>;

/// Adds a TPM2 keyslot bound to `expected` (index → sha256 value, e.g. the values after a
/// planned firmware update), then wipes the old TPM2 keyslots.
///
/// systemd-cryptenroll 252 can only seal to the PCRs' *current* values, so this writes
/// what it would write, itself: a random 32-byte secret sealed under systemd's ECC storage
/// key template with a PolicyPCR digest of the expected values (`seal`), the keyslot
/// passphrase `base64(secret)` added with `cryptsetup luksAddKey` (PBKDF2, 1000
/// iterations, as systemd does for high-entropy TPM keys), and a `systemd-tpm2` token
/// (`cryptsetup token import`) that systemd-cryptsetup 252 unlocks with. Old TPM2 slots
/// and their tokens are then removed with `systemd-cryptenroll --wipe-slot=`. If the token
/// cannot be written, the new keyslot is removed again.
pub fn reseal(
    cfg: &DiskConfig,
    name: &str,
    expected: &[(u32, [u8; 32])],
    unlock_key: &[u8],
    seal: SealFn<'_>,
) -> Result<Enrolled> {
    validate_key(unlock_key)?;
    let dev = resolve(cfg, name)?;
    let before = dump(cfg, name, &dev)?;
    let key = KeyFile::new(&Zeroizing::new(unlock_key.to_vec()))?;
    check_unlock_key(cfg, name, &dev, &key)?;
    let old = tpm2_keyslots(&before);
    let used = keyslots(&before);
    let slot = (0..32).find(|k| !used.contains(k)).ok_or_else(|| Error::Tool {
        tool: "cryptsetup",
        status: "ok".into(),
        stderr: "no free LUKS2 keyslot".into(),
    })?;

    let mut secret = Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut secret[..]).map_err(|e| Error::KeyFile(std::io::Error::other(e.to_string())))?;
    let blob = seal(&secret[..], expected)?;
    let passphrase = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(&secret[..]));
    let new_key = KeyFile::new(passphrase.as_bytes())?;
    let add = [
        "luksAddKey".into(),
        "--batch-mode".into(),
        "--pbkdf".into(),
        "pbkdf2".into(),
        "--pbkdf-force-iterations".into(),
        "1000".into(),
        "--hash".into(),
        "sha512".into(),
        "--key-slot".into(),
        slot.to_string(),
        "--key-file".into(),
        path_arg(&key.path()),
        path_arg(&dev),
        path_arg(&new_key.path()),
    ];
    checked("cryptsetup", run("cryptsetup", &cfg.cryptsetup, &add)?)?;
    drop(new_key);
    drop(key);

    let mut indices: Vec<u32> = expected.iter().map(|(i, _)| *i).collect();
    indices.sort_unstable();
    let token = serde_json::json!({
        "type": "systemd-tpm2",
        "keyslots": [slot.to_string()],
        "tpm2-blob": base64::engine::general_purpose::STANDARD.encode(&blob),
        "tpm2-pcrs": indices,
        "tpm2-pcr-bank": "sha256",
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": hex::encode(crate::pcr::policy_digest(expected)),
        "tpm2-pin": false,
    });
    let token_file = KeyFile::new(token.to_string().as_bytes())?;
    let import = ["token".into(), "import".into(), "--json-file".into(), path_arg(&token_file.path()), path_arg(&dev)];
    if let Err(e) = run("cryptsetup", &cfg.cryptsetup, &import).and_then(|r| checked("cryptsetup", r)) {
        let kill = ["luksKillSlot".into(), "--batch-mode".into(), path_arg(&dev), slot.to_string()];
        let _ = run("cryptsetup", &cfg.cryptsetup, &kill);
        return Err(e);
    }
    if !old.is_empty() {
        let wipe =
            [format!("--wipe-slot={}", old.iter().map(i32::to_string).collect::<Vec<_>>().join(",")), path_arg(&dev)];
        checked("systemd-cryptenroll", run("systemd-cryptenroll", &cfg.cryptenroll, &wipe)?)?;
    }
    let after = dump(cfg, name, &dev)?;
    let now = tpm2_keyslots(&after);
    if now != vec![slot] {
        return Err(Error::Tool {
            tool: "cryptsetup",
            status: "ok".into(),
            stderr: format!("after reseal the TPM2 keyslots are {now:?}, expected [{slot}]"),
        });
    }
    Ok(Enrolled { keyslot: slot, wiped: old })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_are_strict() {
        for ok in ["sda3", "nvme0n1p3", "mmcblk0p2", "vda1", "loop7"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "../sda", "sda/1", "Sda", "1sda", "sda 1", "mapper", &"a".repeat(33)] {
            assert!(bad == "mapper" || !valid_name(bad), "{bad}");
        }
        let cfg = DiskConfig::default();
        assert!(matches!(resolve(&cfg, "../etc/passwd"), Err(Error::InvalidArgument(_))));
        assert!(matches!(resolve(&cfg, "null"), Err(Error::InvalidArgument(_))), "char device refused");
        assert!(matches!(resolve(&cfg, "nosuchdisk9"), Err(Error::PartitionNotFound(_))));
    }

    #[test]
    fn token_keyslots_from_metadata() {
        let meta: Value = serde_json::json!({
            "keyslots": {"0": {}, "1": {}, "2": {}},
            "tokens": {"0": {"type": "systemd-tpm2", "keyslots": ["1"]}, "1": {"type": "other", "keyslots": ["2"]}}
        });
        assert_eq!(keyslots(&meta), vec![0, 1, 2]);
        assert_eq!(tpm2_keyslots(&meta), vec![1]);
    }
}
