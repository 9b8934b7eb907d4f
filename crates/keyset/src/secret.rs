// SPDX-License-Identifier: Apache-2.0
//! Secret holders: zeroed on drop, redacted in `Debug`, no `Display`, no `Clone` unless needed.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Result};

/// Length of the SDEK and of every derived wrapping key, in bytes.
pub const KEY_LEN: usize = 32;
/// Longest password accepted anywhere (bounds the KDF input).
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Shortest password accepted when setting one (unlock accepts any non-empty length).
pub const MIN_NEW_PASSWORD_CHARS: usize = 8;

/// The storage data encryption key: 256 random bits. Volume keys derive from or are wrapped by it.
pub struct Sdek(Zeroizing<[u8; KEY_LEN]>);

impl Sdek {
    /// Draws a fresh SDEK from the OS random number generator.
    pub fn generate() -> Result<Sdek> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(&mut key[..])?;
        Ok(Sdek(key))
    }

    /// Builds an SDEK from exactly [`KEY_LEN`] bytes, e.g. after unwrapping; `None` otherwise.
    pub(crate) fn from_slice(bytes: &[u8]) -> Option<Sdek> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(Sdek(Zeroizing::new(arr)))
    }

    /// The raw key. Callers must not copy it into non-zeroizing storage, log it, or put it in argv.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for Sdek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sdek(<redacted>)")
    }
}

/// A password as typed by the admin. Bounded to [`MAX_PASSWORD_BYTES`].
pub struct Password(Zeroizing<String>);

impl Password {
    /// Takes ownership of a typed password. Empty or over-long input is refused (the input is
    /// zeroed either way).
    pub fn new(password: String) -> Result<Password> {
        let password = Zeroizing::new(password);
        if password.is_empty() {
            return Err(Error::PasswordTooShort { min: 1 });
        }
        if password.len() > MAX_PASSWORD_BYTES {
            return Err(Error::PasswordTooLong { max: MAX_PASSWORD_BYTES });
        }
        Ok(Password(password))
    }

    /// Checks the length policy for a password about to be set.
    pub(crate) fn check_new(&self) -> Result<()> {
        if self.0.chars().count() < MIN_NEW_PASSWORD_CHARS {
            return Err(Error::PasswordTooShort { min: MIN_NEW_PASSWORD_CHARS });
        }
        Ok(())
    }

    /// The password bytes, for the KDF only.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Opaque secret bytes crossing an API boundary (e.g. what a TPM unseal returned).
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes; they are zeroed when the `Secret` drops.
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(Zeroizing::new(bytes))
    }

    /// The raw bytes.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }
}

impl From<&Sdek> for Secret {
    /// Copies the SDEK into a `Secret`, e.g. to hand it to the broker's SealSecret.
    fn from(sdek: &Sdek) -> Secret {
        Secret::new(sdek.expose_secret().to_vec())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<redacted {} bytes>)", self.0.len())
    }
}

/// A derived 256-bit wrapping key; zeroed on drop.
pub(crate) struct WrapKey(pub(crate) Zeroizing<[u8; KEY_LEN]>);

impl WrapKey {
    pub(crate) fn zeroed() -> WrapKey {
        WrapKey(Zeroizing::new([0u8; KEY_LEN]))
    }
}

impl Drop for WrapKey {
    fn drop(&mut self) {
        // Zeroizing already does this; explicit for readers auditing key lifetimes.
        self.0.zeroize();
    }
}

/// Fills `buf` from the OS random number generator (getrandom(2)).
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<()> {
    getrandom::fill(buf).map_err(|source| Error::Random { source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_is_redacted() {
        let sdek = Sdek::generate().unwrap();
        let pw = Password::new("hunter2-correct-horse".into()).unwrap();
        let secret = Secret::new(b"topsecret".to_vec());
        let all = format!("{sdek:?} {pw:?} {secret:?}");
        assert!(!all.contains("hunter2"), "{all}");
        assert!(!all.contains("topsecret"), "{all}");
        assert!(!all.contains(&hex::encode(sdek.expose_secret())), "{all}");
        assert!(all.contains("redacted"));
    }

    #[test]
    fn password_bounds() {
        assert!(matches!(Password::new(String::new()), Err(Error::PasswordTooShort { .. })));
        assert!(matches!(Password::new("x".repeat(MAX_PASSWORD_BYTES + 1)), Err(Error::PasswordTooLong { .. })));
        assert!(Password::new("short".into()).unwrap().check_new().is_err());
        assert!(Password::new("long-enough".into()).unwrap().check_new().is_ok());
    }

    #[test]
    fn generated_sdeks_differ() {
        let a = Sdek::generate().unwrap();
        let b = Sdek::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
