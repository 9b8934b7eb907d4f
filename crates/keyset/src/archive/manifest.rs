// SPDX-License-Identifier: Apache-2.0
//! The manifest and trailer records, the archive's path rules and the manifest validator.

use std::collections::HashSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::import::ImportLimits;
use crate::error::{Error, Result};
use crate::keyset::KEYSET_RELATIVE_PATH;

/// Name of the first tar entry.
pub(crate) const MANIFEST_NAME: &str = "manifest.json";
/// Name of the last tar entry.
pub(crate) const TRAILER_NAME: &str = "trailer.json";
/// Longest archive path.
pub(crate) const MAX_PATH_BYTES: usize = 4096;
/// Longest path component (the Linux NAME_MAX).
const MAX_COMPONENT_BYTES: usize = 255;
/// Longest ciphertext symlink target (a 4 KiB plaintext target encrypts to ~5.5 KiB base64).
const MAX_SYMLINK_TARGET_BYTES: usize = 8192;
/// Most volumes in one archive.
pub(crate) const MAX_VOLUMES: usize = 64;
/// Longest volume id.
pub const MAX_VOLUME_ID_LEN: usize = 63;
/// Largest trailer entry.
pub(crate) const MAX_TRAILER_BYTES: u64 = 4096;

/// What an export carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// The named volumes' ciphertext and journals; restores onto an appliance that still has
    /// the same key set (the importer checks the key-set id).
    Control,
    /// The same plus the sealed key set, so it restores on new hardware with the export's
    /// password or recovery key.
    Full,
}

impl ExportKind {
    /// `control` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            ExportKind::Control => "control",
            ExportKind::Full => "full",
        }
    }
}

impl fmt::Display for ExportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Manifest {
    pub format: String,
    pub version: u64,
    pub kind: ExportKind,
    pub created: String,
    /// Fingerprint of the SDEK the volumes are encrypted under.
    pub key_id: String,
    pub volumes: Vec<String>,
    pub total_bytes: u64,
    pub entries: Vec<Entry>,
}

/// Only the fields that decide whether the manifest is a version we read.
#[derive(Deserialize)]
pub(crate) struct VersionProbe {
    pub format: String,
    pub version: u64,
}

/// One tree entry, in archive order.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    pub mode: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Entry types the format knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// `trailer.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Trailer {
    pub archive_sha256: String,
    pub archive_bytes: u64,
}

/// The two per-volume areas of the state dir that an archive carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    Ciphertext,
    Volumes,
}

/// Where an archive path lands in the state-dir layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Place<'a> {
    Keyset,
    VolumeRoot(Area, &'a str),
    Inside(Area, &'a str),
}

/// Checks a volume id: `[a-z0-9][a-z0-9_-]*`, at most [`MAX_VOLUME_ID_LEN`] bytes.
pub fn validate_volume_id(id: &str) -> Result<()> {
    let mut bytes = id.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if first_ok && rest_ok && id.len() <= MAX_VOLUME_ID_LEN {
        Ok(())
    } else {
        Err(Error::VolumeIds { reason: format!("{:?} is not a valid volume id", printable(id)) })
    }
}

/// Checks a volume id list: 1..=64 valid, distinct ids.
pub(crate) fn validate_volume_ids(ids: &[String]) -> Result<()> {
    if ids.is_empty() || ids.len() > MAX_VOLUMES {
        return Err(Error::VolumeIds { reason: format!("need 1..={MAX_VOLUMES} volumes, got {}", ids.len()) });
    }
    let mut seen = HashSet::new();
    for id in ids {
        validate_volume_id(id)?;
        if !seen.insert(id.as_str()) {
            return Err(Error::VolumeIds { reason: format!("{id} is listed twice") });
        }
    }
    Ok(())
}

/// Relative, `/`-separated, no empty, `.` or `..` components, no control characters or
/// backslashes, bounded lengths.
pub(crate) fn check_path_syntax(path: &str) -> Result<()> {
    let reject = |reason| Err(Error::PathRejected { path: printable(path), reason });
    if path.is_empty() {
        return reject("is empty");
    }
    if path.len() > MAX_PATH_BYTES {
        return reject("is too long");
    }
    if path.starts_with('/') {
        return reject("is absolute");
    }
    for component in path.split('/') {
        match component {
            "" => return reject("has an empty component"),
            "." => return reject("has a '.' component"),
            ".." => return reject("has a '..' component"),
            c if c.len() > MAX_COMPONENT_BYTES => return reject("has a component over 255 bytes"),
            c if c.chars().any(|ch| ch.is_control() || ch == '\\') => {
                return reject("has a control character or backslash");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Maps a syntactically valid path onto the layout; anything else is refused.
pub(crate) fn classify(path: &str) -> Result<Place<'_>> {
    if path == KEYSET_RELATIVE_PATH {
        return Ok(Place::Keyset);
    }
    let mut parts = path.splitn(3, '/');
    let area = match parts.next() {
        Some("ciphertext") => Area::Ciphertext,
        Some("volumes") => Area::Volumes,
        _ => return Err(Error::PathRejected { path: printable(path), reason: "is outside the export layout" }),
    };
    let id = parts.next().unwrap_or_default();
    if validate_volume_id(id).is_err() {
        return Err(Error::PathRejected { path: printable(path), reason: "does not name a valid volume" });
    }
    Ok(match parts.next() {
        None => Place::VolumeRoot(area, id),
        Some(_) => Place::Inside(area, id),
    })
}

/// A ciphertext symlink target: one base64url name, so it stays inside its directory.
pub(crate) fn check_symlink_target(target: &str) -> bool {
    !target.is_empty()
        && target.len() <= MAX_SYMLINK_TARGET_BYTES
        && target.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
}

/// Lowercase hex of exactly 32 bytes.
pub(crate) fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A path cut to 200 characters with control characters escaped, for error messages.
pub(crate) fn printable(path: &str) -> String {
    let mut out: String = path.chars().take(200).flat_map(char::escape_default).collect();
    if path.chars().count() > 200 {
        out.push_str("...");
    }
    out
}

impl Manifest {
    /// Checks every field, path and cap before anything is written.
    pub(crate) fn validate(&self, limits: &ImportLimits) -> Result<()> {
        let reject = |reason: String| Err(Error::ArchiveRejected { reason });
        if OffsetDateTime::parse(&self.created, &Rfc3339).is_err() {
            return reject("manifest `created` is not an RFC 3339 time".into());
        }
        if !is_sha256_hex(&self.key_id) {
            return reject("manifest `key_id` is not a SHA-256 hex digest".into());
        }
        validate_volume_ids(&self.volumes)?;
        if self.entries.len() as u64 > limits.max_entries {
            return Err(Error::LimitExceeded { what: "entry count", limit: limits.max_entries });
        }
        let volumes: HashSet<&str> = self.volumes.iter().map(String::as_str).collect();
        let mut paths = HashSet::new();
        let mut dirs = HashSet::new();
        let mut roots = HashSet::new();
        let mut has_keyset = false;
        let mut total: u64 = 0;
        for e in &self.entries {
            check_path_syntax(&e.path)?;
            let bad = |reason| Err(Error::PathRejected { path: printable(&e.path), reason });
            if !paths.insert(e.path.as_str()) {
                return bad("appears twice in the manifest");
            }
            if e.mode & !0o777 != 0 {
                return bad("has mode bits beyond 0o777");
            }
            match classify(&e.path)? {
                Place::Keyset if self.kind == ExportKind::Full && e.kind == EntryKind::File => has_keyset = true,
                Place::Keyset => return bad("is only allowed as a file in a full export"),
                Place::VolumeRoot(_, id) | Place::Inside(_, id) if !volumes.contains(id) => {
                    return bad("belongs to a volume not listed in the manifest");
                }
                Place::VolumeRoot(area, _) => {
                    if e.kind != EntryKind::Dir {
                        return bad("must be a directory");
                    }
                    if area == Area::Ciphertext {
                        roots.insert(e.path.as_str());
                    }
                }
                Place::Inside(area, _) => {
                    let parent = e.path.rsplit_once('/').map(|(p, _)| p).unwrap_or_default();
                    if !dirs.contains(parent) {
                        return bad("comes before its parent directory");
                    }
                    if e.kind == EntryKind::Symlink && area != Area::Ciphertext {
                        return bad("is a symlink outside ciphertext");
                    }
                }
            }
            match e.kind {
                EntryKind::File => {
                    if !e.sha256.as_deref().is_some_and(is_sha256_hex) || e.target.is_some() {
                        return bad("is a file without a valid sha256");
                    }
                    if e.size > limits.max_file_bytes {
                        return Err(Error::LimitExceeded { what: "file size", limit: limits.max_file_bytes });
                    }
                    total = total.saturating_add(e.size);
                    if total > limits.max_total_bytes {
                        return Err(Error::LimitExceeded { what: "total size", limit: limits.max_total_bytes });
                    }
                }
                EntryKind::Dir => {
                    if e.size != 0 || e.sha256.is_some() || e.target.is_some() {
                        return bad("is a directory with size, digest or target");
                    }
                    dirs.insert(e.path.as_str());
                }
                EntryKind::Symlink => {
                    if e.size != 0 || e.sha256.is_some() || !e.target.as_deref().is_some_and(check_symlink_target) {
                        return bad("is a symlink whose target is not a single encrypted name");
                    }
                }
            }
        }
        if total != self.total_bytes {
            return reject("manifest `total_bytes` does not match its entries".into());
        }
        for id in &self.volumes {
            if !roots.contains(format!("ciphertext/{id}").as_str()) {
                return reject(format!("volume {id} has no ciphertext directory in the manifest"));
            }
        }
        if self.kind == ExportKind::Full && !has_keyset {
            return reject("a full export must carry crypto/keyset.json".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_syntax() {
        for ok in ["ciphertext/control", "ciphertext/control/gocryptfs.conf", "volumes/a-1/state.json"] {
            check_path_syntax(ok).unwrap();
        }
        for bad in ["", "/etc/passwd", "ciphertext/../x", "ciphertext//x", "./x", "a/.", "a\\b", "a\nb"] {
            assert!(matches!(check_path_syntax(bad), Err(Error::PathRejected { .. })), "{bad:?}");
        }
        assert!(check_path_syntax(&"a/".repeat(3000)).is_err());
    }

    #[test]
    fn layout() {
        assert_eq!(classify("crypto/keyset.json").unwrap(), Place::Keyset);
        assert_eq!(classify("ciphertext/c1").unwrap(), Place::VolumeRoot(Area::Ciphertext, "c1"));
        assert_eq!(classify("volumes/c1/state.json").unwrap(), Place::Inside(Area::Volumes, "c1"));
        for bad in ["crypto/other", "mounts/control/x", "ciphertext/Bad", "exports/full/x", "etc"] {
            assert!(classify(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_ids_and_targets() {
        validate_volume_ids(&["control".into(), "bootstrap".into()]).unwrap();
        assert!(validate_volume_ids(&[]).is_err());
        assert!(validate_volume_ids(&["a".into(), "a".into()]).is_err());
        assert!(validate_volume_id("-a").is_err());
        assert!(validate_volume_id(&"a".repeat(64)).is_err());
        assert!(check_symlink_target("YGhHJuVREHvR2NovjstG5LE22YCRTwATkz7ena0qY5Hohy60PFacnuTxnQ"));
        for bad in ["", "../x", "/etc/shadow", "a/b", "."] {
            assert!(!check_symlink_target(bad), "{bad}");
        }
    }
}
