// SPDX-License-Identifier: Apache-2.0
//! Shared test fixtures: Flatcar-like disk images made with real `sgdisk`, checked with real
//! `cgpt` and `sgdisk -v`, and a loop-device guard.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Command;

use piccolo_bootctl::{BootControl, BootedSource, SlotId};
pub use piccolo_testkit::disks::{LoopDev, USR_TYPE as USR, cgpt_attrs, cgpt_set, cgpt_show, run, sgdisk_ok};

/// Partition numbers as on Flatcar: EFI 1, USR-A 3, USR-B 4, ROOT 9.
pub const A: u32 = 3;
pub const B: u32 = 4;
/// Size of each USR partition in the test image.
pub const USR_BYTES: u64 = 16 << 20;

/// Layout of a test OS image: total size, EFI and each USR partition, in MiB.
#[derive(Clone, Copy)]
pub struct Layout {
    pub total: u64,
    pub efi: u64,
    pub usr: u64,
}

/// The slot tests' image: 64 MiB, EFI 4, USR 16 + 16, ROOT the rest.
pub const FULL: Layout = Layout { total: 64, efi: 4, usr: 16 };
/// The installer's image: 24 MiB, EFI 2, USR 8 + 8, ROOT the rest (less to hash in debug builds).
pub const SMALL: Layout = Layout { total: 24, efi: 2, usr: 8 };

/// A fresh 64 MiB sparse OS image in `dir` ([`FULL`]): EFI-SYSTEM (1), USR-A (3, booted:
/// P1 T0 S1), USR-B (4, P0 T0 S0), ROOT (9), like Flatcar's numbering.
pub fn os_image(dir: &Path, name: &str) -> PathBuf {
    os_image_with(dir, name, FULL)
}

/// An OS image of the given layout, made by real `sgdisk` + `cgpt` into cargo's test scratch
/// directory once (sgdisk sleeps a second after every write) and copied sparsely.
pub fn os_image_with(dir: &Path, name: &str, l: Layout) -> PathBuf {
    let scratch = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let t = scratch.join(format!("bootctl-os-template-v2-{}-{}-{}.img", l.total, l.efi, l.usr));
    if !t.exists() {
        let work = tempfile::tempdir_in(scratch).unwrap();
        let made = make_os_image(work.path(), "t.img", l);
        sgdisk_ok(&made);
        std::fs::rename(&made, &t).unwrap(); // atomic: parallel tests may race here
    }
    let p = dir.join(name);
    run(Command::new("cp").arg("--sparse=always").arg(&t).arg(&p));
    p
}

/// Builds an OS image with sgdisk and cgpt (about a second).
pub fn make_os_image(dir: &Path, name: &str, l: Layout) -> PathBuf {
    piccolo_testkit::disks::os_image(dir, name, l.total, l.efi, l.usr)
}

/// (priority, tries, successful) as real `cgpt show -i N -P/-T/-S` reports them.
pub fn cgpt(img: &Path, n: u32) -> (u8, u8, bool) {
    cgpt_show(img, n)
}

/// Boot control of `img` as if the running system booted `booted`.
pub fn ctl(img: &Path, booted: SlotId) -> BootControl {
    BootControl::new(img, booted, BootedSource::Configured)
}

/// The partition number of a slot in the test image.
pub fn number(slot: SlotId) -> u32 {
    match slot {
        SlotId::A => A,
        SlotId::B => B,
    }
}

/// The slot of a partition number.
pub fn slot_of(n: u32) -> SlotId {
    match n {
        A => SlotId::A,
        B => SlotId::B,
        other => panic!("partition {other} is not a slot"),
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Deterministic pseudo-random payload bytes.
pub fn payload(len: usize, seed: u8) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// Boots the image with the simulator (GRUB), returning the slot booted.
pub fn grub_boot(img: &Path) -> Option<SlotId> {
    piccolo_bootctl::simulator::boot_image(img).unwrap().map(|e| slot_of(e.number))
}

/// Boots repeatedly without ever marking success until the selection changes or 16 boots
/// pass; returns (first boot, the slot booted once the first one stopped being chosen or
/// the first one if it never stopped). Works on a copy; the image is not changed.
pub fn grub_boot_until_fallback(img: &Path, scratch: &Path) -> (Option<SlotId>, Option<SlotId>) {
    run(Command::new("cp").arg("--sparse=always").arg(img).arg(scratch));
    let first = grub_boot(scratch);
    let mut last = first;
    for _ in 0..16 {
        last = grub_boot(scratch);
        if last != first {
            break;
        }
    }
    (first, last)
}

/// Bytes of `path` in `[off, off + len)`.
pub fn bytes_at(path: &Path, off: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; usize::try_from(len).unwrap()];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Asserts `before` and `after` differ only inside `allowed` (offset, length) ranges.
pub fn assert_changed_only_in(before: &[u8], after: &[u8], allowed: &[(u64, u64)]) {
    assert_eq!(before.len(), after.len());
    let mut ranges: Vec<(usize, usize)> =
        allowed.iter().map(|(o, n)| (usize::try_from(*o).unwrap(), usize::try_from(o + n).unwrap())).collect();
    ranges.sort();
    let mut pos = 0;
    for (start, end) in ranges.into_iter().chain([(before.len(), before.len())]) {
        let start = start.min(before.len());
        if pos < start && before[pos..start] != after[pos..start] {
            let i = (pos..start).find(|i| before[*i] != after[*i]).unwrap();
            panic!("byte {i} changed outside the allowed ranges");
        }
        pos = pos.max(end);
    }
}
