// SPDX-License-Identifier: Apache-2.0
//! Power loss during the update sequence: after every step, and inside every table write
//! (each prefix of primary array → primary header → backup array → backup header), and in
//! the middle of the payload write, GRUB still boots a slot, and the `next_boot`/`fallback`
//! that `boot_state` reports are what the simulated GRUB actually boots.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use piccolo_bootctl::{SlotAttrs, SlotId, gpt};

/// The image as it would be found after power loss now.
fn snapshot(img: &Path, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    run(std::process::Command::new("cp").arg("--sparse=always").arg(img).arg(&p));
    p
}

fn slot_attrs(img: &Path) -> [SlotAttrs; 2] {
    let f = gpt::open_ro(img).unwrap();
    let t = gpt::read_table(&f, img).unwrap();
    [A, B].map(|n| SlotAttrs::from_word(t.entry(n).unwrap().attributes))
}

/// The invariant on a power-loss image: some slot boots, and what boot_state reports is
/// what GRUB does (boot until the first choice stops being chosen).
fn check_bootable(img: &Path, booted: SlotId, scratch: &Path, what: &str) {
    let st = ctl(img, booted).boot_state().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(st.next_boot.is_some(), "{what}: no slot would boot");
    let (first, fallback) = grub_boot_until_fallback(img, scratch);
    assert_eq!(first, st.next_boot, "{what}: next boot");
    assert_eq!(fallback, st.fallback, "{what}: fallback");
}

/// Every crash state inside the table write that turned `before` into `after`.
fn check_torn_writes(before: &Path, after: &Path, booted: SlotId, dir: &Path, step: &str) {
    let f = gpt::open_ro(after).unwrap();
    let t = gpt::read_table(&f, after).unwrap();
    let [p_hdr, p_arr, b_hdr, b_arr] = <[(u64, u64); 4]>::try_from(t.table_ranges()).unwrap();
    let (old, new) = (slot_attrs(before), slot_attrs(after));
    for k in 1..4 {
        let torn = snapshot(before, dir, &format!("torn-{step}-{k}.img"));
        let w = std::fs::OpenOptions::new().write(true).open(&torn).unwrap();
        for (o, n) in &[p_arr, p_hdr, b_arr, b_hdr][..k] {
            w.write_all_at(&bytes_at(after, *o, *n), *o).unwrap();
        }
        let got = slot_attrs(&torn);
        assert!(got == old || got == new, "{step}: crash after {k} writes reads a mixed table");
        check_bootable(&torn, booted, &dir.join("scratch.img"), &format!("{step}, crash after {k} writes"));
    }
}

/// One step of the sequence: given the booted slot, returns the new booted slot after a boot.
type Step<'a> = Box<dyn Fn(SlotId) -> Option<SlotId> + 'a>;

fn run_sequence(mark_good: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img_buf = os_image(d, "os.img");
    let img = img_buf.as_path();
    let scratch = d.join("scratch.img");
    let data = payload(2 << 20, 9);
    let mut booted = SlotId::A;
    let mut prev = snapshot(img, d, "step0.img");
    check_bootable(&prev, booted, &scratch, "initial");

    let steps: Vec<(&str, Step)> = vec![
        (
            "prepare",
            Box::new(|b| {
                ctl(img, b).prepare_inactive().unwrap();
                None
            }),
        ),
        (
            "write",
            Box::new(|b| {
                ctl(img, b).write_inactive(&mut &data[..], data.len() as u64, &sha256(&data)).unwrap();
                None
            }),
        ),
        (
            "activate",
            Box::new(|b| {
                ctl(img, b).activate_inactive().unwrap();
                None
            }),
        ),
        ("boot", Box::new(|_| Some(grub_boot(img).unwrap()))),
        (
            if mark_good { "mark" } else { "boot-again" },
            Box::new(move |b| {
                if mark_good {
                    ctl(img, b).mark_boot_successful().unwrap();
                    None
                } else {
                    Some(grub_boot(img).unwrap())
                }
            }),
        ),
    ];
    for (i, (name, step)) in steps.iter().enumerate() {
        if *name == "write" {
            // Power lost halfway through the payload: the slot is still prepared.
            let half = snapshot(&prev, d, "half.img");
            let w = std::fs::OpenOptions::new().write(true).open(&half).unwrap();
            w.write_all_at(&data[..1 << 20], 43008 * 512).unwrap();
            check_bootable(&half, booted, &scratch, "half-written payload");
            assert_eq!(slot_attrs(&half)[1], SlotAttrs::default());
        }
        if let Some(b) = step(booted) {
            booted = b;
        }
        let snap = snapshot(img, d, &format!("step{}.img", i + 1));
        sgdisk_ok(&snap);
        check_bootable(&snap, booted, &scratch, &format!("after {name}"));
        if slot_attrs(&prev) != slot_attrs(&snap) {
            check_torn_writes(&prev, &snap, booted, d, name);
        }
        prev = snap;
    }
    let st = ctl(img, booted).boot_state().unwrap();
    if mark_good {
        assert_eq!((booted, st.next_boot, st.fallback), (SlotId::B, Some(SlotId::B), Some(SlotId::B)));
    } else {
        assert_eq!((booted, st.next_boot), (SlotId::A, Some(SlotId::A)), "fell back to the old slot");
    }
}

#[test]
fn power_loss_after_every_step_with_mark_good() {
    run_sequence(true);
}

#[test]
fn power_loss_after_every_step_without_mark_good() {
    run_sequence(false);
}
