// SPDX-License-Identifier: Apache-2.0
//! JWT signing-key rotation against a real SQLite file: one transaction and one journal row
//! per rotation, keys retired longer ago than the kept lifetime deleted, the ones just
//! retired kept, the journal chain intact afterwards; a failing rotation changes nothing.

use std::time::Duration;

use piccolo_store::{Role, Store};
use zeroize::Zeroizing;

fn secret(b: u8) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(vec![b; 32])
}

async fn keys(store: &Store) -> Vec<(String, bool)> {
    store.read_signing_keys().await.unwrap().into_iter().map(|k| (k.key_id, k.retired.is_some())).collect()
}

#[tokio::test]
async fn rotation_retires_active_keys_and_prunes_only_long_retired_ones() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::locked();
    store.open(&dir.path().join("control.db"), Role::Leader).await.unwrap();
    let hour = Duration::from_secs(3600);

    store.write_signing_key("admin", "a", "HS256", secret(1)).await.unwrap();
    let head0 = store.read_head_revision().await.unwrap().unwrap().revision;
    let r = store.write_signing_key_rotated("admin", "b", "HS256", secret(2), hour).await.unwrap();
    assert_eq!((r.retired, r.pruned), (vec!["a".to_string()], vec![]));
    assert_eq!(r.revision.revision, head0 + 1, "one journal row per rotation");
    assert_eq!(r.revision.kind, "auth.signing_key.rotate");
    assert_eq!(keys(&store).await, vec![("a".into(), true), ("b".into(), false)]);

    // Within the kept lifetime nothing is deleted.
    let r = store.write_signing_key_rotated("admin", "c", "HS256", secret(3), hour).await.unwrap();
    assert_eq!((r.retired, r.pruned), (vec!["b".to_string()], vec![]));
    assert_eq!(keys(&store).await.len(), 3);

    // Past it: a and b (retired over a second ago) go; c, retired by this very rotation, stays.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = store.write_signing_key_rotated("admin", "d", "HS256", secret(4), Duration::from_secs(1)).await.unwrap();
    assert_eq!(r.retired, vec!["c".to_string()]);
    assert_eq!(r.pruned, vec!["a".to_string(), "b".to_string()]);
    assert_eq!(keys(&store).await, vec![("c".into(), true), ("d".into(), false)]);
    let d = store.read_signing_keys().await.unwrap().pop().unwrap();
    assert_eq!(*d.secret, vec![4u8; 32]);

    // The journal still verifies (rows are never deleted, only key rows).
    let check = store.read_journal_verification().await.unwrap();
    assert_eq!(check.rows, head0 + 3, "{check:?}");

    // A rotation that fails (the active key's id again) rolls back as a whole: c, due for
    // pruning by now, stays, d stays active, no journal row.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let head = store.read_head_revision().await.unwrap().unwrap().revision;
    let err = store.write_signing_key_rotated("admin", "d", "HS256", secret(5), Duration::from_secs(1)).await;
    assert!(matches!(err, Err(piccolo_store::Error::InvalidInput { .. })), "{err:?}");
    assert_eq!(keys(&store).await, vec![("c".into(), true), ("d".into(), false)]);
    assert_eq!(store.read_head_revision().await.unwrap().unwrap().revision, head);
}

#[tokio::test]
async fn rotation_is_refused_while_locked_and_on_a_follower() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let store = Store::locked();
    let err = store.write_signing_key_rotated("admin", "a", "HS256", secret(1), Duration::ZERO).await;
    assert!(matches!(err, Err(piccolo_store::Error::Locked)), "{err:?}");
    store.open(&path, Role::Leader).await.unwrap();
    store.write_signing_key("admin", "a", "HS256", secret(1)).await.unwrap();
    store.close().await.unwrap();
    let follower = Store::locked();
    follower.open(&path, Role::Follower).await.unwrap();
    let err = follower.write_signing_key_rotated("admin", "b", "HS256", secret(2), Duration::ZERO).await;
    assert!(matches!(err, Err(piccolo_store::Error::NotLeader)), "{err:?}");
    assert_eq!(keys(&follower).await, vec![("a".into(), false)]);
}
