// SPDX-License-Identifier: Apache-2.0
//! The durable record of attempts per version (`<state_dir>/state.json`), rewritten
//! atomically (temp, fsync, rename, fsync dir) before every step that changes the disk, so a
//! restart after power loss knows what was in flight.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::window::{Window, now};

/// Where a version got to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    /// Inactive slot prepared, payload streaming into it.
    Downloading,
    /// Written and verified by the broker, not activated.
    Written,
    /// ActivateInactiveSlot is (or was) in flight.
    Activating,
    /// Activated: the next boot tries it.
    Staged,
    /// The box runs it; the health check has not marked the boot good yet.
    Booted,
    /// Running and marked good.
    Succeeded,
    /// Failed; see `reason` and `permanent`.
    Failed,
    /// Cancelled by the operator.
    Cancelled,
}

impl AttemptState {
    /// The name shown to operators.
    pub fn name(self) -> &'static str {
        match self {
            AttemptState::Downloading => "downloading",
            AttemptState::Written => "written",
            AttemptState::Activating => "activating",
            AttemptState::Staged => "staged",
            AttemptState::Booted => "booted",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
            AttemptState::Cancelled => "cancelled",
        }
    }
}

/// One version's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Where it got to.
    pub state: AttemptState,
    /// Download attempts so far.
    pub attempts: u32,
    /// Why it failed or was cancelled.
    #[serde(default)]
    pub reason: String,
    /// Never retried automatically (the box fell back from it, or the operator rolled back).
    #[serde(default)]
    pub permanent: bool,
    /// Slot written (`USR-A`/`USR-B`).
    #[serde(default)]
    pub slot: Option<String>,
    /// Slot that was booted when it was written.
    #[serde(default)]
    pub from_slot: Option<String>,
    /// Payload digest from the manifest.
    #[serde(default)]
    pub sha256: String,
    /// Unix seconds of the last change.
    pub updated_at: u64,
}

/// The file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Format version (1).
    #[serde(default)]
    pub format: u32,
    /// Per version.
    #[serde(default)]
    pub attempts: BTreeMap<String, Attempt>,
    /// Maintenance window set by SetWindow (overrides the config file).
    #[serde(default)]
    pub window: Option<Window>,
    /// Increases on every write.
    #[serde(default)]
    pub generation: u64,
}

/// The record and where it lives.
#[derive(Debug)]
pub struct RecordStore {
    path: PathBuf,
    /// In memory; [`RecordStore::save`] makes it durable.
    pub rec: Record,
}

impl RecordStore {
    /// Loads `<dir>/state.json`, or starts empty when there is none. A file that does not
    /// parse is an error: starting empty would forget which versions must not be retried.
    pub fn load(dir: &Path) -> Result<RecordStore, Error> {
        let path = dir.join("state.json");
        let rec = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::State {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Record { format: 1, ..Default::default() },
            Err(source) => return Err(Error::State { path, source }),
        };
        Ok(RecordStore { path, rec })
    }

    /// Writes the record durably.
    pub fn save(&mut self) -> Result<(), Error> {
        self.rec.generation += 1;
        self.rec.format = 1;
        let bytes = serde_json::to_vec_pretty(&self.rec).unwrap_or_default();
        crate::durable::write_atomic(&self.path, &bytes)
            .map_err(|source| Error::State { path: self.path.clone(), source })
    }

    /// Updates (or creates) `version`'s entry with `f`, stamps it and saves.
    pub fn update(&mut self, version: &str, f: impl FnOnce(&mut Attempt)) -> Result<(), Error> {
        let a = self.rec.attempts.entry(version.to_owned()).or_insert_with(|| Attempt {
            state: AttemptState::Downloading,
            attempts: 0,
            reason: String::new(),
            permanent: false,
            slot: None,
            from_slot: None,
            sha256: String::new(),
            updated_at: 0,
        });
        f(a);
        a.updated_at = now();
        self.save()
    }

    /// The version currently staged, booted or in flight, if any.
    pub fn in_flight(&self) -> Option<(String, Attempt)> {
        use AttemptState::*;
        self.rec
            .attempts
            .iter()
            .filter(|(_, a)| matches!(a.state, Downloading | Written | Activating | Staged | Booted))
            .max_by_key(|(_, a)| a.updated_at)
            .map(|(v, a)| (v.clone(), a.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reload_and_refuses_garbage() {
        let d = tempfile::tempdir().unwrap();
        let mut s = RecordStore::load(d.path()).unwrap();
        s.update("1.1.0", |a| {
            a.state = AttemptState::Failed;
            a.permanent = true;
            a.reason = "fell back".into();
        })
        .unwrap();
        let s2 = RecordStore::load(d.path()).unwrap();
        assert_eq!(s2.rec, s.rec);
        assert_eq!(s2.rec.attempts["1.1.0"].reason, "fell back");
        std::fs::write(d.path().join("state.json"), b"{not json").unwrap();
        assert!(RecordStore::load(d.path()).is_err());
    }
}
