// SPDX-License-Identifier: Apache-2.0
//! The Tpm service through a real broker with swtpm and real users, under the shipped
//! policy: the caller × TPM RPC matrix, seal/unseal/reseal and the PCR policy mismatch,
//! device JWTs verified with jsonwebtoken, bad input audited as failed, no secret in any
//! audit record, a stable token key across broker restarts, and no TPM at all.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use piccolo_proto::v1::UnsealSecretRequest;
use piccolo_proto::v1::tpm_client::TpmClient;
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::swtpm::Swtpm;

const SECRET: &str = "persistence-key-set-auto-unlock-0123456789";

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn production_policy() -> String {
    std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap()
}

fn tpm_broker(policy: &str, tcti: &str) -> Broker {
    system_users();
    Broker::start(BrokerOptions {
        policy: policy.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        extra_config: format!("[tpm]\ntcti = {tcti:?}\n"),
        ..Default::default()
    })
}

/// A file every test user can read, in the broker's (0755) temp dir.
fn shared_file(b: &Broker, name: &str, data: &[u8]) -> String {
    let dir = b.path("shared");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    p.display().to_string()
}

fn ctl_ok(b: &Broker, user: &str, args: &[&str]) -> Vec<u8> {
    let o = b.ctl_as(user, args);
    assert_eq!(o.status.code(), Some(0), "{user} {args:?}: {}", out(&o));
    o.stdout
}

fn ctl_json(b: &Broker, user: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&ctl_ok(b, user, args)).unwrap()
}

fn verify(token: &str, pem: &str) -> jsonwebtoken::errors::Result<serde_json::Value> {
    let mut v = Validation::new(Algorithm::ES256);
    v.set_issuer(&["piccolo-broker"]);
    let key = DecodingKey::from_ec_pem(pem.as_bytes()).unwrap();
    jsonwebtoken::decode::<serde_json::Value>(token, &key, &v).map(|d| d.claims)
}

#[test]
fn shipped_policy_grants_each_tpm_rpc_only_to_its_users() {
    let sw = Swtpm::start();
    let b = tpm_broker(&production_policy(), &sw.tcti());
    let secret = shared_file(&b, "secret", SECRET.as_bytes());
    let key = shared_file(&b, "unlock-key", b"k");
    let blob_b64 = String::from_utf8(ctl_ok(&b, "piccolo-api", &["tpm", "seal", "--in", &secret])).unwrap();
    let blob = shared_file(&b, "blob", blob_b64.trim().as_bytes());
    let exp = format!("7={}", "00".repeat(32));

    let ok = 0;
    let denied = 3;
    // (command, users allowed); everyone else in the list is denied.
    let users = ["root", "piccolo-api", "piccolo-updater", "piccolo-apps", "piccolo-remote"];
    let cases: &[(&[&str], &[&str])] = &[
        (&["tpm", "identity"], &["root", "piccolo-api", "piccolo-updater"]),
        (&["tpm", "pcrs", "--index", "7"], &["root"]),
        (&["tpm", "seal", "--in", &secret], &["root", "piccolo-api"]),
        (&["tpm", "unseal", "--in", &blob], &["root", "piccolo-api"]),
        (&["tpm", "reseal", "--in", &blob, "--expected", &exp], &["piccolo-api"]),
        (&["tpm", "token-key"], &["piccolo-updater"]),
        (&["tpm", "sign-token", "--tier", "premium"], &["piccolo-updater"]),
        // The shipped allow-list names real disks only; no one may enroll a loop device.
        (&["tpm", "enroll-disk", "--partition", "loop0", "--key-file", &key], &[]),
        (&["tpm", "reseal-disk", "--partition", "loop0", "--expected", &exp, "--key-file", &key], &[]),
    ];
    for (args, allowed) in cases {
        for user in users {
            let o = b.ctl_as(user, args);
            let want = if allowed.contains(&user) { ok } else { denied };
            assert_eq!(o.status.code(), Some(want), "{user} {args:?}: {}", out(&o));
            if want == denied {
                assert!(out(&o).contains("permission denied"), "{user} {args:?}: {}", out(&o));
            }
        }
    }
    // Every call reached the broker and left a record with the caller's uid and decision.
    let recs = records(&b);
    let uid = |n: &str| nix::unistd::User::from_name(n).unwrap().unwrap().uid.as_raw();
    for (rpc, user, decision) in [
        ("SignDeviceToken", "piccolo-updater", "allow"),
        ("SignDeviceToken", "piccolo-api", "deny"),
        ("UnsealSecret", "piccolo-api", "allow"),
        ("UnsealSecret", "piccolo-updater", "deny"),
        ("EnrollDiskTpm", "root", "deny"),
    ] {
        assert!(
            recs.iter().any(|r| r["rpc"] == rpc && r["caller"]["uid"] == uid(user) && r["decision"] == decision),
            "{rpc} {user} {decision}"
        );
    }
    assert_no_secret(&b);
}

fn assert_no_secret(b: &Broker) {
    let text = b.audit_text();
    let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
    let hex: String = SECRET.bytes().map(|x| format!("{x:02x}")).collect();
    for needle in [SECRET, &b64, &hex, &SECRET[..16]] {
        assert!(!text.contains(needle), "audit log holds the secret ({needle})");
    }
    let stderr = b.stderr_text();
    assert!(!stderr.contains(SECRET) && !stderr.contains(&b64), "broker log holds the secret");
}

#[test]
fn seal_unseal_reseal_and_pcr_mismatch_through_the_broker() {
    let sw = Swtpm::start();
    let b = tpm_broker(&production_policy(), &sw.tcti());
    let secret = shared_file(&b, "secret", SECRET.as_bytes());
    let blob = b.path("blob.bin").display().to_string();
    let o = b.ctl_as("root", &["tpm", "seal", "--in", &secret, "--out", &blob]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert_eq!(ctl_ok(&b, "root", &["tpm", "unseal", "--in", &blob]), SECRET.as_bytes());

    // The persistence owner reseals for a planned PCR 7 change.
    let api_blob = String::from_utf8(ctl_ok(&b, "piccolo-api", &["tpm", "seal", "--in", &secret])).unwrap();
    let api_blob = shared_file(&b, "api-blob", api_blob.trim().as_bytes());
    let pcrs = ctl_json(&b, "root", &["tpm", "pcrs", "--index", "7", "--json"]);
    let now7: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&pcrs["pcrs"][0]["value"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let next7: String = Swtpm::extended_value(&now7).iter().map(|x| format!("{x:02x}")).collect();
    let resealed =
        ctl_ok(&b, "piccolo-api", &["tpm", "reseal", "--in", &api_blob, "--expected", &format!("7={next7}")]);
    let resealed = shared_file(&b, "resealed", String::from_utf8(resealed).unwrap().trim().as_bytes());

    sw.extend_pcr(7);
    let o = b.ctl_as("root", &["tpm", "unseal", "--in", &blob]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(o.stdout.is_empty(), "no data on a mismatch");
    assert!(String::from_utf8_lossy(&o.stderr).contains("FailedPrecondition: PCR policy mismatch"), "{}", out(&o));
    assert_eq!(ctl_ok(&b, "piccolo-api", &["tpm", "unseal", "--in", &resealed]), SECRET.as_bytes());
    let mismatch = records(&b)
        .into_iter()
        .filter(|r| r["rpc"] == "UnsealSecret" && r["outcome"]["code"] == "FAILED_PRECONDITION")
        .collect::<Vec<_>>();
    assert_eq!(mismatch.len(), 1);
    assert_eq!(mismatch[0]["outcome"]["message"], "PCR policy mismatch");
    assert_eq!(mismatch[0]["args"]["sealed_blob"]["bytes"], std::fs::metadata(&blob).unwrap().len());
    let seal = records(&b).into_iter().find(|r| r["rpc"] == "SealSecret").unwrap();
    assert_eq!(seal["args"], serde_json::json!({"secret_bytes": SECRET.len(), "pcrs": []}));
    assert_no_secret(&b);
}

#[test]
fn bad_input_is_invalid_argument_and_audited_as_failed() {
    let sw = Swtpm::start();
    let other = Swtpm::start();
    let b = tpm_broker(&production_policy(), &sw.tcti());
    let big = shared_file(&b, "big", &[b'x'; 129]);
    let secret = shared_file(&b, "secret", SECRET.as_bytes());
    let good = String::from_utf8(ctl_ok(&b, "root", &["tpm", "seal", "--in", &secret])).unwrap();
    let mut raw = base64::engine::general_purpose::STANDARD.decode(good.trim()).unwrap();
    let n = raw.len();
    raw[n / 2] ^= 1;
    let corrupt = shared_file(&b, "corrupt", &raw);
    // Sealed by another TPM's broker.
    let b2 = tpm_broker(&production_policy(), &other.tcti());
    let foreign = String::from_utf8(ctl_ok(&b2, "root", &["tpm", "seal", "--in", &secret])).unwrap();
    let foreign = shared_file(&b, "foreign", foreign.trim().as_bytes());

    let cases: &[(&str, &[&str], &str, &str)] = &[
        ("root", &["tpm", "seal", "--in", &big], "SealSecret", "secret must be 1..=128 bytes, got 129"),
        ("root", &["tpm", "seal", "--in", &secret, "--pcr", "24"], "SealSecret", "PCR index 24 out of range"),
        ("root", &["tpm", "pcrs", "--index", "99"], "ReadPcrs", "PCR index 99 out of range"),
        ("root", &["tpm", "unseal", "--in", &corrupt], "UnsealSecret", "sealed blob is corrupt"),
        ("root", &["tpm", "unseal", "--in", &foreign], "UnsealSecret", "sealed blob was not made by this TPM"),
        (
            "piccolo-updater",
            &["tpm", "sign-token", "--tier", "t", "--ttl", "3601"],
            "SignDeviceToken",
            "ttl_seconds must be 1..=3600",
        ),
        ("piccolo-updater", &["tpm", "sign-token", "--tier", "t", "--ttl", "0"], "SignDeviceToken", "ttl_seconds"),
    ];
    for (user, args, rpc, msg) in cases {
        let before = records(&b).len();
        let o = b.ctl_as(user, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", out(&o));
        assert!(out(&o).contains(msg), "{args:?}: {}", out(&o));
        let new = &records(&b)[before..];
        assert_eq!(new.len(), 1, "{args:?}: one record");
        assert_eq!(new[0]["rpc"], *rpc);
        assert_eq!(new[0]["decision"], "allow");
        assert_eq!(new[0]["outcome"]["code"], "INVALID_ARGUMENT", "{args:?}");
    }
    // Larger than piccoloctl sends (64 KiB) but within the gRPC limit: refused before any
    // helper starts, as an invalid argument, and audited.
    let before = records(&b).len();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let e = rt
        .block_on(async {
            let mut c = TpmClient::new(piccolo_proto::client::connect_unix(&b.socket).await.unwrap());
            c.unseal_secret(UnsealSecretRequest { sealed_blob: vec![b'x'; 3 << 19] }).await
        })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("exceeds 1048576 bytes"), "{e}");
    let new = &records(&b)[before..];
    assert_eq!((new.len(), &new[0]["outcome"]["code"]), (1, &serde_json::json!("INVALID_ARGUMENT")));
    assert_eq!(records(&b).iter().filter(|r| r["rpc"] == "SealSecret" && r["args"]["secret_bytes"] == 129).count(), 1);
    assert_no_secret(&b);
}

#[test]
fn device_jwt_verifies_with_the_exported_key_and_the_key_survives_restarts() {
    let sw = Swtpm::start();
    let mut b = tpm_broker(&production_policy(), &sw.tcti());
    let key = ctl_json(&b, "piccolo-updater", &["tpm", "token-key", "--json"]);
    let pem = key["public_key_pem"].as_str().unwrap().to_owned();
    assert_eq!(key["jwk"]["kid"], key["kid"]);
    let id = ctl_json(&b, "piccolo-updater", &["tpm", "identity", "--json"]);
    let t = ctl_json(
        &b,
        "piccolo-updater",
        &["tpm", "sign-token", "--tier", "premium", "--feature", "disk-encryption", "--ttl", "900", "--json"],
    );
    let token = t["token"].as_str().unwrap();
    let claims = verify(token, &pem).unwrap();
    assert_eq!(claims["device_id"], id["device_id"]);
    assert!(claims["device_id"].as_str().unwrap().starts_with("tpm-ek-"));
    assert_eq!(claims["subscription_tier"], "premium");
    assert_eq!(claims["features"], serde_json::json!(["disk-encryption"]));
    assert_eq!(claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(), 900);
    assert_eq!(claims["exp"], t["expires_at"]);
    let mut bytes = token.as_bytes().to_vec();
    let i = bytes.len() - 10;
    bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
    assert!(verify(&String::from_utf8(bytes).unwrap(), &pem).is_err(), "a flipped byte fails");
    let rec = records(&b).into_iter().find(|r| r["rpc"] == "SignDeviceToken").unwrap();
    assert_eq!(
        rec["args"],
        serde_json::json!({"subscription_tier": "premium", "features": ["disk-encryption"], "ttl_seconds": 900})
    );

    b.stop();
    b.restart();
    let again = ctl_json(&b, "piccolo-updater", &["tpm", "token-key", "--json"]);
    assert_eq!(again["kid"], key["kid"], "same key after a broker restart");
    let t2 = ctl_json(&b, "piccolo-updater", &["tpm", "sign-token", "--tier", "basic", "--json"]);
    assert!(verify(t2["token"].as_str().unwrap(), &pem).is_ok());
}

#[test]
fn without_a_tpm_the_broker_serves_and_tpm_calls_fail_fast() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for tcti in [format!("swtpm:host=127.0.0.1,port={port}"), "device:/nonexistent/tpmrm0".to_owned()] {
        let b = tpm_broker(&production_policy(), &tcti);
        let info = ctl_json(&b, "root", &["info", "--json"]);
        let tpm = info["backends"].as_array().unwrap().iter().find(|x| x["name"] == "tpm").unwrap().clone();
        assert_eq!(tpm["available"], false, "{tcti}: {tpm}");
        assert!(tpm["detail"].as_str().unwrap().starts_with("no TPM"), "{tpm}");
        let secret = shared_file(&b, "secret", b"s");
        for (user, args) in [
            ("root", &["tpm", "identity"][..]),
            ("root", &["tpm", "pcrs"]),
            ("root", &["tpm", "seal", "--in", &secret]),
            ("piccolo-updater", &["tpm", "sign-token", "--tier", "x"]),
            ("piccolo-updater", &["tpm", "token-key"]),
        ] {
            let t = Instant::now();
            let o = b.ctl_as(user, args);
            assert!(t.elapsed() < Duration::from_secs(5), "{args:?} took {:?}", t.elapsed());
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", out(&o));
            assert!(String::from_utf8_lossy(&o.stderr).contains("FailedPrecondition: no TPM"), "{}", out(&o));
        }
        assert!(
            records(&b)
                .iter()
                .any(|r| r["rpc"] == "GetDeviceIdentity" && r["outcome"]["code"] == "FAILED_PRECONDITION")
        );
        // Nothing else is affected.
        ctl_ok(&b, "root", &["whoami"]);
    }
}

#[test]
fn the_tpm_stack_runs_in_the_helper_and_a_missing_helper_is_a_clear_error() {
    let sw = Swtpm::start();
    let b = tpm_broker(&production_policy(), &sw.tcti());
    let id = ctl_json(&b, "root", &["tpm", "identity", "--json"]);
    assert!(id["device_id"].as_str().unwrap().starts_with("tpm-ek-"), "{id}");
    // The call went through the helper: the broker never mapped the TSS or OpenSSL.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", b.pid())).unwrap();
    for lib in ["libtss2", "libcrypto"] {
        assert!(!maps.contains(lib), "the broker maps {lib}:\n{maps}");
    }
    drop(b);

    system_users();
    let helper = "/nonexistent/piccolo-broker-tpm";
    let b = Broker::start(BrokerOptions {
        policy: production_policy(),
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        extra_config: format!("[tpm]\ntcti = {:?}\nhelper = {helper:?}\n", sw.tcti()),
        ..Default::default()
    });
    let info = ctl_json(&b, "root", &["info", "--json"]);
    let tpm = info["backends"].as_array().unwrap().iter().find(|x| x["name"] == "tpm").unwrap().clone();
    assert_eq!(tpm["available"], false, "{tpm}");
    assert_eq!(tpm["detail"], format!("TPM helper {helper} not present"), "{tpm}");
    let o = b.ctl_as("root", &["tpm", "identity"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains(&format!("cannot start the TPM helper {helper}")), "{}", out(&o));
    let last = records(&b).into_iter().rfind(|r| r["rpc"] == "GetDeviceIdentity").unwrap();
    assert_eq!(last["outcome"]["code"], "INTERNAL", "{last}");
    drop(b);

    // A helper that fails, or answers nothing, is an internal error naming what happened.
    for (helper, says) in
        [("/bin/false", "the TPM helper failed (exit status: 1)"), ("/bin/true", "the TPM helper's answer is empty")]
    {
        let b = Broker::start(BrokerOptions {
            policy: production_policy(),
            extra_config: format!("[tpm]\ntcti = {:?}\nhelper = {helper:?}\n", sw.tcti()),
            ..Default::default()
        });
        let o = b.ctl_as("root", &["tpm", "identity"]);
        assert_eq!(o.status.code(), Some(1), "{}", out(&o));
        assert!(out(&o).contains(says), "{helper}: {}", out(&o));
    }
}
