// SPDX-License-Identifier: Apache-2.0
//! Boot state through the whole path: the real `piccolo-api` running as system user
//! `piccolo-api` (no capabilities) asks a real `piccolo-broker` (production policy) for
//! GetBootState on an sgdisk-made OS image; the answer reaches HTTP and the event stream.

mod common;

use common::{Api, PASSWORD, StackOptions, rt};
use piccolo_testkit::disks::os_image;

#[test]
fn boot_state_through_the_broker_as_the_api_user() {
    let img_dir = tempfile::tempdir().unwrap();
    let img = os_image(img_dir.path(), "os.img", 64, 4, 16);
    let api = Api::start_opts(StackOptions {
        api_args: vec!["--boot-poll-secs".into(), "1".into()],
        broker_config: format!("[boot]\nos_disk = {:?}\nbooted_slot = \"A\"\n", img.display().to_string()),
        ..Default::default()
    });

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
    let audit = api.broker.audit_text();
    assert!(
        audit.lines().any(|l| l.contains("\"GetBootState\"") && l.contains("\"piccolo-api\"") && l.contains("allow")),
        "no allowed GetBootState by piccolo-api in the audit log:\n{audit}"
    );
}
