// SPDX-License-Identifier: Apache-2.0
//! Key derivation and wrapping: Argon2id for passwords (serialised process-wide), SHA-256 for
//! the high-entropy recovery key, AES-256-GCM for the wraps.

use std::sync::{Mutex, PoisonError};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};
use crate::hooks::DerivationGuard;
use crate::secret::{KEY_LEN, Password, WrapKey, fill_random};

/// Salt length for both the Argon2id salt and the recovery-key salt.
pub(crate) const SALT_LEN: usize = 16;
/// AES-GCM nonce length.
pub(crate) const NONCE_LEN: usize = 12;

/// Argon2id cost parameters, as recorded in `crypto/keyset.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory in KiB (Argon2 `m`).
    pub m_cost_kib: u32,
    /// Passes over memory (Argon2 `t`).
    pub t_cost: u32,
    /// Lanes (Argon2 `p`).
    pub p_cost: u32,
}

impl KdfParams {
    /// The production choice: 64 MiB, 3 passes, 1 lane. See the crate docs for why.
    pub const RECOMMENDED: KdfParams = KdfParams { m_cost_kib: 64 * 1024, t_cost: 3, p_cost: 1 };
    /// Smallest memory accepted (8 MiB): below this Argon2id stops being memory-hard in practice.
    pub const MIN_M_COST_KIB: u32 = 8 * 1024;
    /// Largest memory accepted (256 MiB): a key set from elsewhere (an import) must not be able
    /// to make unlock exhaust a 1 GiB board.
    pub const MAX_M_COST_KIB: u32 = 256 * 1024;
    /// Largest pass count accepted (bounds unlock time).
    pub const MAX_T_COST: u32 = 16;
    /// Largest lane count accepted.
    pub const MAX_P_COST: u32 = 8;

    /// Checks the parameters against the accepted ranges.
    pub fn validate(&self) -> Result<()> {
        let ok = (Self::MIN_M_COST_KIB..=Self::MAX_M_COST_KIB).contains(&self.m_cost_kib)
            && (1..=Self::MAX_T_COST).contains(&self.t_cost)
            && (1..=Self::MAX_P_COST).contains(&self.p_cost);
        if ok {
            Ok(())
        } else {
            Err(Error::KdfParamsOutOfRange { m_cost_kib: self.m_cost_kib, t_cost: self.t_cost, p_cost: self.p_cost })
        }
    }
}

impl Default for KdfParams {
    fn default() -> KdfParams {
        KdfParams::RECOMMENDED
    }
}

/// One derivation at a time in this process, so N concurrent wrong guesses cost the memory of
/// one. The guarded value is `()`, so a poisoned lock carries no broken state and is reused.
static KDF_LOCK: Mutex<()> = Mutex::new(());

/// Argon2id(password, salt) -> 256-bit wrapping key. Blocks while another derivation runs.
pub(crate) fn derive_password_key(params: &KdfParams, password: &Password, salt: &[u8]) -> Result<WrapKey> {
    params.validate()?;
    let argon_params = Params::new(params.m_cost_kib, params.t_cost, params.p_cost, Some(KEY_LEN))
        .map_err(|e| Error::DeriveKey { reason: e.to_string() })?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, argon_params);

    let _serial = KDF_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
    let _counted = DerivationGuard::enter();
    // Allocated under the lock so at most one block array exists at a time.
    let mut blocks = vec![Block::default(); argon.params().block_count()];
    let mut key = WrapKey::zeroed();
    let result = argon.hash_password_into_with_memory(password.as_bytes(), salt, &mut key.0[..], &mut blocks);
    // The blocks hold password-dependent state; clear them before the allocator reuses them.
    for block in blocks.iter_mut() {
        block.zeroize();
    }
    drop(blocks);
    result.map_err(|e| Error::DeriveKey { reason: e.to_string() })?;
    Ok(key)
}

/// SHA-256(domain || salt || recovery entropy) -> wrapping key. The recovery key carries 128
/// random bits, so stretching adds nothing against brute force; a plain hash keeps recovery
/// unlock cheap and memory-free.
pub(crate) fn derive_recovery_key(salt: &[u8], entropy: &[u8]) -> WrapKey {
    let mut h = Sha256::new();
    h.update(b"piccolo-keyset v1 recovery-kdf\0");
    h.update(salt);
    h.update(entropy);
    let mut out = h.finalize();
    let mut key = WrapKey::zeroed();
    key.0.copy_from_slice(&out);
    out.zeroize();
    key
}

/// A fresh random salt.
pub(crate) fn new_salt() -> Result<[u8; SALT_LEN]> {
    let mut salt = [0u8; SALT_LEN];
    fill_random(&mut salt)?;
    Ok(salt)
}

/// AES-256-GCM seal of `plaintext` under `key` with a fresh random nonce.
pub(crate) fn seal(key: &WrapKey, aad: &[u8], plaintext: &[u8]) -> Result<([u8; NONCE_LEN], Vec<u8>)> {
    let cipher =
        Aes256Gcm::new_from_slice(&key.0[..]).map_err(|_| Error::DeriveKey { reason: "AES-256 key length".into() })?;
    let mut nonce = [0u8; NONCE_LEN];
    fill_random(&mut nonce)?;
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
        .map_err(|_| Error::DeriveKey { reason: "AES-GCM encryption failed".into() })?;
    Ok((nonce, ct))
}

/// AES-256-GCM open; `None` when the key, nonce, AAD or ciphertext do not match.
pub(crate) fn open(key: &WrapKey, aad: &[u8], nonce: &[u8], ciphertext: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    if nonce.len() != NONCE_LEN {
        return None;
    }
    let cipher = Aes256Gcm::new_from_slice(&key.0[..]).ok()?;
    cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad }).ok().map(Zeroizing::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { m_cost_kib: KdfParams::MIN_M_COST_KIB, t_cost: 1, p_cost: 1 };

    #[test]
    fn recommended_params_are_in_range() {
        KdfParams::RECOMMENDED.validate().unwrap();
    }

    #[test]
    fn out_of_range_params_are_refused() {
        for p in [
            KdfParams { m_cost_kib: 1024, ..FAST },
            KdfParams { m_cost_kib: 1 << 20, ..FAST },
            KdfParams { t_cost: 0, ..FAST },
            KdfParams { t_cost: 100, ..FAST },
            KdfParams { p_cost: 0, ..FAST },
            KdfParams { p_cost: 64, ..FAST },
        ] {
            assert!(matches!(p.validate(), Err(Error::KdfParamsOutOfRange { .. })), "{p:?}");
        }
    }

    #[test]
    fn derivation_is_deterministic_and_salted() {
        let pw = Password::new("correct horse".into()).unwrap();
        let a = derive_password_key(&FAST, &pw, &[1; SALT_LEN]).unwrap();
        let b = derive_password_key(&FAST, &pw, &[1; SALT_LEN]).unwrap();
        let c = derive_password_key(&FAST, &pw, &[2; SALT_LEN]).unwrap();
        assert_eq!(*a.0, *b.0);
        assert_ne!(*a.0, *c.0);
    }

    #[test]
    fn seal_open_binds_aad() {
        let key = derive_recovery_key(&[0; SALT_LEN], &[7; 16]);
        let (nonce, ct) = seal(&key, b"aad-1", b"payload").unwrap();
        assert_eq!(&open(&key, b"aad-1", &nonce, &ct).unwrap()[..], b"payload");
        assert!(open(&key, b"aad-2", &nonce, &ct).is_none());
        let other = derive_recovery_key(&[1; SALT_LEN], &[7; 16]);
        assert!(open(&other, b"aad-1", &nonce, &ct).is_none());
    }
}
