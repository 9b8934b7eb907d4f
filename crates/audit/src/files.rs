// SPDX-License-Identifier: Apache-2.0
//! The files that make up one chain: `audit.jsonl.N` … `audit.jsonl.1`, `audit.jsonl`,
//! and the checkpoint file `audit.jsonl.state`.

use std::fs::File;
use std::io::{BufRead, Cursor, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::record::Record;

/// One point in the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Sequence number of the record.
    pub seq: u64,
    /// Its hash.
    pub hash: String,
}

/// What the writer last promised about the chain's ends.
///
/// `anchor` is the last record of the newest file deleted by rotation (the oldest kept file
/// links to it); `head` is the last record written when the checkpoint was taken (at
/// rotation, shutdown and at most every few seconds while busy). A chain that ends before
/// `head` was truncated.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainState {
    /// Trusted predecessor of the oldest kept record.
    #[serde(default)]
    pub anchor: Option<Checkpoint>,
    /// Last record known durable.
    #[serde(default)]
    pub head: Option<Checkpoint>,
}

/// `<log>.state`.
pub fn state_path(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".state");
    PathBuf::from(s)
}

/// `<log>.<n>`.
pub(crate) fn rotated_path(log: &Path, n: u32) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The existing files of the chain ending in `log`, oldest first.
pub fn chain_files(log: &Path) -> Vec<PathBuf> {
    let mut n = 1;
    let mut rotated = Vec::new();
    while rotated_path(log, n).exists() {
        rotated.push(rotated_path(log, n));
        n += 1;
    }
    rotated.reverse();
    if log.exists() {
        rotated.push(log.to_path_buf());
    }
    rotated
}

/// Reads the checkpoint file; a missing file is an empty state.
pub fn read_chain_state(log: &Path) -> std::io::Result<ChainState> {
    match std::fs::read(state_path(log)) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ChainState::default()),
        Err(e) => Err(e),
    }
}

/// Replaces the checkpoint file atomically: temp file, fsync, rename, fsync dir.
pub(crate) fn write_chain_state(log: &Path, state: &ChainState, group: Option<u32>) -> std::io::Result<()> {
    let dest = state_path(log);
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o640).open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        if let Some(gid) = group {
            nix::unistd::fchown(&f, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(std::io::Error::from)?;
        }
        f.write_all(&serde_json::to_vec(state).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &dest)?;
    sync_dir(&dest)
}

/// fsyncs the directory holding `path`, so a rename or create in it is durable.
pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Reads every record of the given files in order, without verifying the chain.
/// Lines that do not parse are returned as errors with their file and line number.
pub fn read_records(files: &[PathBuf]) -> impl Iterator<Item = Result<Record, String>> + '_ {
    files.iter().flat_map(|f| {
        let lines: Box<dyn Iterator<Item = Result<Record, String>>> = match read_log(f) {
            // Parses one line at a time; only the file's text is held.
            Ok(text) => Box::new(Cursor::new(text).lines().enumerate().map(move |(i, l)| {
                let l = l.map_err(|e| format!("{}:{}: {e}", f.display(), i + 1))?;
                serde_json::from_str::<Record>(&l).map_err(|e| format!("{}:{}: {e}", f.display(), i + 1))
            })),
            Err(e) => Box::new(std::iter::once(Err(format!("{}: {e}", f.display())))),
        };
        lines
    })
}

/// The records of one file as text: up to the zeros a preallocating writer keeps ahead of
/// them (see [`crate::AuditConfig::preallocate`]). Anything but zeros after the first zero
/// is an error: records never contain a NUL byte.
pub fn read_log(path: &Path) -> Result<String, String> {
    let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if let Some(end) = bytes.iter().position(|b| *b == 0) {
        if let Some(junk) = bytes[end..].iter().position(|b| *b != 0) {
            return Err(format!("byte {} is not zero, after the end of the records at byte {end}", end + junk));
        }
        bytes.truncate(end);
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8".into())
}
