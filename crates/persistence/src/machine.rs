// SPDX-License-Identifier: Apache-2.0
//! [`Persistence`]: the one lock/unlock state machine. Every transition holds one async mutex,
//! so setup, unlock, lock, reconcile, export and import never interleave.

use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use piccolo_keyset::{
    CreatedKeyset, ExportKind, ExportSummary, ImportLimits, ImportReport, KdfParams, Keyset, Password, RecoveryKey,
    Sdek, Secret,
};
use piccolo_store::{CONTROL_DB_NAME, Role, Store};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Mutex, broadcast, watch};

use crate::broker::{BrokerError, SealBackend, VolumeBackend, VolumeClass, VolumeInfo};
use crate::error::{Error, Result};
use crate::events::{Event, LockReason, LockState, UnlockMethod};
use crate::journal::{self, Desired, JOURNAL_VERSION, Observed, VolumeRecord};
use crate::keys::VolumeKey;

/// The bootstrap volume's id.
pub const BOOTSTRAP: &str = "bootstrap";
/// The control volume's id.
pub const CONTROL: &str = "control";
/// Longest volume id the broker accepts.
pub const MAX_VOLUME_ID_LEN: usize = 63;

/// How the state machine is set up.
#[derive(Debug, Clone)]
pub struct Config {
    /// `$PICCOLO_STATE_DIR`.
    pub state_dir: PathBuf,
    /// Leader (store read-write) or follower (read-only), from configuration for now.
    pub role: Role,
    /// Argon2id parameters for a new key set.
    pub kdf: KdfParams,
    /// PCRs the TPM-sealed SDEK is bound to.
    pub tpm_pcrs: Vec<u32>,
    /// Caps for imports.
    pub import_limits: ImportLimits,
    /// The user application volumes are presented as (the broker's `present_as`; the
    /// policy must allow it). `None`: as the persistence owner itself.
    pub app_volume_user: Option<String>,
}

impl Config {
    /// Leader, recommended KDF parameters, PCR 7, default import caps.
    pub fn new(state_dir: impl Into<PathBuf>) -> Config {
        Config {
            state_dir: state_dir.into(),
            role: Role::Leader,
            kdf: KdfParams::RECOMMENDED,
            tpm_pcrs: vec![7],
            import_limits: ImportLimits::default(),
            app_volume_user: Some(APP_VOLUME_USER.to_string()),
        }
    }
}

/// What a reconciliation found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Volumes whose gocryptfs process was found dead (reported, and remounted if unlocked).
    pub needs_repair: Vec<String>,
    /// Desired-mounted volumes that were (re)mounted.
    pub remounted: Vec<String>,
    /// Volumes unmounted because they must not be mounted in the current state.
    pub unmounted: Vec<String>,
    /// Volumes that could not be brought to their desired state, with the error message.
    pub failed: Vec<(String, String)>,
}

struct Machine {
    /// `Some` exactly while unlocked (and during an export taken while unlocked).
    sdek: Option<Arc<Sdek>>,
}

struct Inner {
    config: Config,
    volumes: Arc<dyn VolumeBackend>,
    sealer: Option<Arc<dyn SealBackend>>,
    store: Store,
    machine: Mutex<Machine>,
    state: watch::Sender<LockState>,
    events: broadcast::Sender<Event>,
}

/// The persistence state machine of one state dir. Cheap to clone (all clones share it).
#[derive(Clone)]
pub struct Persistence {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persistence").field("state", &self.state()).finish_non_exhaustive()
    }
}

fn now() -> String {
    // Formatting a current UTC time as RFC 3339 only fails for years outside 0..=9999.
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

async fn blocking<R: Send + 'static>(f: impl FnOnce() -> Result<R> + Send + 'static) -> Result<R> {
    tokio::task::spawn_blocking(f).await.map_err(|source| Error::Task { source })?
}

fn message(e: &(dyn std::error::Error + 'static)) -> String {
    piccolo_store::error_chain(e)
}

fn class_of(id: &str) -> VolumeClass {
    match id {
        BOOTSTRAP => VolumeClass::Bootstrap,
        CONTROL => VolumeClass::Control,
        _ => VolumeClass::Application,
    }
}

/// The apps worker's user: application volumes are presented as it by default.
pub const APP_VOLUME_USER: &str = "piccolo-apps";

/// Checks an application volume id: `[a-z0-9][a-z0-9-]{0,62}`, not a reserved id.
pub fn validate_app_volume_id(id: &str) -> Result<()> {
    let bad = |reason| Err(Error::InvalidVolumeId { id: id.to_string(), reason });
    let mut bytes = id.bytes();
    let first = bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !first || !bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return bad("must match [a-z0-9][a-z0-9-]*");
    }
    if id.len() > MAX_VOLUME_ID_LEN {
        return bad("longer than 63 bytes");
    }
    if id == BOOTSTRAP || id == CONTROL {
        return bad("reserved");
    }
    Ok(())
}

impl Persistence {
    /// Builds the state machine (locked) for `config.state_dir`, creating `volumes/` and
    /// finishing or discarding an import a crash interrupted. Call [`Persistence::reconcile`]
    /// next (it unmounts anything left mounted that must not be), then optionally
    /// [`Persistence::unlock_with_tpm`].
    pub async fn new(
        config: Config,
        volumes: Arc<dyn VolumeBackend>,
        sealer: Option<Arc<dyn SealBackend>>,
    ) -> Result<Persistence> {
        let dir = config.state_dir.clone();
        blocking(move || {
            crate::durable::private_dir(&dir.join("volumes"))
                .map_err(|source| Error::StateDir { path: dir.join("volumes"), source })?;
            match piccolo_keyset::recover_interrupted_import(&dir) {
                // In production the broker stages imports (root's `.import-*` dirs) and
                // recovers them at its own start; this process cannot read them.
                Err(piccolo_keyset::Error::Stage { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    tracing::info!("an interrupted import is left to the broker's recovery");
                }
                other => {
                    other?;
                }
            }
            // A crash inside `commit_pending` leaves the pending name beside the committed key
            // set; it would keep the first password working after a change, so it goes.
            if piccolo_keyset::keyset_path(&dir).exists() {
                Keyset::discard_pending(&dir)?;
            }
            Ok(())
        })
        .await?;
        let (state, _) = watch::channel(LockState::Locked);
        let (events, _) = broadcast::channel(256);
        Ok(Persistence {
            inner: Arc::new(Inner {
                config,
                volumes,
                sealer,
                store: Store::locked(),
                machine: Mutex::new(Machine { sdek: None }),
                state,
                events,
            }),
        })
    }

    /// The current state.
    pub fn state(&self) -> LockState {
        *self.inner.state.borrow()
    }

    /// Watches the state (e.g. to serve 423 while not [`LockState::Unlocked`]).
    pub fn watch_state(&self) -> watch::Receiver<LockState> {
        self.inner.state.subscribe()
    }

    /// Subscribes to transition events.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// The control store handle: open while unlocked, [`piccolo_store::Error::Locked`] otherwise.
    pub fn store(&self) -> Store {
        self.inner.store.clone()
    }

    /// The state dir.
    pub fn state_dir(&self) -> &Path {
        &self.inner.config.state_dir
    }

    /// Whether a key set exists (setup was done or a full export was imported).
    pub fn is_set_up(&self) -> bool {
        piccolo_keyset::keyset_path(self.state_dir()).exists()
    }

    /// Whether a TPM-sealed SDEK is enrolled.
    pub async fn read_tpm_enrolled(&self) -> Result<bool> {
        let dir = self.state_dir().to_path_buf();
        blocking(move || Ok(Keyset::read(&dir)?.has_tpm_seal())).await
    }

    /// Every volume journal.
    pub async fn read_volumes(&self) -> Result<Vec<VolumeRecord>> {
        let dir = self.state_dir().to_path_buf();
        blocking(move || journal::read_all(&dir)).await
    }

    fn emit(&self, e: Event) {
        tracing::info!(event = ?e, "persistence");
        let _ = self.inner.events.send(e);
    }

    fn set_state(&self, s: LockState) {
        self.inner.state.send_replace(s);
    }

    fn expected_mountpoint(&self, id: &str) -> PathBuf {
        self.state_dir().join("mounts").join(id)
    }

    fn write_record(&self, rec: &mut VolumeRecord) -> Result<()> {
        rec.updated = now();
        journal::write(self.state_dir(), rec)
    }

    fn record_or_new(&self, id: &str, desired: Desired) -> Result<VolumeRecord> {
        Ok(journal::read(self.state_dir(), id)?.unwrap_or_else(|| {
            let t = now();
            VolumeRecord {
                version: JOURNAL_VERSION,
                volume_id: id.to_string(),
                class: class_of(id),
                desired,
                observed: Observed::Unknown,
                role: self.inner.config.role,
                needs_repair: false,
                created: t.clone(),
                updated: t,
                last_mounted: None,
                last_error: None,
            }
        }))
    }

    /// The broker's view of `ids`, one VolumeStatus call per id (the policy grants the API
    /// worker named ids only; an empty id would need a `*` rule). Unknown ids are absent.
    async fn status_of(&self, ids: &[String]) -> Result<HashMap<String, VolumeInfo>> {
        let mut out = HashMap::new();
        for id in ids {
            match self.inner.volumes.volume_status(Some(id)).await {
                Ok(list) => out.extend(list.into_iter().filter(|v| &v.volume_id == id).map(|v| (id.clone(), v))),
                Err(BrokerError::NotFound(_)) => {}
                Err(e) => return Err(Error::volume("status", id)(e)),
            }
        }
        Ok(out)
    }

    /// Mounts one volume with its derived key and journals the result.
    async fn mount_one(&self, sdek: &Sdek, rec: &mut VolumeRecord, info: Option<&VolumeInfo>) -> Result<PathBuf> {
        let id = rec.volume_id.clone();
        if info.is_some_and(|i| i.mounted) {
            // A leftover or dead mount: unmount first, the fresh mount verifies the key.
            self.inner.volumes.unmount_volume(&id).await.map_err(Error::volume("unmount", &id))?;
        }
        let key = VolumeKey::derive(sdek, &id);
        let result = self.inner.volumes.mount_volume(&id, &key).await.map_err(Error::volume("mount", &id));
        drop(key);
        let result = result.and_then(|mp| self.check_mountpoint(&id, mp));
        match &result {
            Ok(_) => {
                rec.observed = Observed::Mounted;
                rec.needs_repair = false;
                rec.role = self.inner.config.role;
                rec.last_mounted = Some(now());
                rec.last_error = None;
            }
            Err(e) => {
                rec.observed = Observed::Unmounted;
                rec.last_error = Some(message(e));
            }
        }
        self.write_record(rec)?;
        if result.is_ok() {
            self.emit(Event::VolumeMounted { volume: id });
        }
        result
    }

    fn check_mountpoint(&self, id: &str, found: PathBuf) -> Result<PathBuf> {
        let expected = self.expected_mountpoint(id);
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let here = canon(&expected);
        if canon(&found) != here {
            return Err(Error::UnexpectedMountpoint { volume: id.to_string(), found, expected });
        }
        match crate::mounts::is_fuse_mount_here(&here) {
            Ok(true) => Ok(found),
            Ok(false) => Err(Error::MountNotVisible { volume: id.to_string(), mountpoint: here }),
            Err(source) => Err(Error::StateDir { path: "/proc/self/mountinfo".into(), source }),
        }
    }

    /// Unmounts one volume and journals it.
    async fn unmount_one(&self, id: &str) -> Result<()> {
        let result = match self.inner.volumes.unmount_volume(id).await {
            // A volume that was never created (e.g. before setup) is not mounted either.
            Ok(()) | Err(BrokerError::NotFound(_)) => Ok(()),
            Err(e) => Err(Error::volume("unmount", id)(e)),
        };
        if let Some(mut rec) = journal::read(self.state_dir(), id)? {
            match &result {
                Ok(()) => {
                    rec.observed = Observed::Unmounted;
                    rec.last_error = None;
                }
                Err(e) => rec.last_error = Some(message(e)),
            }
            self.write_record(&mut rec)?;
        }
        match &result {
            Ok(()) => self.emit(Event::VolumeUnmounted { volume: id.to_string() }),
            Err(e) => self.emit(Event::VolumeFailed { volume: id.to_string(), reason: message(e) }),
        }
        result
    }

    /// Mounts bootstrap, control and every desired-mounted application volume, then opens the
    /// store. On failure undoes what it did (bootstrap stays mounted: that is the locked state).
    async fn bring_up(&self, sdek: &Sdek) -> Result<()> {
        let mut mounted_now: Vec<String> = Vec::new();
        let result = self.bring_up_steps(sdek, &mut mounted_now).await;
        if result.is_err() {
            if let Err(e) = self.inner.store.close().await {
                tracing::error!(error = %message(&e), "rollback: closing the control store failed");
            }
            for id in mounted_now.iter().rev().filter(|id| id.as_str() != BOOTSTRAP) {
                if let Err(e) = self.unmount_one(id).await {
                    tracing::error!(volume = %id, error = %message(&e), "rollback: unmount failed");
                }
            }
        }
        result
    }

    async fn bring_up_steps(&self, sdek: &Sdek, mounted_now: &mut Vec<String>) -> Result<()> {
        let mut plan =
            vec![self.record_or_new(BOOTSTRAP, Desired::Mounted)?, self.record_or_new(CONTROL, Desired::Mounted)?];
        let dir = self.state_dir().to_path_buf();
        plan.extend(
            journal::read_all(&dir)?
                .into_iter()
                .filter(|r| r.class == VolumeClass::Application && r.desired == Desired::Mounted),
        );
        let ids: Vec<String> = plan.iter().map(|r| r.volume_id.clone()).collect();
        let status = self.status_of(&ids).await?;
        let mut control_mp = None;
        for mut rec in plan {
            let info = status.get(&rec.volume_id);
            // A healthy bootstrap mount is the locked state's normal condition: keep it.
            if rec.volume_id == BOOTSTRAP && info.is_some_and(|i| i.mounted && !i.needs_repair) {
                continue;
            }
            let mp = self.mount_one(sdek, &mut rec, info).await?;
            mounted_now.push(rec.volume_id.clone());
            if rec.volume_id == CONTROL {
                control_mp = Some(mp);
            }
        }
        let control_mp = control_mp.unwrap_or_else(|| self.expected_mountpoint(CONTROL));
        self.inner.store.open(&control_mp.join(CONTROL_DB_NAME), self.inner.config.role).await?;
        Ok(())
    }

    /// Closes the store and unmounts control and application volumes (and bootstrap if
    /// asked). Returns what could not be done; never stops half-way.
    async fn quiesce(&self, include_bootstrap: bool) -> (Vec<String>, Option<String>) {
        let store_err = self.inner.store.close().await.err().map(|e| message(&e));
        if let Some(e) = &store_err {
            tracing::error!(error = %e, "closing the control store failed");
        }
        let ids: Vec<String> = match journal::read_all(self.state_dir()) {
            Ok(recs) => recs.into_iter().filter(|r| r.class == VolumeClass::Application).map(|r| r.volume_id).collect(),
            Err(e) => {
                tracing::error!(error = %message(&e), "reading volume journals failed");
                Vec::new()
            }
        };
        let mut ids = ids;
        ids.sort();
        ids.push(CONTROL.to_string());
        if include_bootstrap {
            ids.push(BOOTSTRAP.to_string());
        }
        let mut failed = Vec::new();
        for id in ids {
            if self.unmount_one(&id).await.is_err() {
                failed.push(id);
            }
        }
        (failed, store_err)
    }

    // ---- setup and unlock -----------------------------------------------------------

    /// First-time setup: creates the key set under `password`, the bootstrap and control
    /// volumes, mounts them and opens (creates) the store. Returns the recovery key, to be
    /// shown to the admin once. A failure leaves the state locked and "not set up": the key
    /// set stays pending (`crypto/keyset.setup.json`) until the volumes are up, so a retry
    /// with the same password resumes with the same SDEK (and draws a new recovery key, the
    /// first was never shown).
    pub async fn setup(&self, password: Password) -> Result<RecoveryKey> {
        let mut m = self.inner.machine.lock().await;
        self.require_locked()?;
        if self.is_set_up() {
            return Err(Error::AlreadySetUp);
        }
        self.begin_unlock(UnlockMethod::Setup);
        let result = async {
            let ids = [BOOTSTRAP.to_string(), CONTROL.to_string()];
            let mut existing: Vec<String> = self.status_of(&ids).await?.into_keys().collect();
            existing.sort();
            let (dir, kdf) = (self.state_dir().to_path_buf(), self.inner.config.kdf);
            let mut created = blocking(move || open_setup_keyset(&dir, &password, kdf, existing)).await?;
            for id in [BOOTSTRAP, CONTROL] {
                let key = VolumeKey::derive(&created.sdek, id);
                match self.inner.volumes.create_volume(id, class_of(id), &key, None).await {
                    // Only a resumed setup gets here with existing volumes; mounting verifies the key.
                    Ok(()) | Err(BrokerError::AlreadyExists(_)) => {}
                    Err(e) => return Err(Error::volume("create", id)(e)),
                }
                let mut rec = self.record_or_new(id, Desired::Mounted)?;
                rec.observed = Observed::Unmounted;
                self.write_record(&mut rec)?;
            }
            self.bring_up(&created.sdek).await?;
            let dir = self.state_dir().to_path_buf();
            let committed = blocking(move || {
                created.keyset.commit_pending(&dir)?;
                Ok(created)
            })
            .await;
            if committed.is_err() {
                let _ = self.quiesce(false).await;
            }
            committed
        }
        .await;
        match result {
            Ok(created) => {
                m.sdek = Some(Arc::new(created.sdek));
                self.finish_unlock(UnlockMethod::Setup);
                Ok(created.recovery_key)
            }
            Err(e) => Err(self.fail_unlock(UnlockMethod::Setup, e)),
        }
    }

    /// Unlocks with the admin password.
    pub async fn unlock_with_password(&self, password: Password) -> Result<()> {
        self.unlock(UnlockMethod::Password, move |ks| Ok(ks.unlock_with_password(&password)?)).await
    }

    /// Unlocks with the recovery key as typed (a typo is reported as mistyped).
    pub async fn unlock_with_recovery_key(&self, typed: String) -> Result<()> {
        self.unlock(UnlockMethod::RecoveryKey, move |ks| {
            let key = RecoveryKey::parse(&typed)?;
            Ok(ks.unlock_with_recovery_key(&key)?)
        })
        .await
    }

    /// Unlocks with the TPM-sealed SDEK (no password). With changed PCRs this fails with
    /// "TPM unlock failed: PCR 7 changed" and the state stays locked.
    pub async fn unlock_with_tpm(&self) -> Result<()> {
        let sealer = self.inner.sealer.clone().ok_or(Error::TpmUnavailable)?;
        let rt = tokio::runtime::Handle::current();
        self.unlock(UnlockMethod::Tpm, move |ks| {
            // Runs on a blocking-pool thread, where waiting for the async call is allowed.
            Ok(ks.unlock_with_tpm(|blob| rt.block_on(sealer.unseal_secret(blob)))?)
        })
        .await
    }

    /// At boot: unlocks with the TPM if a sealed SDEK is enrolled and a TPM backend is
    /// configured. `Ok(false)` when TPM unlock is not set up; an error (state locked) when it
    /// is but failed, e.g. because PCR 7 changed.
    pub async fn auto_unlock(&self) -> Result<bool> {
        if self.inner.sealer.is_none() || !self.is_set_up() || !self.read_tpm_enrolled().await? {
            return Ok(false);
        }
        self.unlock_with_tpm().await.map(|()| true)
    }

    fn require_locked(&self) -> Result<()> {
        match self.state() {
            LockState::Locked => Ok(()),
            state => Err(Error::NotLocked { state }),
        }
    }

    fn begin_unlock(&self, method: UnlockMethod) {
        self.set_state(LockState::Unlocking);
        self.emit(Event::Unlocking { method });
    }

    fn finish_unlock(&self, method: UnlockMethod) {
        self.set_state(LockState::Unlocked);
        self.emit(Event::Unlocked { method });
    }

    fn fail_unlock(&self, method: UnlockMethod, e: Error) -> Error {
        self.set_state(LockState::Locked);
        self.emit(Event::UnlockFailed { method, reason: message(&e) });
        self.emit(Event::Locked { reason: LockReason::Rollback });
        e
    }

    async fn unlock<F>(&self, method: UnlockMethod, open: F) -> Result<()>
    where
        F: FnOnce(Keyset) -> Result<Sdek> + Send + 'static,
    {
        let mut m = self.inner.machine.lock().await;
        self.require_locked()?;
        if !self.is_set_up() {
            return Err(Error::NotSetUp);
        }
        self.begin_unlock(method);
        let dir = self.state_dir().to_path_buf();
        let result = async {
            let sdek = blocking(move || open(Keyset::read(&dir)?)).await?;
            self.bring_up(&sdek).await?;
            Ok(sdek)
        }
        .await;
        match result {
            Ok(sdek) => {
                m.sdek = Some(Arc::new(sdek));
                self.finish_unlock(method);
                Ok(())
            }
            Err(e) => Err(self.fail_unlock(method, e)),
        }
    }

    // ---- lock -----------------------------------------------------------------------

    /// Locks: closes the store, unmounts application and control volumes, zeroes the keys.
    /// Bootstrap stays mounted. Locking a locked state is a no-op. The state ends locked even
    /// when a step fails; the failures are returned as [`Error::LockIncomplete`].
    pub async fn lock(&self) -> Result<()> {
        let mut m = self.inner.machine.lock().await;
        if self.state() == LockState::Locked {
            return Ok(());
        }
        self.set_state(LockState::Locking);
        self.emit(Event::Locking);
        let (failed, store_err) = self.quiesce(false).await;
        m.sdek = None;
        self.set_state(LockState::Locked);
        self.emit(Event::Locked { reason: LockReason::Requested });
        incomplete(failed, store_err)
    }

    // ---- application volumes --------------------------------------------------------

    /// Creates (if new) and mounts an application volume, and records it as desired-mounted
    /// so it comes back after every unlock. Returns its mountpoint.
    pub async fn ensure_app_volume(&self, volume_id: &str) -> Result<PathBuf> {
        validate_app_volume_id(volume_id)?;
        let m = self.inner.machine.lock().await;
        let sdek = m.sdek.as_ref().ok_or(Error::Locked)?;
        let existing = journal::read(self.state_dir(), volume_id)?;
        if existing.is_none() {
            let key = VolumeKey::derive(sdek, volume_id);
            let user = self.inner.config.app_volume_user.as_deref();
            match self.inner.volumes.create_volume(volume_id, VolumeClass::Application, &key, user).await {
                // The key is derived, not stored: a volume whose journal was lost still opens.
                Ok(()) | Err(BrokerError::AlreadyExists(_)) => {}
                Err(e) => return Err(Error::volume("create", volume_id)(e)),
            }
        }
        let mut rec = existing.unwrap_or(self.record_or_new(volume_id, Desired::Mounted)?);
        rec.desired = Desired::Mounted;
        self.write_record(&mut rec)?;
        let status = self.status_of(&[volume_id.to_string()]).await?;
        if let Some(info) = status.get(volume_id).filter(|i| i.mounted && !i.needs_repair) {
            return self.check_mountpoint(volume_id, info.mountpoint.clone());
        }
        self.mount_one(sdek, &mut rec, status.get(volume_id)).await
    }

    /// Unmounts an application volume and records it as desired-unmounted.
    pub async fn release_app_volume(&self, volume_id: &str) -> Result<()> {
        validate_app_volume_id(volume_id)?;
        let _m = self.inner.machine.lock().await;
        let mut rec = journal::read(self.state_dir(), volume_id)?
            .ok_or_else(|| Error::UnknownVolume { volume: volume_id.to_string() })?;
        rec.desired = Desired::Unmounted;
        self.write_record(&mut rec)?;
        self.unmount_one(volume_id).await
    }

    // ---- reconciliation -------------------------------------------------------------

    /// Compares every journal with what the broker observes. A dead gocryptfs (needs repair)
    /// is reported ([`Event::VolumeNeedsRepair`], journal flag) and, while unlocked,
    /// remounted; desired-mounted volumes that are not mounted are mounted while unlocked;
    /// control and application volumes found mounted while locked are unmounted.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let m = self.inner.machine.lock().await;
        let unlocked = self.state() == LockState::Unlocked;
        let records = journal::read_all(self.state_dir())?;
        let ids: Vec<String> = records.iter().map(|r| r.volume_id.clone()).collect();
        let status = self.status_of(&ids).await?;
        let mut report = ReconcileReport::default();
        for mut rec in records {
            let id = rec.volume_id.clone();
            let info = status.get(&id);
            let mounted = info.is_some_and(|i| i.mounted);
            let dead = info.is_some_and(|i| i.needs_repair);
            let before = rec.clone();
            rec.observed = if mounted && !dead { Observed::Mounted } else { Observed::Unmounted };
            if dead {
                rec.needs_repair = true;
                report.needs_repair.push(id.clone());
                self.emit(Event::VolumeNeedsRepair { volume: id.clone() });
            }
            let wanted = rec.desired == Desired::Mounted
                && (unlocked || (rec.class == VolumeClass::Bootstrap && m.sdek.is_some()));
            if let (true, Some(sdek)) = (wanted && (!mounted || dead), m.sdek.as_ref()) {
                if id == CONTROL {
                    // The store's connection is on the dead mount: reopen it after the remount.
                    let _ = self.inner.store.close().await;
                }
                match self.mount_one(sdek, &mut rec, info).await {
                    Ok(mp) => {
                        report.remounted.push(id.clone());
                        if id == CONTROL {
                            self.inner.store.open(&mp.join(CONTROL_DB_NAME), self.inner.config.role).await?;
                        }
                    }
                    Err(e) => {
                        self.emit(Event::VolumeFailed { volume: id.clone(), reason: message(&e) });
                        report.failed.push((id.clone(), message(&e)));
                    }
                }
                continue;
            }
            let must_not_be_mounted =
                rec.class != VolumeClass::Bootstrap && (!unlocked || rec.desired == Desired::Unmounted);
            if mounted && must_not_be_mounted {
                match self.unmount_one(&id).await {
                    Ok(()) => report.unmounted.push(id.clone()),
                    Err(e) => report.failed.push((id.clone(), message(&e))),
                }
                continue;
            }
            if rec != before {
                self.write_record(&mut rec)?;
            }
        }
        Ok(report)
    }

    /// Runs [`Persistence::reconcile`] every `interval`; failures go to the log and as
    /// events. Abort the task to stop it.
    pub fn spawn_reconciler(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = this.reconcile().await {
                    tracing::error!(error = %message(&e), "volume reconciliation failed");
                }
            }
        })
    }

    // ---- key-set changes ------------------------------------------------------------

    /// Rewraps the SDEK under a new password after checking the current one. Volumes and
    /// their keys are untouched. Needs the unlocked state.
    pub async fn change_password(&self, current: Password, new: Password) -> Result<()> {
        let m = self.inner.machine.lock().await;
        let sdek = Arc::clone(m.sdek.as_ref().ok_or(Error::Locked)?);
        let dir = self.state_dir().to_path_buf();
        blocking(move || {
            let mut ks = Keyset::read(&dir)?;
            ks.unlock_with_password(&current)?;
            ks.change_password(&sdek, &new)?;
            Ok(())
        })
        .await
    }

    /// Sets a new password with the recovery key as typed (the admin forgot the password):
    /// rewraps the SDEK under `new` without touching volume data. Works locked or unlocked
    /// and leaves the lock state as it was. A typo is reported as mistyped.
    pub async fn reset_password(&self, typed_recovery_key: String, new: Password) -> Result<()> {
        let _m = self.inner.machine.lock().await;
        if !self.is_set_up() {
            return Err(Error::NotSetUp);
        }
        let dir = self.state_dir().to_path_buf();
        blocking(move || {
            let key = RecoveryKey::parse(&typed_recovery_key)?;
            let mut ks = Keyset::read(&dir)?;
            let sdek = ks.unlock_with_recovery_key(&key)?;
            ks.change_password(&sdek, &new)?;
            Ok(())
        })
        .await
    }

    /// Replaces the recovery key; returns the new one (show it once). Needs the unlocked state.
    pub async fn rotate_recovery_key(&self) -> Result<RecoveryKey> {
        let m = self.inner.machine.lock().await;
        let sdek = Arc::clone(m.sdek.as_ref().ok_or(Error::Locked)?);
        let dir = self.state_dir().to_path_buf();
        blocking(move || {
            let mut ks = Keyset::read(&dir)?;
            let pending = ks.prepare_recovery_key_rotation(&sdek)?;
            let key = RecoveryKey::parse(pending.recovery_key().expose_secret())?;
            ks.commit_recovery_key_rotation(pending)?;
            Ok(key)
        })
        .await
    }

    // ---- TPM auto-unlock ------------------------------------------------------------

    /// Seals the SDEK to the configured PCRs through the broker and stores the blob in the
    /// key set. Needs the unlocked state.
    pub async fn enable_tpm_unlock(&self) -> Result<()> {
        let sealer = self.inner.sealer.clone().ok_or(Error::TpmUnavailable)?;
        let m = self.inner.machine.lock().await;
        let sdek = m.sdek.as_ref().ok_or(Error::Locked)?;
        let blob = sealer
            .seal_secret(&Secret::from(sdek.as_ref()), &self.inner.config.tpm_pcrs)
            .await
            .map_err(|source| Error::Tpm { step: "seal", source })?;
        let sdek = Arc::clone(sdek);
        let dir = self.state_dir().to_path_buf();
        blocking(move || Ok(Keyset::read(&dir)?.write_tpm_sealed_sdek(&sdek, &blob)?)).await?;
        self.emit(Event::TpmEnrolled);
        Ok(())
    }

    /// Removes the TPM-sealed SDEK (password or recovery key needed from now on).
    pub async fn disable_tpm_unlock(&self) -> Result<()> {
        let _m = self.inner.machine.lock().await;
        let dir = self.state_dir().to_path_buf();
        blocking(move || Ok(Keyset::read(&dir)?.remove_tpm_sealed_sdek()?)).await?;
        self.emit(Event::TpmRemoved);
        Ok(())
    }

    // ---- export and import ----------------------------------------------------------

    /// Writes `exports/<kind>/...pcv` with the volumes quiesced (store closed, volumes
    /// unmounted) and brings them back afterwards if it was unlocked. `control` exports the
    /// control volume (allowed while locked); `full` exports every volume and the key set and
    /// needs the unlocked state (bootstrap is unmounted for it and must be remounted).
    pub async fn export(&self, kind: ExportKind) -> Result<(PathBuf, ExportSummary)> {
        let mut m = self.inner.machine.lock().await;
        let was = self.state();
        if kind == ExportKind::Full && m.sdek.is_none() {
            return Err(Error::Locked);
        }
        let ids: Vec<String> = match kind {
            ExportKind::Control => vec![CONTROL.to_string()],
            ExportKind::Full => {
                // Every journaled volume the broker knows (`ciphertext/` is root's: ask it).
                let ids: Vec<String> = journal::read_all(self.state_dir())?.into_iter().map(|r| r.volume_id).collect();
                let known = self.status_of(&ids).await?;
                ids.into_iter().filter(|id| known.contains_key(id)).collect()
            }
        };
        self.set_state(LockState::Exporting);
        self.emit(Event::ExportStarted { kind });
        let (failed, store_err) = self.quiesce(kind == ExportKind::Full).await;
        let exported = match incomplete(failed, store_err) {
            Err(e) => Err(e),
            Ok(()) => self.write_export_file(kind, &ids).await,
        };
        match &exported {
            Ok((path, summary)) => {
                self.emit(Event::ExportFinished { kind, path: path.clone(), archive_bytes: summary.archive_bytes })
            }
            Err(e) => self.emit(Event::ExportFailed { kind, reason: message(e) }),
        }
        if was == LockState::Unlocked
            && let Some(sdek) = m.sdek.as_ref()
        {
            if let Err(e) = self.bring_up(sdek).await {
                m.sdek = None;
                self.set_state(LockState::Locked);
                self.emit(Event::Locked { reason: LockReason::ExportResumeFailed });
                return Err(Error::ResumeAfterExport { source: Box::new(e) });
            }
            self.set_state(LockState::Unlocked);
        } else {
            self.set_state(LockState::Locked);
        }
        exported
    }

    /// Imports an archive: locks fully first (store closed, every volume unmounted including
    /// bootstrap, keys zeroed), then validates and swaps it in (see `piccolo_keyset::import`).
    /// The state stays locked afterwards, also on failure: unlock with the export's password
    /// or recovery key.
    pub async fn import<R: std::io::Read + Send + 'static>(&self, reader: R) -> Result<ImportReport> {
        let mut m = self.inner.machine.lock().await;
        self.set_state(LockState::Importing);
        let (failed, store_err) = self.quiesce(true).await;
        m.sdek = None;
        let result = match incomplete(failed, store_err) {
            Err(e) => Err(e),
            Ok(()) => {
                let limits = &self.inner.config.import_limits;
                self.inner.volumes.import_archive(Box::new(reader), limits).await.map_err(|e| match e {
                    BrokerError::Archive(k) => Error::Keyset(k),
                    // The broker's archive validation refused it: the same error kind as an
                    // in-process import would give (the message is the broker's).
                    BrokerError::Rejected(reason) => {
                        let reason = reason.strip_prefix("import archive rejected: ").unwrap_or(&reason).to_string();
                        Error::Keyset(piccolo_keyset::Error::ArchiveRejected { reason })
                    }
                    source => Error::Volume { step: "import", volume: "(archive)".into(), source },
                })
            }
        };
        if let Ok(report) = &result {
            self.emit(Event::Imported { kind: report.kind, volumes: report.volumes.clone() });
        }
        self.set_state(LockState::Locked);
        self.emit(Event::Locked { reason: LockReason::Import });
        result
    }
}

impl Persistence {
    /// Streams the export from the volume backend into `exports/<kind>/{control-plane,
    /// full-data}.pcv` in this process's own `exports/` dir: temp file, fsync, rename, fsync
    /// of the directory, so a reader never sees a partial archive under the final name.
    async fn write_export_file(&self, kind: ExportKind, ids: &[String]) -> Result<(PathBuf, ExportSummary)> {
        let name = match kind {
            ExportKind::Control => "control-plane.pcv",
            ExportKind::Full => "full-data.pcv",
        };
        let dir = self.state_dir().join("exports").join(kind.name());
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        let state_err = |dir: &Path| {
            let dir = dir.to_path_buf();
            move |source| Error::StateDir { path: dir, source }
        };
        let file = {
            let (dir, tmp) = (dir.clone(), tmp.clone());
            blocking(move || {
                crate::durable::private_dir(&dir).map_err(state_err(&dir))?;
                // A leftover temp file of this pid is never read: replace it.
                let _ = std::fs::remove_file(&tmp);
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(state_err(&tmp))
            })
            .await?
        };
        let exported = self.inner.volumes.export_archive(kind, ids, file).await.map_err(|e| match e {
            BrokerError::Archive(k) => Error::Keyset(k),
            source => Error::Volume { step: "export", volume: ids.join(","), source },
        });
        let (dir2, tmp2, path2) = (dir.clone(), tmp.clone(), path.clone());
        let result = match exported {
            Ok((file, summary)) => {
                blocking(move || {
                    file.sync_all().map_err(state_err(&tmp2))?;
                    drop(file);
                    std::fs::rename(&tmp2, &path2).map_err(state_err(&path2))?;
                    crate::durable::fsync_dir(&dir2).map_err(state_err(&dir2))?;
                    Ok(summary)
                })
                .await
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Never read under the temp name; removing it is tidy-up only.
            let _ = std::fs::remove_file(&tmp);
        }
        result.map(|summary| (path, summary))
    }
}

/// The key set a setup runs under: the pending one of an interrupted attempt when `password`
/// opens it, else a new pending one. `existing` are the setup volumes the broker already has;
/// they were created under the pending key set's SDEK, so without it they cannot be reused.
fn open_setup_keyset(dir: &Path, password: &Password, kdf: KdfParams, existing: Vec<String>) -> Result<CreatedKeyset> {
    match Keyset::read_pending(dir)? {
        Some(mut keyset) => match keyset.unlock_with_password(password) {
            Ok(sdek) => {
                let recovery_key = keyset.rotate_recovery_key(&sdek)?;
                Ok(CreatedKeyset { keyset, sdek, recovery_key })
            }
            Err(piccolo_keyset::Error::WrongPassword) if existing.is_empty() => {
                Keyset::discard_pending(dir)?;
                Ok(Keyset::create_pending(dir, password, kdf)?)
            }
            Err(piccolo_keyset::Error::WrongPassword) => Err(Error::SetupInterrupted { volumes: existing }),
            Err(e) => Err(e.into()),
        },
        None if !existing.is_empty() => Err(Error::SetupInterrupted { volumes: existing }),
        None => Ok(Keyset::create_pending(dir, password, kdf)?),
    }
}

fn incomplete(failed: Vec<String>, store_err: Option<String>) -> Result<()> {
    if failed.is_empty() && store_err.is_none() {
        return Ok(());
    }
    let mut volumes = failed;
    if let Some(e) = store_err {
        volumes.push(format!("(control store: {e})"));
    }
    Err(Error::LockIncomplete { volumes })
}
