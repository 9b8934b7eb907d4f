// SPDX-License-Identifier: Apache-2.0
//! EnrollDiskTpm / ResealDiskTpm through a real broker with swtpm, on LUKS2 images attached
//! to loop devices: the `partitions` allow-list, intent/outcome audit records without the
//! unlock key, the enrolled slot bound to PCR 7 (luksDump), unsealed by systemd-cryptsetup
//! until PCR 7 changes, and a reseal that opens only after the planned change.

mod common;

use base64::Engine;
use common::*;
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::luks::Luks2;
use piccolo_testkit::swtpm::Swtpm;

const KEY: &[u8] = b"operator-luks-key-do-not-log-42";

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn policy(partition: &str) -> String {
    format!(
        r#"version = 1

[[rule]]
rpcs = ["ReadPcrs"]
users = ["root"]
reason = "test: operators read PCRs"

[[rule]]
rpcs = ["EnrollDiskTpm", "ResealDiskTpm"]
users = ["root"]
partitions = ["{partition}"]
reason = "test: operators enroll the one test volume"
"#
    )
}

fn start(sw: &Swtpm, partition: &str) -> Broker {
    system_users();
    Broker::start(BrokerOptions {
        policy: policy(partition),
        audit_group: Some("piccolo-audit".into()),
        extra_config: format!("[tpm]\ntcti = {:?}\n", sw.tcti()),
        ..Default::default()
    })
}

fn tpm2_tokens(l: &Luks2) -> Vec<serde_json::Value> {
    let m: serde_json::Value = serde_json::from_str(&l.metadata_json()).unwrap();
    m["tokens"].as_object().unwrap().values().filter(|t| t["type"] == "systemd-tpm2").cloned().collect()
}

fn unseals(l: &Luks2, sw: &Swtpm, keyslot: i32) -> bool {
    let o = out(&l.systemd_attach(sw));
    o.contains("Completed TPM2 key unsealing") && o.contains(&format!("[keyslot {keyslot}] using passphrase"))
}

#[test]
fn enroll_and_reseal_through_the_broker() {
    let sw = Swtpm::start();
    let luks = Luks2::create(KEY);
    let other = Luks2::create(KEY);
    let b = start(&sw, &luks.name());
    let key = b.path("unlock.key");
    std::fs::write(&key, KEY).unwrap();
    let wrong = b.path("wrong.key");
    std::fs::write(&wrong, b"wrong").unwrap();
    let (k, w) = (key.display().to_string(), wrong.display().to_string());
    let other_before = other.metadata_json();

    // Not on the allow-list: refused by the policy, nothing changed.
    let o = b.ctl_as("root", &["tpm", "enroll-disk", "--partition", &other.name(), "--key-file", &k]);
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(out(&o).contains("EnrollDiskTpm: permission denied"), "{}", out(&o));
    assert_eq!(other.metadata_json(), other_before);
    // A wrong unlock key or a PCR index out of range: INVALID_ARGUMENT, nothing changed.
    let before = luks.metadata_json();
    let o = b.ctl_as("root", &["tpm", "enroll-disk", "--partition", &luks.name(), "--key-file", &w]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(out(&o).contains("the unlock key opens no keyslot"), "{}", out(&o));
    let o = b.ctl_as("root", &["tpm", "enroll-disk", "--partition", &luks.name(), "--pcr", "24", "--key-file", &k]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert_eq!(luks.metadata_json(), before);

    let o = b.ctl_as("root", &["tpm", "enroll-disk", "--partition", &luks.name(), "--key-file", &k]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("enrolled TPM2 keyslot 1"), "{}", out(&o));
    let dump = luks.dump();
    assert!(dump.contains("systemd-tpm2"), "{dump}");
    let tokens = tpm2_tokens(&luks);
    assert_eq!((tokens.len(), tokens[0]["tpm2-pcrs"].clone()), (1, serde_json::json!([7])));
    assert!(unseals(&luks, &sw, 1), "systemd-cryptsetup unseals with the TPM");

    // Reseal for the value PCR 7 will have after a planned change.
    let pcrs = b.ctl_as("root", &["tpm", "pcrs", "--index", "7", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&pcrs.stdout).unwrap();
    let hex = v["pcrs"][0]["value"].as_str().unwrap();
    let now7: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap()).collect();
    let next7: String = Swtpm::extended_value(&now7).iter().map(|x| format!("{x:02x}")).collect();
    let exp = format!("7={next7}");
    let o =
        b.ctl_as("root", &["tpm", "reseal-disk", "--partition", &luks.name(), "--expected", &exp, "--key-file", &k]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(out(&o).contains("enrolled TPM2 keyslot 2") && out(&o).contains("wiped [1]"), "{}", out(&o));
    assert!(!unseals(&luks, &sw, 2), "not before the change");
    sw.extend_pcr(7);
    assert!(unseals(&luks, &sw, 2), "after the planned change the new slot unseals");
    let tokens = tpm2_tokens(&luks);
    let blob = base64::engine::general_purpose::STANDARD.decode(tokens[0]["tpm2-blob"].as_str().unwrap()).unwrap();
    let secret = sw.unseal_systemd_blob(&blob, "7").unwrap();
    assert!(luks.opens_with(base64::engine::general_purpose::STANDARD.encode(secret).as_bytes()));

    // Intent and outcome records, key size only.
    let recs = records(&b);
    let enroll: Vec<_> = recs.iter().filter(|r| r["rpc"] == "EnrollDiskTpm" && r["decision"] == "allow").collect();
    assert!(enroll.iter().any(|r| r["kind"] == "intent"));
    assert!(enroll.iter().any(|r| r["kind"] == "outcome" && r["outcome"]["code"] == "ok"));
    assert!(enroll.iter().any(|r| r["kind"] == "outcome" && r["outcome"]["code"] == "INVALID_ARGUMENT"));
    assert!(enroll.iter().all(|r| r["args"]["unlock_key_bytes"] == KEY.len() || r["args"]["unlock_key_bytes"] == 5));
    assert!(recs.iter().any(|r| r["rpc"] == "EnrollDiskTpm" && r["decision"] == "deny"));
    assert!(recs.iter().any(|r| r["rpc"] == "ResealDiskTpm" && r["kind"] == "outcome" && r["outcome"]["code"] == "ok"));
    let text = b.audit_text();
    let key_text = std::str::from_utf8(KEY).unwrap();
    assert!(!text.contains(key_text) && !b.stderr_text().contains(key_text), "unlock key leaked");
    let no_key_files = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("piccolo-tpm-"))
        .count();
    assert_eq!(no_key_files, 0, "private key files are removed");
}
