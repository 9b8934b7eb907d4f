// SPDX-License-Identifier: Apache-2.0
//! The caller × RPC matrix with real users, audit records per call, policy reload and
//! `--check-policy`.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;

fn out(o: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn caller_rpc_matrix_with_real_users_is_enforced_and_audited() {
    let b = broker(MATRIX_POLICY);
    let uid = |n: &str| nix::unistd::User::from_name(n).unwrap().unwrap().uid.as_raw();

    // (user, args, expected exit code, text the output must contain)
    let cases: &[(&str, &[&str], i32, &str)] = &[
        ("piccolo-api", &["info"], 0, "policy sha256"),
        ("piccolo-api", &["whoami"], 0, "user     piccolo-api"),
        ("piccolo-updater", &["info"], 3, "access denied by the broker policy: GetInfo: permission denied"),
        ("piccolo-updater", &["whoami"], 0, "allowed  WhoAmI"),
        ("nobody", &["info"], 3, "permission denied on socket"),
        ("root", &["info"], 3, "GetInfo: permission denied"),
        ("root", &["whoami"], 0, "user     root"),
    ];
    for (user, args, code, text) in cases {
        let o = b.ctl_as(user, args);
        assert_eq!(o.status.code(), Some(*code), "{user} {args:?}: {}", out(&o));
        assert!(out(&o).contains(text), "{user} {args:?}: {}", out(&o));
    }

    // One record per call that reached the broker, with the caller's real uid.
    let recs = records(&b);
    let find = |user: &str, rpc: &str, decision: &str| {
        recs.iter().any(|r| {
            r["caller"]["uid"] == uid(user) && r["rpc"] == rpc && r["decision"] == decision && r["kind"] == "call"
        })
    };
    assert!(find("piccolo-api", "GetInfo", "allow"));
    assert!(find("piccolo-api", "WhoAmI", "allow"));
    assert!(find("piccolo-updater", "GetInfo", "deny"));
    assert!(find("piccolo-updater", "WhoAmI", "allow"));
    assert!(find("root", "GetInfo", "deny"));
    assert!(find("root", "WhoAmI", "allow"));
    let denied = recs.iter().find(|r| r["decision"] == "deny").unwrap();
    assert_eq!(denied["outcome"]["code"], "PERMISSION_DENIED");
    assert_eq!(denied["caller"]["user"], "piccolo-updater");
    // pid is recorded for audit; exe only where readable (the broker holds no CAP_SYS_PTRACE).
    assert!(denied["caller"]["pid"].as_i64().unwrap() > 1);
    // nobody never got past the socket's permissions, so no record names it.
    assert!(!recs.iter().any(|r| r["caller"]["uid"] == uid("nobody")));
}

#[test]
fn socket_and_audit_files_have_the_documented_owners_and_modes() {
    let b = broker(MATRIX_POLICY);
    let gid = |n: &str| nix::unistd::Group::from_name(n).unwrap().unwrap().gid.as_raw();
    let dir = std::fs::metadata(b.socket.parent().unwrap()).unwrap();
    assert_eq!((dir.uid(), dir.gid(), dir.permissions().mode() & 0o7777), (0, gid("piccolo-broker"), 0o750));
    let sock = std::fs::metadata(&b.socket).unwrap();
    assert_eq!((sock.uid(), sock.gid(), sock.permissions().mode() & 0o7777), (0, gid("piccolo-broker"), 0o660));
    let log = std::fs::metadata(&b.audit).unwrap();
    assert_eq!((log.uid(), log.gid(), log.permissions().mode() & 0o7777), (0, gid("piccolo-audit"), 0o640));
}

#[test]
fn sighup_reloads_a_good_policy_and_keeps_the_old_one_on_a_bad_one() {
    let b = broker(MATRIX_POLICY);
    assert_eq!(b.ctl_as("piccolo-updater", &["info"]).status.code(), Some(3));

    // Good: grant GetInfo to the updater too.
    let good = MATRIX_POLICY.replace("users = [\"piccolo-api\"]", "users = [\"piccolo-api\", \"piccolo-updater\"]");
    std::fs::write(&b.policy, &good).unwrap();
    b.reload();
    assert_eq!(b.ctl_as("piccolo-updater", &["info"]).status.code(), Some(0));
    assert!(b.audit_text().contains("broker.policy_reloaded"));

    // Bad: an unknown RPC. The good policy must stay in force.
    std::fs::write(&b.policy, good.replace("\"GetInfo\"]", "\"GetInfo\", \"RunAnything\"]")).unwrap();
    b.reload();
    assert!(b.audit_text().contains("broker.policy_reload_rejected"));
    assert!(b.audit_text().contains("unknown RPC"));
    assert_eq!(b.ctl_as("piccolo-updater", &["info"]).status.code(), Some(0), "old policy still in force");
    assert!(b.stderr_text().contains("policy reload rejected"));
}

fn check(text: &str) -> (bool, String) {
    system_users();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("p.toml");
    std::fs::write(&f, text).unwrap();
    let o = piccolo_testkit::broker::check_policy(&f);
    (o.status.success(), out(&o))
}

#[test]
fn check_policy_prints_the_table_and_names_bad_lines() {
    let (ok, text) = check(MATRIX_POLICY);
    assert!(ok, "{text}");
    assert!(text.contains("user:piccolo-api") && text.contains("group:piccolo-broker"), "{text}");
    let getinfo = text.lines().find(|l| l.starts_with("GetInfo")).unwrap();
    assert!(getinfo.contains("yes"), "{getinfo}");

    let (ok, text) =
        check("version = 1\n\n[[rule]]\nrpcs = [\"WhoAmI\", \"Reboot2\"]\nusers = [\"root\"]\nreason = \"x\"\n");
    assert!(!ok);
    assert!(text.contains("p.toml:4: unknown RPC \"Reboot2\""), "{text}");

    let (ok, text) =
        check("version = 1\n\n[[rule]]\nrpcs = [\"WhoAmI\"]\nusers = [\"no-such-user-xyz\"]\nreason = \"x\"\n");
    assert!(!ok);
    assert!(text.contains("p.toml:5: unknown user \"no-such-user-xyz\""), "{text}");

    let (ok, text) = check("version = 1\n[[rule]]\nrpcs = [\"WhoAmI\"]\nuser = [\"root\"]\nreason = \"x\"\n");
    assert!(!ok);
    assert!(text.contains("p.toml:4") && text.contains("unknown field"), "{text}");
}

#[test]
fn shipped_policy_is_valid() {
    let (ok, text) = check(&std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap());
    assert!(ok, "{text}");
}
