// SPDX-License-Identifier: Apache-2.0
//! Power loss of the worker (SIGKILL) during the download and around activation: the box
//! still boots the old version, and a restarted worker recovers from its durable record and
//! the broker's boot state (restarts the download, or finishes the activation).

mod updater_rig;

use piccolo_testkit::disks::{USR_A, USR_B, cgpt_show, sgdisk_ok};
use serde_json::json;
use updater_rig::*;

#[test]
fn kill_during_download_then_restart_downloads_again() {
    let mut r = Rig::start(None);
    let mut slow = available(&r.payload, "1.1.0");
    slow["rate_bytes_per_sec"] = json!(400_000);
    r.server.set_scenario(&slow);
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    r.updater.wait_for(20, "progress", |s| s["bytes_done"].as_u64().unwrap_or(0) > 300_000);
    r.updater.kill9();

    // The slot was prepared first and never verified: GRUB still boots A.
    assert_eq!(cgpt_show(&r.img, USR_B), (0, 0, false));
    assert_eq!(cgpt_show(&r.img, USR_A), (1, 0, true));
    assert!(!r.boot_state().slots[1].verified);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.updater.state_dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(record["attempts"]["1.1.0"]["state"], "downloading", "{record}");
    sgdisk_ok(&r.img);

    // Restart with a fast server: recovery notes the interruption and checks again at once.
    r.server.set_scenario(&available(&r.payload, "1.1.0"));
    r.updater.restart();
    let s = wait_rebooting(&r, 60);
    let a = attempt(&s, "1.1.0").unwrap();
    assert_eq!((a["state"].as_str(), a["attempts"].as_u64()), (Some("staged"), Some(2)), "{s}");
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false));
    assert_eq!(r.reboot(), USR_B);
}

fn crash_at(point: &str) -> Rig {
    let mut r = Rig::start(None);
    r.updater.stop();
    r.updater.set_env(vec![("PICCOLO_UPDATER_CRASH_AT".into(), point.into())]);
    r.updater.restart();
    let (code, out) = r.ctl(&["check"]);
    assert_eq!(code, 0, "{out}");
    r.updater.wait_stderr(&format!("PICCOLO-UPDATER-CRASH-POINT {point}"), 60);
    r.updater.kill9();
    r.updater.set_env(vec![]);
    r
}

#[test]
fn kill_before_activation_boots_old_and_restart_activates() {
    let mut r = crash_at("before-activate");
    // Written and verified, never activated: unbootable, A boots.
    assert_eq!(cgpt_show(&r.img, USR_B), (0, 0, false));
    assert!(r.boot_state().slots[1].verified);
    assert_eq!(cgpt_show(&r.img, USR_A), (1, 0, true));
    let before = std::fs::read(&r.img).unwrap();
    assert_eq!(piccolo_bootctl::simulator::boot_image(&r.img).unwrap().unwrap().number, USR_A);
    assert!(before == std::fs::read(&r.img).unwrap(), "booting A spends no tries");

    let downloads = r.server.payload_requests().len();
    r.updater.restart();
    let s = wait_rebooting(&r, 30);
    assert_eq!(attempt(&s, "1.1.0").unwrap()["attempts"], 1, "no second download: {s}");
    assert_eq!(r.server.payload_requests().len(), downloads);
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false));
    assert_eq!(r.reboot(), USR_B);
}

#[test]
fn kill_after_activation_is_recognised_as_staged() {
    let mut r = crash_at("after-activate");
    // Activated: the next boot tries B once; A stays the good fallback.
    assert_eq!(cgpt_show(&r.img, USR_B), (2, 1, false));
    assert_eq!(cgpt_show(&r.img, USR_A), (1, 0, true));
    let st = r.boot_state();
    assert_eq!((st.next_boot, st.fallback), (2, 1), "B next, A fallback");
    r.updater.restart();
    let s = wait_rebooting(&r, 30);
    assert_eq!(attempt(&s, "1.1.0").unwrap()["state"], "staged");
    assert_eq!(r.reboot_requests(), "delay=0\n");
    // Power fails again on B before the health check: GRUB falls back to A.
    assert_eq!(r.reboot(), USR_B);
    assert_eq!(r.reboot(), USR_A);
    let s = r.updater.wait_for(20, "failed", |s| attempt(s, "1.1.0").is_some_and(|a| a["state"] == "failed"));
    assert!(attempt(&s, "1.1.0").unwrap()["reason"].as_str().unwrap().contains("fell back to USR-A"));
}
