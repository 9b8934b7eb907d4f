// SPDX-License-Identifier: Apache-2.0
//! The lock/unlock state machine with real gocryptfs volumes over FUSE (run directly as root
//! through [`common::LocalGocryptfs`]), the real SQLite store inside the control volume and a
//! real swtpm for TPM auto-unlock.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{FAST, LocalGocryptfs, PASSWORD, ToolsSealer, entries, files_containing, is_mounted, pw};
use piccolo_keyset::ExportKind;
use piccolo_persistence::{
    BOOTSTRAP, CONTROL, Config, Desired, Error, Event, LockReason, LockState, Observed, Persistence, UnlockMethod,
};
use piccolo_store::{AppWrite, Role};
use tokio::sync::broadcast;

const MARKER: &str = "PLAINTEXT-MARKER-5f1c9e";

struct Fixture {
    dir: tempfile::TempDir,
    backend: Arc<LocalGocryptfs>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new().prefix("piccolo-persist-").tempdir().unwrap();
        let backend = Arc::new(LocalGocryptfs::new(dir.path()));
        Fixture { dir, backend }
    }

    fn state(&self) -> &Path {
        self.dir.path()
    }

    fn config(&self, role: Role) -> Config {
        let mut c = Config::new(self.state());
        c.kdf = FAST;
        c.role = role;
        c
    }

    async fn persistence(&self, role: Role, sealer: Option<Arc<ToolsSealer>>) -> Persistence {
        let sealer = sealer.map(|s| s as Arc<dyn piccolo_persistence::SealBackend>);
        Persistence::new(self.config(role), self.backend.clone(), sealer).await.unwrap()
    }

    fn mount(&self, id: &str) -> PathBuf {
        self.state().join("mounts").join(id)
    }

    /// The invariant while locked: control and application mountpoints are not mounted and
    /// empty, and the marker is nowhere under the state dir (bootstrap's mount excepted: it
    /// stays mounted by design and never receives the marker).
    fn assert_locked_invariant(&self, app_ids: &[&str]) {
        for id in std::iter::once(&CONTROL).chain(app_ids) {
            let mp = self.mount(id);
            assert!(!is_mounted(&mp), "{id} is still mounted while locked");
            assert_eq!(entries(&mp), Vec::<String>::new(), "{id}'s mountpoint holds files while locked");
        }
        let hits = files_containing(self.state(), MARKER.as_bytes(), &[self.mount(BOOTSTRAP)]);
        assert!(hits.is_empty(), "plaintext marker found while locked: {hits:?}");
    }
}

fn drain(rx: &mut broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

fn marker_app() -> AppWrite {
    AppWrite { name: "web".into(), spec: format!("env: {MARKER}"), enabled: true, status: "running".into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_lock_unlock_round_trips_and_leaves_no_plaintext_while_locked() {
    let fx = Fixture::new();
    let p = fx.persistence(Role::Leader, None).await;
    assert_eq!(p.state(), LockState::Locked);
    assert!(!p.is_set_up());
    assert!(matches!(p.unlock_with_password(pw(PASSWORD)).await, Err(Error::NotSetUp)));
    let mut events = p.subscribe();

    let recovery = p.setup(pw(PASSWORD)).await.unwrap();
    assert_eq!(p.state(), LockState::Unlocked);
    assert_eq!(
        drain(&mut events),
        [
            Event::Unlocking { method: UnlockMethod::Setup },
            Event::VolumeMounted { volume: BOOTSTRAP.into() },
            Event::VolumeMounted { volume: CONTROL.into() },
            Event::Unlocked { method: UnlockMethod::Setup },
        ]
    );
    assert!(matches!(p.setup(pw(PASSWORD)).await, Err(Error::NotLocked { .. })));
    let store = p.store();
    assert!(fx.mount(CONTROL).join("control.db").exists(), "the store lives inside the control mount");
    store.write_app("admin", marker_app()).await.unwrap();
    store.write_remote_config("admin", serde_json::json!({ "note": MARKER })).await.unwrap();
    let app_mp = p.ensure_app_volume("app-1").await.unwrap();
    assert_eq!(app_mp, fx.mount("app-1"));
    std::fs::write(app_mp.join("data.txt"), MARKER).unwrap();
    // Plaintext is visible while unlocked (so the later "not found" means something).
    assert!(!files_containing(&fx.mount("app-1"), MARKER.as_bytes(), &[]).is_empty());
    drain(&mut events);

    p.lock().await.unwrap();
    assert_eq!(p.state(), LockState::Locked);
    let evs = drain(&mut events);
    assert_eq!(evs.first(), Some(&Event::Locking));
    assert_eq!(evs.last(), Some(&Event::Locked { reason: LockReason::Requested }));
    assert!(evs.contains(&Event::VolumeUnmounted { volume: CONTROL.into() }));
    assert!(evs.contains(&Event::VolumeUnmounted { volume: "app-1".into() }));
    assert!(!evs.contains(&Event::VolumeUnmounted { volume: BOOTSTRAP.into() }));
    assert!(is_mounted(&fx.mount(BOOTSTRAP)), "bootstrap stays mounted by design");
    assert!(matches!(store.read_apps().await, Err(piccolo_store::Error::Locked)));
    fx.assert_locked_invariant(&["app-1"]);
    let control = p.read_volumes().await.unwrap().into_iter().find(|r| r.volume_id == CONTROL).unwrap();
    assert_eq!((control.desired, control.observed), (Desired::Mounted, Observed::Unmounted));
    // Lock is idempotent.
    p.lock().await.unwrap();

    // A wrong password: stays locked, says why.
    let err = p.unlock_with_password(pw("wrong password!")).await.unwrap_err();
    assert!(matches!(err, Error::Keyset(piccolo_keyset::Error::WrongPassword)), "{err:?}");
    assert_eq!(p.state(), LockState::Locked);
    let evs = drain(&mut events);
    assert!(
        matches!(
            &evs[..],
            [
                Event::Unlocking { method: UnlockMethod::Password },
                Event::UnlockFailed { method: UnlockMethod::Password, .. },
                Event::Locked { reason: LockReason::Rollback }
            ]
        ),
        "{evs:?}"
    );
    fx.assert_locked_invariant(&["app-1"]);

    // Unlock brings the store and the desired-mounted app volume back.
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    assert_eq!(store.read_app("web").await.unwrap().unwrap().spec, format!("env: {MARKER}"));
    assert_eq!(std::fs::read_to_string(fx.mount("app-1").join("data.txt")).unwrap(), MARKER);
    assert_eq!(store.read_revisions(0, 10).await.unwrap().len(), 2);
    p.lock().await.unwrap();
    fx.assert_locked_invariant(&["app-1"]);

    // The recovery key opens the same state; a typo is reported as such.
    let typo = {
        let mut s = recovery.expose_secret().to_string();
        let c = if s.starts_with('A') { "B" } else { "A" };
        s.replace_range(0..1, c);
        s
    };
    let err = p.unlock_with_recovery_key(typo).await.unwrap_err();
    assert!(matches!(err, Error::Keyset(piccolo_keyset::Error::RecoveryKeyMistyped { .. })), "{err:?}");
    p.unlock_with_recovery_key(recovery.expose_secret().to_string()).await.unwrap();
    assert_eq!(store.read_apps().await.unwrap().len(), 1);
    store.read_journal_verification().await.unwrap();
    p.lock().await.unwrap();
    fx.assert_locked_invariant(&["app-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_failure_half_way_rolls_back_to_fully_locked() {
    let fx = Fixture::new();
    let p = fx.persistence(Role::Leader, None).await;
    p.setup(pw(PASSWORD)).await.unwrap();
    p.store().write_app("admin", marker_app()).await.unwrap();
    p.ensure_app_volume("app-1").await.unwrap();
    p.lock().await.unwrap();

    // Break app-1 for real: its gocryptfs.conf no longer parses, so the mount fails after
    // bootstrap and control were mounted.
    let conf = fx.state().join("ciphertext/app-1/gocryptfs.conf");
    let good = std::fs::read(&conf).unwrap();
    std::fs::write(&conf, b"{ not json").unwrap();
    let mut events = p.subscribe();
    let err = p.unlock_with_password(pw(PASSWORD)).await.unwrap_err();
    assert!(matches!(&err, Error::Volume { step: "mount", volume, .. } if volume == "app-1"), "{err:?}");
    assert_eq!(p.state(), LockState::Locked);
    let evs = drain(&mut events);
    assert!(evs.contains(&Event::VolumeMounted { volume: CONTROL.into() }), "{evs:?}");
    assert!(evs.contains(&Event::VolumeUnmounted { volume: CONTROL.into() }), "control was rolled back: {evs:?}");
    assert_eq!(evs.last(), Some(&Event::Locked { reason: LockReason::Rollback }));
    assert!(matches!(p.store().read_apps().await, Err(piccolo_store::Error::Locked)));
    fx.assert_locked_invariant(&["app-1"]);
    let rec = p.read_volumes().await.unwrap().into_iter().find(|r| r.volume_id == "app-1").unwrap();
    assert!(rec.last_error.is_some());

    // Repaired, the next unlock works and nothing was lost.
    std::fs::write(&conf, good).unwrap();
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    assert!(p.store().read_app("web").await.unwrap().is_some());
    p.lock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gocryptfs_is_noticed_reported_and_remounted() {
    let fx = Fixture::new();
    let p = fx.persistence(Role::Leader, None).await;
    p.setup(pw(PASSWORD)).await.unwrap();
    let mp = p.ensure_app_volume("app-1").await.unwrap();
    std::fs::write(mp.join("f"), b"kept").unwrap();
    p.store().write_app("admin", marker_app()).await.unwrap();
    assert_eq!(p.reconcile().await.unwrap(), Default::default(), "healthy: nothing to do");

    let mut events = p.subscribe();
    fx.backend.kill_gocryptfs("app-1");
    fx.backend.kill_gocryptfs(CONTROL);
    let report = p.reconcile().await.unwrap();
    assert_eq!(report.needs_repair, ["app-1", CONTROL]);
    assert_eq!(report.remounted, ["app-1", CONTROL]);
    assert!(report.failed.is_empty(), "{report:?}");
    let evs = drain(&mut events);
    assert!(evs.contains(&Event::VolumeNeedsRepair { volume: "app-1".into() }));
    assert!(evs.contains(&Event::VolumeNeedsRepair { volume: CONTROL.into() }));
    assert_eq!(std::fs::read(mp.join("f")).unwrap(), b"kept");
    // The store was reopened on the new control mount.
    assert!(p.store().read_app("web").await.unwrap().is_some());
    p.store().write_app("admin", AppWrite { name: "b".into(), ..marker_app() }).await.unwrap();
    let rec = p.read_volumes().await.unwrap().into_iter().find(|r| r.volume_id == "app-1").unwrap();
    assert!(!rec.needs_repair && rec.observed == Observed::Mounted);

    // While locked, a dead bootstrap is reported (it cannot be remounted without a key).
    p.lock().await.unwrap();
    fx.backend.kill_gocryptfs(BOOTSTRAP);
    let report = p.reconcile().await.unwrap();
    assert_eq!(report.needs_repair, [BOOTSTRAP]);
    assert!(report.remounted.is_empty());
    let rec = p.read_volumes().await.unwrap().into_iter().find(|r| r.volume_id == BOOTSTRAP).unwrap();
    assert!(rec.needs_repair);
    // The next unlock repairs it.
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    let rec = p.read_volumes().await.unwrap().into_iter().find(|r| r.volume_id == BOOTSTRAP).unwrap();
    assert!(!rec.needs_repair);
    p.lock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_unlocked_unmounts_leftovers_and_released_volumes_stay_down() {
    let fx = Fixture::new();
    let p = fx.persistence(Role::Leader, None).await;
    p.setup(pw(PASSWORD)).await.unwrap();
    p.ensure_app_volume("app-1").await.unwrap();
    p.ensure_app_volume("app-2").await.unwrap();
    p.release_app_volume("app-2").await.unwrap();
    assert!(!is_mounted(&fx.mount("app-2")));
    p.store().write_app("admin", marker_app()).await.unwrap();
    // The API worker dies without locking: the mounts outlive it.
    p.store().close().await.unwrap();
    drop(p);
    assert!(is_mounted(&fx.mount(CONTROL)));

    let p = fx.persistence(Role::Leader, None).await;
    assert_eq!(p.state(), LockState::Locked);
    let report = p.reconcile().await.unwrap();
    assert_eq!(report.unmounted, ["app-1", CONTROL]);
    fx.assert_locked_invariant(&["app-1", "app-2"]);
    assert!(is_mounted(&fx.mount(BOOTSTRAP)));
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    assert!(is_mounted(&fx.mount("app-1")), "desired-mounted volume came back");
    assert!(!is_mounted(&fx.mount("app-2")), "released volume stays unmounted");
    assert!(matches!(p.ensure_app_volume("control").await, Err(Error::InvalidVolumeId { .. })));
    assert!(matches!(p.ensure_app_volume("../x").await, Err(Error::InvalidVolumeId { .. })));
    p.lock().await.unwrap();
    assert!(matches!(p.ensure_app_volume("app-3").await, Err(Error::Locked)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_opens_the_store_read_only() {
    let fx = Fixture::new();
    let leader = fx.persistence(Role::Leader, None).await;
    leader.setup(pw(PASSWORD)).await.unwrap();
    leader.store().write_app("admin", marker_app()).await.unwrap();
    leader.lock().await.unwrap();
    drop(leader);

    let follower = fx.persistence(Role::Follower, None).await;
    follower.unlock_with_password(pw(PASSWORD)).await.unwrap();
    let store = follower.store();
    assert_eq!(store.read_role().await.unwrap(), Role::Follower);
    assert!(store.read_app("web").await.unwrap().is_some());
    assert!(matches!(store.write_app("admin", marker_app()).await, Err(piccolo_store::Error::NotLeader)));
    let rec = follower.read_volumes().await.unwrap().into_iter().find(|r| r.volume_id == CONTROL).unwrap();
    assert_eq!(rec.role, Role::Follower);
    follower.lock().await.unwrap();
    fx.assert_locked_invariant(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tpm_auto_unlock_until_pcr7_changes() {
    let fx = Fixture::new();
    let sealer = Arc::new(ToolsSealer { tpm: piccolo_testkit::swtpm::Swtpm::start() });
    let p = fx.persistence(Role::Leader, Some(sealer.clone())).await;
    assert!(!p.auto_unlock().await.unwrap(), "not set up: nothing to do");
    p.setup(pw(PASSWORD)).await.unwrap();
    p.store().write_app("admin", marker_app()).await.unwrap();
    p.enable_tpm_unlock().await.unwrap();
    assert!(p.read_tpm_enrolled().await.unwrap());
    p.lock().await.unwrap();
    drop(p);

    // "Boot": a new process unlocks without a password.
    let p = fx.persistence(Role::Leader, Some(sealer.clone())).await;
    p.reconcile().await.unwrap();
    assert!(p.auto_unlock().await.unwrap());
    assert_eq!(p.state(), LockState::Unlocked);
    assert!(p.store().read_app("web").await.unwrap().is_some());
    p.lock().await.unwrap();

    // Secure Boot state changes: PCR 7 differs, the TPM refuses, the state stays locked.
    sealer.tpm.extend_pcr(7);
    let mut events = p.subscribe();
    let err = p.auto_unlock().await.unwrap_err();
    assert_eq!(err.to_string(), "TPM unlock failed: PCR 7 changed");
    assert_eq!(p.state(), LockState::Locked);
    let evs = drain(&mut events);
    assert!(
        evs.iter().any(|e| matches!(e,
        Event::UnlockFailed { method: UnlockMethod::Tpm, reason } if reason == "TPM unlock failed: PCR 7 changed")),
        "{evs:?}"
    );
    fx.assert_locked_invariant(&[]);
    // The password still works; re-enrolling seals to the new PCR 7.
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    p.enable_tpm_unlock().await.unwrap();
    p.lock().await.unwrap();
    p.unlock_with_tpm().await.unwrap();
    p.disable_tpm_unlock().await.unwrap();
    p.lock().await.unwrap();
    assert!(!p.auto_unlock().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_export_restores_on_new_hardware_with_the_export_password() {
    let fx = Fixture::new();
    let p = fx.persistence(Role::Leader, None).await;
    p.setup(pw(PASSWORD)).await.unwrap();
    p.store().write_app("admin", marker_app()).await.unwrap();
    let mp = p.ensure_app_volume("app-1").await.unwrap();
    std::fs::write(mp.join("data.txt"), MARKER).unwrap();
    let mut events = p.subscribe();
    let (path, summary) = p.export(ExportKind::Full).await.unwrap();
    assert_eq!(summary.volumes, ["app-1", BOOTSTRAP, CONTROL]);
    let evs = drain(&mut events);
    assert_eq!(evs.first(), Some(&Event::ExportStarted { kind: ExportKind::Full }));
    assert!(evs.contains(&Event::ExportFinished {
        kind: ExportKind::Full,
        path: path.clone(),
        archive_bytes: summary.archive_bytes
    }));
    // Quiesced for the export, back afterwards: unlocked, store writable.
    assert_eq!(p.state(), LockState::Unlocked);
    p.store().write_app("admin", AppWrite { name: "after".into(), ..marker_app() }).await.unwrap();
    let archive = std::fs::read(&path).unwrap();
    assert!(!archive.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()), "the archive holds ciphertext only");
    // Change the password after the export: the import must need the export's password.
    p.change_password(pw(PASSWORD), pw("a newer password")).await.unwrap();
    p.lock().await.unwrap();

    // New hardware: an empty state dir.
    let fx2 = Fixture::new();
    let q = fx2.persistence(Role::Leader, None).await;
    let report = q.import(std::fs::File::open(&path).unwrap()).await.unwrap();
    assert!(report.keyset_replaced && report.requires_unlock);
    assert_eq!(q.state(), LockState::Locked);
    assert!(matches!(q.store().read_apps().await, Err(piccolo_store::Error::Locked)));
    assert!(q.unlock_with_password(pw("a newer password")).await.is_err());
    q.unlock_with_password(pw(PASSWORD)).await.unwrap();
    assert!(q.store().read_app("web").await.unwrap().is_some());
    assert!(q.store().read_app("after").await.unwrap().is_none(), "written after the export");
    assert_eq!(std::fs::read_to_string(fx2.mount("app-1").join("data.txt")).unwrap(), MARKER);
    q.lock().await.unwrap();
    fx2.assert_locked_invariant(&["app-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_export_while_locked_and_import_roll_the_store_back() {
    let fx = Fixture::new();
    let p = fx.persistence(Role::Leader, None).await;
    p.setup(pw(PASSWORD)).await.unwrap();
    p.store().write_app("admin", marker_app()).await.unwrap();
    p.lock().await.unwrap();
    assert!(matches!(p.export(ExportKind::Full).await, Err(Error::Locked)));
    let (path, summary) = p.export(ExportKind::Control).await.unwrap();
    assert_eq!(summary.volumes, [CONTROL]);
    assert_eq!(p.state(), LockState::Locked);

    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    p.store().write_app_deletion("admin", "web").await.unwrap();
    let mut events = p.subscribe();
    let report = p.import(std::fs::File::open(&path).unwrap()).await.unwrap();
    assert_eq!(report.volumes, [CONTROL]);
    assert_eq!(p.state(), LockState::Locked, "import leaves the store locked");
    let evs = drain(&mut events);
    assert!(evs.contains(&Event::Imported { kind: ExportKind::Control, volumes: vec![CONTROL.into()] }));
    assert_eq!(evs.last(), Some(&Event::Locked { reason: LockReason::Import }));
    fx.assert_locked_invariant(&[]);
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    assert!(p.store().read_app("web").await.unwrap().is_some(), "the store is as exported");

    // A damaged archive is refused and changes nothing (still locked afterwards).
    let mut bad = std::fs::read(&path).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let err = p.import(std::io::Cursor::new(bad)).await.unwrap_err();
    assert!(matches!(err, Error::Keyset(_)), "{err:?}");
    assert_eq!(p.state(), LockState::Locked);
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    assert!(p.store().read_app("web").await.unwrap().is_some());
    p.lock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_that_failed_half_way_resumes_with_the_same_password_only() {
    let fx = Fixture::new();
    // A real failure after both volumes exist: control's mountpoint cannot be made.
    std::fs::create_dir_all(fx.state().join("mounts")).unwrap();
    std::fs::write(fx.mount(CONTROL), b"in the way").unwrap();
    let p = fx.persistence(Role::Leader, None).await;
    let err = p.setup(pw(PASSWORD)).await.unwrap_err();
    assert!(matches!(&err, Error::Volume { step: "mount", volume, .. } if volume == CONTROL), "{err:?}");
    assert_eq!(p.state(), LockState::Locked);
    assert!(!p.is_set_up(), "a failed setup must not count as set up");
    assert!(fx.state().join("ciphertext").join(CONTROL).is_dir());
    assert!(matches!(p.unlock_with_password(pw(PASSWORD)).await, Err(Error::NotSetUp)));
    drop(p);

    // After a restart: another password cannot take over the volumes the first attempt made.
    std::fs::remove_file(fx.mount(CONTROL)).unwrap();
    let p = fx.persistence(Role::Leader, None).await;
    let err = p.setup(pw("a different password entirely")).await.unwrap_err();
    match &err {
        Error::SetupInterrupted { volumes } => assert_eq!(volumes, &[BOOTSTRAP.to_string(), CONTROL.to_string()]),
        other => panic!("expected SetupInterrupted, got {other:?}"),
    }
    assert!(err.to_string().contains("retry setup with that password"), "{err}");
    assert!(!p.is_set_up());

    // The same password resumes, with a fresh recovery key that works.
    let recovery = p.setup(pw(PASSWORD)).await.unwrap();
    assert_eq!(p.state(), LockState::Unlocked);
    assert!(p.is_set_up());
    assert!(!fx.state().join(piccolo_keyset::PENDING_KEYSET_RELATIVE_PATH).exists());
    p.store().write_app("admin", marker_app()).await.unwrap();
    p.lock().await.unwrap();
    p.unlock_with_recovery_key(recovery.expose_secret().to_string()).await.unwrap();
    assert!(p.store().read_app("web").await.unwrap().is_some());
    assert!(matches!(p.setup(pw(PASSWORD)).await, Err(Error::NotLocked { .. })));
    p.lock().await.unwrap();
    assert!(matches!(p.setup(pw(PASSWORD)).await, Err(Error::AlreadySetUp)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_that_failed_before_any_volume_starts_over_with_any_password() {
    let fx = Fixture::new();
    // The first volume cannot be created: `ciphertext` is a file.
    std::fs::write(fx.state().join("ciphertext"), b"in the way").unwrap();
    let p = fx.persistence(Role::Leader, None).await;
    let err = p.setup(pw(PASSWORD)).await.unwrap_err();
    assert!(matches!(&err, Error::Volume { step: "create", volume, .. } if volume == BOOTSTRAP), "{err:?}");
    assert!(fx.state().join(piccolo_keyset::PENDING_KEYSET_RELATIVE_PATH).exists());
    assert!(!p.is_set_up());

    std::fs::remove_file(fx.state().join("ciphertext")).unwrap();
    let other = "another admin password";
    p.setup(pw(other)).await.unwrap();
    p.lock().await.unwrap();
    assert!(matches!(
        p.unlock_with_password(pw(PASSWORD)).await,
        Err(Error::Keyset(piccolo_keyset::Error::WrongPassword))
    ));
    p.unlock_with_password(pw(other)).await.unwrap();
    p.lock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_this_process_cannot_see_is_refused_before_the_store_opens() {
    let fx = Fixture::new();
    let p = fx.persistence(Role::Leader, None).await;
    p.setup(pw(PASSWORD)).await.unwrap();
    p.store().write_app("admin", marker_app()).await.unwrap();
    p.lock().await.unwrap();

    // The backend now mounts in a private namespace: it reports success, but here
    // mounts/control is the bare directory on the state file system.
    fx.backend.hide_mounts.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = p.unlock_with_password(pw(PASSWORD)).await.unwrap_err();
    fx.backend.kill_hidden();
    match &err {
        Error::MountNotVisible { volume, .. } => assert_eq!(volume, CONTROL),
        other => panic!("expected MountNotVisible, got {other:?}"),
    }
    assert!(err.to_string().contains("mount propagation"), "{err}");
    assert_eq!(p.state(), LockState::Locked);
    assert_eq!(entries(&fx.mount(CONTROL)), Vec::<String>::new(), "nothing was written into the bare mountpoint");
    fx.assert_locked_invariant(&[]);

    fx.backend.hide_mounts.store(false, std::sync::atomic::Ordering::SeqCst);
    p.unlock_with_password(pw(PASSWORD)).await.unwrap();
    assert!(p.store().read_app("web").await.unwrap().is_some());
    p.lock().await.unwrap();
}
