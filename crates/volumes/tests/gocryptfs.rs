// SPDX-License-Identifier: Apache-2.0
//! The driver against real gocryptfs over FUSE (run as root): create, mount, unmount,
//! the second key check (gocryptfs's own exit 12), refusals that leave nothing mounted,
//! crash leftovers, and a killed gocryptfs.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use piccolo_volumes::{Class, Error, Key, Runner, VolumeId, Volumes, meta};

/// nobody: files in the mount must come out as this uid, not as root.
const OWNER: u32 = 65534;

/// Unmounts whatever a test left mounted (also when it panicked), before the temp dir goes.
struct Cleanup(tempfile::TempDir);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let mounts = self.0.path().join("state/mounts");
        for e in std::fs::read_dir(&mounts).into_iter().flatten().flatten() {
            let _ = nix::mount::umount2(&e.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn vols() -> (Cleanup, Volumes) {
    let d = tempfile::Builder::new().prefix("piccolo-vol-").tempdir().unwrap();
    let v = Volumes::new(d.path().join("state"), Runner::default());
    (Cleanup(d), v)
}

fn id(s: &str) -> VolumeId {
    VolumeId::parse(s).unwrap()
}

fn key(b: u8) -> Key {
    Key::from_slice(&[b; 32]).unwrap()
}

fn is_mounted(p: &Path) -> bool {
    !piccolo_volumes::observe::mounts_on(p).is_empty()
}

#[test]
fn create_mount_write_unmount_remount() {
    let (_d, v) = vols();
    let i = id("control");
    v.create(&i, Class::Control, &key(1), OWNER, OWNER).unwrap();
    assert!(matches!(v.create(&i, Class::Control, &key(1), OWNER, OWNER), Err(Error::AlreadyExists(_))));
    let vd = v.volume_dir(&i);
    assert_eq!(std::fs::metadata(&vd).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(v.data_dir(&i)).unwrap().mode() & 0o777, 0o700);
    assert!(v.data_dir(&i).join("gocryptfs.conf").exists());
    assert_eq!(meta::Meta::read(&vd, &i).unwrap().class, Class::Control);

    let (mnt, pid) = v.mount(&i, &key(1), OWNER).unwrap();
    assert!(pid.is_some());
    assert!(is_mounted(&mnt));
    let root = std::fs::metadata(&mnt).unwrap();
    assert_eq!((root.uid(), root.gid(), root.mode() & 0o777), (65534, 65534, 0o700));
    std::fs::write(mnt.join("f"), b"hello").unwrap();
    assert_eq!(std::fs::metadata(mnt.join("f")).unwrap().uid(), 65534);
    // Mounting again for the owner is a no-op; another uid is refused.
    assert_eq!(v.mount(&i, &key(1), OWNER).unwrap().1, pid);
    assert!(matches!(v.mount(&i, &key(1), 0), Err(Error::NotOwner { owner: 65534, .. })));
    let st = v.status(&i).unwrap();
    assert!(st.mounted && !st.needs_repair);
    assert_eq!(st.owner_uid, Some(65534));

    v.unmount(&i).unwrap();
    v.unmount(&i).unwrap();
    assert!(!is_mounted(&mnt));
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 0);
    let st = v.status(&i).unwrap();
    assert!(!st.mounted && st.pid.is_none());

    let (mnt, _) = v.mount(&i, &key(1), OWNER).unwrap();
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"hello");
    v.unmount(&i).unwrap();
}

#[test]
fn gocryptfs_itself_refuses_a_wrong_key_when_the_check_passes() {
    let (_d, v) = vols();
    let i = id("bootstrap");
    v.create(&i, Class::Bootstrap, &key(1), OWNER, OWNER).unwrap();
    // Make the metadata's check accept key 2: only gocryptfs (exit 12) is left to refuse it.
    let mut m = meta::Meta::read(&v.volume_dir(&i), &i).unwrap();
    m.key_check = meta::key_check(&key(2), &i);
    m.write(&v.volume_dir(&i)).unwrap();
    assert!(matches!(v.mount(&i, &key(2), OWNER), Err(Error::WrongKey)));
    assert!(!is_mounted(&v.mountpoint(&i)));
    assert!(v.status(&i).unwrap().pid.is_none());
}

#[test]
fn refusals_leave_nothing_mounted() {
    let (_d, v) = vols();
    let i = id("app-x");
    assert!(matches!(v.create(&i, Class::Control, &key(1), OWNER, OWNER), Err(Error::InvalidClass(_))));
    assert!(matches!(v.create(&id("x"), Class::Application, &key(1), OWNER, OWNER), Err(Error::InvalidClass(_))));
    assert!(matches!(v.mount(&i, &key(1), OWNER), Err(Error::NotFound(_))));
    v.create(&i, Class::Application, &key(1), OWNER, OWNER).unwrap();
    assert!(matches!(v.mount(&i, &key(9), OWNER), Err(Error::WrongKey)));
    assert!(!is_mounted(&v.mountpoint(&i)));
    // Files in an unmounted mountpoint are not hidden under a mount.
    std::fs::create_dir_all(v.mountpoint(&i)).unwrap();
    std::fs::write(v.mountpoint(&i).join("stray"), b"x").unwrap();
    assert!(matches!(v.mount(&i, &key(1), OWNER), Err(Error::MountpointNotEmpty(_))));
    assert!(!is_mounted(&v.mountpoint(&i)));
    std::fs::remove_file(v.mountpoint(&i).join("stray")).unwrap();
    // A symlink in place of the mountpoint is refused, not followed.
    std::fs::remove_dir(v.mountpoint(&i)).unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), v.mountpoint(&i)).unwrap();
    assert!(matches!(v.mount(&i, &key(1), OWNER), Err(Error::NotADirectory(_))));
    assert!(!is_mounted(elsewhere.path()));
    assert_eq!(std::fs::metadata(elsewhere.path()).unwrap().uid(), 0);
}

#[test]
fn a_crashed_create_leaves_no_volume_and_is_cleaned_up() {
    let (_d, v) = vols();
    let i = id("app-crash");
    let staging = v.state_dir().join("ciphertext/.creating-app-crash");
    std::fs::create_dir_all(staging.join("data")).unwrap();
    std::fs::write(staging.join("data/junk"), b"half").unwrap();
    assert!(v.list().unwrap().is_empty(), "a staging dir is not a volume");
    v.create(&i, Class::Application, &key(3), OWNER, OWNER).unwrap();
    assert!(!staging.exists());
    assert_eq!(v.list().unwrap().len(), 1);
}

#[test]
fn killed_gocryptfs_is_needs_repair_and_remount_repairs() {
    let (_d, v) = vols();
    let i = id("app-kill");
    v.create(&i, Class::Application, &key(4), OWNER, OWNER).unwrap();
    let (mnt, pid) = v.mount(&i, &key(4), OWNER).unwrap();
    std::fs::write(mnt.join("f"), b"kept").unwrap();
    let pid = i32::try_from(pid.unwrap()).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while v.status(&i).unwrap().pid.is_some() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = v.status(&i).unwrap();
    assert!(st.mounted && st.needs_repair, "{st:?}");
    let (mnt, pid2) = v.mount(&i, &key(4), OWNER).unwrap();
    assert!(pid2.is_some());
    assert_eq!(std::fs::read(mnt.join("f")).unwrap(), b"kept");
    let st = v.status(&i).unwrap();
    assert!(st.mounted && !st.needs_repair);
    v.unmount(&i).unwrap();
    assert!(!is_mounted(&mnt));
}

#[test]
fn busy_mount_is_refused_then_unmounts() {
    let (_d, v) = vols();
    let i = id("app-busy");
    v.create(&i, Class::Application, &key(5), OWNER, OWNER).unwrap();
    let (mnt, _) = v.mount(&i, &key(5), OWNER).unwrap();
    let f = std::fs::File::create(mnt.join("open")).unwrap();
    assert!(matches!(v.unmount(&i), Err(Error::Busy(_))));
    assert!(v.status(&i).unwrap().mounted);
    drop(f);
    v.unmount(&i).unwrap();
    assert!(!is_mounted(&mnt));
}

#[test]
fn concurrent_mounts_of_one_volume_make_one_mount() {
    let (_d, v) = vols();
    let i = id("app-race");
    v.create(&i, Class::Application, &key(6), OWNER, OWNER).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| v.mount(&i, &key(6), OWNER))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pids: Vec<_> = results.into_iter().map(|r| r.unwrap().1).collect();
    assert!(pids.iter().all(|p| p.is_some() && *p == pids[0]), "{pids:?}");
    assert_eq!(piccolo_volumes::observe::mounts_on(&v.mountpoint(&i)).len(), 1);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4).map(|_| s.spawn(|| v.unmount(&i))).collect();
        for h in hs {
            h.join().unwrap().unwrap();
        }
    });
    assert!(!is_mounted(&v.mountpoint(&i)));
}
