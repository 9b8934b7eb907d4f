// SPDX-License-Identifier: Apache-2.0
//! The installer against real block devices: a test OS image (GPT with EFI, USR-A, USR-B
//! and ROOT, filled with data) installed onto loop devices, verified byte for byte; refusals
//! leave the target byte-for-byte unchanged. Also the disk list against the real /sys.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use piccolo_bootctl::{
    DiskConfig, Error, Host, ImageSource, ImageSpec, Phase, Progress, SlotId, gpt, install_to_disk, list_disks,
    plan_install,
};

const DISK: u64 = 40 << 20;
const IMAGE: u64 = 24 << 20;

/// The test OS image, with recognisable data in every partition, in `dir/images`.
fn test_os_image(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let img = os_image_with(&images, "os.img", SMALL);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    for (lba, seed, len) in [(2048u64, 1u8, 1 << 20), (6144, 2, 4 << 20), (22528, 3, 1 << 20), (38912, 4, 1 << 20)] {
        f.write_all_at(&payload(len, seed), lba * 512).unwrap();
    }
    img
}

/// A 40 MiB target disk with an old partition table and data near its end.
fn old_disk(dir: &Path) -> PathBuf {
    let p = dir.join("target.img");
    std::fs::File::create(&p).unwrap().set_len(DISK).unwrap();
    run(Command::new("sgdisk")
        .args(["-o", "-n", "1:0:+30M", "-c", "1:OLD-DATA", "-n", "2:0:0", "-c", "2:OLD-TAIL"])
        .arg(&p));
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().write_all_at(&payload(4096, 9), 36 << 20).unwrap();
    p
}

fn cfg(dir: &Path) -> DiskConfig {
    DiskConfig { host: Host::system(), os_disks: vec![], image_dirs: vec![dir.join("images")] }
}

fn digest_of(p: &Path) -> [u8; 32] {
    sha256(&std::fs::read(p).unwrap())
}

#[test]
fn installs_a_file_image_onto_a_loop_device() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_os_image(dir.path());
    let target = old_disk(dir.path());
    let lo = LoopDev::attach(&target);
    let cfg = cfg(dir.path());

    let plan = plan_install(&cfg, &lo.name(), &ImageSpec::File(img.clone())).unwrap();
    assert_eq!((plan.target.size_bytes, plan.target.transport.as_str()), (DISK, "loop"));
    assert!(!plan.target.holds_running_system);
    let parts: Vec<_> = plan.partitions.iter().map(|p| (p.number, p.name.as_str(), p.fully_overwritten)).collect();
    assert_eq!(parts, vec![(1, "OLD-DATA", false), (2, "OLD-TAIL", false)]);
    assert_eq!(plan.wiped_after_image, Some((DISK - (1 << 20), 1 << 20)));
    assert!(list_disks(&cfg).unwrap().iter().any(|d| d.name == lo.name() && !d.holds_running_system));

    let mut events: Vec<Progress> = Vec::new();
    let r =
        install_to_disk(&cfg, &lo.name(), ImageSource::File(img.clone()), &digest_of(&img), &mut |p| events.push(p))
            .unwrap();
    assert_eq!((r.target.as_str(), r.bytes, r.sha256), (lo.name().as_str(), IMAGE, digest_of(&img)));
    // Progress: checking, writing, verifying, each monotonic up to the image size.
    let phases: Vec<Phase> = events.iter().map(|e| e.phase).fold(Vec::new(), |mut v, p| {
        if v.last() != Some(&p) {
            v.push(p);
        }
        v
    });
    assert_eq!(phases, vec![Phase::Checking, Phase::Writing, Phase::Verifying]);
    for w in events.windows(2) {
        assert!(w[0].phase != w[1].phase || w[0].done < w[1].done);
    }
    assert!(events.iter().all(|e| e.total == IMAGE && e.done <= e.total));

    // Byte for byte through the block device, the old backup GPT gone, data past it kept.
    let want = std::fs::read(&img).unwrap();
    assert!(bytes_at(&lo.dev, 0, IMAGE) == want, "device differs from the image");
    assert_eq!(bytes_at(&lo.dev, DISK - (1 << 20), 1 << 20), vec![0u8; 1 << 20]);
    assert_eq!(bytes_at(&lo.dev, 36 << 20, 4096), payload(4096, 9));
    // The installed disk is an A/B OS disk: real cgpt and our reader agree.
    assert_eq!(cgpt(&lo.dev, A), (1, 0, true));
    let st = ctl(&lo.dev, SlotId::A).boot_state().unwrap();
    assert_eq!(st.next_boot, Some(SlotId::A));
}

#[test]
fn installs_a_streamed_image_and_rejects_a_wrong_digest() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_os_image(dir.path());
    let target = old_disk(dir.path());
    let lo = LoopDev::attach(&target);
    let cfg = cfg(dir.path());
    let data = std::fs::read(&img).unwrap();

    // Wrong digest: found only at the end of the stream. No valid GPT may be left behind.
    let e = install_to_disk(
        &cfg,
        &lo.name(),
        ImageSource::Stream { reader: &mut &data[..], len: data.len() as u64 },
        &sha256(b"not it"),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");
    let f = gpt::open_ro(&lo.dev).unwrap();
    assert!(matches!(gpt::read_table(&f, &lo.dev), Err(Error::NoValidTable { .. })), "half-installed disk has a GPT");

    // A short stream is refused the same way.
    let e = install_to_disk(
        &cfg,
        &lo.name(),
        ImageSource::Stream { reader: &mut &data[..1 << 20], len: data.len() as u64 },
        &sha256(&data),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(e, Error::PayloadShort { .. }), "{e}");

    let mut last = None;
    let r = install_to_disk(
        &cfg,
        &lo.name(),
        ImageSource::Stream { reader: &mut &data[..], len: data.len() as u64 },
        &sha256(&data),
        &mut |p| last = Some(p),
    )
    .unwrap();
    assert_eq!(r.sha256, sha256(&data));
    assert_eq!(last, Some(Progress { phase: Phase::Verifying, done: IMAGE, total: IMAGE }));
    assert!(bytes_at(&lo.dev, 0, IMAGE) == data);
    assert_eq!(cgpt(&lo.dev, B), (0, 0, false));
}

/// Runs `f` and asserts every byte of the device is unchanged.
fn device_unchanged<T: std::fmt::Debug>(dev: &Path, f: impl FnOnce() -> T) -> T {
    let before = bytes_at(dev, 0, DISK);
    let r = f();
    if before != bytes_at(dev, 0, DISK) {
        panic!("device changed by {r:?}");
    }
    r
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn refusals_leave_the_target_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let img = test_os_image(dir.path());
    let target = old_disk(dir.path());
    let lo = LoopDev::attach(&target);
    let name = lo.name();
    let good = digest_of(&img);
    let install = |cfg: &DiskConfig, src: ImageSource<'_>, d: &[u8; 32]| {
        device_unchanged(&lo.dev, || install_to_disk(cfg, &name, src, d, &mut |_| {}).unwrap_err())
    };

    // The configured OS disk.
    let mut sys = cfg(dir.path());
    sys.os_disks = vec![lo.dev.clone()];
    let e = install(&sys, ImageSource::File(img.clone()), &good);
    assert!(matches!(e, Error::SystemDisk { .. }), "{e}");
    assert!(e.to_string().contains("holds the running system"));

    // Digest mismatch of a file image: found before the disk is touched.
    let e = install(&cfg(dir.path()), ImageSource::File(img.clone()), &sha256(b"x"));
    assert!(matches!(e, Error::DigestMismatch { .. }), "{e}");

    // Image larger than the disk.
    let big = dir.path().join("images/big.img");
    std::fs::File::create(&big).unwrap().set_len(DISK + 512).unwrap();
    let e = install(&cfg(dir.path()), ImageSource::File(big), &good);
    assert!(matches!(e, Error::TargetTooSmall { .. }), "{e}");

    // Image outside the allowed directory.
    let e = install(&cfg(dir.path()), ImageSource::File(target.clone()), &good);
    assert!(matches!(e, Error::ImageNotAllowed { .. }), "{e}");

    // Somebody else holds the device exclusively: the kernel says busy.
    let excl =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::fcntl::OFlag::O_EXCL.bits()).open(&lo.dev).unwrap();
    let e = install(&cfg(dir.path()), ImageSource::File(img.clone()), &good);
    assert!(matches!(e, Error::DiskInUse { .. }), "{e}");
    drop(excl);

    // Mounted for real: the running system uses it.
    // Fully initialised and mounted read-only: the kernel must not write to it (lazy inode
    // table init or a journal commit would change the device behind the test's back).
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"]).arg(&lo.dev));
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").args(["-o", "ro"]).arg(&lo.dev).arg(&mnt));
    let _m = Mounted(mnt);
    let e = install(&cfg(dir.path()), ImageSource::File(img.clone()), &good);
    assert!(matches!(e, Error::SystemDisk { .. }), "{e}");
    let disks = list_disks(&cfg(dir.path())).unwrap();
    assert!(disks.iter().find(|d| d.name == name).unwrap().holds_running_system);
}

use std::os::unix::fs::OpenOptionsExt;

/// The real /sys/block agrees with lsblk (an independent reader of the same kernel data).
#[test]
fn real_sysfs_listing_matches_lsblk() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.img");
    std::fs::File::create(&backing).unwrap().set_len(48 << 20).unwrap();
    let lo = LoopDev::attach(&backing);
    let ours = list_disks(&cfg(dir.path())).unwrap();
    let me = ours.iter().find(|d| d.name == lo.name()).expect("attached loop device listed");
    assert_eq!((me.size_bytes, me.transport.as_str(), me.holds_running_system), (48 << 20, "loop", false));

    // -P: KEY="value" pairs, so empty columns (no parent, no mount point) keep their place.
    let out = run(Command::new("lsblk").args(["-b", "-P", "-o", "NAME,TYPE,SIZE,RM,ROTA,PKNAME,MOUNTPOINT"]));
    let rows: Vec<std::collections::BTreeMap<String, String>> = out
        .lines()
        .map(|l| {
            l.split("\" ")
                .filter_map(|kv| kv.trim().split_once("=\""))
                .map(|(k, v)| (k.to_owned(), v.trim_end_matches('"').to_owned()))
                .collect()
        })
        .collect();
    let get = |r: &std::collections::BTreeMap<String, String>, k: &str| r.get(k).cloned().unwrap_or_default();
    // Ancestors of a device, itself included, following PKNAME.
    let ancestors = |name: &str| {
        let mut out = vec![name.to_owned()];
        while out.len() < 8 {
            let last = out.last().cloned().unwrap_or_default();
            match rows.iter().find(|r| get(r, "NAME") == last).map(|r| get(r, "PKNAME")) {
                Some(p) if !p.is_empty() => out.push(p),
                _ => break,
            }
        }
        out
    };
    for r in rows.iter().filter(|r| matches!(get(r, "TYPE").as_str(), "disk" | "loop") && get(r, "SIZE") != "0") {
        let name = get(r, "NAME");
        if name.starts_with("zram") || name.starts_with("ram") {
            continue;
        }
        let d = ours.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} missing from list_disks"));
        assert_eq!(d.size_bytes.to_string(), get(r, "SIZE"), "{name}");
        assert_eq!(d.removable, get(r, "RM") == "1", "{name}");
        assert_eq!(d.rotational, get(r, "ROTA") == "1", "{name}");
        // Mounted anywhere below it, or held by a dm/md/crypt device below it.
        let used = rows.iter().any(|x| {
            let xn = get(x, "NAME");
            let held = xn != name && !matches!(get(x, "TYPE").as_str(), "part" | "disk" | "loop");
            ancestors(&xn).contains(&name) && (!get(x, "MOUNTPOINT").is_empty() || held)
        });
        assert_eq!(d.holds_running_system, used, "{name}");
    }
    assert_eq!(ours.len(), ours.iter().map(|d| &d.name).collect::<std::collections::BTreeSet<_>>().len());
}
