// SPDX-License-Identifier: Apache-2.0
//! Durable writes: temp file in the same directory, fsync, rename, fsync the directory.
//!
//! After a crash at any step the target holds either its old or its new content in full;
//! a torn temp file may be left behind and is removed by the next write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::hooks::{CrashPoint, crash_point};
use crate::secret::fill_random;

/// Replaces `path` with `bytes` atomically and durably. The file gets mode `mode`.
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path)?;
    let name = file_name(path)?;
    remove_stale_temps(dir, name)?;
    let tmp = temp_path(dir, name)?;
    let result = write_then_rename(&tmp, path, bytes, mode);
    if result.is_err() {
        // Best effort: the temp name is unique and never read, so a leftover is only litter.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    crash_point(CrashPoint::AfterRename);
    fsync_dir(dir)?;
    crash_point(CrashPoint::AfterDirFsync);
    Ok(())
}

/// Writes `path` durably only if it does not exist yet (`AlreadyExists` otherwise): the temp
/// file is hard-linked into place, which, unlike rename, never replaces an existing name.
pub(crate) fn write_file_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = parent_dir(path)?;
    let name = file_name(path)?;
    remove_stale_temps(dir, name)?;
    let tmp = temp_path(dir, name)?;
    let result = write_temp(&tmp, bytes, mode).and_then(|()| fs::hard_link(&tmp, path));
    // The temp name is unique and never read; removing it is tidy-up, not correctness.
    let _ = fs::remove_file(&tmp);
    result?;
    fsync_dir(dir)
}

pub(crate) fn temp_path(dir: &Path, name: &str) -> io::Result<std::path::PathBuf> {
    let mut tag = [0u8; 8];
    fill_random(&mut tag).map_err(io::Error::other)?;
    Ok(dir.join(format!(".{name}.tmp-{}", hex::encode(tag))))
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_temp(tmp, bytes, mode)?;
    fs::rename(tmp, path)
}

fn write_temp(tmp: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        // create_new is O_CREAT|O_EXCL, which also refuses a symlink planted at the temp name.
        .open(tmp)?;
    let half = bytes.len() / 2;
    f.write_all(&bytes[..half])?;
    crash_point(CrashPoint::MidTempWrite);
    f.write_all(&bytes[half..])?;
    crash_point(CrashPoint::AfterTempWrite);
    f.sync_all()?;
    crash_point(CrashPoint::AfterTempFsync);
    Ok(())
}

/// fsyncs a directory so that creates, renames and unlinks in it are durable.
pub(crate) fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes `.<name>.tmp-*` left by a writer that died before its rename.
fn remove_stale_temps(dir: &Path, name: &str) -> io::Result<()> {
    let prefix = format!(".{name}.tmp-");
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn parent_dir(path: &Path) -> io::Result<&Path> {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no parent directory"))
}

fn file_name(path: &Path) -> io::Result<&str> {
    path.file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no UTF-8 file name"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_content_sets_mode_and_cleans_stale_temps() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("k.json");
        fs::write(dir.path().join(".k.json.tmp-dead"), b"torn").unwrap();
        write_file_atomic(&target, b"one", 0o600).unwrap();
        write_file_atomic(&target, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"two");
        assert_eq!(fs::metadata(&target).unwrap().permissions().mode() & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("k.json")]);
    }
}
