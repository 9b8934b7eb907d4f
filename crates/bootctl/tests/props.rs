// SPDX-License-Identifier: Apache-2.0
//! Random sequences of boot-control operations and simulated GRUB boots on a real image:
//! after every operation, successful or refused, GRUB boots some slot, `boot_state`'s
//! next boot and fallback are what the simulator boots, `sgdisk -v` is clean, and a refused
//! operation changed no slot field (at most it withdrew the inactive slot's verification).

mod common;

use std::path::Path;

use common::*;
use piccolo_bootctl::{Error, SlotAttrs, SlotId, gpt};
use proptest::prelude::*;

#[derive(Debug, Clone, Copy)]
enum Op {
    Prepare,
    WriteGood,
    WriteBadDigest,
    WriteShort,
    WriteLong,
    WriteTooLarge,
    Activate,
    Cancel,
    Rollback,
    Mark,
    Boot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Prepare),
        4 => Just(Op::WriteGood),
        1 => Just(Op::WriteBadDigest),
        1 => Just(Op::WriteShort),
        1 => Just(Op::WriteLong),
        1 => Just(Op::WriteTooLarge),
        3 => Just(Op::Activate),
        1 => Just(Op::Cancel),
        2 => Just(Op::Rollback),
        3 => Just(Op::Mark),
        4 => Just(Op::Boot),
    ]
}

fn slot_attrs(img: &Path) -> [SlotAttrs; 2] {
    let f = gpt::open_ro(img).unwrap();
    let t = gpt::read_table(&f, img).unwrap();
    [A, B].map(|n| SlotAttrs::from_word(t.entry(n).unwrap().attributes))
}

/// Runs one operation; `Ok(Some(slot))` when it was a boot.
fn apply(img: &Path, booted: SlotId, op: Op) -> Result<Option<SlotId>, Error> {
    let c = ctl(img, booted);
    let data = payload(4096, 1);
    let digest = sha256(&data);
    match op {
        Op::Prepare => c.prepare_inactive().map(|_| None),
        Op::WriteGood => c.write_inactive(&mut &data[..], 4096, &digest).map(|_| None),
        Op::WriteBadDigest => c.write_inactive(&mut &data[..], 4096, &sha256(b"other")).map(|_| None),
        Op::WriteShort => c.write_inactive(&mut &data[..2048], 4096, &digest).map(|_| None),
        Op::WriteLong => c.write_inactive(&mut &data[..], 2048, &digest).map(|_| None),
        Op::WriteTooLarge => c.write_inactive(&mut &data[..], USR_BYTES + 1, &digest).map(|_| None),
        Op::Activate => c.activate_inactive().map(|_| None),
        Op::Cancel => c.cancel_update().map(|_| None),
        Op::Rollback => c.rollback_to_other().map(|_| None),
        Op::Mark => c.mark_boot_successful().map(|_| None),
        Op::Boot => Ok(Some(grub_boot(img).expect("GRUB found no bootable slot"))),
    }
}

fn check_sequence(ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let scratch = dir.path().join("scratch.img");
    let mut booted = SlotId::A;
    for (i, op) in ops.iter().enumerate() {
        let before = slot_attrs(&img);
        let what = format!("op {i} {op:?} (booted {booted})");
        match apply(&img, booted, *op) {
            Ok(Some(b)) => booted = b,
            Ok(None) => {
                if let Op::Activate = op {
                    let st = ctl(&img, booted).boot_state().unwrap();
                    assert_eq!((st.next_boot, st.fallback), (Some(booted.other()), Some(booted)), "{what}");
                }
                if let Op::Mark = op {
                    assert!(slot_attrs(&img)[booted as usize].successful, "{what}");
                }
            }
            Err(e) => {
                let mut after = slot_attrs(&img);
                let inactive = booted.other() as usize;
                if before[inactive].verified && !after[inactive].verified {
                    after[inactive].verified = true; // a refused write may withdraw verification
                }
                assert_eq!(before, after, "{what} failed ({e}) but changed the table");
            }
        }
        sgdisk_ok(&img);
        let st = ctl(&img, booted).boot_state().unwrap();
        assert!(st.next_boot.is_some(), "{what}: nothing would boot");
        let (first, fallback) = grub_boot_until_fallback(&img, &scratch);
        assert_eq!((first, fallback), (st.next_boot, st.fallback), "{what}: reported vs simulated");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_operation_sequences_keep_a_bootable_slot(ops in proptest::collection::vec(op(), 1..16)) {
        check_sequence(&ops);
    }
}
