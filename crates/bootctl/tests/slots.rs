// SPDX-License-Identifier: Apache-2.0
//! The A/B update sequence on real sgdisk-made images, each step checked with real
//! `cgpt show -i N -P/-T/-S` and `sgdisk -v`, with GRUB simulated on the image.

mod common;

use common::*;
use piccolo_bootctl::{BootState, SlotId};

/// Checks one slot with cgpt and the reported state against each other.
fn check(img: &std::path::Path, st: &BootState, slot: SlotId, want: (u8, u8, bool)) {
    assert_eq!(cgpt(img, number(slot)), want, "cgpt for {slot}");
    let a = st.slot(slot).attrs;
    assert_eq!((a.priority, a.tries, a.successful), want, "reported for {slot}");
    sgdisk_ok(img);
}

fn write_payload(img: &std::path::Path, booted: SlotId, data: &[u8]) {
    let r = ctl(img, booted).write_inactive(&mut &data[..], data.len() as u64, &sha256(data)).unwrap();
    assert_eq!((r.slot, r.bytes, r.sha256), (booted.other(), data.len() as u64, sha256(data)));
}

#[test]
fn fresh_disk_state() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let st = ctl(&img, SlotId::A).boot_state().unwrap();
    assert_eq!((st.booted, st.next_boot, st.fallback), (SlotId::A, Some(SlotId::A), Some(SlotId::A)));
    assert_eq!(st.slot(SlotId::A).label, "USR-A");
    assert_eq!(st.slot(SlotId::B).partition_number, 4);
    assert_eq!(st.slot(SlotId::B).size_bytes, USR_BYTES);
    let f = piccolo_bootctl::gpt::open_ro(&img).unwrap();
    let t = piccolo_bootctl::gpt::read_table(&f, &img).unwrap();
    assert_eq!(st.slot(SlotId::B).partition_guid, t.entry(4).unwrap().guid);
    check(&img, &st, SlotId::A, (1, 0, true));
    check(&img, &st, SlotId::B, (0, 0, false));
}

#[test]
fn update_boot_new_mark_good() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let a = ctl(&img, SlotId::A);

    let st = a.prepare_inactive().unwrap();
    check(&img, &st, SlotId::B, (0, 0, false));
    assert_eq!(st.next_boot, Some(SlotId::A));

    let data = payload(3 << 20 | 777, 1);
    write_payload(&img, SlotId::A, &data);
    assert_eq!(bytes_at(&img, 43008 * 512, data.len() as u64), data, "payload landed in USR-B");
    assert_eq!(cgpt_attrs(&img, B), 0x200, "verified bit only; still P0 T0 S0");
    let st = a.boot_state().unwrap();
    assert!(st.slot(SlotId::B).attrs.verified);
    assert_eq!(st.next_boot, Some(SlotId::A), "not activated yet");

    let st = a.activate_inactive().unwrap();
    check(&img, &st, SlotId::B, (2, 1, false));
    check(&img, &st, SlotId::A, (1, 0, true));
    assert_eq!((st.next_boot, st.fallback), (Some(SlotId::B), Some(SlotId::A)));
    assert_eq!(cgpt_attrs(&img, B) & 0x200, 0, "verification consumed by activation");

    assert_eq!(grub_boot(&img), Some(SlotId::B));
    assert_eq!(cgpt(&img, B), (2, 0, false), "GRUB spent the try before booting");
    sgdisk_ok(&img);

    let b = ctl(&img, SlotId::B);
    let st = b.boot_state().unwrap();
    assert_eq!((st.booted, st.next_boot), (SlotId::B, Some(SlotId::A)), "unmarked: next boot falls back");
    let st = b.mark_boot_successful().unwrap();
    check(&img, &st, SlotId::B, (2, 0, true));
    assert_eq!((st.next_boot, st.fallback), (Some(SlotId::B), Some(SlotId::B)));
    for _ in 0..3 {
        assert_eq!(grub_boot(&img), Some(SlotId::B));
    }
    check(&img, &b.boot_state().unwrap(), SlotId::B, (2, 0, true));
}

#[test]
fn update_boot_new_no_mark_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let a = ctl(&img, SlotId::A);
    a.prepare_inactive().unwrap();
    write_payload(&img, SlotId::A, &payload(1 << 20, 2));
    let st = a.activate_inactive().unwrap();
    let fallback = st.fallback;
    assert_eq!(grub_boot(&img), Some(SlotId::B));
    // The new system never marks itself good: the next boot is the old slot.
    assert_eq!(grub_boot(&img), fallback);
    assert_eq!(fallback, Some(SlotId::A));
    let st = ctl(&img, SlotId::A).boot_state().unwrap();
    check(&img, &st, SlotId::B, (2, 0, false));
    check(&img, &st, SlotId::A, (1, 0, true));
    assert_eq!((st.next_boot, st.fallback), (Some(SlotId::A), Some(SlotId::A)));
    assert_eq!(grub_boot(&img), Some(SlotId::A), "stays on the old slot");

    // The failed slot can be prepared and updated again from the old one.
    let st = a.prepare_inactive().unwrap();
    check(&img, &st, SlotId::B, (0, 0, false));
    write_payload(&img, SlotId::A, &payload(1 << 20, 3));
    let st = a.activate_inactive().unwrap();
    assert_eq!(st.next_boot, Some(SlotId::B));
}

#[test]
fn rollback_and_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let a = ctl(&img, SlotId::A);
    a.prepare_inactive().unwrap();
    write_payload(&img, SlotId::A, &payload(4096, 4));
    a.activate_inactive().unwrap();

    // Cancel before rebooting: B back to unbootable, A keeps booting.
    let st = a.cancel_update().unwrap();
    check(&img, &st, SlotId::B, (0, 0, false));
    check(&img, &st, SlotId::A, (1, 0, true));
    assert_eq!(st.next_boot, Some(SlotId::A));
    assert!(matches!(a.activate_inactive(), Err(piccolo_bootctl::Error::NotVerified { slot: SlotId::B })));

    // Full update to B, then roll back to A.
    write_payload(&img, SlotId::A, &payload(4096, 5));
    a.activate_inactive().unwrap();
    assert_eq!(grub_boot(&img), Some(SlotId::B));
    let b = ctl(&img, SlotId::B);
    b.mark_boot_successful().unwrap();
    let st = b.rollback_to_other().unwrap();
    check(&img, &st, SlotId::A, (2, 0, true));
    check(&img, &st, SlotId::B, (1, 0, true));
    assert_eq!((st.next_boot, st.fallback), (Some(SlotId::A), Some(SlotId::A)));
    assert_eq!(grub_boot(&img), Some(SlotId::A));
    // And forward again: both are successful, so either way is allowed.
    let st = ctl(&img, SlotId::A).rollback_to_other().unwrap();
    assert_eq!(st.next_boot, Some(SlotId::B));
}

#[test]
fn equal_priorities_go_to_the_first_entry() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    cgpt_set(&img, A, 3, 0, true);
    cgpt_set(&img, B, 3, 0, true);
    let st = ctl(&img, SlotId::B).boot_state().unwrap();
    assert_eq!(st.next_boot, Some(SlotId::A));
    assert_eq!(grub_boot(&img), Some(SlotId::A));
    // Priority 0 never boots, even when successful.
    cgpt_set(&img, A, 0, 0, true);
    let st = ctl(&img, SlotId::B).boot_state().unwrap();
    assert_eq!(st.next_boot, Some(SlotId::B));
    assert_eq!(grub_boot(&img), Some(SlotId::B));
}

#[test]
fn rewriting_a_verified_slot_clears_verification_first() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let a = ctl(&img, SlotId::A);
    a.prepare_inactive().unwrap();
    write_payload(&img, SlotId::A, &payload(8192, 6));
    assert_eq!(cgpt_attrs(&img, B), 0x200);
    // A second write that fails midway must not leave the old verification standing.
    let data = payload(8192, 7);
    let r = a.write_inactive(&mut &data[..4096], 8192, &sha256(&data));
    assert!(matches!(r, Err(piccolo_bootctl::Error::PayloadShort { expected: 8192, received: 4096 })), "{r:?}");
    assert_eq!(cgpt_attrs(&img, B), 0);
    assert!(matches!(a.activate_inactive(), Err(piccolo_bootctl::Error::NotVerified { .. })));
    sgdisk_ok(&img);
}
