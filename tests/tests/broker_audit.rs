// SPDX-License-Identifier: Apache-2.0
//! The audit log as an operator sees it: `piccoloctl audit verify` catches each kind of
//! tampering, `audit show` filters, rotation keeps the chain, and no log means no broker.

mod common;

use std::process::Command;

use common::*;
use piccolo_testkit::bins;

fn ctl(args: &[&str]) -> (i32, String) {
    let o = Command::new(bins::piccoloctl()).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
    )
}

/// A stopped broker's log with a few allowed and denied calls in it.
fn finished_log() -> piccolo_testkit::broker::Broker {
    let mut b = broker(MATRIX_POLICY);
    for _ in 0..3 {
        assert!(b.ctl_as("piccolo-api", &["info"]).status.success());
        assert_eq!(b.ctl_as("piccolo-updater", &["info"]).status.code(), Some(3));
    }
    assert!(b.stop().success());
    b
}

#[test]
fn verify_accepts_an_untouched_chain_and_names_each_kind_of_tampering() {
    let b = finished_log();
    let log = b.audit.display().to_string();
    let (code, text) = ctl(&["audit", "verify", "--log", &log]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok: 8 records"), "{text}");

    let original = std::fs::read_to_string(&b.audit).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let put = |ls: &[&str]| std::fs::write(&b.audit, ls.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();

    // Edited byte: flip a decision.
    assert!(lines[2].contains("\"decision\":\"deny\""), "{}", lines[2]);
    let edited = lines[2].replace("\"decision\":\"deny\"", "\"decision\":\"allow\"");
    let mut ls = lines.clone();
    ls[2] = &edited;
    put(&ls);
    let (code, text) = ctl(&["audit", "verify", "--log", &log]);
    assert_eq!(code, 5, "{text}");
    assert!(text.contains(":3 (seq") || text.contains(":3:"), "{text}");
    assert!(text.contains("hash mismatch") || text.contains("canonical"), "{text}");

    // Deleted line.
    let mut ls = lines.clone();
    ls.remove(4);
    put(&ls);
    let (code, text) = ctl(&["audit", "verify", "--log", &log]);
    assert_eq!(code, 5);
    assert!(text.contains("sequence jumps from 3 to 5"), "{text}");

    // Reordered lines.
    let mut ls = lines.clone();
    ls.swap(5, 6);
    put(&ls);
    let (code, text) = ctl(&["audit", "verify", "--log", &log]);
    assert_eq!(code, 5);
    assert!(text.contains("sequence jumps"), "{text}");

    // Truncated chain: the last records cut off (the broker's stop checkpoint says more exist).
    put(&lines[..5]);
    let (code, text) = ctl(&["audit", "verify", "--log", &log]);
    assert_eq!(code, 5);
    assert!(text.contains("chain truncated"), "{text}");

    std::fs::write(&b.audit, &original).unwrap();
    assert_eq!(ctl(&["audit", "verify", "--log", &log]).0, 0);
}

#[test]
fn show_filters_by_rpc_caller_decision_and_time() {
    let b = finished_log();
    let log = b.audit.display().to_string();
    let (code, text) = ctl(&["audit", "show", "--log", &log, "--decision", "deny"]);
    assert_eq!(code, 0, "{text}");
    let rows: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert!(rows.iter().all(|r| r.contains("piccolo-updater") && r.contains("PERMISSION_DENIED")));

    let (_, text) = ctl(&["audit", "show", "--log", &log, "--caller", "piccolo-api", "--json"]);
    let recs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| r["rpc"] == "GetInfo" && r["decision"] == "allow"));

    let (_, text) = ctl(&["audit", "show", "--log", &log, "--rpc", "broker.start", "--json"]);
    assert_eq!(text.lines().count(), 1);
    let (_, text) = ctl(&["audit", "show", "--log", &log, "--since", "2099-01-01T00:00:00Z", "--json"]);
    assert_eq!(text.lines().count(), 0);
    let (_, text) = ctl(&["audit", "show", "--log", &log, "--since", "1h", "--json"]);
    assert_eq!(text.lines().count(), 8);
    let (code, text) = ctl(&["audit", "show", "--log", &log, "--since", "yesterday"]);
    assert_eq!(code, 2, "{text}");
}

#[test]
fn broker_rotation_keeps_one_verifiable_chain() {
    system_users();
    let mut b = piccolo_testkit::broker::Broker::start(piccolo_testkit::broker::BrokerOptions {
        policy: MATRIX_POLICY.into(),
        socket_group: Some("piccolo-broker".into()),
        audit_max_bytes: Some(1500),
        ..Default::default()
    });
    for _ in 0..15 {
        assert!(b.ctl_as("piccolo-api", &["info"]).status.success());
    }
    assert!(b.stop().success());
    let files = piccolo_audit::chain_files(&b.audit);
    assert!(files.len() >= 3, "{files:?}");
    let (code, text) = ctl(&["audit", "verify", "--log", &b.audit.display().to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("17 records"), "{text}");
}

#[test]
fn broker_continues_the_chain_across_restarts_and_refuses_to_start_without_a_log() {
    let mut b = finished_log();
    b.restart();
    assert!(b.ctl_as("piccolo-api", &["info"]).status.success());
    assert!(b.stop().success());
    let (code, text) = ctl(&["audit", "verify", "--log", &b.audit.display().to_string()]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok: 11 records"), "{text}");

    // An audit log that cannot be opened for appending: the broker must not serve.
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    let bad = b.path("no-such-dir/audit.jsonl");
    let cfg = cfg.replace(&b.audit.display().to_string(), &bad.display().to_string());
    std::fs::write(&b.config, cfg).unwrap();
    let o = Command::new(bins::broker()).arg("--config").arg(&b.config).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("refusing to start without an audit log"), "{err}");
    assert!(!b.socket.exists(), "no socket may appear");
}

/// While the broker runs, the live file ends in zeros written ahead of the records, and
/// `piccoloctl` reads and verifies it through them; a stopped broker leaves plain JSON
/// Lines; `audit_preallocate = false` appends instead.
#[test]
fn the_live_log_is_read_through_its_preallocated_tail() {
    let mut b = broker(MATRIX_POLICY);
    assert!(b.ctl_as("piccolo-api", &["info"]).status.success());
    let log = b.audit.display().to_string();
    let bytes = std::fs::read(&b.audit).unwrap();
    let end = bytes.iter().position(|x| *x == 0).expect("zeros ahead of the records");
    assert!(bytes.len() as u64 >= piccolo_audit::PREALLOCATE, "live file is {} bytes", bytes.len());
    assert_eq!(bytes[end - 1], b'\n');
    let (code, text) = ctl(&["audit", "verify", "--log", &log]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("ok: 2 records"), "{text}");
    let (_, text) = ctl(&["audit", "show", "--log", &log, "--rpc", "GetInfo", "--json"]);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(b.stop().success());
    let stopped = std::fs::read(&b.audit).unwrap();
    assert!(!stopped.contains(&0), "a stopped broker trims the zeros");
    assert_eq!(stopped[..end], bytes[..end], "the records written while running are unchanged");
    assert_eq!(stopped.last(), Some(&b'\n'));
    let (code, text) = ctl(&["audit", "verify", "--log", &log]);
    assert_eq!(code, 0, "{text}");

    let mut b = piccolo_testkit::broker::Broker::start(piccolo_testkit::broker::BrokerOptions {
        policy: MATRIX_POLICY.into(),
        socket_group: Some("piccolo-broker".into()),
        extra_config: "audit_preallocate = false\n".into(),
        ..Default::default()
    });
    assert!(b.ctl_as("piccolo-api", &["info"]).status.success());
    let bytes = std::fs::read(&b.audit).unwrap();
    assert!(!bytes.is_empty() && !bytes.contains(&0), "appending: records only");
    assert_eq!(bytes.last(), Some(&b'\n'));
    assert!(b.stop().success());
}
