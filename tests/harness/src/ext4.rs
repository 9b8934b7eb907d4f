// SPDX-License-Identifier: Apache-2.0
//! A small real ext4 filesystem (an image file made with `mkfs.ext4`, mounted through a
//! loop device) for tests that need inode flags (`chattr +i`) or a filesystem that fills
//! up. Unmounted (and its loop device released) on drop.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::disks::run;

/// A mounted ext4 image.
pub struct Ext4 {
    /// Temp dir holding the image and the mount point.
    pub dir: tempfile::TempDir,
    /// The mount point.
    pub mnt: PathBuf,
}

impl Ext4 {
    /// Makes a `mib`-MiB ext4 image with no blocks reserved for root and mounts it
    /// (`mount -o loop`: the loop device is freed at unmount).
    pub fn new(mib: u64) -> Ext4 {
        let dir = tempfile::Builder::new().prefix("piccolo-ext4-").tempdir().expect("tempdir");
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img).and_then(|f| f.set_len(mib << 20)).expect("create image");
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0"]).arg(&img));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        run(Command::new("mount").args(["-t", "ext4", "-o", "loop,nodev,nosuid"]).arg(&img).arg(&mnt));
        Ext4 { dir, mnt }
    }

    /// Writes a filler file until the filesystem refuses more data (ENOSPC).
    pub fn fill(&self) {
        let mut f = std::fs::File::create(self.mnt.join("filler")).expect("create filler");
        for chunk in [1 << 20, 4096, 1] {
            let buf = vec![0xa5u8; chunk];
            while f.write_all(&buf).is_ok() {}
        }
        f.sync_all().ok();
        assert!(std::fs::write(self.mnt.join("probe"), [1u8; 4096]).is_err(), "filesystem is not full");
        let _ = std::fs::remove_file(self.mnt.join("probe"));
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// `chattr <op> path` (e.g. `+i`, `-i`).
pub fn chattr(path: &Path, op: &str) {
    run(Command::new("chattr").arg(op).arg(path));
}

/// Whether real `lsattr -d path` shows the immutable (`i`) flag.
pub fn immutable(path: &Path) -> bool {
    let out = run(Command::new("lsattr").arg("-d").arg(path));
    let flags = out.split_whitespace().next().unwrap_or_else(|| panic!("lsattr printed {out:?}"));
    flags.contains('i')
}
