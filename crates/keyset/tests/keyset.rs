// SPDX-License-Identifier: Apache-2.0
//! Key-set behaviour against real files: unlock paths, rewraps, the on-disk record, tampering,
//! and tampering.

use piccolo_keyset::{Error, KdfParams, Keyset, Password, RecoveryKey, keyset_path};
use serde_json::Value;

/// Smallest accepted parameters: keep tests fast; the production choice is benchmarked.
const FAST: KdfParams = KdfParams { m_cost_kib: KdfParams::MIN_M_COST_KIB, t_cost: 1, p_cost: 1 };

fn pw(s: &str) -> Password {
    Password::new(s.to_string()).unwrap()
}

fn read_json(state: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(keyset_path(state)).unwrap()).unwrap()
}

#[test]
fn create_then_unlock_with_password_and_recovery_key() {
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let sdek = created.sdek.expose_secret().to_owned();

    let ks = Keyset::read(dir.path()).unwrap();
    assert_eq!(ks.unlock_with_password(&pw("correct horse battery")).unwrap().expose_secret(), &sdek);
    let rk = RecoveryKey::parse(created.recovery_key.expose_secret()).unwrap();
    assert_eq!(ks.unlock_with_recovery_key(&rk).unwrap().expose_secret(), &sdek);
    assert!(matches!(ks.unlock_with_password(&pw("correct horse battery!")), Err(Error::WrongPassword)));
    assert_eq!(ks.generation(), 1);
    assert_eq!(ks.kdf_params(), FAST);
}

#[test]
fn keyset_file_records_kdf_and_wraps_but_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let raw = std::fs::read_to_string(keyset_path(dir.path())).unwrap();
    let v: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(v["format"], "piccolo-keyset");
    assert_eq!(v["version"], 1);
    assert_eq!(v["kdf"]["algorithm"], "argon2id");
    assert_eq!(v["kdf"]["m_cost_kib"], FAST.m_cost_kib);
    assert_eq!(v["kdf"]["t_cost"], 1);
    assert_eq!(v["kdf"]["p_cost"], 1);
    assert_eq!(v["kdf"]["salt"].as_str().unwrap().len(), 32);
    for wrap in ["password_wrap", "recovery_wrap"] {
        assert_eq!(v[wrap]["nonce"].as_str().unwrap().len(), 24, "{wrap}");
        assert_eq!(v[wrap]["ciphertext"].as_str().unwrap().len(), 96, "{wrap}");
    }
    assert!(!raw.contains(&hex::encode(created.sdek.expose_secret())));
    assert!(!raw.contains("correct horse"));
    let rk_compact: String = created.recovery_key.expose_secret().chars().filter(|c| *c != '-').collect();
    assert!(!raw.contains(&rk_compact[..8]));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(keyset_path(dir.path())).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // Debug of everything returned stays redacted.
    let dbg = format!("{created:?}");
    assert!(!dbg.contains(&hex::encode(created.sdek.expose_secret())) && !dbg.contains(&rk_compact[..8]), "{dbg}");
}

#[test]
fn create_refuses_to_overwrite_and_short_passwords() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(Keyset::create(dir.path(), &pw("short"), FAST), Err(Error::PasswordTooShort { .. })));
    assert!(!keyset_path(dir.path()).exists());
    Keyset::create(dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let before = std::fs::read(keyset_path(dir.path())).unwrap();
    assert!(matches!(Keyset::create(dir.path(), &pw("another password"), FAST), Err(Error::KeysetExists { .. })));
    assert_eq!(std::fs::read(keyset_path(dir.path())).unwrap(), before);
}

#[test]
fn recovery_key_mistyped_is_distinct_from_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let text = created.recovery_key.expose_secret().to_string();

    // One symbol changed: the checksum catches it before any unwrap is tried.
    let first = text.chars().next().unwrap();
    let typo = format!("{}{}", if first == 'A' { 'B' } else { 'A' }, &text[1..]);
    let err = RecoveryKey::parse(&typo).unwrap_err();
    assert!(matches!(err, Error::RecoveryKeyMistyped { .. }), "{err}");
    assert!(err.to_string().starts_with("recovery key mistyped"), "{err}");
    assert!(!err.to_string().contains(&text[..4]));

    // A well-formed key from another key set: wrong, not mistyped.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Keyset::create(other_dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let other_rk = RecoveryKey::parse(other.recovery_key.expose_secret()).unwrap();
    let err = created.keyset.unlock_with_recovery_key(&other_rk).unwrap_err();
    assert!(matches!(err, Error::WrongRecoveryKey), "{err}");
    assert_eq!(err.to_string(), "wrong recovery key");
}

#[test]
fn password_change_keeps_sdek_and_leaves_recovery_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw("old password 1"), FAST).unwrap();
    let before = read_json(dir.path());
    let mut ks = Keyset::read(dir.path()).unwrap();
    let sdek = ks.unlock_with_password(&pw("old password 1")).unwrap();
    ks.change_password(&sdek, &pw("new password 2")).unwrap();

    let after = read_json(dir.path());
    assert_eq!(after["recovery_wrap"], before["recovery_wrap"]);
    assert_eq!(after["key_id"], before["key_id"]);
    assert_ne!(after["password_wrap"], before["password_wrap"]);
    assert_ne!(after["kdf"]["salt"], before["kdf"]["salt"]);
    assert_eq!(after["generation"], 2);

    let ks = Keyset::read(dir.path()).unwrap();
    assert!(matches!(ks.unlock_with_password(&pw("old password 1")), Err(Error::WrongPassword)));
    let again = ks.unlock_with_password(&pw("new password 2")).unwrap();
    assert_eq!(again.expose_secret(), created.sdek.expose_secret());
    let rk = RecoveryKey::parse(created.recovery_key.expose_secret()).unwrap();
    assert_eq!(ks.unlock_with_recovery_key(&rk).unwrap().expose_secret(), created.sdek.expose_secret());
}

#[test]
fn recovery_rotation_keeps_sdek_and_password() {
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw("the password"), FAST).unwrap();
    let before = read_json(dir.path());
    let mut ks = Keyset::read(dir.path()).unwrap();
    let new_rk = ks.rotate_recovery_key(&created.sdek).unwrap();
    let after = read_json(dir.path());
    assert_eq!(after["password_wrap"], before["password_wrap"]);
    assert_eq!(after["kdf"], before["kdf"]);

    let ks = Keyset::read(dir.path()).unwrap();
    let old_rk = RecoveryKey::parse(created.recovery_key.expose_secret()).unwrap();
    assert!(matches!(ks.unlock_with_recovery_key(&old_rk), Err(Error::WrongRecoveryKey)));
    let new_rk = RecoveryKey::parse(new_rk.expose_secret()).unwrap();
    assert_eq!(ks.unlock_with_recovery_key(&new_rk).unwrap().expose_secret(), created.sdek.expose_secret());
    assert_eq!(ks.unlock_with_password(&pw("the password")).unwrap().expose_secret(), created.sdek.expose_secret());
}

#[test]
fn rewrap_refuses_a_foreign_sdek() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let ca = Keyset::create(a.path(), &pw("password a"), FAST).unwrap();
    let cb = Keyset::create(b.path(), &pw("password b"), FAST).unwrap();
    let before = std::fs::read(keyset_path(a.path())).unwrap();
    let mut ks = ca.keyset;
    assert!(matches!(ks.change_password(&cb.sdek, &pw("new password")), Err(Error::SdekMismatch { .. })));
    assert!(matches!(ks.rotate_recovery_key(&cb.sdek), Err(Error::SdekMismatch { .. })));
    assert_eq!(std::fs::read(keyset_path(a.path())).unwrap(), before);
}

#[test]
fn wraps_are_bound_to_their_slot() {
    // Copy the password wrap into the recovery slot: the AAD (version + wrap kind) differs,
    // so even the right key could not open it there; and the recovery key is wrong anyway.
    let dir = tempfile::tempdir().unwrap();
    let created = Keyset::create(dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let mut v = read_json(dir.path());
    v["recovery_wrap"]["nonce"] = v["password_wrap"]["nonce"].clone();
    v["recovery_wrap"]["ciphertext"] = v["password_wrap"]["ciphertext"].clone();
    std::fs::write(keyset_path(dir.path()), serde_json::to_vec(&v).unwrap()).unwrap();
    let ks = Keyset::read(dir.path()).unwrap();
    let rk = RecoveryKey::parse(created.recovery_key.expose_secret()).unwrap();
    assert!(matches!(ks.unlock_with_recovery_key(&rk), Err(Error::WrongRecoveryKey)));
}

#[test]
fn tampered_or_foreign_keysets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    Keyset::create(dir.path(), &pw("correct horse battery"), FAST).unwrap();
    let good = read_json(dir.path());
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("future version", Box::new(|v| v["version"] = 2.into())),
        ("memory bomb", Box::new(|v| v["kdf"]["m_cost_kib"] = (4u64 << 20).into())),
        ("argon2i", Box::new(|v| v["kdf"]["algorithm"] = "argon2i".into())),
        ("short salt", Box::new(|v| v["kdf"]["salt"] = "00".into())),
        ("unknown field", Box::new(|v| v["extra"] = 1.into())),
        ("bad nonce", Box::new(|v| v["password_wrap"]["nonce"] = "zz".into())),
    ];
    for (name, mutate) in cases {
        let mut v = good.clone();
        mutate(&mut v);
        std::fs::write(keyset_path(dir.path()), serde_json::to_vec(&v).unwrap()).unwrap();
        let err = Keyset::read(dir.path()).unwrap_err();
        match name {
            "future version" => assert!(matches!(err, Error::UnsupportedKeysetVersion { version: 2, .. }), "{err}"),
            "memory bomb" => assert!(matches!(err, Error::KdfParamsOutOfRange { .. }), "{err}"),
            "unknown field" => assert!(matches!(err, Error::ParseKeyset { .. }), "{err}"),
            _ => assert!(matches!(err, Error::InvalidKeyset { .. }), "{name}: {err}"),
        }
    }
}
