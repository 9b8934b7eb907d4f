// SPDX-License-Identifier: Apache-2.0
//! `volumes/<id>/state.json`: the per-volume journal (desired and observed mount state, role,
//! repair flag, timestamps), written atomically. It holds no secret: it may sit on the host
//! root next to the ciphertext and travels in exports.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use piccolo_store::Role;
use serde::{Deserialize, Serialize};

use crate::broker::VolumeClass;
use crate::durable::{private_dir, write_atomic};
use crate::error::{Error, Result};

/// Journal format version.
pub const JOURNAL_VERSION: u32 = 1;
/// A journal larger than this is refused.
const MAX_JOURNAL_BYTES: u64 = 64 * 1024;

/// What the state machine wants for a volume while unlocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    /// Mounted whenever unlocked (bootstrap: also while locked, once mounted).
    Mounted,
    /// Not mounted.
    Unmounted,
}

/// What was last observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    /// Mounted and served.
    Mounted,
    /// Not mounted.
    Unmounted,
    /// Never observed.
    Unknown,
}

/// One volume's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// [`JOURNAL_VERSION`].
    pub version: u32,
    /// The volume id.
    pub volume_id: String,
    /// Its class.
    pub class: VolumeClass,
    /// Desired state.
    pub desired: Desired,
    /// Last observed state.
    pub observed: Observed,
    /// The node role it was last mounted for.
    pub role: Role,
    /// The gocryptfs process died (or the mount is dead): the volume needs a remount.
    pub needs_repair: bool,
    /// RFC 3339 creation time.
    pub created: String,
    /// RFC 3339 time of the last change to this record.
    pub updated: String,
    /// RFC 3339 time of the last successful mount.
    pub last_mounted: Option<String>,
    /// The last error bringing it to the desired state, if any.
    pub last_error: Option<String>,
}

/// `volumes/<id>/state.json` under `state_dir`.
pub fn journal_path(state_dir: &Path, volume_id: &str) -> PathBuf {
    state_dir.join("volumes").join(volume_id).join("state.json")
}

/// Reads one journal; `None` if the volume has none.
pub fn read(state_dir: &Path, volume_id: &str) -> Result<Option<VolumeRecord>> {
    let path = journal_path(state_dir, volume_id);
    let err = |source| Error::Journal { path: path.clone(), source };
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    if meta.len() > MAX_JOURNAL_BYTES {
        return Err(err(io::Error::new(io::ErrorKind::InvalidData, "journal too large")));
    }
    let bytes = fs::read(&path).map_err(err)?;
    let rec: VolumeRecord =
        serde_json::from_slice(&bytes).map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
    if rec.version != JOURNAL_VERSION || rec.volume_id != volume_id {
        return Err(err(io::Error::new(io::ErrorKind::InvalidData, "journal version or volume id does not match")));
    }
    Ok(Some(rec))
}

/// Every journal under `volumes/`, by id. Unreadable journals are returned as errors.
pub fn read_all(state_dir: &Path) -> Result<Vec<VolumeRecord>> {
    let dir = state_dir.join("volumes");
    let items = match fs::read_dir(&dir) {
        Ok(i) => i,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(Error::Journal { path: dir, source }),
    };
    let mut ids: Vec<String> = Vec::new();
    for item in items {
        let item = item.map_err(|source| Error::Journal { path: dir.clone(), source })?;
        if let Some(name) = item.file_name().to_str()
            && piccolo_keyset::validate_volume_id(name).is_ok()
        {
            ids.push(name.to_string());
        }
    }
    ids.sort();
    let mut out = Vec::new();
    for id in ids {
        if let Some(rec) = read(state_dir, &id)? {
            out.push(rec);
        }
    }
    Ok(out)
}

/// Writes one journal atomically (dir 0700, file 0600).
pub fn write(state_dir: &Path, rec: &VolumeRecord) -> Result<()> {
    let path = journal_path(state_dir, &rec.volume_id);
    let err = |source| Error::Journal { path: path.clone(), source };
    if let Some(dir) = path.parent() {
        private_dir(dir).map_err(err)?;
    }
    let mut bytes = serde_json::to_vec_pretty(rec).map_err(|e| err(io::Error::other(e)))?;
    bytes.push(b'\n');
    write_atomic(&path, &bytes, 0o600).map_err(err)
}
