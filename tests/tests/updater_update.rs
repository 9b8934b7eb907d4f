// SPDX-License-Identifier: Apache-2.0
//! End to end through real processes (swtpm, broker on a disk image, the test update server,
//! `piccolo-updater` as its system user, `piccolo-health`, `piccoloctl`): update → reboot →
//! health ok → marked good; update → reboot → health fails → fallback → version marked failed
//! and never retried; the maintenance window; the control socket's authorisation.

mod updater_rig;

use piccolo_testkit::disks::{USR_A, USR_B, bytes_at, cgpt_show, sgdisk_ok};
use updater_rig::*;

/// USR-B starts at LBA 43008 in the 64 MiB test image.
const USR_B_OFFSET: u64 = 43008 * 512;

#[test]
fn update_reboot_health_ok_marked_good() {
    let mut r = Rig::start(None);
    // Follow the job from another process while it runs.
    let socket = r.updater.socket.display().to_string();
    let follow = std::process::Command::new(piccolo_testkit::bins::piccoloctl())
        .args(["update", "--updater-socket", &socket, "status", "--follow"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    let s = r.updater.wait_for(30, "rebooting", |s| {
        phase(s) == "rebooting" && s["message"].as_str().unwrap().contains("reboot requested")
    });
    assert_eq!(s["version"], "1.1.0");
    let follow = follow.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&follow.stdout);
    assert!(follow.status.success(), "{text}{}", String::from_utf8_lossy(&follow.stderr));
    assert!(text.lines().any(|l| l.starts_with("checking")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("downloading  1.1.0  ") && l.contains("% (")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("verifying  1.1.0  100% (3158073 of 3158073 bytes)")), "{text}");
    assert!(text.lines().last().unwrap().starts_with("rebooting  1.1.0"), "{text}");

    // The broker wrote, verified and activated USR-B and was asked to reboot.
    assert_eq!(r.reboot_requests(), "delay=0\n");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false));
    assert_eq!(cgpt_show(&r.img, USR_A), (1, 0, true));
    assert!(bytes_at(&r.img, USR_B_OFFSET, r.data.len()) == r.data, "payload is in USR-B");
    sgdisk_ok(&r.img);
    // The device was identified by its token only: no query string, TPM identity in the claims.
    let check = r.server.requests().into_iter().find(|q| q["path"] == "/api/v1/updates/check").unwrap();
    assert!(check["query"].is_null(), "{check}");
    assert!(check["claims"]["device_id"].as_str().unwrap().starts_with("tpm-ek-"), "{check}");
    assert_eq!(check["claims"]["subscription_tier"], "free");

    // GRUB boots B (its one try); the worker sees it runs the new version, not yet good.
    assert_eq!(r.reboot(), USR_B);
    let s = r.updater.wait_for(20, "booted", |s| {
        attempt(s, "1.1.0").is_some_and(|a| a["state"] == "booted")
            && s["message"].as_str().unwrap().contains("waiting for the health check")
    });
    assert_eq!(s["current_version"], "1.1.0");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 0, false));

    // A newer version offered now must not touch USR-A: it is this unconfirmed boot's fallback.
    let p2 = r.dir.path().join("payload-1.2.0");
    std::fs::write(&p2, payload(1 << 20, 2)).unwrap();
    r.server.set_scenario(&available(&p2, "1.2.0"));
    let before = std::fs::read(&r.img).unwrap();
    let (_, out) = r.ctl(&["check"]);
    let s = r.updater.wait_for(20, "refused", |s| phase(s) == "failed");
    assert!(s["message"].as_str().unwrap().contains("not marked good yet"), "{s} {out}");
    assert!(before == std::fs::read(&r.img).unwrap(), "the fallback slot was touched");
    r.server.set_scenario(&available(&r.payload, "1.1.0"));

    // The health gate: broker and the updater's socket are up → mark good.
    let cfg = r.health_config("health.toml", &[&r.updater.socket], 10);
    let o = piccolo_testkit::updater::health_as("piccolo-updater", &cfg);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&o.stderr));
    assert!(text.contains("ok    broker") && text.contains("marked USR-B good"), "{text}");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 0, true));
    r.updater.wait_for(20, "succeeded", |s| attempt(s, "1.1.0").is_some_and(|a| a["state"] == "succeeded"));
    sgdisk_ok(&r.img);

    // It keeps booting B, and a new check finds nothing newer than what runs.
    assert_eq!(r.reboot(), USR_B);
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("up to date (running 1.1.0"), "{out}");
    assert!(r.reboot_requests().is_empty());
}

#[test]
fn health_failure_falls_back_and_the_version_is_never_retried() {
    let mut r = Rig::start(None);
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    wait_rebooting(&r, 30);
    assert_eq!(r.reboot(), USR_B);

    // A required worker socket is missing: not marked, exit 1.
    let missing = r.dir.path().join("no-such-api.sock");
    let cfg = r.health_config("health.toml", &[&r.updater.socket, &missing], 1);
    let o = piccolo_testkit::updater::health_as("piccolo-updater", &cfg);
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL  socket") && text.contains("no-such-api.sock"), "{text}");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 0, false), "not marked");

    // Next boot: B has no tries and is not good, GRUB falls back to A.
    assert_eq!(r.reboot(), USR_A);
    let s = r.updater.wait_for(20, "failed", |s| {
        phase(s) == "failed" && attempt(s, "1.1.0").is_some_and(|a| a["state"] == "failed")
    });
    let reason = attempt(&s, "1.1.0").unwrap()["reason"].as_str().unwrap().to_owned();
    assert!(reason.contains("fell back to USR-A") && reason.contains("not retried automatically"), "{reason}");
    assert_eq!(s["message"], reason.as_str(), "the phase names the reason");
    // Visible to the operator in the plain status too.
    let (_, out) = r.ctl(&["status"]);
    assert!(out.contains("1.1.0") && out.contains("fell back to USR-A"), "{out}");

    // The server still offers 1.1.0: a check (and the scheduler) leaves it alone.
    let before = r.server.payload_requests().len();
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1.1.0 is marked failed") && out.contains("not retried automatically"), "{out}");
    let (code, out) = r.ctl(&["apply"]);
    assert_eq!(code, 0, "{out}");
    r.updater.wait_for(10, "idle", |s| phase(s) == "idle");
    assert_eq!(r.server.payload_requests().len(), before, "no download of a failed version");
    assert!(r.reboot_requests().is_empty(), "no reboot");
    assert_eq!(cgpt_show(&r.img, USR_A), (1, 0, true));
    assert_eq!(piccolo_bootctl::simulator::boot_image(&r.img).unwrap().unwrap().number, USR_A);

    // A restarted worker remembers it (durable record).
    r.updater.stop();
    r.updater.restart();
    let (_, out) = r.ctl(&["check"]);
    assert!(out.contains("1.1.0 is marked failed"), "{out}");
    // The operator may insist.
    let (code, out) = r.ctl(&["check", "--force"]);
    assert_eq!(code, 0, "{out}");
    wait_rebooting(&r, 30);
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false));
}

#[test]
fn window_defers_the_reboot_and_apply_overrides_it() {
    // A one-minute window that is not now.
    let now = piccolo_updater::window::now();
    let m = (now % 86400) / 60;
    let open = (m + 120) % 1440;
    let hm = |x: u64| format!("{:02}:{:02}", x / 60, x % 60);
    let (a, b) = (hm(open), hm((open + 1) % 1440));
    let r = Rig::start(Some((&a, &b)));
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    let s = r.updater.wait_for(30, "waiting", |s| phase(s) == "waiting_for_window");
    assert!(s["message"].as_str().unwrap().contains(&format!("{a}-{b} UTC")), "{s}");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false), "staged");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(r.reboot_requests().is_empty(), "no reboot outside the window");

    // Opening the window now (SetWindow) reboots.
    let (code, out) = r.ctl(&["window", "00:00", "00:00"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("00:00-00:00 UTC (any time)"), "{out}");
    wait_rebooting(&r, 10);
    assert_eq!(r.reboot_requests(), "delay=0\n");
}

#[test]
fn apply_now_reboots_outside_the_window_and_control_is_authorised() {
    let r = Rig::start(Some(("03:00", "03:00")));
    // Same start and end means any time; set a closed window through the socket instead.
    let now = piccolo_updater::window::now();
    let m = (now % 86400) / 60;
    let hm = |x: u64| format!("{:02}:{:02}", x / 60, x % 60);
    let (code, out) = r.ctl(&["window", &hm((m + 120) % 1440), &hm((m + 121) % 1440)]);
    assert_eq!(code, 0, "{out}");
    // Another worker may not drive the updater; piccolo-api may.
    let o = r.updater.ctl_as("piccolo-apps", &["status"]);
    assert_eq!(o.status.code(), Some(3), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Status: permission denied"));
    let o = r.updater.ctl_as("piccolo-apps", &["apply"]);
    assert_eq!(o.status.code(), Some(3));
    let o = r.updater.ctl_as("piccolo-api", &["apply"]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    wait_rebooting(&r, 30);
    assert_eq!(r.reboot_requests(), "delay=0\n");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false));
}
