// SPDX-License-Identifier: Apache-2.0
//! `ciphertext/<id>/piccolo.volume.json`: the volume's class, creation time and key check,
//! root-owned 0600, written atomically (temp file, fsync, rename, fsync dir).
//!
//! The key check is HMAC-SHA256(key, "piccolo volume key check v1" || id). gocryptfs itself
//! also refuses a wrong password (exit 12); the check lets a wrong key fail before gocryptfs
//! runs and guards against a volume whose gocryptfs.conf was swapped for one the caller's
//! key happens to open. It reveals nothing about a 256-bit key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Class, Error, Key, VolumeId};

/// File name inside `ciphertext/<id>/`.
pub const META_FILE: &str = "piccolo.volume.json";
/// Metadata format version.
pub const FORMAT: u32 = 1;
const CHECK_LABEL: &[u8] = b"piccolo volume key check v1";
/// Metadata files are tiny; anything larger is refused unread.
const MAX_META: u64 = 4096;

/// What is recorded about a volume at creation.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// [`FORMAT`].
    pub format: u32,
    /// The id (must match the directory name).
    pub id: String,
    /// The class.
    pub class: Class,
    /// The owning user: the creator. gocryptfs (root, `-allow_other`) creates each file as
    /// the calling user, so the tree belongs to one uid and only it may mount the volume.
    pub owner_uid: u32,
    /// The owning user's primary gid at creation.
    pub owner_gid: u32,
    /// The user the files are presented as when another than the owner (an application
    /// volume the persistence owner creates and mounts for the apps worker). Absent: the
    /// owner. Only the owner may mount; the mount and its files appear as this uid:gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presented: Option<(u32, u32)>,
    /// The presented user's name (recorded since archives: an import on other hardware
    /// re-resolves the presented uid:gid by this name, since uids differ between machines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presented_user: Option<String>,
    /// RFC 3339 UTC.
    pub created: String,
    /// Hex HMAC-SHA256 key check.
    pub key_check: String,
}

/// HMAC-SHA256 (RFC 2104) with a 32-byte key.
fn hmac_sha256(key: &[u8; 32], msg: &[&[u8]]) -> [u8; 32] {
    let mut ipad = [0x36u8; 64];
    let mut opad = [0x5cu8; 64];
    for (i, k) in key.iter().enumerate() {
        ipad[i] ^= k;
        opad[i] ^= k;
    }
    let mut inner = Sha256::new();
    inner.update(ipad);
    for m in msg {
        inner.update(m);
    }
    let inner = inner.finalize();
    let mut outer = Sha256::new();
    outer.update(opad);
    outer.update(inner);
    let out = outer.finalize().into();
    zeroize::Zeroize::zeroize(&mut ipad);
    zeroize::Zeroize::zeroize(&mut opad);
    out
}

/// The key check value for `key` on volume `id`.
pub fn key_check(key: &Key, id: &VolumeId) -> String {
    hex::encode(hmac_sha256(key.bytes(), &[CHECK_LABEL, id.as_str().as_bytes()]))
}

impl Meta {
    /// New metadata for a volume being created.
    pub fn new(id: &VolumeId, class: Class, key: &Key, owner_uid: u32, owner_gid: u32) -> Meta {
        let created =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        Meta {
            format: FORMAT,
            id: id.to_string(),
            class,
            owner_uid,
            owner_gid,
            presented: None,
            presented_user: None,
            created,
            key_check: key_check(key, id),
        }
    }

    /// The uid:gid the mount presents files as: [`Meta::presented`], else the owner.
    pub fn presented_as(&self) -> (u32, u32) {
        self.presented.unwrap_or((self.owner_uid, self.owner_gid))
    }

    /// Compares the key check in constant time.
    pub fn key_matches(&self, key: &Key, id: &VolumeId) -> bool {
        let want = key_check(key, id);
        let (a, b) = (want.as_bytes(), self.key_check.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Reads and checks `dir/piccolo.volume.json` of volume `id`.
    pub fn read(dir: &Path, id: &VolumeId) -> Result<Meta, Error> {
        let path = dir.join(META_FILE);
        let bad = |reason: String| Error::Metadata { path: path.clone(), reason };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc_o_nofollow())
            .open(&path)
            .map_err(Error::io("open", &path))?;
        let len = f.metadata().map_err(Error::io("stat", &path))?.len();
        if len > MAX_META {
            return Err(bad(format!("{len} bytes")));
        }
        let meta: Meta = serde_json::from_reader(f).map_err(|e| bad(e.to_string()))?;
        if meta.format != FORMAT {
            return Err(bad(format!("format {} (this broker reads {FORMAT})", meta.format)));
        }
        if meta.id != id.as_str() {
            return Err(bad(format!("records id {:?}", meta.id)));
        }
        Ok(meta)
    }

    /// Writes `dir/piccolo.volume.json` atomically, mode 0600.
    pub fn write(&self, dir: &Path) -> Result<(), Error> {
        let path = dir.join(META_FILE);
        let tmp = dir.join(format!(".{META_FILE}.tmp"));
        let mut text = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Metadata { path: path.clone(), reason: e.to_string() })?;
        text.push(b'\n');
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io("create", &tmp))?;
        f.write_all(&text).map_err(Error::io("write", &tmp))?;
        f.sync_all().map_err(Error::io("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(Error::io("rename", &path))?;
        crate::fsync_dir(dir)
    }
}

/// O_NOFOLLOW, from nix's re-export of the libc constant.
fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231_style_vector() {
        // RFC 4231 test case 2 uses a 4-byte key; pad to 32 bytes with zeros, which HMAC
        // does itself for keys shorter than the block size, so the result is the same.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hex::encode(hmac_sha256(&key, &[b"what do ya want ", b"for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn key_check_depends_on_key_and_id() {
        let id = VolumeId::parse("control").unwrap();
        let other = VolumeId::parse("bootstrap").unwrap();
        let k1 = Key::from_slice(&[1; 32]).unwrap();
        let k2 = Key::from_slice(&[2; 32]).unwrap();
        let m = Meta::new(&id, Class::Control, &k1, 0, 0);
        assert!(m.key_matches(&k1, &id));
        assert!(!m.key_matches(&k2, &id));
        assert!(!m.key_matches(&k1, &other));
    }

    #[test]
    fn write_read_and_refusals() {
        let d = tempfile::tempdir().unwrap();
        let id = VolumeId::parse("app-a").unwrap();
        let m = Meta::new(&id, Class::Application, &Key::from_slice(&[7; 32]).unwrap(), 5, 6);
        m.write(d.path()).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join(META_FILE)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let back = Meta::read(d.path(), &id).unwrap();
        assert_eq!((back.class, back.owner_uid, back.owner_gid), (Class::Application, 5, 6));
        assert_eq!((back.presented, back.presented_as()), (None, (5, 6)));
        let mut p = m.clone();
        p.presented = Some((8, 9));
        p.write(d.path()).unwrap();
        assert_eq!(Meta::read(d.path(), &id).unwrap().presented_as(), (8, 9));
        // The presented user's name round-trips (imports re-resolve it); absent stays absent.
        p.presented_user = Some("piccolo-apps".into());
        p.write(d.path()).unwrap();
        assert_eq!(Meta::read(d.path(), &id).unwrap().presented_user.as_deref(), Some("piccolo-apps"));
        assert!(matches!(Meta::read(d.path(), &VolumeId::parse("app-b").unwrap()), Err(Error::Metadata { .. })));
        std::fs::write(d.path().join(META_FILE), "{\"format\":2}").unwrap();
        assert!(matches!(Meta::read(d.path(), &id), Err(Error::Metadata { .. })));
        std::fs::write(d.path().join(META_FILE), vec![b' '; 5000]).unwrap();
        assert!(matches!(Meta::read(d.path(), &id), Err(Error::Metadata { .. })));
    }
}
