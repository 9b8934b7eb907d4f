// SPDX-License-Identifier: Apache-2.0
//! Boot state through the whole path: the real `piccolo-api` running as system user
//! `piccolo-api` (no capabilities) asks a real `piccolo-broker` (production policy) for
//! GetBootState on an sgdisk-made OS image; the answer reaches HTTP and the event stream.

mod common;

use std::path::Path;

use common::{Api, PASSWORD, rt};
use piccolo_testkit::broker::{Broker, BrokerOptions};
use piccolo_testkit::disks::os_image;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn boot_state_through_the_broker_as_the_api_user() {
    piccolo_testkit::users::apply_sysusers(&repo().join("systemd/sysusers.d/piccolo.conf"));
    let img_dir = tempfile::tempdir().unwrap();
    let img = os_image(img_dir.path(), "os.img", 64, 4, 16);
    let policy = std::fs::read_to_string(repo().join("policy/broker.toml")).unwrap();
    let broker = Broker::start(BrokerOptions {
        policy,
        socket_group: Some("piccolo-broker".into()),
        audit_group: Some("piccolo-audit".into()),
        extra_config: format!("[boot]\nos_disk = {:?}\nbooted_slot = \"A\"\n", img.display().to_string()),
        ..Default::default()
    });
    let dir = tempfile::Builder::new().prefix("piccolo-api-boot-").tempdir().unwrap();
    let user = nix::unistd::User::from_name("piccolo-api").unwrap().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    let socket = broker.socket.display().to_string();
    let api = Api::start_in(dir, &["--broker-socket", &socket, "--boot-poll-secs", "1"], Some("piccolo-api"));
    // The worker really runs as piccolo-api, without capabilities.
    let status = std::fs::read_to_string(format!("/proc/{}/status", api.pid())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(uid_line.split_whitespace().skip(1).all(|u| u == user.uid.to_string()), "{uid_line}");
    assert!(status.lines().any(|l| l == "CapEff:\t0000000000000000"), "{status}");

    rt().block_on(async {
        api.setup().await;
        let s = api.login(PASSWORD).await;
        let r = api.get("/api/v1/boot", &[("authorization", &s.bearer())]).await;
        assert_eq!(r.status, 200, "{} / {}", r.text(), api.log());
        let b = r.json();
        assert_eq!(b["booted"], "a", "{b}");
        assert_eq!(b["slots"].as_array().unwrap().len(), 2, "{b}");
        assert_eq!(b["slots"][0]["label"], "USR-A", "{b}");
        assert_eq!(b["slots"][1]["label"], "USR-B", "{b}");

        // The event stream: the lock state first, then the polled boot state.
        let ev = api.get("/api/v1/events?limit=2", &[("authorization", &s.bearer())]).await;
        let text = ev.text();
        assert!(text.contains("event: lock"), "{text}");
        assert!(text.contains("event: boot") && text.contains(r#""booted":"a""#), "{text}");
    });
    let audit = broker.audit_text();
    assert!(
        audit.lines().any(|l| l.contains("\"GetBootState\"") && l.contains("\"piccolo-api\"") && l.contains("allow")),
        "no allowed GetBootState by piccolo-api in the audit log:\n{audit}"
    );
}
