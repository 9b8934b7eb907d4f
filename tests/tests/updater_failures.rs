// SPDX-License-Identifier: Apache-2.0
//! What the update server can do wrong, one scenario after another on one rig: each leaves
//! the inactive slot unbootable and the active slot untouched (checked with cgpt, the GRUB
//! simulator and the broker's GetBootState). Also: the device JWT is checked by the server
//! (expired, wrong key, tampered, missing → 401), "not yet" is respected, a dropped transfer
//! resumes with Range, and Cancel stops a slow download.

mod updater_rig;

use std::time::Duration;

use base64::Engine as _;
use piccolo_proto::v1::Slot;
use piccolo_testkit::disks::{USR_A, USR_B, cgpt_show, sgdisk_ok};
use serde_json::json;
use updater_rig::*;

/// B is unbootable and unverified, A is the good booted slot, GRUB boots A.
fn untouched(r: &Rig, what: &str) {
    assert_eq!(cgpt_show(&r.img, USR_B), (0, 0, false), "{what}: USR-B");
    assert_eq!(cgpt_show(&r.img, USR_A), (1, 0, true), "{what}: USR-A");
    let st = r.boot_state();
    assert_eq!((st.next_boot, st.fallback), (Slot::A as i32, Slot::A as i32), "{what}");
    assert!(!st.slots[1].verified, "{what}: USR-B must not be verified");
    sgdisk_ok(&r.img);
    assert!(r.reboot_requests().is_empty(), "{what}: no reboot");
}

fn check_fails(r: &Rig, what: &str, needle: &str) -> serde_json::Value {
    let (code, out) = r.ctl(&["check", "--force"]);
    let s = r.updater.wait_for(60, what, |s| phase(s) == "failed" || phase(s) == "idle");
    assert_eq!(phase(&s), "failed", "{what}: {s} ({code} {out})");
    let msg = s["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{what}: {msg}");
    untouched(r, what);
    s
}

#[test]
fn server_failures_leave_the_active_slot_untouched() {
    let r = Rig::start(None);
    let base = available(&r.payload, "1.1.0");
    let with = |extra: serde_json::Value| {
        let mut v = base.clone();
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    };

    // A manifest signed by another key: refused before any download.
    r.server.set_scenario(&with(json!({"bad_signature": true})));
    check_fails(&r, "bad signature", "signature does not verify against the pinned key");
    assert!(r.server.payload_requests().is_empty(), "nothing downloaded after a bad signature");

    // The check itself answers 500.
    r.server.set_scenario(&with(json!({"check_500": true})));
    check_fails(&r, "check 500", "answered 500");

    // The payload keeps answering 500 (more than the retries).
    r.server.set_scenario(&with(json!({"payload_500_count": 1000})));
    check_fails(&r, "payload 500", "server answered 500");

    // The transfer always stops at 1 MiB (it announced the full length).
    r.server.set_scenario(&with(json!({"truncate_at": 1 << 20})));
    let s = check_fails(&r, "truncated", "download of 1.1.0 failed after");
    let done = s["message"].as_str().unwrap().split("after ").nth(1).unwrap().split(' ').next().unwrap();
    assert!(done.parse::<u64>().unwrap() <= 1 << 20, "{s}");
    assert!(attempt(&s, "1.1.0").unwrap()["state"] == "failed");
    let ranges: Vec<_> =
        r.server.payload_requests().iter().filter_map(|q| q["range"].as_str().map(str::to_owned)).collect();
    assert!(ranges.len() >= 2 && ranges.iter().all(|g| g.starts_with("bytes=")), "resume attempts: {ranges:?}");

    // The manifest's digest is not the payload's: the broker refuses the slot.
    r.server.set_scenario(&with(json!({"wrong_sha256": "00".repeat(32)})));
    check_fails(&r, "wrong digest", "digest mismatch");
    let recs = records(&r.broker);
    assert!(recs.iter().any(|x| x["rpc"] == "WriteInactiveSlot" && x["outcome"]["code"] == "DATA_LOSS"));

    // The device key the server trusts is another device's: 401.
    let other_tpm = piccolo_testkit::swtpm::Swtpm::start();
    let other = piccolo_testkit::broker::Broker::start(piccolo_testkit::broker::BrokerOptions {
        policy: POLICY.into(),
        extra_config: format!("[tpm]\ntcti = {:?}\n", other_tpm.tcti()),
        ..Default::default()
    });
    let other_jwk = r.rt.block_on(async {
        let ch = piccolo_proto::client::connect_unix(&other.socket).await.unwrap();
        piccolo_proto::v1::tpm_client::TpmClient::new(ch)
            .get_device_token_key(piccolo_proto::v1::GetDeviceTokenKeyRequest {})
            .await
            .unwrap()
            .into_inner()
            .jwk_json
    });
    let own_jwk = std::fs::read_to_string(r.server.dir.path().join("device.jwk")).unwrap();
    r.server.set_device_jwk(&other_jwk);
    r.server.set_scenario(&base);
    check_fails(&r, "wrong device key", "answered 401");
    r.server.set_device_jwk(&own_jwk);

    // Staged rollout: "not yet" is respected (idle, nothing fetched, next check deferred).
    r.server.set_scenario(&json!({"status": "not_yet", "retry_after": 7200}));
    let n = r.server.payload_requests().len();
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    let s = r.updater.status();
    assert_eq!(phase(&s), "idle", "{s}");
    assert!(s["message"].as_str().unwrap().contains("not yet"), "{s}");
    let wait = s["next_check"].as_i64().unwrap() - piccolo_updater::window::now() as i64;
    assert!((7100..=7200).contains(&wait), "next check in {wait} s");
    assert_eq!(r.server.payload_requests().len(), n);
    untouched(&r, "not yet");

    // A slow transfer is cancelled by the operator.
    r.server.set_scenario(&with(json!({"rate_bytes_per_sec": 200_000})));
    let (code, out) = r.ctl(&["check", "--force"]);
    assert_eq!(code, 0, "{out}");
    r.updater.wait_for(20, "progress", |s| phase(s) == "downloading" && s["bytes_done"].as_u64().unwrap() > 0);
    let (code, out) = r.ctl(&["cancel"]);
    assert_eq!(code, 0, "{out}");
    let s = r.updater.wait_for(20, "cancelled", |s| phase(s) == "idle");
    assert_eq!(attempt(&s, "1.1.0").unwrap()["state"], "cancelled");
    untouched(&r, "cancelled");
    // Cancelled versions are not fetched again automatically.
    r.server.set_scenario(&base);
    let (_, out) = r.ctl(&["check"]);
    assert!(out.contains("was cancelled; not retried automatically"), "{out}");

    // Finally a transfer dropped once at 1 MiB (after a 500) resumes with Range and completes.
    r.server.set_scenario(&with(json!({"drop_once_at": 1 << 20, "payload_500_count": 0})));
    let before = r.server.payload_requests().len();
    let (code, out) = r.ctl(&["check", "--force"]);
    assert_eq!(code, 0, "{out}");
    wait_rebooting(&r, 60);
    let reqs = r.server.payload_requests()[before..].to_vec();
    // The cut-off response delivered up to 1 MiB; the next one resumes where the data ended.
    assert!(reqs.len() == 2 && reqs[0]["status"] == 200 && reqs[1]["status"] == 206, "{reqs:?}");
    let from: u64 = reqs[1]["range"].as_str().unwrap()["bytes=".len()..].trim_end_matches('-').parse().unwrap();
    assert!(from > 0 && from <= 1 << 20, "{reqs:?}");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false));
}

#[test]
fn device_tokens_are_checked_by_the_server() {
    let r = Rig::start(None);
    let http = piccolo_updater::http::Http::new(Duration::from_secs(5));
    let url = format!("{}/api/v1/updates/check", r.server.url());
    let get = |t: Option<&str>| {
        r.rt.block_on(async { http.get(&url, t, 0).await.map(|resp| resp.status().as_u16()).unwrap() })
    };
    let good = r.token(60);
    assert_eq!(get(Some(&good)), 200);
    assert_eq!(get(None), 401);
    // Tampered: a claim changed, signature kept.
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut claims: serde_json::Value = serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
    claims["subscription_tier"] = json!("premium");
    let forged = format!("{}.{}.{}", parts[0], b64.encode(claims.to_string()), parts[2]);
    assert_eq!(get(Some(&forged)), 401);
    // Signature bytes flipped.
    let mut sig = b64.decode(parts[2]).unwrap();
    sig[5] ^= 1;
    assert_eq!(get(Some(&format!("{}.{}.{}", parts[0], parts[1], b64.encode(sig)))), 401);
    // Expired.
    let short = r.token(1);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(get(Some(&short)), 401);
    let reasons: Vec<String> = r
        .server
        .requests()
        .iter()
        .filter(|q| q["status"] == 401)
        .map(|q| q["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons.iter().any(|x| x.contains("xpired")), "{reasons:?}");
}
