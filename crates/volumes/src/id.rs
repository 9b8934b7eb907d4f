// SPDX-License-Identifier: Apache-2.0
//! Volume ids, classes and keys: the only inputs paths and gocryptfs arguments are built from.

use std::fmt;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::Error;

/// A validated volume id: `[a-z0-9][a-z0-9-]{0,62}`. It can never contain `/`, `.`, or
/// start with `-`, so `<dir>/<id>` is always one new path component and never an option.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct VolumeId(String);

impl VolumeId {
    /// Validates `s`.
    pub fn parse(s: &str) -> Result<VolumeId, Error> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if ok {
            Ok(VolumeId(s.to_owned()))
        } else {
            // The message quotes at most 64 characters of what was sent.
            Err(Error::InvalidId(s.chars().take(64).collect()))
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a volume is for; recorded at creation and reported by status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// Mounted even while the control plane is locked.
    Bootstrap,
    /// The control store.
    Control,
    /// One per application; ids start with `app-`.
    Application,
}

/// Prefix every application volume id has, and only application volumes have: the policy
/// grants the apps worker `app-*`, so it can only ever create application volumes.
pub const APP_PREFIX: &str = "app-";

impl Class {
    /// Lowercase name (`bootstrap`, `control`, `application`).
    pub fn name(self) -> &'static str {
        match self {
            Class::Bootstrap => "bootstrap",
            Class::Control => "control",
            Class::Application => "application",
        }
    }

    /// Refuses class/id pairs that break the `app-` rule.
    pub fn check_id(self, id: &VolumeId) -> Result<(), Error> {
        let app_id = id.as_str().starts_with(APP_PREFIX);
        match (self, app_id) {
            (Class::Application, false) => {
                Err(Error::InvalidClass(format!("application volume ids start with {APP_PREFIX:?}")))
            }
            (Class::Bootstrap | Class::Control, true) => {
                Err(Error::InvalidClass(format!("ids starting with {APP_PREFIX:?} are application volumes")))
            }
            _ => Ok(()),
        }
    }
}

/// A 256-bit volume key, zeroed on drop; `Debug` never shows it.
pub struct Key(Zeroizing<[u8; 32]>);

impl Key {
    /// Copies a 32-byte key (the caller zeroizes its own buffer).
    pub fn from_slice(b: &[u8]) -> Result<Key, Error> {
        let arr: [u8; 32] = b.try_into().map_err(|_| Error::InvalidKeyLength(b.len()))?;
        Ok(Key(Zeroizing::new(arr)))
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The gocryptfs password for this key: 64 lowercase hex digits and a newline, as
    /// written to gocryptfs's stdin (and as an operator types it at the CLI prompt).
    pub(crate) fn password_line(&self) -> Zeroizing<Vec<u8>> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = Zeroizing::new(Vec::with_capacity(65));
        for b in self.0.iter() {
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        }
        out.push(b'\n');
        out
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "0", "control", "app-photos", "a-", &"a".repeat(63)] {
            assert!(VolumeId::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "-a", "A", "../x", "a/b", "a.b", "a b", "é", "a\0", &"a".repeat(64), "app_x", "."] {
            assert!(matches!(VolumeId::parse(bad), Err(Error::InvalidId(_))), "{bad:?}");
        }
    }

    #[test]
    fn class_and_prefix() {
        let app = VolumeId::parse("app-x").unwrap();
        let ctl = VolumeId::parse("control").unwrap();
        assert!(Class::Application.check_id(&app).is_ok());
        assert!(Class::Application.check_id(&ctl).is_err());
        assert!(Class::Control.check_id(&app).is_err());
        assert!(Class::Bootstrap.check_id(&ctl).is_ok());
    }

    #[test]
    fn key_length_and_password() {
        assert!(matches!(Key::from_slice(&[0; 31]), Err(Error::InvalidKeyLength(31))));
        assert!(matches!(Key::from_slice(&[0; 33]), Err(Error::InvalidKeyLength(33))));
        let k = Key::from_slice(&[0xab; 32]).unwrap();
        assert_eq!(&k.password_line()[..], format!("{}\n", "ab".repeat(32)).as_bytes());
        assert_eq!(format!("{k:?}"), "Key(<redacted>)");
    }
}
