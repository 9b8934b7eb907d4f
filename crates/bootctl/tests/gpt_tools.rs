// SPDX-License-Identifier: Apache-2.0
//! The GPT reader/writer against real `sgdisk` and `cgpt`: reading what sgdisk made, writes
//! that cgpt reads back and `sgdisk -v` accepts, repair from either copy, torn writes.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use piccolo_bootctl::gpt::{self, Copy};
use piccolo_bootctl::{Error, FLATCAR_USR_TYPE, SlotAttrs};

#[test]
fn reads_what_sgdisk_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let f = gpt::open_ro(&img).unwrap();
    let t = gpt::read_table(&f, &img).unwrap();
    assert_eq!((t.sector_size, t.source, t.copies_agree), (512, Copy::Primary, true));
    assert_eq!(t.disk_bytes, 64 << 20);
    let e = t.entries();
    let summary: Vec<_> = e.iter().map(|e| (e.number, e.name.as_str(), e.first_lba)).collect();
    assert_eq!(summary, vec![(1, "EFI-SYSTEM", 2048), (3, "USR-A", 10240), (4, "USR-B", 43008), (9, "ROOT", 75776)]);
    assert_eq!(e[1].type_guid, FLATCAR_USR_TYPE);
    assert_eq!(e[1].last_lba - e[1].first_lba + 1, USR_BYTES / 512);
    // The unique GUIDs are the ones sgdisk reports.
    let info = run(std::process::Command::new("sgdisk").args(["-i", "3"]).arg(&img));
    let want = e[1].guid.to_string().to_uppercase();
    assert!(info.contains(&format!("Partition unique GUID: {want}")), "{info}");
    assert_eq!(
        SlotAttrs::from_word(e[1].attributes),
        SlotAttrs { priority: 1, tries: 0, successful: true, verified: false }
    );
}

#[test]
fn attribute_writes_are_seen_by_cgpt_and_pass_sgdisk_verify() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    let before = std::fs::read(&img).unwrap();
    let f = gpt::open_rw(&img).unwrap();
    let mut t = gpt::read_table(&f, &img).unwrap();
    let other_bits = (1u64 << 60) | 1; // read-only and the UEFI "required" bit survive
    for (n, p, tr, s) in [(3u32, 5u8, 0u8, true), (4, 15, 15, false)] {
        let w = SlotAttrs { priority: p, tries: tr, successful: s, verified: false }.to_word(other_bits);
        t.set_attributes(n, w).unwrap();
    }
    t.write_table(&f, &img).unwrap();
    assert_eq!(cgpt(&img, 3), (5, 0, true));
    assert_eq!(cgpt(&img, 4), (15, 15, false));
    assert_eq!(cgpt_attrs(&img, 4), 0x10ff, "cgpt -A is attrs >> 48 (bit 60 → 0x1000)");
    sgdisk_ok(&img);
    // Only the two copies' headers and arrays changed.
    let after = std::fs::read(&img).unwrap();
    assert_changed_only_in(&before, &after, &t.table_ranges());
    assert_ne!(before, after);
    // Unused entries cannot be written.
    assert!(matches!(t.set_attributes(2, 0), Err(Error::NoSuchPartition { number: 2 })));
    assert!(matches!(t.set_attributes(200, 0), Err(Error::NoSuchPartition { number: 200 })));
}

fn flip(img: &std::path::Path, off: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, off).unwrap();
}

#[test]
fn damaged_primary_is_read_from_backup_and_repaired_on_write() {
    let dir = tempfile::tempdir().unwrap();
    for (name, off) in [("header.img", 512 + 40), ("entries.img", 1024 + 128 * 2 + 60)] {
        let img = os_image(dir.path(), name);
        flip(&img, off);
        let f = gpt::open_rw(&img).unwrap();
        let mut t = gpt::read_table(&f, &img).unwrap();
        assert_eq!((t.source, t.copies_agree), (Copy::Backup, false), "{name}");
        assert_eq!(t.entries().len(), 4);
        let w = SlotAttrs { priority: 2, tries: 1, successful: false, verified: false }.to_word(0);
        t.set_attributes(4, w).unwrap();
        t.write_table(&f, &img).unwrap();
        sgdisk_ok(&img);
        let t = gpt::read_table(&f, &img).unwrap();
        assert_eq!((t.source, t.copies_agree), (Copy::Primary, true), "{name} repaired");
        assert_eq!(cgpt(&img, 4), (2, 1, false));
    }
}

#[test]
fn damaged_backup_is_repaired_from_primary() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    flip(&img, (64 << 20) - 512 + 40);
    let f = gpt::open_rw(&img).unwrap();
    let t = gpt::read_table(&f, &img).unwrap();
    assert_eq!((t.source, t.copies_agree), (Copy::Primary, false));
    t.write_table(&f, &img).unwrap();
    sgdisk_ok(&img);
}

#[test]
fn no_valid_copy_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let img = os_image(dir.path(), "os.img");
    flip(&img, 512 + 40);
    flip(&img, (64 << 20) - 512 + 40);
    let f = gpt::open_ro(&img).unwrap();
    assert!(matches!(gpt::read_table(&f, &img), Err(Error::NoValidTable { .. })));
    let zeros = dir.path().join("zeros.img");
    std::fs::File::create(&zeros).unwrap().set_len(8 << 20).unwrap();
    let f = gpt::open_ro(&zeros).unwrap();
    assert!(matches!(gpt::read_table(&f, &zeros), Err(Error::NoValidTable { .. })));
    let tiny = dir.path().join("tiny.img");
    std::fs::write(&tiny, b"EFI PART").unwrap();
    let f = gpt::open_ro(&tiny).unwrap();
    assert!(matches!(gpt::read_table(&f, &tiny), Err(Error::NoValidTable { .. })));
}

/// Every state a crash can leave during one `write_table` (primary array, primary header,
/// fsync, backup array, backup header) reads as the old table or the new one, never a mix.
#[test]
fn torn_writes_read_as_old_or_new() {
    let dir = tempfile::tempdir().unwrap();
    let old_img = os_image(dir.path(), "old.img");
    let new_img = dir.path().join("new.img");
    std::fs::copy(&old_img, &new_img).unwrap();
    let f = gpt::open_rw(&new_img).unwrap();
    let mut t = gpt::read_table(&f, &new_img).unwrap();
    t.set_attributes(4, SlotAttrs { priority: 2, tries: 1, successful: false, verified: false }.to_word(0)).unwrap();
    t.set_attributes(3, SlotAttrs { priority: 1, tries: 0, successful: true, verified: false }.to_word(0)).unwrap();
    t.write_table(&f, &new_img).unwrap();
    let [p_hdr, p_arr, b_hdr, b_arr] = <[(u64, u64); 4]>::try_from(t.table_ranges()).unwrap();
    // Writes in order; a crash after k of them.
    let order = [p_arr, p_hdr, b_arr, b_hdr];
    for k in 0..=order.len() {
        let p = dir.path().join(format!("torn{k}.img"));
        std::fs::copy(&old_img, &p).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        for (o, n) in &order[..k] {
            w.write_all_at(&bytes_at(&new_img, *o, *n), *o).unwrap();
        }
        let f = gpt::open_ro(&p).unwrap();
        let got = gpt::read_table(&f, &p).unwrap();
        let b = SlotAttrs::from_word(got.entry(4).unwrap().attributes);
        let expect_new = k >= 2; // the primary header carries the new array's CRC
        assert_eq!(b.tries, u8::from(expect_new), "crash after {k} writes");
        assert_eq!(cgpt(&p, 4).1, u8::from(expect_new), "cgpt agrees after {k} writes");
    }
}
