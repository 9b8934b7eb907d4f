// SPDX-License-Identifier: Apache-2.0
//! Per-volume keys: HKDF-SHA256 over the SDEK, one key per volume id.
//!
//! `key(id) = HKDF-SHA256(salt = "piccolo-persistence volume-key v1", ikm = SDEK,
//! info = "volume:" ‖ id)`, 32 bytes. Derivation (not wrapping) means no per-volume key
//! material is stored anywhere: rewrapping the SDEK (password change, recovery rotation)
//! leaves every volume key as it is, and a volume key reveals neither the SDEK nor any other
//! volume's key.

use std::fmt;

use hkdf::Hkdf;
use piccolo_keyset::{KEY_LEN, Sdek};
use sha2::Sha256;
use zeroize::Zeroizing;

const SALT: &[u8] = b"piccolo-persistence volume-key v1";

/// A volume's 256-bit key. Zeroed on drop, redacted in `Debug`. It leaves this process only
/// inside a CreateVolume/MountVolume request to the broker.
pub struct VolumeKey(Zeroizing<[u8; KEY_LEN]>);

impl VolumeKey {
    /// Derives the key of `volume_id` from `sdek`.
    pub fn derive(sdek: &Sdek, volume_id: &str) -> VolumeKey {
        let hk = Hkdf::<Sha256>::new(Some(SALT), sdek.expose_secret());
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        let info = [b"volume:".as_slice(), volume_id.as_bytes()].concat();
        // expand only fails for outputs longer than 255 * 32 bytes; 32 is always fine.
        if hk.expand(&info, &mut okm[..]).is_err() {
            unreachable!("HKDF-SHA256 expand of 32 bytes cannot fail");
        }
        VolumeKey(okm)
    }

    /// The raw key, for the broker request only.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_per_volume_and_per_sdek_and_are_stable() {
        let a = Sdek::generate().unwrap();
        let b = Sdek::generate().unwrap();
        let ka = VolumeKey::derive(&a, "control");
        assert_eq!(ka.expose_secret(), VolumeKey::derive(&a, "control").expose_secret());
        assert_ne!(ka.expose_secret(), VolumeKey::derive(&a, "bootstrap").expose_secret());
        assert_ne!(ka.expose_secret(), VolumeKey::derive(&b, "control").expose_secret());
        assert_ne!(ka.expose_secret(), a.expose_secret());
        assert_eq!(format!("{ka:?}"), "VolumeKey(<redacted>)");
    }

    #[test]
    fn matches_rfc5869_construction() {
        // Independent HKDF computation with HMAC-SHA256 by hand (extract, then one expand block).
        use sha2::Digest;
        fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
            let mut k = [0u8; 64];
            if key.len() > 64 {
                k[..32].copy_from_slice(&Sha256::digest(key));
            } else {
                k[..key.len()].copy_from_slice(key);
            }
            let ipad: Vec<u8> = k.iter().map(|b| b ^ 0x36).collect();
            let opad: Vec<u8> = k.iter().map(|b| b ^ 0x5c).collect();
            let inner = Sha256::new().chain_update(&ipad).chain_update(msg).finalize();
            Sha256::new().chain_update(&opad).chain_update(inner).finalize().into()
        }
        let sdek = Sdek::generate().unwrap();
        let prk = hmac(SALT, sdek.expose_secret());
        let okm = hmac(&prk, b"volume:app-1\x01");
        assert_eq!(&okm, VolumeKey::derive(&sdek, "app-1").expose_secret());
    }
}
