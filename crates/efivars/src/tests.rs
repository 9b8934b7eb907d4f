// SPDX-License-Identifier: Apache-2.0
//! The write algorithm on a real ext4 filesystem (loop-mounted image, real `chattr` and
//! `lsattr`), plus root detection. Runs as root (mount, CAP_LINUX_IMMUTABLE).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use piccolo_testkit::ext4::{Ext4, chattr, immutable};

use crate::fs::Hooks;
use crate::{Attributes, Code, Efivars, Error, GLOBAL_GUID, RootKind, SYSTEMD_BOOT_GUID, VarId, Variable, codec};

fn boot_next() -> VarId {
    VarId::parse("BootNext", GLOBAL_GUID).unwrap()
}

fn file(fs: &Ext4, id: &VarId) -> PathBuf {
    fs.mnt.join(id.file_name())
}

fn bytes(attrs: u32, data: &[u8]) -> Vec<u8> {
    let mut v = attrs.to_le_bytes().to_vec();
    v.extend_from_slice(data);
    v
}

/// Files under the root other than the filler.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "lost+found" && n != "filler")
        .collect();
    v.sort();
    v
}

#[test]
fn root_kinds() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let e = Efivars::open(&missing).unwrap_err();
    assert!(matches!(e, Error::NoEfi { .. }) && e.grpc_code() == Code::FailedPrecondition, "{e}");
    assert!(e.to_string().starts_with("no EFI: "), "{e}");
    std::fs::write(tmp.path().join("f"), b"").unwrap();
    assert!(matches!(Efivars::open(&tmp.path().join("f")), Err(Error::NoEfi { .. })));
    // A sysfs directory is what /sys/firmware/efi/efivars is without efivarfs on it.
    let e = Efivars::open(Path::new("/sys/kernel")).unwrap_err();
    assert!(matches!(e, Error::NoEfi { .. }) && e.to_string().contains("not mounted"), "{e}");
    assert_eq!(Efivars::open(tmp.path()).unwrap().kind(), RootKind::PlainDirectory);
}

#[test]
fn new_variable_is_attrs_then_data() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    ev.set(&id, Attributes::BOOT_VARIABLE, &codec::encode_u16(3)).unwrap();
    assert_eq!(std::fs::read(file(&fs, &id)).unwrap(), [7, 0, 0, 0, 3, 0]);
    assert!(!immutable(&file(&fs, &id)), "a new file on ext4 gets no flag");
    let v = ev.get(&id).unwrap();
    assert_eq!((v.attributes, codec::decode_u16(&v.data).unwrap()), (Attributes(7), 3));

    let one_shot = VarId::parse("LoaderEntryOneShot", SYSTEMD_BOOT_GUID).unwrap();
    ev.set(&one_shot, Attributes::BOOT_VARIABLE, &codec::encode_utf16("piccolo-b.conf").unwrap()).unwrap();
    assert_eq!(codec::decode_utf16(&ev.get(&one_shot).unwrap().data).unwrap(), "piccolo-b.conf");
    assert_eq!(listing(&fs.mnt), [id.file_name(), one_shot.file_name()]);
}

#[test]
fn immutable_variable_is_written_and_flag_restored() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = VarId::parse("BootOrder", GLOBAL_GUID).unwrap();
    let p = file(&fs, &id);
    std::fs::write(&p, bytes(7, &codec::encode_u16_list(&[1, 2, 3, 4]))).unwrap();
    chattr(&p, "+i");
    assert!(std::fs::write(&p, b"x").is_err(), "immutable: a plain write is refused");
    let ino = std::fs::metadata(&p).unwrap().ino();

    ev.set(&id, Attributes::BOOT_VARIABLE, &codec::encode_u16_list(&[2, 1])).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), bytes(7, &[2, 0, 1, 0]), "replaced whole (old tail cut)");
    assert!(immutable(&p), "flag restored");
    assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino, "written in place");
    assert_eq!(codec::decode_u16_list(&ev.get(&id).unwrap().data).unwrap(), [2, 1]);

    // A mutable file stays mutable.
    chattr(&p, "-i");
    ev.set(&id, Attributes::BOOT_VARIABLE, &codec::encode_u16_list(&[9])).unwrap();
    assert!(!immutable(&p));
    assert_eq!(std::fs::read(&p).unwrap(), bytes(7, &[9, 0]));
}

#[test]
fn delete_clears_immutable_and_unlinks() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    std::fs::write(&p, bytes(7, &[1, 0])).unwrap();
    chattr(&p, "+i");
    assert!(std::fs::remove_file(&p).is_err(), "immutable: unlink is refused");
    ev.delete(&id).unwrap();
    assert!(!p.exists());
    let e = ev.delete(&id).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }) && e.grpc_code() == Code::NotFound, "{e}");
    assert!(matches!(ev.get(&id), Err(Error::NotFound { .. })));
}

#[test]
fn failed_write_of_new_variable_leaves_no_file() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    fs.fill();
    let id = VarId::parse("LoaderEntryDefault", SYSTEMD_BOOT_GUID).unwrap();
    let e = ev.set(&id, Attributes::BOOT_VARIABLE, &[0x55; 8192]).unwrap_err();
    assert!(matches!(&e, Error::Write { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)), "{e:?}");
    assert_eq!(e.grpc_code(), Code::ResourceExhausted);
    assert!(!file(&fs, &id).exists(), "the file this call created was removed");
    assert_eq!(listing(&fs.mnt), Vec::<String>::new());

    // Same, when the kernel marks the new file immutable on create (as efivarfs does for
    // variables not on its removable list): the flag is cleared so the unlink works.
    let p = file(&fs, &id);
    let mut as_kernel = || chattr(&p, "+i");
    let e = ev
        .set_with(
            &id,
            Attributes::BOOT_VARIABLE,
            &[0x55; 8192],
            &mut Hooks { between_opens: &mut || (), after_create: &mut as_kernel },
        )
        .unwrap_err();
    assert!(matches!(&e, Error::Write { .. }), "{e:?}");
    assert!(!p.exists(), "immutable new file removed after the failed write");
}

#[test]
fn failed_write_of_existing_variable_keeps_it_and_its_flag() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    std::fs::write(&p, bytes(7, &[1, 0])).unwrap();
    chattr(&p, "+i");
    fs.fill();
    let e = ev.set(&id, Attributes::BOOT_VARIABLE, &[0x55; 16384]).unwrap_err();
    assert!(matches!(&e, Error::Write { .. } | Error::ShortWrite { .. }), "{e:?}");
    assert!(immutable(&p), "flag restored after the failure");
    assert_eq!(&std::fs::read(&p).unwrap()[..4], &[7, 0, 0, 0], "existing file not removed");
}

#[test]
fn new_file_made_immutable_on_create_keeps_the_flag() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    let mut as_kernel = || chattr(&p, "+i");
    ev.set_with(
        &id,
        Attributes::BOOT_VARIABLE,
        &[5, 0],
        &mut Hooks { between_opens: &mut || (), after_create: &mut as_kernel },
    )
    .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), bytes(7, &[5, 0]));
    assert!(immutable(&p), "the flags the kernel set are restored");
}

#[test]
fn replaced_file_is_not_written() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    std::fs::write(&p, bytes(7, &[1, 0])).unwrap();
    // A second name for the original inode, to look at it after it is replaced.
    let original = fs.mnt.join("original");
    std::fs::hard_link(&p, &original).unwrap();
    chattr(&p, "+i");
    let other = fs.mnt.join("other");
    std::fs::write(&other, bytes(7, &[2, 0])).unwrap();

    let mut replace = || std::fs::rename(&other, &p).unwrap();
    let e = ev
        .set_with(
            &id,
            Attributes::BOOT_VARIABLE,
            &[9, 0],
            &mut Hooks { between_opens: &mut replace, after_create: &mut || () },
        )
        .unwrap_err();
    assert!(matches!(e, Error::Replaced { .. }) && e.grpc_code() == Code::Aborted, "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), bytes(7, &[2, 0]), "the replacement is untouched");
    assert_eq!(std::fs::read(&original).unwrap(), bytes(7, &[1, 0]), "the original is untouched");
    assert!(immutable(&original), "the original's flag is restored");
    chattr(&original, "-i");
}

#[test]
fn created_meanwhile_is_not_written() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    let mut create = || std::fs::write(&p, bytes(7, &[2, 0])).unwrap();
    let e = ev
        .set_with(
            &id,
            Attributes::BOOT_VARIABLE,
            &[9, 0],
            &mut Hooks { between_opens: &mut create, after_create: &mut || () },
        )
        .unwrap_err();
    assert!(matches!(&e, Error::OpenWrite { source, .. } if source.raw_os_error() == Some(libc::EEXIST)), "{e:?}");
    assert_eq!(e.grpc_code(), Code::Aborted);
    assert_eq!(std::fs::read(&p).unwrap(), bytes(7, &[2, 0]), "the other writer's file is kept");
}

#[test]
fn refuses_before_touching_anything() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    for (attrs, data) in [(0x4u32, &[1u8, 0][..]), (0x87, &[1, 0]), (7, &[]), (7, &[0; crate::MAX_DATA_BYTES + 1])] {
        let e = ev.set(&id, Attributes(attrs), data).unwrap_err();
        assert_eq!(e.grpc_code(), Code::InvalidArgument, "{e}");
    }
    let e = ev.set(&id, Attributes(0x47), &[1, 0]).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "append on a plain directory: {e}");
    assert_eq!(listing(&fs.mnt), Vec::<String>::new());
}

#[test]
fn links_fifos_and_junk_are_not_followed() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let target = fs.mnt.join("target");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, file(&fs, &id)).unwrap();
    for e in [
        ev.set(&id, Attributes::BOOT_VARIABLE, &[1, 0]).unwrap_err(),
        ev.get(&id).unwrap_err(),
        ev.delete(&id).unwrap_err(),
    ] {
        assert!(matches!(e, Error::NotRegularFile { .. }), "{e}");
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(file(&fs, &id).symlink_metadata().unwrap().file_type().is_symlink());

    let fifo = VarId::parse("Fifo", GLOBAL_GUID).unwrap();
    nix::unistd::mkfifo(&file(&fs, &fifo), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    assert!(matches!(ev.get(&fifo), Err(Error::NotRegularFile { .. })), "no hang on a FIFO");
    assert!(matches!(ev.set(&fifo, Attributes::BOOT_VARIABLE, &[1, 0]), Err(Error::NotRegularFile { .. })));

    let short = VarId::parse("Short", GLOBAL_GUID).unwrap();
    std::fs::write(file(&fs, &short), [7, 0, 0]).unwrap();
    let e = ev.get(&short).unwrap_err();
    assert!(matches!(e, Error::Malformed { len: 3 }) && e.grpc_code() == Code::DataLoss, "{e}");

    let big = VarId::parse("Big", GLOBAL_GUID).unwrap();
    std::fs::write(file(&fs, &big), vec![7; 4 + crate::MAX_DATA_BYTES + 1]).unwrap();
    assert!(matches!(ev.get(&big), Err(Error::VariableTooLarge { .. })));
    std::fs::write(file(&fs, &big), vec![7; 4 + crate::MAX_DATA_BYTES]).unwrap();
    assert_eq!(
        ev.get(&big).unwrap(),
        Variable { attributes: Attributes(0x0707_0707), data: vec![7; crate::MAX_DATA_BYTES] }
    );
}

#[test]
fn replaced_file_is_not_deleted() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    std::fs::write(&p, bytes(7, &[1, 0])).unwrap();
    let original = fs.mnt.join("original");
    std::fs::hard_link(&p, &original).unwrap();
    chattr(&p, "+i");
    let other = fs.mnt.join("other");
    std::fs::write(&other, bytes(7, &[2, 0])).unwrap();
    let e = ev.delete_with(&id, &mut || std::fs::rename(&other, &p).unwrap()).unwrap_err();
    assert!(matches!(e, Error::Replaced { .. }), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), bytes(7, &[2, 0]), "the replacement is not deleted");
    assert!(immutable(&original), "the original's flag is restored");
}

#[test]
fn deleted_meanwhile_is_not_recreated() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    std::fs::write(&p, bytes(7, &[1, 0])).unwrap();
    let mut remove = || std::fs::remove_file(&p).unwrap();
    let e = ev
        .set_with(
            &id,
            Attributes::BOOT_VARIABLE,
            &[9, 0],
            &mut Hooks { between_opens: &mut remove, after_create: &mut || () },
        )
        .unwrap_err();
    assert_eq!(e.grpc_code(), Code::Aborted, "{e}");
    assert!(!p.exists(), "an existing variable's write never creates a file");
}

#[test]
fn concurrent_writers_all_succeed_and_the_flag_ends_set() {
    let fs = Ext4::new(8);
    let ev = Efivars::open(&fs.mnt).unwrap();
    let id = boot_next();
    let p = file(&fs, &id);
    std::fs::write(&p, bytes(7, &[0, 0])).unwrap();
    chattr(&p, "+i");
    std::thread::scope(|s| {
        for t in 0u8..8 {
            let (ev, id) = (&ev, &id);
            s.spawn(move || {
                for _ in 0..20 {
                    ev.set(id, Attributes::BOOT_VARIABLE, &[t, 0]).unwrap();
                }
            });
        }
    });
    assert!(immutable(&p));
    let v = ev.get(&id).unwrap();
    assert!(v.data.len() == 2 && v.data[0] < 8 && v.data[1] == 0, "{v:?}");
}
