// SPDX-License-Identifier: Apache-2.0
//! The control store against real SQLite files: migrations, pragmas, journal read-back and
//! tamper detection, Locked and NotLeader gating, maintenance failures reported.

use std::path::{Path, PathBuf};
use std::time::Duration;

use piccolo_store::{AppWrite, Error, Role, SCHEMA_VERSION, Store, StoreEvent};
use rusqlite::Connection;
use zeroize::Zeroizing;

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("control.db")
}

async fn open_leader(path: &Path) -> Store {
    let store = Store::locked();
    store.open(path, Role::Leader).await.expect("open leader");
    store
}

fn app(name: &str, status: &str) -> AppWrite {
    AppWrite {
        name: name.into(),
        spec: format!("name: {name}\nimage: busybox\n"),
        enabled: true,
        status: status.into(),
    }
}

#[tokio::test]
async fn fresh_file_is_migrated_with_durable_pragmas_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open_leader(&path).await;
    assert_eq!(store.read_schema_version().await.unwrap(), SCHEMA_VERSION);
    store.write_app("admin", app("web", "stopped")).await.unwrap();
    // Another connection sees WAL mode (persistent) and the tables the migration made.
    let raw = Connection::open(&path).unwrap();
    let mode: String = raw.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
    assert_eq!(mode, "wal");
    let uv: u32 = raw.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(uv, SCHEMA_VERSION);
    let tables: Vec<String> = raw
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(tables, ["apps", "auth_sessions", "auth_signing_keys", "remote_config", "revisions"]);
    assert!(path.with_extension("db-wal").exists(), "WAL file exists while open");
    drop(raw);
    store.close().await.unwrap();
    // Closing checkpoints and truncates the WAL.
    let wal = path.with_extension("db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
    // Reopening runs no migration again and keeps the data.
    store.open(&path, Role::Leader).await.unwrap();
    assert_eq!(store.read_app("web").await.unwrap().unwrap().status, "stopped");
    assert_eq!(store.read_head_revision().await.unwrap().unwrap().revision, 1);
}

#[tokio::test]
async fn newer_schema_is_refused_and_followers_do_not_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    {
        let raw = Connection::open(&path).unwrap();
        raw.pragma_update(None, "user_version", SCHEMA_VERSION + 7).unwrap();
    }
    let store = Store::locked();
    match store.open(&path, Role::Leader).await {
        Err(Error::SchemaTooNew { found, supported }) => {
            assert_eq!((found, supported), (SCHEMA_VERSION + 7, SCHEMA_VERSION));
        }
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert!(!store.is_open());
    // A file at version 0 (never migrated): the follower refuses, the file is not changed.
    let path0 = dir.path().join("zero.db");
    Connection::open(&path0).unwrap().execute_batch("CREATE TABLE unrelated (x INTEGER)").unwrap();
    match store.open(&path0, Role::Follower).await {
        Err(Error::FollowerSchemaOutdated { found: 0, expected }) => assert_eq!(expected, SCHEMA_VERSION),
        other => panic!("expected FollowerSchemaOutdated, got {other:?}"),
    }
    let uv: u32 = Connection::open(&path0).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(uv, 0);
    // The leader migrates it from 0 and keeps the unrelated table.
    store.open(&path0, Role::Leader).await.unwrap();
    assert_eq!(store.read_schema_version().await.unwrap(), SCHEMA_VERSION);
    store.close().await.unwrap();
    let n: i64 =
        Connection::open(&path0).unwrap().query_row("SELECT count(*) FROM unrelated", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn every_change_is_one_journal_row_readable_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_leader(&db_path(&dir)).await;
    let r1 = store.write_remote_config("piccolo-remote", serde_json::json!({"portal": "a.example"})).await.unwrap();
    let r2 = store.write_app("admin", app("web", "running")).await.unwrap();
    let r3 = store.write_signing_key("piccolo-api", "k1", "HS256", Zeroizing::new(vec![7u8; 32])).await.unwrap();
    let (r4, sess) =
        store.write_session("piccolo-api", "session-secret-id-1", "admin", "2999-01-01T00:00:00Z").await.unwrap();
    let r5 = store.write_session_revoked("admin", "session-secret-id-1").await.unwrap();
    let r6 = store.write_signing_key_retired("admin", "k1").await.unwrap();
    let r7 = store.write_app_deletion("admin", "web").await.unwrap();
    let r8 = store.write_remote_config("piccolo-remote", serde_json::json!({"portal": "b.example"})).await.unwrap();
    let (none, purged) = store.write_expired_sessions_purged("piccolo-api", "2000-01-01T00:00:00Z").await.unwrap();
    assert_eq!((none, purged), (None, 0), "nothing expired: no change, no revision");
    let (r9, purged) = store.write_expired_sessions_purged("piccolo-api", "3000-01-01T00:00:00Z").await.unwrap();
    assert_eq!(purged, 1);
    let r9 = r9.unwrap();

    let all = store.read_revisions(0, 100).await.unwrap();
    let written = [&r1, &r2, &r3, &r4, &r5, &r6, &r7, &r8, &r9];
    assert_eq!(all.len(), written.len());
    for (i, (row, w)) in all.iter().zip(written).enumerate() {
        assert_eq!(row, w, "row {i} reads back as returned");
        assert_eq!(row.revision, i as u64 + 1);
        assert!(row.at.ends_with('Z'), "{}", row.at);
    }
    let kinds: Vec<&str> = all.iter().map(|r| r.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "remote_config.write",
            "app.write",
            "auth.signing_key.write",
            "auth.session.write",
            "auth.session.revoke",
            "auth.signing_key.retire",
            "app.delete",
            "remote_config.write",
            "auth.session.purge",
        ]
    );
    assert_eq!(all[1].actor, "admin");
    assert_eq!(all[1].subject, "web");
    assert_eq!(all[3].subject, sess.session_hash);
    // Paging and single-row reads.
    let page = store.read_revisions(3, 2).await.unwrap();
    assert_eq!(page.iter().map(|r| r.revision).collect::<Vec<_>>(), [4, 5]);
    assert_eq!(store.read_revision(8).await.unwrap().unwrap(), r8);
    assert_eq!(store.read_revision(99).await.unwrap(), None);
    // Identical documents give identical payload digests; different ones differ.
    assert_ne!(r1.payload_sha256, r8.payload_sha256);
    let check = store.read_journal_verification().await.unwrap();
    assert_eq!(check.rows, 9);
    assert_eq!(check.head.unwrap(), r9);
    // The values are there.
    assert_eq!(store.read_remote_config().await.unwrap().unwrap().document["portal"], "b.example");
    assert_eq!(store.read_remote_config().await.unwrap().unwrap().revision, 8);
    assert!(store.read_app("web").await.unwrap().is_none());
    let keys = store.read_signing_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(&keys[0].secret[..], &[7u8; 32]);
    assert!(keys[0].retired.is_some());
    assert!(!format!("{keys:?}").contains("7, 7"), "Debug redacts key material");
    assert!(store.read_session("session-secret-id-1").await.unwrap().is_none(), "purged");
}

#[tokio::test]
async fn failed_changes_leave_no_revision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_leader(&db_path(&dir)).await;
    store.write_signing_key("api", "k1", "HS256", Zeroizing::new(vec![1; 32])).await.unwrap();
    assert!(matches!(
        store.write_signing_key("api", "k1", "HS256", Zeroizing::new(vec![2; 32])).await,
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(store.write_app_deletion("admin", "nope").await, Err(Error::NotFound { .. })));
    assert!(matches!(store.write_session_revoked("admin", "nope").await, Err(Error::NotFound { .. })));
    assert!(matches!(store.write_app("", app("x", "s")).await, Err(Error::InvalidInput { .. })));
    assert!(matches!(store.write_app("admin", app("", "s")).await, Err(Error::InvalidInput { .. })));
    let mut big = app("big", "s");
    big.spec = "x".repeat(piccolo_store::MAX_DOCUMENT_BYTES + 1);
    assert!(matches!(store.write_app("admin", big).await, Err(Error::InvalidInput { .. })));
    assert_eq!(store.read_revisions(0, 10).await.unwrap().len(), 1);
    assert_eq!(store.read_journal_verification().await.unwrap().rows, 1);
}

#[tokio::test]
async fn edited_or_deleted_journal_rows_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open_leader(&path).await;
    for i in 0..5 {
        store.write_app("admin", app(&format!("a{i}"), "s")).await.unwrap();
    }
    store.read_journal_verification().await.unwrap();
    store.close().await.unwrap();
    let raw = Connection::open(&path).unwrap();
    raw.execute("UPDATE revisions SET actor = 'mallory' WHERE revision = 3", []).unwrap();
    drop(raw);
    store.open(&path, Role::Leader).await.unwrap();
    match store.read_journal_verification().await {
        Err(Error::JournalBroken { revision: 3, .. }) => {}
        other => panic!("expected JournalBroken at 3, got {other:?}"),
    }
    store.close().await.unwrap();
    let raw = Connection::open(&path).unwrap();
    raw.execute("UPDATE revisions SET actor = 'admin' WHERE revision = 3", []).unwrap();
    raw.pragma_update(None, "foreign_keys", "OFF").unwrap();
    raw.execute("DELETE FROM revisions WHERE revision = 4", []).unwrap();
    drop(raw);
    store.open(&path, Role::Leader).await.unwrap();
    match store.read_journal_verification().await {
        Err(Error::JournalBroken { revision: 5, .. }) => {}
        other => panic!("expected JournalBroken at 5, got {other:?}"),
    }
    // A new change after a deleted tail still gets a fresh number (never reused).
    store.close().await.unwrap();
    let raw = Connection::open(&path).unwrap();
    raw.pragma_update(None, "foreign_keys", "OFF").unwrap();
    raw.execute("DELETE FROM revisions WHERE revision >= 4", []).unwrap();
    drop(raw);
    store.open(&path, Role::Leader).await.unwrap();
    let next = store.write_app("admin", app("b", "s")).await.unwrap();
    assert_eq!(next.revision, 6);
}

#[tokio::test]
async fn a_locked_store_refuses_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = Store::locked();
    assert_all_locked(&store).await;
    store.open(&path, Role::Leader).await.unwrap();
    store.write_app("admin", app("web", "s")).await.unwrap();
    let clone = store.clone();
    store.close().await.unwrap();
    assert_all_locked(&clone).await;
    assert!(!clone.is_open());
    // Close on a locked handle is a no-op.
    clone.close().await.unwrap();
}

async fn assert_all_locked(s: &Store) {
    macro_rules! locked {
        ($e:expr) => {
            match $e.await {
                Err(Error::Locked) => {}
                other => panic!("{}: expected Locked, got {:?}", stringify!($e), other.map(|_| ())),
            }
        };
    }
    locked!(s.read_role());
    locked!(s.read_schema_version());
    locked!(s.read_revisions(0, 10));
    locked!(s.read_revision(1));
    locked!(s.read_head_revision());
    locked!(s.read_journal_verification());
    locked!(s.write_signing_key("a", "k", "HS256", Zeroizing::new(vec![1])));
    locked!(s.write_signing_key_retired("a", "k"));
    locked!(s.read_signing_keys());
    locked!(s.write_session("a", "id", "admin", "2999-01-01T00:00:00Z"));
    locked!(s.write_session_revoked("a", "id"));
    locked!(s.write_expired_sessions_purged("a", "2999-01-01T00:00:00Z"));
    locked!(s.read_session("id"));
    locked!(s.write_remote_config("a", serde_json::json!({})));
    locked!(s.read_remote_config());
    locked!(s.write_app("a", app("x", "s")));
    locked!(s.write_app_deletion("a", "x"));
    locked!(s.read_app("x"));
    locked!(s.read_apps());
    locked!(s.read_quick_check());
    locked!(s.read_integrity_check());
    locked!(s.write_wal_checkpoint());
    locked!(s.write_maintenance());
}

#[tokio::test]
async fn a_follower_reads_but_every_mutation_is_not_leader() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let leader = open_leader(&path).await;
    leader.write_app("admin", app("web", "running")).await.unwrap();
    leader.write_remote_config("r", serde_json::json!({"x": 1})).await.unwrap();
    leader.close().await.unwrap();
    let before = std::fs::read(&path).unwrap();

    let f = Store::locked();
    f.open(&path, Role::Follower).await.unwrap();
    assert_eq!(f.read_role().await.unwrap(), Role::Follower);
    assert_eq!(f.read_apps().await.unwrap().len(), 1);
    assert_eq!(f.read_revisions(0, 10).await.unwrap().len(), 2);
    f.read_journal_verification().await.unwrap();
    f.read_quick_check().await.unwrap();
    macro_rules! not_leader {
        ($e:expr) => {
            match $e.await {
                Err(Error::NotLeader) => {}
                other => panic!("{}: expected NotLeader, got {:?}", stringify!($e), other.map(|_| ())),
            }
        };
    }
    not_leader!(f.write_app("a", app("x", "s")));
    not_leader!(f.write_app_deletion("a", "web"));
    not_leader!(f.write_remote_config("a", serde_json::json!({})));
    not_leader!(f.write_signing_key("a", "k", "HS256", Zeroizing::new(vec![1])));
    not_leader!(f.write_signing_key_retired("a", "k"));
    not_leader!(f.write_session("a", "id", "admin", "2999-01-01T00:00:00Z"));
    not_leader!(f.write_session_revoked("a", "id"));
    not_leader!(f.write_expired_sessions_purged("a", "2999-01-01T00:00:00Z"));
    not_leader!(f.write_wal_checkpoint());
    // Maintenance on a follower checks, does not checkpoint.
    assert_eq!(f.write_maintenance().await.unwrap().wal_frames, 0);
    f.close().await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), before, "the follower changed nothing");
}

#[tokio::test]
async fn corruption_is_reported_by_maintenance_not_swallowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open_leader(&path).await;
    for i in 0..400 {
        store.write_app("admin", app(&format!("app-{i:04}"), &"s".repeat(200))).await.unwrap();
    }
    assert!(store.write_maintenance().await.is_ok());
    store.close().await.unwrap();
    // Overwrite the middle pages (b-tree pages of the tables and indexes) with garbage.
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    assert!(bytes.len() > 20 * page, "{} bytes", bytes.len());
    let end = bytes.len() - 2 * page;
    for b in bytes[5 * page..end].iter_mut().step_by(7) {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();

    let mut events = store.subscribe();
    // Opening may or may not notice; maintenance must.
    if let Err(e) = store.open(&path, Role::Leader).await {
        // Opening read the damaged schema page: that is a report too.
        assert!(matches!(e, Error::Open { .. } | Error::Pragma { .. } | Error::Migrate { .. }), "{e:?}");
        return;
    }
    let err = store.write_maintenance().await.expect_err("corruption must be reported");
    assert!(matches!(err, Error::IntegrityCheck { .. } | Error::Query { .. }), "{err:?}");
    let ev = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let StoreEvent::MaintenanceFailed { step, error } = events.recv().await.unwrap() {
                break (step, error);
            }
        }
    })
    .await
    .expect("a MaintenanceFailed event");
    assert_eq!(ev.0, "quick_check");
    assert!(!ev.1.is_empty());
}

#[tokio::test]
async fn a_checkpoint_blocked_by_a_reader_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open_leader(&path).await;
    store.write_app("admin", app("a", "s")).await.unwrap();
    // Another connection holds a read snapshot, so the WAL cannot be reset.
    let reader = Connection::open(&path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader.query_row("SELECT count(*) FROM apps", [], |r| r.get(0)).unwrap();
    store.write_app("admin", app("b", "s")).await.unwrap();
    let mut events = store.subscribe();
    match store.write_maintenance().await {
        Err(Error::CheckpointIncomplete { busy: true, .. }) => {}
        other => panic!("expected CheckpointIncomplete, got {other:?}"),
    }
    match events.recv().await.unwrap() {
        StoreEvent::MaintenanceFailed { step: "wal_checkpoint", .. } => {}
        other => panic!("unexpected event {other:?}"),
    }
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    let report = store.write_maintenance().await.unwrap();
    assert_eq!(report.wal_frames, report.checkpointed);
}

#[tokio::test]
async fn session_ids_are_stored_only_as_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open_leader(&path).await;
    let id = "SESSION-ID-THAT-MUST-NOT-BE-STORED";
    let (_, rec) = store.write_session("api", id, "admin", "2999-01-01T00:00:00Z").await.unwrap();
    assert_eq!(rec.session_hash, piccolo_store::session_hash(id));
    assert_eq!(store.read_session(id).await.unwrap().unwrap(), rec);
    store.close().await.unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(id.len()).any(|w| w == id.as_bytes()));
}

#[tokio::test]
async fn periodic_maintenance_reports_each_round_and_skips_while_locked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::locked();
    let mut events = store.subscribe();
    let task = store.spawn_maintenance(Duration::from_millis(30));
    // Locked: rounds are skipped silently.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert!(events.try_recv().is_err(), "no maintenance while locked");
    store.open(&db_path(&dir), Role::Leader).await.unwrap();
    store.write_app("admin", app("a", "s")).await.unwrap();
    let ok = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let StoreEvent::MaintenanceOk(r) = events.recv().await.unwrap() {
                break r;
            }
        }
    })
    .await
    .expect("a maintenance round while open");
    assert_eq!(ok.wal_frames, ok.checkpointed);
    task.abort();
}
