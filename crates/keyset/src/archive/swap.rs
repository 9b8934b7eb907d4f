// SPDX-License-Identifier: Apache-2.0
//! Staging area and the journaled swap that moves a validated import into place.
//!
//! Layout: `<state>/.import-<random>/new/<target>` holds the validated content,
//! `.../old/<target>` receives what it replaces, `.../journal.json` lists the targets. The
//! journal is the commit point: before it exists an interrupted import is discarded, after it
//! the swap is rolled forward, one rename per target, each step idempotent.

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::check_path_syntax;
use crate::durable::{fsync_dir, write_file_atomic};
use crate::error::{Error, Result};
use crate::hooks::{CrashPoint, crash_point};
use crate::secret::fill_random;

const STAGING_PREFIX: &str = ".import-";
const JOURNAL_NAME: &str = "journal.json";
const JOURNAL_VERSION: u64 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Journal {
    version: u64,
    targets: Vec<JournalTarget>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalTarget {
    /// State-dir-relative path being replaced.
    path: String,
    /// Whether live content existed at commit time (and must be moved aside).
    had_live: bool,
    /// Whether the import carries a replacement (else the target is only removed).
    has_new: bool,
}

/// A staging directory under the state dir; removed on drop unless committed.
pub(crate) struct Staging {
    root: PathBuf,
    committed: bool,
}

impl Staging {
    /// Creates `<state>/.import-<random>/new` (mode 0700).
    pub(crate) fn create(state_dir: &Path) -> Result<Staging> {
        let mut tag = [0u8; 8];
        fill_random(&mut tag)?;
        let root = state_dir.join(format!("{STAGING_PREFIX}{}", hex::encode(tag)));
        let stage_err = |source| Error::Stage { path: root.clone(), source };
        DirBuilder::new().mode(0o700).create(&root).map_err(stage_err)?;
        let staging = Staging { root, committed: false };
        DirBuilder::new()
            .mode(0o700)
            .create(staging.new_dir())
            .map_err(|source| Error::Stage { path: staging.new_dir(), source })?;
        Ok(staging)
    }

    /// Where validated content is unpacked.
    pub(crate) fn new_dir(&self) -> PathBuf {
        self.root.join("new")
    }

    /// Writes the journal (commit point) and swaps every target into place. From the journal on
    /// the staging dir is kept on failure so [`recover_interrupted_import`] can finish the swap.
    pub(crate) fn commit(mut self, state_dir: &Path, targets: &[String]) -> Result<()> {
        let mut journal = Journal { version: JOURNAL_VERSION, targets: Vec::new() };
        for t in targets {
            journal.targets.push(JournalTarget {
                path: t.clone(),
                had_live: exists(&state_dir.join(t)),
                has_new: exists(&self.new_dir().join(t)),
            });
        }
        crash_point(CrashPoint::ImportBeforeJournal);
        let path = self.root.join(JOURNAL_NAME);
        let bytes = serde_json::to_vec_pretty(&journal)
            .map_err(|e| Error::Stage { path: path.clone(), source: io::Error::other(e) })?;
        fsync_dir(&self.root).map_err(|source| Error::Stage { path: self.root.clone(), source })?;
        write_file_atomic(&path, &bytes, 0o600).map_err(|source| Error::Stage { path: path.clone(), source })?;
        self.committed = true;
        crash_point(CrashPoint::ImportAfterJournal);
        roll_forward(state_dir, &self.root, &journal)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Uncommitted staging is never read again; a leftover is removed by the next import.
            let _ = remove_tree(&self.root);
        }
    }
}

/// Finishes or discards imports interrupted by a crash: a staging dir with a journal is rolled
/// forward, one without is deleted. Call it at start-up, before unlocking. Returns how many
/// staging dirs were handled.
pub fn recover_interrupted_import(state_dir: &Path) -> Result<usize> {
    let stage_err = |path: &Path, source| Error::Stage { path: path.to_path_buf(), source };
    let mut handled = 0;
    let entries = match fs::read_dir(state_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(stage_err(state_dir, e)),
    };
    for item in entries {
        let item = item.map_err(|e| stage_err(state_dir, e))?;
        let is_staging = item.file_name().to_str().is_some_and(|n| n.starts_with(STAGING_PREFIX));
        if !is_staging {
            continue;
        }
        let root = item.path();
        let journal_path = root.join(JOURNAL_NAME);
        match fs::read(&journal_path) {
            Ok(bytes) => {
                let journal: Journal = serde_json::from_slice(&bytes)
                    .map_err(|e| stage_err(&journal_path, io::Error::new(io::ErrorKind::InvalidData, e)))?;
                for t in &journal.targets {
                    check_path_syntax(&t.path)?;
                }
                roll_forward(state_dir, &root, &journal)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                remove_tree(&root).map_err(|e| stage_err(&root, e))?;
                fsync_dir(state_dir).map_err(|e| stage_err(state_dir, e))?;
            }
            Err(e) => return Err(stage_err(&journal_path, e)),
        }
        handled += 1;
    }
    Ok(handled)
}

/// Moves each live target to `old/`, each staged one into place, then deletes the staging dir.
fn roll_forward(state_dir: &Path, root: &Path, journal: &Journal) -> Result<()> {
    for t in &journal.targets {
        let live = state_dir.join(&t.path);
        let new = root.join("new").join(&t.path);
        let old = root.join("old").join(&t.path);
        let swap_err = |source| Error::Swap { path: live.clone(), source };
        if t.had_live && !exists(&old) && exists(&live) {
            move_durably(&live, &old).map_err(swap_err)?;
        }
        crash_point(CrashPoint::ImportMidSwap);
        if t.has_new && exists(&new) {
            move_durably(&new, &live).map_err(swap_err)?;
        }
    }
    crash_point(CrashPoint::ImportAfterSwap);
    remove_tree(root).map_err(|source| Error::Swap { path: root.to_path_buf(), source })?;
    fsync_dir(state_dir).map_err(|source| Error::Swap { path: state_dir.to_path_buf(), source })
}

/// rename(from, to), creating `to`'s parents (0700), then fsyncs both parent directories.
fn move_durably(from: &Path, to: &Path) -> io::Result<()> {
    let to_parent = to.parent().ok_or_else(|| io::Error::other("target has no parent"))?;
    let from_parent = from.parent().ok_or_else(|| io::Error::other("source has no parent"))?;
    if !to_parent.is_dir() {
        DirBuilder::new().mode(0o700).recursive(true).create(to_parent)?;
        if let Some(grand) = to_parent.parent() {
            fsync_dir(grand)?;
        }
    }
    fs::rename(from, to)?;
    fsync_dir(to_parent)?;
    fsync_dir(from_parent)
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// remove_dir_all that also copes with read-only directories when not running as root.
pub(crate) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_dirs_writable(path)?;
            fs::remove_dir_all(path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn make_dirs_writable(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Ok(());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    for item in fs::read_dir(dir)? {
        make_dirs_writable(&item?.path())?;
    }
    Ok(())
}
