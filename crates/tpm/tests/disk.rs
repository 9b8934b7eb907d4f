// SPDX-License-Identifier: Apache-2.0
//! LUKS2 TPM2 enrollment on a loop device with swtpm: systemd-cryptenroll's slot is bound
//! to PCR 7 (luksDump), systemd-cryptsetup 252 unseals its key with the TPM and stops after
//! PCR 7 changes, and the TPM-released key opens the keyslot (cryptsetup). Reseal binds a
//! new slot to expected values and wipes the old one. Bad input changes nothing.
//!
//! Not exercised here: the device-mapper mapping itself (this kernel has no dm-mod, so
//! `systemd-cryptsetup attach` stops at activation with "Operation not supported", after
//! the TPM step these tests look at).

use base64::Engine;
use piccolo_testkit::luks::Luks2;
use piccolo_testkit::swtpm::Swtpm;
use piccolo_tpm::{Bank, DiskConfig, Error, Tpm};
use serde_json::Value;

const KEY: &[u8] = b"operator recovery key 0123456789";

fn tpm2_tokens(l: &Luks2) -> Vec<Value> {
    let m: Value = serde_json::from_str(&l.metadata_json()).unwrap();
    m["tokens"].as_object().unwrap().values().filter(|t| t["type"] == "systemd-tpm2").cloned().collect()
}

fn blob(t: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(t["tpm2-blob"].as_str().unwrap()).unwrap()
}

fn b64(secret: &[u8]) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.encode(secret).into_bytes()
}

fn text(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The TPM released the key and systemd-cryptsetup went on to activate `keyslot` with it.
fn attach_unseals(l: &Luks2, sw: &Swtpm, keyslot: i32) -> bool {
    let out = text(&l.systemd_attach(sw));
    let ok =
        out.contains("Completed TPM2 key unsealing") && out.contains(&format!("[keyslot {keyslot}] using passphrase"));
    if !ok {
        assert!(out.contains("TPM2") && out.contains("headless"), "unexpected attach output: {out}");
    }
    ok
}

#[test]
fn enroll_binds_pcr7_and_stops_opening_after_pcr7_changes() {
    let sw = Swtpm::start();
    let luks = Luks2::create(KEY);
    let tpm = Tpm::new(sw.tcti());
    let cfg = DiskConfig::default();

    let e = tpm.enroll_disk(&cfg, &luks.name(), &[], KEY).unwrap();
    assert_eq!(e.keyslot, 1);
    let dump = luks.dump();
    assert!(dump.contains("systemd-tpm2"), "{dump}");
    let tokens = tpm2_tokens(&luks);
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["tpm2-pcrs"], serde_json::json!([7]));
    assert_eq!(tokens[0]["keyslots"], serde_json::json!(["1"]));
    assert_eq!(tokens[0]["tpm2-pin"], false);
    // systemd's policy hash is the one our software PolicyPCR computation gives.
    let pcr7: [u8; 32] = tpm.read_pcrs(Bank::Sha256, &[7]).unwrap()[0].1.clone().try_into().unwrap();
    assert_eq!(tokens[0]["tpm2-policy-hash"], hex::encode(piccolo_tpm::pcr::policy_digest(&[(7, pcr7)])));

    // The TPM releases the key, and that key opens the volume.
    assert!(attach_unseals(&luks, &sw, 1), "systemd-cryptsetup did not unseal with the TPM");
    let secret = sw.unseal_systemd_blob(&blob(&tokens[0]), "7").expect("TPM unseals the slot's key");
    assert!(luks.opens_with(&b64(&secret)), "the TPM-released key opens keyslot 1");
    assert!(!luks.opens_with(b"not the key"));

    sw.extend_pcr(7);
    assert!(!attach_unseals(&luks, &sw, 1), "opened after PCR 7 changed");
    assert!(sw.unseal_systemd_blob(&blob(&tokens[0]), "7").is_none());
    assert!(luks.opens_with(KEY), "the unlock key still works");
}

#[test]
fn reseal_binds_a_new_slot_to_expected_values_and_wipes_the_old_one() {
    let sw = Swtpm::start();
    let luks = Luks2::create(KEY);
    let tpm = Tpm::new(sw.tcti());
    let cfg = DiskConfig::default();
    assert_eq!(tpm.enroll_disk(&cfg, &luks.name(), &[7], KEY).unwrap().keyslot, 1);

    let now7 = tpm.read_pcrs(Bank::Sha256, &[7]).unwrap()[0].1.clone();
    let next7 = Swtpm::extended_value(&now7);
    let r = tpm.reseal_disk(&cfg, &luks.name(), &[(7, next7.clone())], KEY).unwrap();
    assert_eq!((r.keyslot, r.wiped.clone()), (2, vec![1]));
    let tokens = tpm2_tokens(&luks);
    assert_eq!(tokens.len(), 1, "old token wiped with its slot");
    assert_eq!(tokens[0]["keyslots"], serde_json::json!(["2"]));
    let m: Value = serde_json::from_str(&luks.metadata_json()).unwrap();
    assert!(m["keyslots"].get("1").is_none(), "old TPM2 keyslot wiped");
    assert!(m["keyslots"].get("0").is_some(), "the unlock key's slot stays");
    let next: [u8; 32] = next7.clone().try_into().unwrap();
    assert_eq!(tokens[0]["tpm2-policy-hash"], hex::encode(piccolo_tpm::pcr::policy_digest(&[(7, next)])));

    // Today the new slot does not open; after the planned change it does.
    assert!(!attach_unseals(&luks, &sw, 2));
    assert!(sw.unseal_systemd_blob(&blob(&tokens[0]), "7").is_none());
    sw.extend_pcr(7);
    assert!(attach_unseals(&luks, &sw, 2), "systemd-cryptsetup unseals the resealed slot after the change");
    let secret = sw.unseal_systemd_blob(&blob(&tokens[0]), "7").expect("unseals after the change");
    assert!(luks.opens_with(&b64(&secret)));
    assert!(luks.opens_with(KEY));
}

#[test]
fn bad_input_changes_nothing() {
    let sw = Swtpm::start();
    let luks = Luks2::create(KEY);
    let tpm = Tpm::new(sw.tcti());
    let cfg = DiskConfig::default();
    let before = luks.metadata_json();
    let name = luks.name();

    let e = tpm.enroll_disk(&cfg, &name, &[], b"wrong key").unwrap_err();
    assert!(matches!(e, Error::UnlockKeyRejected(_)), "{e}");
    assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument);
    for (n, pcrs, key) in [
        ("../loop0", &[][..], KEY),
        ("/dev/loop0", &[], KEY),
        (name.as_str(), &[24], KEY),
        (name.as_str(), &[], &[][..]),
        (name.as_str(), &[], &[0u8; 513][..]),
    ] {
        let e = tpm.enroll_disk(&cfg, n, pcrs, key).unwrap_err();
        assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument, "{n} {pcrs:?}: {e}");
    }
    let e = tpm.reseal_disk(&cfg, &name, &[(7, vec![0; 31])], KEY).unwrap_err();
    assert_eq!(e.code(), piccolo_tpm::Code::InvalidArgument);
    let e = tpm.reseal_disk(&cfg, &name, &[(7, vec![0; 32])], b"wrong key").unwrap_err();
    assert!(matches!(e, Error::UnlockKeyRejected(_)), "{e}");
    assert_eq!(tpm.enroll_disk(&cfg, "nosuchdisk7", &[], KEY).unwrap_err().code(), piccolo_tpm::Code::NotFound);
    assert_eq!(luks.metadata_json(), before, "nothing changed");

    // A block device that is not LUKS2.
    let plain = tempfile::NamedTempFile::new().unwrap();
    plain.as_file().set_len(8 << 20).unwrap();
    let lo = piccolo_testkit::disks::LoopDev::attach(plain.path());
    let e = tpm.enroll_disk(&cfg, &lo.name(), &[], KEY).unwrap_err();
    assert!(matches!(e, Error::NotLuks2(_)), "{e}");

    // No TPM: refused before anything runs.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let none = Tpm::new(format!("swtpm:host=127.0.0.1,port={port}"));
    assert!(matches!(none.enroll_disk(&cfg, &name, &[], KEY).unwrap_err(), Error::NoTpm(_)));
    assert_eq!(luks.metadata_json(), before);
}
