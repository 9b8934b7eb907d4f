// SPDX-License-Identifier: Apache-2.0
//! [`Persistence`] over `crates/keyset` directly, with the interim encrypted store
//! (`store.rs`). Lock state is the presence of the SDEK in memory; there are no gocryptfs
//! volumes yet (that is `crates/persistence`), so export/import carry every directory under
//! `ciphertext/` (at least the interim store's) and the key set.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use piccolo_keyset::{self as ks, Error as KsError, ImportLimits, KdfParams, Keyset, Password, RecoveryKey, Sdek};

use super::store::{STORE_VOLUME, Store};
use super::{BackendError, BackendResult, ExportInfo, ExportKind, ImportInfo, LockState, Persistence};

/// The key-set backed persistence.
pub struct KeysetBackend {
    state_dir: PathBuf,
    params: KdfParams,
    limits: ImportLimits,
    /// Mirrors `inner` for lock-free reads: 0 uninitialised, 1 locked, 2 unlocked.
    state: AtomicU8,
    inner: Mutex<Inner>,
}

struct Inner {
    sdek: Option<Sdek>,
    store: Option<Store>,
}

fn internal(e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    BackendError::Internal(Box::new(e))
}

/// The one mapping of key-set errors to backend errors.
fn map_ks(e: KsError) -> BackendError {
    match e {
        KsError::WrongPassword => BackendError::WrongPassword,
        KsError::WrongRecoveryKey => BackendError::WrongRecoveryKey,
        KsError::KeysetExists { .. } => BackendError::AlreadyInitialised,
        e @ (KsError::PasswordTooShort { .. }
        | KsError::PasswordTooLong { .. }
        | KsError::RecoveryKeyMistyped { .. }) => BackendError::InvalidInput(e.to_string()),
        e @ (KsError::ReadArchive { .. }
        | KsError::ArchiveRejected { .. }
        | KsError::UnsupportedArchiveVersion { .. }
        | KsError::PathRejected { .. }
        | KsError::EntryTypeRejected { .. }
        | KsError::DigestMismatch { .. }
        | KsError::ChecksumMismatch
        | KsError::LimitExceeded { .. }
        | KsError::KeysetMismatch
        | KsError::VolumeMounted { .. }
        | KsError::UnsupportedKeysetVersion { .. }
        | KsError::ParseKeyset { .. }
        | KsError::InvalidKeyset { .. }
        | KsError::KdfParamsOutOfRange { .. }) => BackendError::ImportRejected(e.to_string()),
        other => internal(other),
    }
}

impl KeysetBackend {
    /// A backend over `state_dir` that creates key sets with `params`.
    pub fn new(state_dir: &Path, params: KdfParams) -> BackendResult<KeysetBackend> {
        params.validate().map_err(|e| BackendError::InvalidInput(e.to_string()))?;
        // Finish (or roll back) an import a crash interrupted, before reading anything.
        ks::recover_interrupted_import(state_dir).map_err(internal)?;
        let b = KeysetBackend {
            state_dir: state_dir.to_path_buf(),
            params,
            limits: ImportLimits::default(),
            state: AtomicU8::new(0),
            inner: Mutex::new(Inner { sdek: None, store: None }),
        };
        let initial = if ks::keyset_path(state_dir).exists() { LockState::Locked } else { LockState::Uninitialised };
        b.set_state(initial);
        Ok(b)
    }

    fn set_state(&self, s: LockState) {
        let v = match s {
            LockState::Uninitialised => 0,
            LockState::Locked => 1,
            LockState::Unlocked => 2,
        };
        self.state.store(v, Ordering::SeqCst);
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Inner holds no invariant a panic could break half-way (options replaced whole).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_keyset(&self) -> BackendResult<Keyset> {
        match Keyset::read(&self.state_dir) {
            Ok(k) => Ok(k),
            Err(KsError::ReadKeyset { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                Err(BackendError::NotInitialised)
            }
            Err(e) => Err(internal(e)),
        }
    }

    fn open_with(&self, inner: &mut Inner, sdek: Sdek) -> BackendResult<()> {
        let store = Store::open(&self.state_dir, &sdek).map_err(internal)?;
        inner.store = Some(store);
        inner.sdek = Some(sdek);
        self.set_state(LockState::Unlocked);
        Ok(())
    }

    fn volumes(&self) -> BackendResult<Vec<String>> {
        let dir = self.state_dir.join("ciphertext");
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(internal)? {
            let entry = entry.map_err(internal)?;
            if entry.file_type().map_err(internal)?.is_dir()
                && let Some(name) = entry.file_name().to_str()
                && ks::validate_volume_id(name).is_ok()
            {
                ids.push(name.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }
}

impl Persistence for KeysetBackend {
    fn lock_state(&self) -> LockState {
        match self.state.load(Ordering::SeqCst) {
            0 => LockState::Uninitialised,
            1 => LockState::Locked,
            _ => LockState::Unlocked,
        }
    }

    fn initialise(&self, password: &Password) -> BackendResult<RecoveryKey> {
        let mut inner = self.inner();
        std::fs::create_dir_all(&self.state_dir).map_err(internal)?;
        let created = Keyset::create(&self.state_dir, password, self.params).map_err(map_ks)?;
        let store = Store::open(&self.state_dir, &created.sdek).map_err(internal)?;
        // The store file must exist so that exports always carry the control state.
        store.flush().map_err(internal)?;
        inner.store = Some(store);
        inner.sdek = Some(created.sdek);
        self.set_state(LockState::Unlocked);
        Ok(created.recovery_key)
    }

    fn verify_password(&self, password: &Password) -> BackendResult<()> {
        self.read_keyset()?.unlock_with_password(password).map(drop).map_err(map_ks)
    }

    fn unlock_with_password(&self, password: &Password) -> BackendResult<()> {
        let keyset = self.read_keyset()?;
        let sdek = keyset.unlock_with_password(password).map_err(map_ks)?;
        let mut inner = self.inner();
        self.open_with(&mut inner, sdek)
    }

    fn unlock_with_recovery_key(&self, key: &RecoveryKey) -> BackendResult<()> {
        let keyset = self.read_keyset()?;
        let sdek = keyset.unlock_with_recovery_key(key).map_err(map_ks)?;
        let mut inner = self.inner();
        self.open_with(&mut inner, sdek)
    }

    fn lock(&self) -> BackendResult<()> {
        let mut inner = self.inner();
        inner.store = None;
        inner.sdek = None;
        if self.lock_state() == LockState::Unlocked {
            self.set_state(LockState::Locked);
        }
        Ok(())
    }

    fn change_password(&self, current: &Password, new: &Password) -> BackendResult<()> {
        let mut keyset = self.read_keyset()?;
        let sdek = keyset.unlock_with_password(current).map_err(map_ks)?;
        let _inner = self.inner();
        keyset.change_password(&sdek, new).map_err(map_ks)
    }

    fn rotate_recovery_key(&self, password: &Password) -> BackendResult<RecoveryKey> {
        let mut keyset = self.read_keyset()?;
        let sdek = keyset.unlock_with_password(password).map_err(map_ks)?;
        let _inner = self.inner();
        keyset.rotate_recovery_key(&sdek).map_err(map_ks)
    }

    fn reset_password(&self, key: &RecoveryKey, new: &Password) -> BackendResult<()> {
        let mut keyset = self.read_keyset()?;
        let sdek = keyset.unlock_with_recovery_key(key).map_err(map_ks)?;
        let mut inner = self.inner();
        keyset.change_password(&sdek, new).map_err(map_ks)?;
        self.open_with(&mut inner, sdek)
    }

    fn export(&self, kind: ExportKind, out: &mut dyn Write) -> BackendResult<ExportInfo> {
        // Held for the whole export: no store write can change the tree between the passes.
        let inner = self.inner();
        if inner.sdek.is_none() {
            return Err(match self.lock_state() {
                LockState::Uninitialised => BackendError::NotInitialised,
                _ => BackendError::Locked,
            });
        }
        let kind = match kind {
            ExportKind::Control => ks::ExportKind::Control,
            ExportKind::Full => ks::ExportKind::Full,
        };
        let volumes = self.volumes()?;
        let summary = ks::write_export(&self.state_dir, kind, &volumes, out).map_err(map_ks)?;
        Ok(ExportInfo {
            volumes: summary.volumes,
            archive_bytes: summary.archive_bytes,
            archive_sha256: summary.archive_sha256,
        })
    }

    fn import(&self, input: &mut dyn Read) -> BackendResult<ImportInfo> {
        // Serialised with every other state change; the SDEK is dropped only once the
        // importer has validated everything and swapped it in.
        let mut inner = self.inner();
        if self.lock_state() == LockState::Uninitialised {
            std::fs::create_dir_all(&self.state_dir).map_err(internal)?;
        }
        let report = ks::import(input, &self.state_dir, &self.limits).map_err(map_ks)?;
        inner.store = None;
        inner.sdek = None;
        let state =
            if ks::keyset_path(&self.state_dir).exists() { LockState::Locked } else { LockState::Uninitialised };
        self.set_state(state);
        Ok(ImportInfo {
            kind: match report.kind {
                ks::ExportKind::Control => ExportKind::Control,
                ks::ExportKind::Full => ExportKind::Full,
            },
            volumes: report.volumes,
            created: report.created,
            keyset_replaced: report.keyset_replaced,
            orphaned_volumes: report.orphaned_volumes,
        })
    }

    fn store_get(&self, key: &str) -> BackendResult<Option<Vec<u8>>> {
        let inner = self.inner();
        let store = inner.store.as_ref().ok_or(BackendError::Locked)?;
        Ok(store.get(key))
    }

    fn store_put(&self, key: &str, value: &[u8]) -> BackendResult<()> {
        let mut inner = self.inner();
        let store = inner.store.as_mut().ok_or(BackendError::Locked)?;
        store.put(key, value).map_err(internal)
    }
}

/// The interim store's volume id, for docs and tests.
pub const INTERIM_STORE_VOLUME: &str = STORE_VOLUME;
