// SPDX-License-Identifier: Apache-2.0
//! Variable identity: a validated name and vendor GUID, and the efivarfs file name
//! `<Name>-<guid, lowercase, dashed>` they map to.

use std::fmt;

use crate::Error;

/// Longest variable name accepted, in bytes (rhboot/efivar refuses longer names).
pub const MAX_NAME_BYTES: usize = 1024;

/// The EFI global variable GUID (`BootNext`, `BootOrder`, `Boot####`, ...).
pub const GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// systemd-boot's vendor GUID (`LoaderEntryDefault`, `LoaderEntryOneShot`, ...).
pub const SYSTEMD_BOOT_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// A vendor GUID in canonical form: 36 characters, lowercase hex, dashes at 8, 13, 18, 23.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(String);

impl Guid {
    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex digits of either case) and
    /// lowercases it. Anything else (braces, no dashes, other lengths) is refused.
    pub fn parse(s: &str) -> Result<Guid, Error> {
        let b = s.as_bytes();
        let ok = b.len() == 36
            && b.iter().enumerate().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => *c == b'-',
                _ => c.is_ascii_hexdigit(),
            });
        if !ok {
            return Err(Error::InvalidGuid);
        }
        Ok(Guid(s.to_ascii_lowercase()))
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A variable name: 1 to [`MAX_NAME_BYTES`] ASCII letters, digits, `_`, `-` and `.`; not
/// starting with `.`, never containing `..` or `/`. Every variable piccolo touches
/// (`BootNext`, `Boot0001`, `LoaderEntryOneShot`) fits; names outside this set are refused
/// rather than escaped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarName(String);

impl VarName {
    /// Validates a name.
    pub fn parse(s: &str) -> Result<VarName, Error> {
        if s.is_empty() {
            return Err(Error::InvalidName { reason: "empty" });
        }
        if s.len() > MAX_NAME_BYTES {
            return Err(Error::InvalidName { reason: "longer than 1024 bytes" });
        }
        if !s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.')) {
            return Err(Error::InvalidName { reason: "only ASCII letters, digits, '_', '-' and '.' are allowed" });
        }
        if s.starts_with('.') || s.contains("..") {
            return Err(Error::InvalidName { reason: "must not start with '.' or contain '..'" });
        }
        Ok(VarName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One variable: (name, vendor GUID).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarId {
    /// The name.
    pub name: VarName,
    /// The vendor GUID.
    pub guid: Guid,
}

impl VarId {
    /// Validates both parts.
    pub fn parse(name: &str, guid: &str) -> Result<VarId, Error> {
        Ok(VarId { name: VarName::parse(name)?, guid: Guid::parse(guid)? })
    }

    /// The efivarfs file name, `<Name>-<guid>`; also the policy's `efi_variables` value.
    pub fn file_name(&self) -> String {
        format!("{}-{}", self.name.0, self.guid.0)
    }
}

impl fmt::Display for VarId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.name.0, self.guid.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guids() {
        assert_eq!(Guid::parse("8BE4DF61-93CA-11D2-AA0D-00E098032B8C").unwrap().as_str(), GLOBAL_GUID);
        assert_eq!(Guid::parse(SYSTEMD_BOOT_GUID).unwrap().as_str(), SYSTEMD_BOOT_GUID);
        for bad in [
            "",
            "8be4df6193ca11d2aa0d00e098032b8c",
            "{8be4df61-93ca-11d2-aa0d-00e098032b8c}",
            "8be4df61-93ca-11d2-aa0d-00e098032b8",
            "8be4df61-93ca-11d2-aa0d-00e098032b8cc",
            "8be4df61-93ca-11d2-aa0d_00e098032b8c",
            "8be4df61-93ca-11d2-aa0d-00e098032b8g",
            "8be4df61-93ca-11d2-aa0d-00e098/../8c",
            "8be4df61-93ca-11d2-aa0d-00e09803２b8",
        ] {
            assert!(matches!(Guid::parse(bad), Err(Error::InvalidGuid)), "{bad:?}");
        }
    }

    #[test]
    fn names() {
        for good in ["BootNext", "Boot0001", "LoaderEntryOneShot", "db", "dump-type0-1", "a.b", "x_y"] {
            assert_eq!(VarName::parse(good).unwrap().as_str(), good);
        }
        assert!(VarName::parse(&"A".repeat(1024)).is_ok());
        for bad in [
            "",
            "..",
            ".",
            ".hidden",
            "a..b",
            "a/b",
            "../BootNext",
            "Boot Next",
            "Boot\0Next",
            "Bööt",
            "a\nb",
            &"A".repeat(1025),
        ] {
            assert!(matches!(VarName::parse(bad), Err(Error::InvalidName { .. })), "{bad:?}");
        }
    }

    #[test]
    fn file_name_is_name_dash_lowercase_guid() {
        let id = VarId::parse("BootNext", "8BE4DF61-93CA-11D2-AA0D-00E098032B8C").unwrap();
        assert_eq!(id.file_name(), "BootNext-8be4df61-93ca-11d2-aa0d-00e098032b8c");
        assert_eq!(id.to_string(), id.file_name());
    }
}
