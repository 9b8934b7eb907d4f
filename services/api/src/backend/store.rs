// SPDX-License-Identifier: Apache-2.0
//! Interim control store: one small key-value file, AES-256-GCM encrypted under a key derived
//! from the SDEK, at `ciphertext/api-store/store.bin` (so it is ciphertext at rest, unreadable
//! while locked, and travels in exports like any volume). It holds only the API's own records
//! (the JWT signing key). `crates/persistence`'s SQLite control store replaces it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use piccolo_keyset::Sdek;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The interim store's volume id (a directory under `ciphertext/`).
pub const STORE_VOLUME: &str = "api-store";
const FILE_NAME: &str = "store.bin";
const AAD: &[u8] = b"piccolo-api interim store v1";
const NONCE_LEN: usize = 12;
/// A store file larger than this is refused before decryption.
const MAX_STORE_BYTES: u64 = 1 << 20;

/// The decrypted store while unlocked.
pub struct Store {
    path: PathBuf,
    key: Zeroizing<[u8; 32]>,
    values: BTreeMap<String, String>,
}

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading the file failed.
    #[error("cannot read control store {0}")]
    Read(PathBuf, #[source] io::Error),
    /// Writing the file durably failed.
    #[error("cannot write control store {0}")]
    Write(PathBuf, #[source] io::Error),
    /// The file does not decrypt under this SDEK or is malformed.
    #[error("control store {0} does not open under this key set")]
    Corrupt(PathBuf),
}

fn derive_key(sdek: &Sdek) -> Zeroizing<[u8; 32]> {
    let digest =
        Sha256::new().chain_update(b"piccolo-api store key v1\0").chain_update(sdek.expose_secret()).finalize();
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&digest);
    key
}

impl Store {
    /// Opens (or, if absent, starts empty) the store under `state_dir` with `sdek`.
    pub fn open(state_dir: &Path, sdek: &Sdek) -> Result<Store, StoreError> {
        let path = state_dir.join("ciphertext").join(STORE_VOLUME).join(FILE_NAME);
        let key = derive_key(sdek);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(f) => {
                f.take(MAX_STORE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| StoreError::Read(path.clone(), e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Store { path, key, values: BTreeMap::new() });
            }
            Err(e) => return Err(StoreError::Read(path, e)),
        }
        if bytes.len() as u64 > MAX_STORE_BYTES || bytes.len() < NONCE_LEN {
            return Err(StoreError::Corrupt(path));
        }
        let cipher = Aes256Gcm::new_from_slice(&key[..]).map_err(|_| StoreError::Corrupt(path.clone()))?;
        let (nonce, ct) = bytes.split_at(NONCE_LEN);
        let plain = Zeroizing::new(
            cipher
                .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: AAD })
                .map_err(|_| StoreError::Corrupt(path.clone()))?,
        );
        let values = serde_json::from_slice(&plain).map_err(|_| StoreError::Corrupt(path.clone()))?;
        Ok(Store { path, key, values })
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.values.get(key).and_then(|v| STANDARD.decode(v).ok())
    }

    /// Sets `key` and writes the whole store atomically (temp, fsync, rename, fsync dir).
    pub fn put(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut next = self.values.clone();
        next.insert(key.to_string(), STANDARD.encode(value));
        self.write(&next)?;
        self.values = next;
        Ok(())
    }

    /// Writes the current contents (used at creation so the file exists).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.write(&self.values)
    }

    fn write(&self, values: &BTreeMap<String, String>) -> Result<(), StoreError> {
        let werr = |e| StoreError::Write(self.path.clone(), e);
        let plain = Zeroizing::new(serde_json::to_vec(values).map_err(|e| werr(io::Error::other(e)))?);
        let cipher = Aes256Gcm::new_from_slice(&self.key[..]).map_err(|e| werr(io::Error::other(e.to_string())))?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| werr(io::Error::other(e.to_string())))?;
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: &plain, aad: AAD })
            .map_err(|e| werr(io::Error::other(e.to_string())))?;
        let dir = self.path.parent().ok_or_else(|| werr(io::Error::other("store path has no parent")))?;
        if let Some(ciphertext) = dir.parent() {
            make_dir(ciphertext).map_err(werr)?;
        }
        make_dir(dir).map_err(werr)?;
        let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(werr)?;
        f.write_all(&nonce).and_then(|()| f.write_all(&ct)).and_then(|()| f.sync_all()).map_err(werr)?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(werr)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(werr)
    }
}

fn make_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}
