// SPDX-License-Identifier: Apache-2.0
//! Bad input to the slot operations: a clear error, and the partition table (and, unless the
//! payload itself was being written, the whole disk) is byte-for-byte unchanged.

mod common;

use std::path::Path;

use common::*;
use piccolo_bootctl::{BootControl, BootedSource, Error, SlotId, gpt};

fn image_bytes(img: &Path) -> Vec<u8> {
    std::fs::read(img).unwrap()
}

/// Runs `f` and asserts the whole image is unchanged.
fn unchanged<T>(img: &Path, f: impl FnOnce() -> T) -> T {
    let before = image_bytes(img);
    let r = f();
    assert!(before == image_bytes(img), "image changed");
    r
}

/// The byte range of partition `n`.
fn partition_range(img: &Path, n: u32) -> (u64, u64) {
    let f = gpt::open_ro(img).unwrap();
    let e = gpt::read_table(&f, img).unwrap().entry(n).unwrap();
    (e.first_lba * 512, (e.last_lba + 1 - e.first_lba) * 512)
}

#[test]
fn wrong_device() {
    let dir = tempfile::tempdir().unwrap();
    // Not there at all.
    let missing = BootControl::new(dir.path().join("nope"), SlotId::A, BootedSource::Configured);
    assert!(matches!(missing.boot_state(), Err(Error::OpenDisk { .. })));
    assert!(matches!(missing.prepare_inactive(), Err(Error::OpenDisk { .. })));
    // No partition table.
    let blank = dir.path().join("blank.img");
    std::fs::File::create(&blank).unwrap().set_len(32 << 20).unwrap();
    let e = unchanged(&blank, || ctl(&blank, SlotId::A).prepare_inactive().unwrap_err());
    assert!(matches!(e, Error::NoValidTable { .. }), "{e}");
    assert!(e.to_string().contains("has no valid GPT"), "{e}");
    // A GPT, but not an A/B OS disk.
    let plain = dir.path().join("plain.img");
    std::fs::File::create(&plain).unwrap().set_len(32 << 20).unwrap();
    run(std::process::Command::new("sgdisk").args(["-o", "-n", "1:0:+8M", "-c", "1:USR-A"]).arg(&plain));
    for op in [BootControl::prepare_inactive, BootControl::activate_inactive, BootControl::mark_boot_successful] {
        let e = unchanged(&plain, || op(&ctl(&plain, SlotId::A)).unwrap_err());
        assert!(matches!(&e, Error::FindSlots { reason, .. } if reason.contains("0 partitions")), "{e}");
    }
    // A third usr-type partition: GRUB could boot something that is not a slot.
    let img = os_image(dir.path(), "three.img");
    run(std::process::Command::new("sgdisk").args(["-n", "5:0:+512K", "-t", &format!("5:{USR}")]).arg(&img));
    let e = unchanged(&img, || ctl(&img, SlotId::A).prepare_inactive().unwrap_err());
    assert!(matches!(&e, Error::FindSlots { reason, .. } if reason.contains("3 partitions")), "{e}");
    // A directory.
    let e = ctl(dir.path(), SlotId::A).boot_state().unwrap_err();
    assert!(matches!(e, Error::ReadTable { .. } | Error::NoValidTable { .. } | Error::OpenDisk { .. }), "{e}");
}

#[test]
fn payload_larger_than_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let data = payload(1024, 1);
    let e = unchanged(&img, || {
        ctl(&img, SlotId::A).write_inactive(&mut &data[..], USR_BYTES + 512, &sha256(&data)).unwrap_err()
    });
    assert!(
        matches!(e, Error::PayloadTooLarge { slot: SlotId::B, len, capacity } if len == USR_BYTES + 512 && capacity == USR_BYTES),
        "{e}"
    );
    let e = unchanged(&img, || ctl(&img, SlotId::A).write_inactive(&mut &data[..], 0, &sha256(b"")).unwrap_err());
    assert!(matches!(e, Error::PayloadEmpty), "{e}");
}

/// Stream errors found only while writing: the table is unchanged, nothing outside the
/// inactive partition changed, and the slot is still unbootable and unverified.
#[test]
fn digest_mismatch_and_wrong_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let data = payload(1 << 20, 2);
    type Case<'a> = Box<dyn Fn() -> Result<piccolo_bootctl::WriteReport, Error> + 'a>;
    let cases: Vec<(&str, Case)> = vec![
        ("digest", Box::new(|| ctl(&img, SlotId::A).write_inactive(&mut &data[..], 1 << 20, &sha256(b"x")))),
        ("short", Box::new(|| ctl(&img, SlotId::A).write_inactive(&mut &data[..1000], 1 << 20, &sha256(&data)))),
        ("long", Box::new(|| ctl(&img, SlotId::A).write_inactive(&mut &data[..], 1000, &sha256(&data[..1000])))),
    ];
    let slot_b = partition_range(&img, B);
    for (name, f) in cases {
        let before = image_bytes(&img);
        let e = f().unwrap_err();
        match name {
            "digest" => {
                assert!(
                    matches!(&e, Error::DigestMismatch { expected, actual }
                    if *expected == hex(&sha256(b"x")) && *actual == hex(&sha256(&data))),
                    "{e}"
                );
            }
            "short" => assert!(matches!(e, Error::PayloadShort { expected: 1048576, received: 1000 }), "{e}"),
            _ => assert!(matches!(e, Error::PayloadTooLong { expected: 1000 }), "{e}"),
        }
        assert_eq!(e.grpc_code(), piccolo_bootctl::Code::DataLoss);
        assert_changed_only_in(&before, &image_bytes(&img), &[slot_b]);
        assert_eq!(cgpt(&img, B), (0, 0, false), "{name}");
        assert_eq!(cgpt_attrs(&img, B), 0, "{name}: not verified");
        assert!(matches!(ctl(&img, SlotId::A).activate_inactive(), Err(Error::NotVerified { slot: SlotId::B })));
        assert_eq!(grub_boot_until_fallback(&img, &dir.path().join("s.img")), (Some(SlotId::A), Some(SlotId::A)));
        sgdisk_ok(&img);
    }
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn activation_without_a_verified_payload() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let e = unchanged(&img, || ctl(&img, SlotId::A).activate_inactive().unwrap_err());
    assert!(matches!(e, Error::NotVerified { slot: SlotId::B }), "{e}");
    assert!(e.to_string().contains("no verified payload"));
    // The verified bit set by hand on a slot that is not prepared does not count either.
    cgpt_set(&img, B, 1, 1, false);
    let e = unchanged(&img, || ctl(&img, SlotId::A).activate_inactive().unwrap_err());
    assert!(matches!(e, Error::NotPrepared { slot: SlotId::B }), "{e}");
}

#[test]
fn refused_state_transitions_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let data = payload(4096, 3);
    // Writing over the fallback slot (B good and bootable) without preparing it first.
    cgpt_set(&img, B, 1, 0, true);
    let e = unchanged(&img, || ctl(&img, SlotId::A).write_inactive(&mut &data[..], 4096, &sha256(&data)).unwrap_err());
    assert!(matches!(e, Error::NotPrepared { slot: SlotId::B }), "{e}");
    // Rollback to a slot that would not boot.
    cgpt_set(&img, B, 2, 0, false);
    let e = unchanged(&img, || ctl(&img, SlotId::A).rollback_to_other().unwrap_err());
    assert!(matches!(e, Error::WouldNotBoot { slot: SlotId::B }), "{e}");
    // Booted B on trial (GRUB spent its try, not marked): preparing A would leave nothing.
    cgpt_set(&img, B, 2, 0, false);
    let e = unchanged(&img, || ctl(&img, SlotId::B).prepare_inactive().unwrap_err());
    assert!(matches!(e, Error::NoBootableSlot { operation: "PrepareInactiveSlot" }), "{e}");
    let e = unchanged(&img, || ctl(&img, SlotId::B).cancel_update().unwrap_err());
    assert!(matches!(e, Error::NoBootableSlot { .. }), "{e}");
    // Activating on top of an unmarked booted slot.
    let img2 = os_image(dir.path(), "os2.img");
    ctl(&img2, SlotId::A).write_inactive(&mut &data[..], 4096, &sha256(&data)).unwrap();
    cgpt_set(&img2, A, 1, 1, false);
    let e = unchanged(&img2, || ctl(&img2, SlotId::A).activate_inactive().unwrap_err());
    assert!(matches!(e, Error::BootedNotSuccessful { slot: SlotId::A }), "{e}");
}

#[test]
fn a_concurrent_operation_is_refused_not_interleaved() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let held = nix::fcntl::Flock::lock(std::fs::File::open(&img).unwrap(), nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let e = unchanged(&img, || ctl(&img, SlotId::A).prepare_inactive().unwrap_err());
    assert!(matches!(e, Error::DiskBusy { .. }), "{e}");
    assert_eq!(e.grpc_code(), piccolo_bootctl::Code::Aborted);
    // Reading the state needs no lock.
    assert_eq!(ctl(&img, SlotId::A).boot_state().unwrap().next_boot, Some(SlotId::A));
    drop(held);
    ctl(&img, SlotId::A).prepare_inactive().unwrap();
}
