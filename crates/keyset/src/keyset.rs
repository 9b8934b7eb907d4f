// SPDX-License-Identifier: Apache-2.0
//! The key set: create, read, unlock (password, recovery key, TPM), and the rewrap operations.
//! Every write replaces `crypto/keyset.json` atomically and leaves the other wraps untouched.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::durable::{fsync_dir, write_file_atomic, write_file_new};
use crate::error::{Error, Result};
use crate::format::{
    AAD_PASSWORD, AAD_RECOVERY, KEYSET_FORMAT, KEYSET_VERSION, KdfRecord, KeysetFile, MAX_TPM_BLOB_BYTES,
    RecoveryWrapRecord, VersionProbe, WrapRecord, unhex,
};
use crate::kdf::{self, KdfParams};
use crate::recovery::RecoveryKey;
use crate::secret::{Password, Sdek, Secret};

/// Where the key set lives, relative to the state dir.
pub const KEYSET_RELATIVE_PATH: &str = "crypto/keyset.json";
/// Where first-run setup keeps its key set until the volumes it protects exist
/// ([`Keyset::create_pending`]); [`Keyset::commit_pending`] moves it to [`KEYSET_RELATIVE_PATH`].
pub const PENDING_KEYSET_RELATIVE_PATH: &str = "crypto/keyset.setup.json";
/// A key set larger than this is refused before parsing.
pub(crate) const MAX_KEYSET_BYTES: u64 = 256 * 1024;

/// A parsed, shape-validated key set. Holds no secret: only wraps and public parameters.
#[derive(Debug, Clone)]
pub struct Keyset {
    path: PathBuf,
    file: KeysetFile,
}

/// What [`Keyset::create`] returns: the recovery key is shown to the admin once, then dropped.
#[derive(Debug)]
pub struct CreatedKeyset {
    /// The key set as written.
    pub keyset: Keyset,
    /// The new SDEK (unlocked).
    pub sdek: Sdek,
    /// The recovery key; only its wrap was stored.
    pub recovery_key: RecoveryKey,
}

/// A recovery key drawn and wrapped but not yet written (see
/// [`Keyset::prepare_recovery_key_rotation`]).
#[derive(Debug)]
pub struct PendingRecoveryKey {
    recovery_key: RecoveryKey,
    wrap: RecoveryWrapRecord,
}

impl PendingRecoveryKey {
    /// The new key, to show the admin before committing.
    pub fn recovery_key(&self) -> &RecoveryKey {
        &self.recovery_key
    }
}

/// Why a TPM unseal callback failed.
#[derive(Debug)]
pub enum TpmUnsealError {
    /// The TPM's PCR 7 no longer matches the sealing policy (Secure Boot state changed).
    PcrMismatch,
    /// Any other failure (broker unreachable, TPM error, ...).
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// The key-set path under `state_dir`.
pub fn keyset_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEYSET_RELATIVE_PATH)
}

/// The public fingerprint of an SDEK: SHA-256 over a domain tag and the key, hex.
/// It identifies which SDEK a key set or an export belongs to and reveals nothing usable.
pub(crate) fn key_id_of(sdek: &Sdek) -> String {
    let digest =
        Sha256::new().chain_update(b"piccolo-keyset v1 key-id\0").chain_update(sdek.expose_secret()).finalize();
    hex::encode(digest)
}

fn now_rfc3339() -> String {
    // Rfc3339 formatting of a UTC timestamp only fails for years outside 0..=9999.
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

impl Keyset {
    /// Creates `crypto/keyset.json` with a new random SDEK, a password wrap and a recovery wrap.
    /// Refuses to overwrite an existing key set.
    pub fn create(state_dir: &Path, password: &Password, params: KdfParams) -> Result<CreatedKeyset> {
        Keyset::create_at(keyset_path(state_dir), state_dir, password, params)
    }

    /// Like [`Keyset::create`], but at [`PENDING_KEYSET_RELATIVE_PATH`]: first-run setup writes
    /// the key set here, creates the volumes under its SDEK, then commits it. A setup that
    /// fails half-way leaves no `keyset.json` (the box is still "not set up") and a retry with
    /// the same password finds the SDEK the volumes were created under.
    pub fn create_pending(state_dir: &Path, password: &Password, params: KdfParams) -> Result<CreatedKeyset> {
        if keyset_path(state_dir).exists() {
            return Err(Error::KeysetExists { path: keyset_path(state_dir) });
        }
        Keyset::create_at(state_dir.join(PENDING_KEYSET_RELATIVE_PATH), state_dir, password, params)
    }

    /// The pending key set of an interrupted setup, if any.
    pub fn read_pending(state_dir: &Path) -> Result<Option<Keyset>> {
        let path = state_dir.join(PENDING_KEYSET_RELATIVE_PATH);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::ReadKeyset { path, source }),
            Ok(_) => Keyset::read_file(&path).map(Some),
        }
    }

    /// Removes the pending key set of an interrupted setup (nothing was ever committed under it).
    pub fn discard_pending(state_dir: &Path) -> Result<()> {
        let path = state_dir.join(PENDING_KEYSET_RELATIVE_PATH);
        let write_err = |source| Error::WriteKeyset { path: path.clone(), source };
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(write_err(e)),
            Ok(()) => fsync_dir(path.parent().unwrap_or(state_dir)).map_err(write_err),
        }
    }

    /// Makes a pending key set the key set: link to `keyset.json` (which must not exist, so a
    /// concurrent or finished setup is never overwritten), drop the pending name, fsync the
    /// directory. A crash in between leaves both names on one file; [`Keyset::read_pending`]
    /// then finds a pending set whose commit already happened, and setup refuses as set up.
    pub fn commit_pending(&mut self, state_dir: &Path) -> Result<()> {
        let path = keyset_path(state_dir);
        let write_err = |source| Error::WriteKeyset { path: path.clone(), source };
        fs::hard_link(&self.path, &path).map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => Error::KeysetExists { path: path.clone() },
            _ => write_err(source),
        })?;
        fs::remove_file(&self.path).map_err(write_err)?;
        fsync_dir(path.parent().unwrap_or(state_dir)).map_err(write_err)?;
        self.path = path;
        Ok(())
    }

    fn create_at(path: PathBuf, state_dir: &Path, password: &Password, params: KdfParams) -> Result<CreatedKeyset> {
        password.check_new()?;
        params.validate()?;
        let sdek = Sdek::generate()?;
        let recovery_key = RecoveryKey::generate()?;
        let (kdf, password_wrap) = wrap_password(&sdek, password, params)?;
        let now = now_rfc3339();
        let file = KeysetFile {
            format: KEYSET_FORMAT.to_string(),
            version: KEYSET_VERSION,
            generation: 1,
            key_id: key_id_of(&sdek),
            created: now.clone(),
            updated: now,
            kdf,
            password_wrap,
            recovery_wrap: wrap_recovery(&sdek, &recovery_key)?,
            tpm_sealed_sdek: None,
        };
        let write_err = |source| Error::WriteKeyset { path: path.clone(), source };
        let dir = path.parent().unwrap_or(state_dir);
        create_private_dir(dir).map_err(write_err)?;
        let bytes = encode(&file).map_err(write_err)?;
        write_file_new(&path, &bytes, 0o600).map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => Error::KeysetExists { path: path.clone() },
            _ => write_err(source),
        })?;
        let keyset = Keyset { path, file };
        Ok(CreatedKeyset { keyset, sdek, recovery_key })
    }

    /// Reads and shape-checks `crypto/keyset.json` under `state_dir`.
    pub fn read(state_dir: &Path) -> Result<Keyset> {
        Keyset::read_file(&keyset_path(state_dir))
    }

    /// Reads and shape-checks a key set at an explicit path (e.g. inside an import staging dir).
    pub fn read_file(path: &Path) -> Result<Keyset> {
        let read_err = |source| Error::ReadKeyset { path: path.to_path_buf(), source };
        let mut bytes = Vec::new();
        File::open(path).map_err(read_err)?.take(MAX_KEYSET_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
        Keyset::from_bytes(path, &bytes)
    }

    /// Parses and shape-checks key-set bytes that were read from `path`.
    pub(crate) fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Keyset> {
        if bytes.len() as u64 > MAX_KEYSET_BYTES {
            return Err(Error::InvalidKeyset { path: path.to_path_buf(), reason: "file too large".into() });
        }
        let parse_err = |source| Error::ParseKeyset { path: path.to_path_buf(), source };
        let probe: VersionProbe = serde_json::from_slice(bytes).map_err(parse_err)?;
        if probe.format != KEYSET_FORMAT || probe.version != KEYSET_VERSION {
            return Err(Error::UnsupportedKeysetVersion {
                path: path.to_path_buf(),
                format: probe.format,
                version: probe.version,
            });
        }
        let file: KeysetFile = serde_json::from_slice(bytes).map_err(parse_err)?;
        file.validate(path)?;
        Ok(Keyset { path: path.to_path_buf(), file })
    }

    /// The public SDEK fingerprint (hex); exports record it so imports can match key sets.
    pub fn key_id(&self) -> &str {
        &self.file.key_id
    }

    /// Increments on every write.
    pub fn generation(&self) -> u64 {
        self.file.generation
    }

    /// The Argon2id parameters of the password wrap.
    pub fn kdf_params(&self) -> KdfParams {
        self.file.kdf.params()
    }

    /// Whether a TPM-sealed SDEK is enrolled.
    pub fn has_tpm_seal(&self) -> bool {
        self.file.tpm_sealed_sdek.is_some()
    }

    /// The file this key set was read from or written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Derives the password key (Argon2id, serialised process-wide) and opens the password wrap.
    pub fn unlock_with_password(&self, password: &Password) -> Result<Sdek> {
        let salt = unhex(&self.file.kdf.salt);
        let key = kdf::derive_password_key(&self.file.kdf.params(), password, &salt)?;
        let w = &self.file.password_wrap;
        let plain =
            kdf::open(&key, AAD_PASSWORD, &unhex(&w.nonce), &unhex(&w.ciphertext)).ok_or(Error::WrongPassword)?;
        self.checked_sdek(&plain, "password wrap")
    }

    /// Opens the recovery wrap. Parse the typed key with [`RecoveryKey::parse`] first: a typo is
    /// [`Error::RecoveryKeyMistyped`] there, a valid but wrong key is [`Error::WrongRecoveryKey`] here.
    pub fn unlock_with_recovery_key(&self, recovery_key: &RecoveryKey) -> Result<Sdek> {
        let w = &self.file.recovery_wrap;
        let key = kdf::derive_recovery_key(&unhex(&w.salt), recovery_key.entropy());
        let plain =
            kdf::open(&key, AAD_RECOVERY, &unhex(&w.nonce), &unhex(&w.ciphertext)).ok_or(Error::WrongRecoveryKey)?;
        self.checked_sdek(&plain, "recovery wrap")
    }

    /// Unlocks with the TPM: `unseal` gets the stored blob (it calls the broker's UnsealSecret)
    /// and returns the unsealed bytes, which must be this key set's SDEK. A PCR mismatch
    /// becomes [`Error::TpmPcrChanged`] ("TPM unlock failed: PCR 7 changed").
    pub fn unlock_with_tpm<E>(&self, unseal: impl FnOnce(&[u8]) -> Result<Secret, E>) -> Result<Sdek>
    where
        E: Into<TpmUnsealError>,
    {
        let blob =
            self.file.tpm_sealed_sdek.as_deref().ok_or_else(|| Error::TpmNotEnrolled { path: self.path.clone() })?;
        let secret = unseal(&unhex(blob)).map_err(|e| match e.into() {
            TpmUnsealError::PcrMismatch => Error::TpmPcrChanged,
            TpmUnsealError::Failed(source) => Error::TpmUnseal { source },
        })?;
        match Sdek::from_slice(secret.expose_secret()) {
            Some(sdek) if key_id_of(&sdek) == self.file.key_id => Ok(sdek),
            _ => Err(Error::TpmWrongSecret),
        }
    }

    /// Rewraps the SDEK under a new password (new salt, same KDF parameters). The recovery
    /// wrap, the TPM blob and all volume data stay as they are.
    pub fn change_password(&mut self, sdek: &Sdek, new_password: &Password) -> Result<()> {
        new_password.check_new()?;
        self.check_sdek(sdek)?;
        let (kdf, password_wrap) = wrap_password(sdek, new_password, self.file.kdf.params())?;
        self.write_next(KeysetFile { kdf, password_wrap, ..self.file.clone() })
    }

    /// Replaces the recovery key in one step and returns the new key, to be shown once; the old
    /// key stops working. Prefer [`Keyset::prepare_recovery_key_rotation`] in interactive flows,
    /// so the new key is shown (and confirmed) before the old one is dropped.
    pub fn rotate_recovery_key(&mut self, sdek: &Sdek) -> Result<RecoveryKey> {
        let pending = self.prepare_recovery_key_rotation(sdek)?;
        let PendingRecoveryKey { recovery_key, wrap } = pending;
        self.write_next(KeysetFile { recovery_wrap: wrap, ..self.file.clone() })?;
        Ok(recovery_key)
    }

    /// First half of a rotation: draws a new recovery key and wraps the SDEK under it without
    /// writing anything. Show [`PendingRecoveryKey::recovery_key`], then call
    /// [`Keyset::commit_recovery_key_rotation`]. A crash in between leaves the old key valid.
    pub fn prepare_recovery_key_rotation(&self, sdek: &Sdek) -> Result<PendingRecoveryKey> {
        self.check_sdek(sdek)?;
        let recovery_key = RecoveryKey::generate()?;
        let wrap = wrap_recovery(sdek, &recovery_key)?;
        Ok(PendingRecoveryKey { recovery_key, wrap })
    }

    /// Second half of a rotation: writes the prepared recovery wrap atomically.
    pub fn commit_recovery_key_rotation(&mut self, pending: PendingRecoveryKey) -> Result<()> {
        self.write_next(KeysetFile { recovery_wrap: pending.wrap, ..self.file.clone() })
    }

    /// Stores the blob the broker's SealSecret produced for this SDEK (sealed to PCR 7).
    pub fn write_tpm_sealed_sdek(&mut self, sdek: &Sdek, blob: &[u8]) -> Result<()> {
        self.check_sdek(sdek)?;
        if blob.is_empty() || blob.len() > MAX_TPM_BLOB_BYTES {
            return Err(Error::TpmBlobSize { size: blob.len(), max: MAX_TPM_BLOB_BYTES });
        }
        self.write_next(KeysetFile { tpm_sealed_sdek: Some(hex::encode(blob)), ..self.file.clone() })
    }

    /// Drops the TPM-sealed SDEK (auto-unlock off).
    pub fn remove_tpm_sealed_sdek(&mut self) -> Result<()> {
        self.write_next(KeysetFile { tpm_sealed_sdek: None, ..self.file.clone() })
    }

    fn check_sdek(&self, sdek: &Sdek) -> Result<()> {
        if key_id_of(sdek) == self.file.key_id { Ok(()) } else { Err(Error::SdekMismatch { path: self.path.clone() }) }
    }

    fn checked_sdek(&self, plain: &[u8], wrap: &str) -> Result<Sdek> {
        match Sdek::from_slice(plain) {
            Some(sdek) if key_id_of(&sdek) == self.file.key_id => Ok(sdek),
            _ => Err(Error::InvalidKeyset {
                path: self.path.clone(),
                reason: format!("{wrap} does not hold the key named by key_id"),
            }),
        }
    }

    /// Writes `next` with the generation bumped; `self` changes only once it is durable.
    fn write_next(&mut self, mut next: KeysetFile) -> Result<()> {
        next.generation = self.file.generation.saturating_add(1);
        next.updated = now_rfc3339();
        encode(&next)
            .and_then(|bytes| write_file_atomic(&self.path, &bytes, 0o600))
            .map_err(|source| Error::WriteKeyset { path: self.path.clone(), source })?;
        self.file = next;
        Ok(())
    }
}

fn wrap_password(sdek: &Sdek, password: &Password, params: KdfParams) -> Result<(KdfRecord, WrapRecord)> {
    let salt = kdf::new_salt()?;
    let key = kdf::derive_password_key(&params, password, &salt)?;
    let (nonce, ct) = kdf::seal(&key, AAD_PASSWORD, sdek.expose_secret())?;
    let record = KdfRecord {
        algorithm: "argon2id".into(),
        argon2_version: 0x13,
        m_cost_kib: params.m_cost_kib,
        t_cost: params.t_cost,
        p_cost: params.p_cost,
        salt: hex::encode(salt),
    };
    Ok((record, WrapRecord { nonce: hex::encode(nonce), ciphertext: hex::encode(ct) }))
}

fn wrap_recovery(sdek: &Sdek, recovery_key: &RecoveryKey) -> Result<RecoveryWrapRecord> {
    let salt = kdf::new_salt()?;
    let key = kdf::derive_recovery_key(&salt, recovery_key.entropy());
    let (nonce, ct) = kdf::seal(&key, AAD_RECOVERY, sdek.expose_secret())?;
    Ok(RecoveryWrapRecord {
        kdf: "sha256".into(),
        salt: hex::encode(salt),
        nonce: hex::encode(nonce),
        ciphertext: hex::encode(ct),
    })
}

fn encode(file: &KeysetFile) -> io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(file).map_err(io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Creates `dir` (mode 0700) if missing and makes its entry durable.
pub(crate) fn create_private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}
