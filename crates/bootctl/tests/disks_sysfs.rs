// SPDX-License-Identifier: Apache-2.0
//! Disk listing, OS-disk detection and install planning against a temp-dir sysfs tree laid
//! out like the kernel's (`block/NAME` symlinks into `devices/...`, partitions as
//! subdirectories, `slaves/` and `holders/`) plus a mountinfo file.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use piccolo_bootctl::{
    BootControl, BootedSource, DiskConfig, Error, Host, ImageSpec, SlotId, list_disks, plan_install,
};

struct Fake {
    _dir: tempfile::TempDir,
    root: PathBuf,
    host: Host,
}

fn write(p: &Path, v: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, format!("{v}\n")).unwrap();
}

impl Fake {
    fn new() -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        for d in ["sys/block", "dev", "images"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let host = Host { sysfs_root: root.join("sys"), dev_root: root.join("dev"), mountinfo: root.join("mountinfo") };
        Fake { _dir: dir, root, host }
    }

    /// A disk at `sys/devices/<bus>/block/<name>` with `block/<name>` linking to it.
    fn disk(&self, name: &str, bus: &str, dev: &str, bytes: u64, removable: bool, rotational: bool) -> PathBuf {
        let d = self.root.join("sys/devices").join(bus).join("block").join(name);
        write(&d.join("dev"), dev);
        write(&d.join("size"), &(bytes / 512).to_string());
        write(&d.join("removable"), if removable { "1" } else { "0" });
        write(&d.join("queue/rotational"), if rotational { "1" } else { "0" });
        std::fs::create_dir_all(d.join("holders")).unwrap();
        std::fs::create_dir_all(d.join("slaves")).unwrap();
        std::os::unix::fs::symlink(format!("../devices/{bus}/block/{name}"), self.root.join("sys/block").join(name))
            .unwrap();
        // The "device node": a sparse regular file of the disk's size.
        std::fs::File::create(self.host.dev_root.join(name)).unwrap().set_len(bytes).unwrap();
        d
    }

    fn part(&self, disk: &Path, name: &str, number: u32, dev: &str) -> PathBuf {
        let p = disk.join(name);
        write(&p.join("dev"), dev);
        write(&p.join("partition"), &number.to_string());
        write(&p.join("start"), &(2048 * number).to_string());
        write(&p.join("size"), "2048");
        std::fs::create_dir_all(p.join("holders")).unwrap();
        p
    }

    fn mounts(&self, lines: &[(&str, &str)]) {
        let text: String = lines
            .iter()
            .enumerate()
            .map(|(i, (dev, mp))| format!("{} 1 {dev} / {mp} rw,relatime - ext4 /dev/x rw\n", 20 + i))
            .collect();
        std::fs::write(&self.host.mountinfo, text).unwrap();
    }

    fn cfg(&self) -> DiskConfig {
        DiskConfig { host: self.host.clone(), os_disks: vec![], image_dirs: vec![self.root.join("images")] }
    }
}

/// A machine: SATA disk with a mounted data partition, USB stick, NVMe OS disk behind
/// dm-verity for /usr and / on its ROOT, an SD card, loop devices, zram, and a virtio disk
/// whose partition is held by an (unmounted) dm mapping.
fn machine() -> Fake {
    let f = Fake::new();
    let sda = f.disk("sda", "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0", "8:0", 1 << 40, false, true);
    write(&sda.join("device/model"), "WDC WD10EZEX    ");
    f.part(&sda, "sda1", 1, "8:1");
    let sdb = f.disk(
        "sdb",
        "pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0",
        "8:16",
        16 << 30,
        true,
        false,
    );
    write(&sdb.join("device/model"), "Flash Disk");
    let nvme = f.disk("nvme0n1", "pci0000:00/0000:00:1d.0/0000:3d:00.0/nvme/nvme0", "259:0", 512 << 30, false, false);
    write(&nvme.join("device/model"), "Samsung SSD 980");
    for (n, num, dev) in
        [("nvme0n1p1", 1, "259:1"), ("nvme0n1p3", 3, "259:3"), ("nvme0n1p4", 4, "259:4"), ("nvme0n1p9", 9, "259:9")]
    {
        f.part(&nvme, n, num, dev);
    }
    let dm = f.disk("dm-0", "virtual", "253:0", 1 << 30, false, false);
    std::fs::create_dir_all(dm.join("slaves/nvme0n1p4")).unwrap();
    let mmc = f.disk("mmcblk0", "platform/fe320000.mmc/mmc_host/mmc1/mmc1:0001", "179:0", 8 << 20, true, false);
    write(&mmc.join("device/name"), "SD8GB");
    f.disk("loop0", "virtual", "7:0", 0, false, false);
    f.disk("loop1", "virtual", "7:1", 64 << 20, false, false);
    f.disk("zram0", "virtual", "252:0", 4 << 30, false, false);
    let vdb = f.disk("vdb", "pci0000:00/0000:00:05.0/virtio3", "254:16", 20 << 30, false, true);
    let vdb1 = f.part(&vdb, "vdb1", 1, "254:17");
    std::fs::create_dir_all(vdb1.join("holders/dm-1")).unwrap();
    f.mounts(&[("0:21", "/proc"), ("259:9", "/"), ("253:0", "/usr"), ("8:1", "/srv/data"), ("0:30", "/tmp")]);
    f
}

#[test]
fn lists_disks_with_their_properties() {
    let f = machine();
    let disks = list_disks(&f.cfg()).unwrap();
    let got: Vec<_> = disks
        .iter()
        .map(|d| {
            (
                d.name.as_str(),
                d.size_bytes,
                d.model.as_str(),
                d.removable,
                d.rotational,
                d.transport.as_str(),
                d.holds_running_system,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("loop1", 64 << 20, "", false, false, "loop", false),
            ("mmcblk0", 8 << 20, "SD8GB", true, false, "mmc", false),
            ("nvme0n1", 512 << 30, "Samsung SSD 980", false, false, "nvme", true),
            ("sda", 1 << 40, "WDC WD10EZEX", false, true, "sata", true),
            ("sdb", 16 << 30, "Flash Disk", true, false, "usb", false),
            ("vdb", 20 << 30, "", false, true, "virtio", true),
        ]
    );
    assert_eq!(disks[4].dev_path, f.host.dev_root.join("sdb"));
    // The configured OS disk counts as the running system even when nothing is mounted.
    let mut cfg = f.cfg();
    cfg.os_disks = vec![f.host.dev_root.join("mmcblk0")];
    let d = list_disks(&cfg).unwrap();
    assert!(d.iter().find(|d| d.name == "mmcblk0").unwrap().holds_running_system);
}

#[test]
fn finds_the_booted_slot_through_dm_verity() {
    let f = machine();
    assert_eq!(f.host.locate_usr().unwrap(), ("nvme0n1".to_owned(), Some(4)));
    // The "device node" is an OS image whose USR-B is partition 4.
    let img = os_image(&f.host.dev_root, "nvme0n1");
    let c = BootControl::from_running_system(&f.host, None).unwrap();
    assert_eq!((c.disk(), c.booted()), (img.as_path(), SlotId::B));
    let st = c.boot_state().unwrap();
    assert_eq!((st.booted, st.booted_source), (SlotId::B, BootedSource::Detected));
    // Configured disk that is not the running one.
    let other = os_image(&f.root, "other.img");
    let e = BootControl::from_running_system(&f.host, Some(other)).unwrap_err();
    assert!(matches!(&e, Error::DetectOsDisk { reason } if reason.contains("not on")), "{e}");
    // /usr on a partition that is no slot.
    f.mounts(&[("259:9", "/usr")]);
    let e = BootControl::from_running_system(&f.host, None).unwrap_err();
    assert!(matches!(&e, Error::DetectOsDisk { reason } if reason.contains("partition 9")), "{e}");
    // /usr not on a block device at all (overlay, tmpfs).
    f.mounts(&[("0:40", "/"), ("0:41", "/usr")]);
    let e = BootControl::from_running_system(&f.host, None).unwrap_err();
    assert!(matches!(&e, Error::DetectOsDisk { reason } if reason.contains("not on a block device")), "{e}");
    assert_eq!(e.grpc_code(), piccolo_bootctl::Code::Unavailable);
    // No /usr mount: / is used.
    f.mounts(&[("259:3", "/")]);
    assert_eq!(BootControl::from_running_system(&f.host, None).unwrap().booted(), SlotId::A);
}

#[test]
fn install_targets_are_validated() {
    let f = machine();
    let cfg = f.cfg();
    let img = os_image(&f.root.join("images"), "os.img");
    let spec = ImageSpec::File(img.clone());
    let err = |t: &str, s: &ImageSpec| plan_install(&cfg, t, s).unwrap_err();
    assert!(matches!(err("sda1", &spec), Error::NotWholeDisk { .. }));
    assert!(matches!(err("dm-0", &spec), Error::NotWholeDisk { .. }));
    assert!(matches!(err("zram0", &spec), Error::NotWholeDisk { .. }));
    assert!(matches!(err("nvme0n1", &spec), Error::SystemDisk { .. }));
    assert!(matches!(err("sda", &spec), Error::SystemDisk { .. }), "mounted data partition");
    assert!(matches!(err("vdb", &spec), Error::SystemDisk { .. }), "partition held by dm");
    assert!(matches!(err("sdz", &spec), Error::UnknownDisk { .. }));
    for bad in ["../sda", "sda/", "", "SDA", "sd a"] {
        assert!(matches!(err(bad, &spec), Error::InvalidDiskName { .. }), "{bad:?}");
    }
    // The device node must be the block device sysfs describes.
    std::fs::remove_file(f.host.dev_root.join("sdb")).unwrap();
    assert!(matches!(err("sdb", &spec), Error::UnknownDisk { .. }), "no node");
    std::fs::create_dir(f.host.dev_root.join("sdb")).unwrap();
    assert!(matches!(err("sdb", &spec), Error::UnknownDisk { .. }), "a directory");
    std::fs::remove_dir(f.host.dev_root.join("sdb")).unwrap();
    std::os::unix::fs::symlink("/dev/null", f.host.dev_root.join("sdb")).unwrap();
    assert!(matches!(err("sdb", &spec), Error::UnknownDisk { .. }), "a symlink");
    std::fs::remove_file(f.host.dev_root.join("sdb")).unwrap();
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    mknod(&f.host.dev_root.join("sdb"), SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), makedev(7, 200)).unwrap();
    assert!(matches!(err("sdb", &spec), Error::UnknownDisk { .. }), "block device 7:200 is not sdb (8:16)");
    std::fs::remove_file(f.host.dev_root.join("sdb")).unwrap();
    mknod(&f.host.dev_root.join("sdb"), SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), makedev(8, 16)).unwrap();
    // The right node passes the check (and then fails to open: no such device here).
    let e = err("sdb", &ImageSpec::Stream { len: 1 << 20 });
    assert!(matches!(e, Error::OpenDisk { .. }), "{e}");
    std::fs::remove_file(f.host.dev_root.join("sdb")).unwrap();
    std::fs::File::create(f.host.dev_root.join("sdb")).unwrap().set_len(16 << 30).unwrap();
    let e = err("mmcblk0", &spec);
    assert!(matches!(e, Error::TargetTooSmall { need, have, .. } if need == 64 << 20 && have == 8 << 20), "{e}");
    assert!(matches!(err("sdb", &ImageSpec::Stream { len: 0 }), Error::ImageEmpty));
    assert!(matches!(err("sdb", &ImageSpec::Stream { len: (16 << 30) + 1 }), Error::TargetTooSmall { .. }));
}

#[test]
fn images_must_come_from_the_allowed_directory() {
    let f = machine();
    let cfg = f.cfg();
    let outside = os_image(&f.root, "outside.img");
    let plan = |p: PathBuf| plan_install(&cfg, "sdb", &ImageSpec::File(p));
    assert!(matches!(plan(outside.clone()), Err(Error::ImageNotAllowed { .. })));
    let link = f.root.join("images/link.img");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    assert!(matches!(plan(link), Err(Error::ImageNotAllowed { .. })), "symlink out of the directory");
    assert!(matches!(plan(f.root.join("images/../outside.img")), Err(Error::ImageNotAllowed { .. })));
    assert!(matches!(plan(PathBuf::from("images/os.img")), Err(Error::ImageNotAllowed { .. })), "relative");
    assert!(matches!(plan(f.root.join("images")), Err(Error::ImageNotAllowed { .. })), "the directory itself");
    std::fs::create_dir(f.root.join("images/sub")).unwrap();
    assert!(matches!(plan(f.root.join("images/sub")), Err(Error::ImageNotAllowed { .. })), "a directory");
    let e = plan(f.root.join("images/missing.img")).unwrap_err();
    assert!(matches!(e, Error::OpenImage { .. }) && e.grpc_code() == piccolo_bootctl::Code::NotFound, "{e}");
    std::fs::write(f.root.join("images/empty.img"), b"").unwrap();
    assert!(matches!(plan(f.root.join("images/empty.img")), Err(Error::ImageEmpty)));
}

#[test]
fn the_plan_lists_exactly_what_is_overwritten() {
    let f = machine();
    let cfg = f.cfg();
    // The USB stick's "device node" currently holds the OS layout (and is 16 GiB, sparse).
    let target = os_image(&f.host.dev_root, "sdb");
    std::fs::OpenOptions::new().write(true).open(&target).unwrap().set_len(16 << 30).unwrap();
    let image = os_image(&f.root.join("images"), "small.img");
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(40 << 20).unwrap();
    let plan = plan_install(&cfg, "sdb", &ImageSpec::File(image.clone())).unwrap();
    assert_eq!(plan.target.name, "sdb");
    assert_eq!((plan.image_bytes, plan.image_path.as_deref()), (40 << 20, Some(image.as_path())));
    assert!(plan.has_gpt);
    let parts: Vec<_> =
        plan.partitions.iter().map(|p| (p.number, p.name.as_str(), p.start, p.size, p.fully_overwritten)).collect();
    assert_eq!(
        parts,
        vec![
            (1, "EFI-SYSTEM", 2048 * 512, 4 << 20, true),
            (3, "USR-A", 10240 * 512, 16 << 20, true),
            (4, "USR-B", 43008 * 512, 16 << 20, true),
            (9, "ROOT", 75776 * 512, (131038 - 75776 + 1) * 512, false),
        ]
    );
    assert_eq!(plan.wiped_after_image, Some(((16 << 30) - (1 << 20), 1 << 20)));
    // A target without a GPT: the kernel's partitions are listed instead.
    let blank = f.host.dev_root.join("sda");
    std::fs::File::create(&blank).unwrap().set_len(1 << 30).unwrap();
    let mut cfg2 = cfg.clone();
    f.mounts(&[("259:9", "/")]);
    cfg2.host = f.host.clone();
    let plan = plan_install(&cfg2, "sda", &ImageSpec::Stream { len: 40 << 20 }).unwrap();
    assert!(!plan.has_gpt);
    assert_eq!(plan.partitions.len(), 1);
    assert_eq!(
        (plan.partitions[0].number, plan.partitions[0].start, plan.partitions[0].size),
        (1, 2048 * 512, 2048 * 512)
    );
}
