// SPDX-License-Identifier: Apache-2.0
//! The on-disk shape of `crypto/keyset.json` (format `piccolo-keyset`, version 1) and its
//! validation. Binary fields are lowercase hex; there is no base64 anywhere.
//!
//! ```json
//! { "format": "piccolo-keyset", "version": 1, "generation": 3,
//!   "key_id": "<hex SHA-256 fingerprint of the SDEK>",
//!   "created": "<RFC 3339>", "updated": "<RFC 3339>",
//!   "kdf": { "algorithm": "argon2id", "argon2_version": 19,
//!            "m_cost_kib": 65536, "t_cost": 3, "p_cost": 1, "salt": "<16 bytes>" },
//!   "password_wrap": { "nonce": "<12 bytes>", "ciphertext": "<48 bytes>" },
//!   "recovery_wrap": { "kdf": "sha256", "salt": "<16 bytes>", "nonce": "..", "ciphertext": ".." },
//!   "tpm_sealed_sdek": "<opaque broker SealSecret blob>"   // optional
//! }
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kdf::{KdfParams, NONCE_LEN, SALT_LEN};
use crate::secret::KEY_LEN;

/// The `format` field of a key set.
pub const KEYSET_FORMAT: &str = "piccolo-keyset";
/// The only key-set version this build reads and writes.
pub const KEYSET_VERSION: u64 = 1;
/// Largest TPM-sealed blob accepted (a TPM2B private + public pair is well under 2 KiB).
pub const MAX_TPM_BLOB_BYTES: usize = 16 * 1024;
/// AES-GCM tag length.
const TAG_LEN: usize = 16;

/// AAD of the password wrap: binds the format version and the wrap kind.
pub(crate) const AAD_PASSWORD: &[u8] = b"piccolo-keyset\0v1\0password-wrap";
/// AAD of the recovery wrap.
pub(crate) const AAD_RECOVERY: &[u8] = b"piccolo-keyset\0v1\0recovery-wrap";

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeysetFile {
    pub format: String,
    pub version: u64,
    pub generation: u64,
    pub key_id: String,
    pub created: String,
    pub updated: String,
    pub kdf: KdfRecord,
    pub password_wrap: WrapRecord,
    pub recovery_wrap: RecoveryWrapRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm_sealed_sdek: Option<String>,
}

/// Argon2id parameters and salt of the password wrap.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KdfRecord {
    pub algorithm: String,
    pub argon2_version: u32,
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
    pub salt: String,
}

/// One AES-256-GCM wrap of the SDEK.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WrapRecord {
    pub nonce: String,
    pub ciphertext: String,
}

/// The recovery wrap: its own salt (the key is stretched by SHA-256 only, see `kdf`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecoveryWrapRecord {
    pub kdf: String,
    pub salt: String,
    pub nonce: String,
    pub ciphertext: String,
}

/// Only the fields needed to decide whether the file is a version we read.
#[derive(Deserialize)]
pub(crate) struct VersionProbe {
    pub format: String,
    pub version: u64,
}

impl KdfRecord {
    pub(crate) fn params(&self) -> KdfParams {
        KdfParams { m_cost_kib: self.m_cost_kib, t_cost: self.t_cost, p_cost: self.p_cost }
    }
}

impl KeysetFile {
    /// Checks every field's shape; cryptographic checks happen at unlock.
    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: &str| Error::InvalidKeyset { path: path.to_path_buf(), reason: reason.to_string() };
        if self.format != KEYSET_FORMAT || self.version != KEYSET_VERSION {
            return Err(Error::UnsupportedKeysetVersion {
                path: path.to_path_buf(),
                format: self.format.clone(),
                version: self.version,
            });
        }
        if self.kdf.algorithm != "argon2id" || self.kdf.argon2_version != 0x13 {
            return Err(bad("kdf must be argon2id version 19"));
        }
        self.kdf.params().validate()?;
        check_hex(&self.kdf.salt, SALT_LEN).map_err(|()| bad("kdf.salt"))?;
        check_hex(&self.key_id, KEY_LEN).map_err(|()| bad("key_id"))?;
        check_hex(&self.password_wrap.nonce, NONCE_LEN).map_err(|()| bad("password_wrap.nonce"))?;
        check_hex(&self.password_wrap.ciphertext, KEY_LEN + TAG_LEN).map_err(|()| bad("password_wrap.ciphertext"))?;
        if self.recovery_wrap.kdf != "sha256" {
            return Err(bad("recovery_wrap.kdf must be sha256"));
        }
        check_hex(&self.recovery_wrap.salt, SALT_LEN).map_err(|()| bad("recovery_wrap.salt"))?;
        check_hex(&self.recovery_wrap.nonce, NONCE_LEN).map_err(|()| bad("recovery_wrap.nonce"))?;
        check_hex(&self.recovery_wrap.ciphertext, KEY_LEN + TAG_LEN).map_err(|()| bad("recovery_wrap.ciphertext"))?;
        if let Some(blob) = &self.tpm_sealed_sdek {
            let bytes = hex::decode(blob).map_err(|_| bad("tpm_sealed_sdek is not hex"))?;
            if bytes.is_empty() || bytes.len() > MAX_TPM_BLOB_BYTES {
                return Err(bad("tpm_sealed_sdek size"));
            }
        }
        Ok(())
    }
}

/// `s` is lowercase hex of exactly `len` bytes.
fn check_hex(s: &str, len: usize) -> std::result::Result<(), ()> {
    let ok = s.len() == len * 2 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok { Ok(()) } else { Err(()) }
}

/// Decodes a field `validate` already checked.
pub(crate) fn unhex(s: &str) -> Vec<u8> {
    // validate() ran on every KeysetFile before use, so the field is well-formed hex;
    // an empty vector would still fail every cryptographic check safely.
    hex::decode(s).unwrap_or_default()
}
