// SPDX-License-Identifier: Apache-2.0
//! What the running system looks like: block devices in sysfs and mounts in mountinfo.
//!
//! Every path is configurable ([`Host`]) so tests can build a temp-dir sysfs tree and a
//! mountinfo file, and also run against the real `/sys` and `/proc/self/mountinfo`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Where to look at the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// sysfs mount point (`/sys`); disks are under `block/`.
    pub sysfs_root: PathBuf,
    /// Device directory (`/dev`); a disk `NAME` is `dev_root/NAME`.
    pub dev_root: PathBuf,
    /// Mount table (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
}

impl Host {
    /// The real host.
    pub fn system() -> Host {
        Host {
            sysfs_root: PathBuf::from("/sys"),
            dev_root: PathBuf::from("/dev"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
        }
    }

    /// `sysfs_root/block`.
    pub fn block_dir(&self) -> PathBuf {
        self.sysfs_root.join("block")
    }

    /// The device node of a disk or partition name.
    pub fn dev_path(&self, name: &str) -> PathBuf {
        self.dev_root.join(name)
    }
}

/// A device number `major:minor`.
pub type DevNum = (u32, u32);

/// One mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Device number of the mount source (`0:N` for virtual filesystems).
    pub dev: DevNum,
    /// Mount point, unescaped.
    pub mount_point: String,
}

/// One block device known to sysfs: a whole disk or one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name (`sda`, `sda3`, `dm-0`).
    pub name: String,
    /// Its device number.
    pub dev: DevNum,
    /// The whole disk it belongs to (itself for a disk).
    pub disk: String,
    /// Partition number, for partitions.
    pub partition: Option<u32>,
    /// Devices this one is stacked on (`slaves/`: dm, md), by kernel name.
    pub slaves: Vec<String>,
    /// The sysfs directory.
    pub sysfs_dir: PathBuf,
}

fn read_sysfs(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| Error::ReadSysfs { path: path.to_owned(), source })
}

/// Reads an optional sysfs attribute (absent → `None`).
pub fn read_attr(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name)).ok().map(|s| s.trim().to_owned())
}

fn parse_dev(s: &str) -> Option<DevNum> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Undoes mountinfo's octal escapes (`\040` for space and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Host {
    /// Every mount in the mount table.
    pub fn mounts(&self) -> Result<Vec<Mount>, Error> {
        let text = std::fs::read_to_string(&self.mountinfo)
            .map_err(|source| Error::ReadMountinfo { path: self.mountinfo.clone(), source })?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let dev = parse_dev(f.nth(2)?)?;
                let mount_point = unescape(f.nth(1)?);
                Some(Mount { dev, mount_point })
            })
            .collect())
    }

    /// Every disk and partition under `sysfs_root/block`.
    pub fn block_devices(&self) -> Result<Vec<BlockDev>, Error> {
        let dir = self.block_dir();
        let rd = std::fs::read_dir(&dir).map_err(|source| Error::ListDisks { path: dir.clone(), source })?;
        let mut names: Vec<String> =
            rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect();
        names.sort();
        let mut out = Vec::new();
        for disk in names {
            let ddir = dir.join(&disk);
            let Some(dev) = read_attr(&ddir, "dev").and_then(|d| parse_dev(&d)) else { continue };
            out.push(BlockDev {
                name: disk.clone(),
                dev,
                disk: disk.clone(),
                partition: None,
                slaves: list_names(&ddir.join("slaves")),
                sysfs_dir: ddir.clone(),
            });
            for part in list_names(&ddir) {
                let pdir = ddir.join(&part);
                let Some(number) = read_attr(&pdir, "partition").and_then(|p| p.parse().ok()) else { continue };
                let Some(pdev) = read_attr(&pdir, "dev").and_then(|d| parse_dev(&d)) else { continue };
                out.push(BlockDev {
                    name: part,
                    dev: pdev,
                    disk: disk.clone(),
                    partition: Some(number),
                    slaves: Vec::new(),
                    sysfs_dir: pdir,
                });
            }
        }
        Ok(out)
    }

    /// The whole disks holding the partitions or disks behind `dev`, following dm/md stacking.
    pub fn backing(&self, index: &[BlockDev], dev: DevNum) -> Vec<BlockDev> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&BlockDev> = index.iter().filter(|b| b.dev == dev).collect();
        while let Some(b) = todo.pop() {
            if !seen.insert(b.name.clone()) {
                continue;
            }
            if b.slaves.is_empty() {
                out.push(b.clone());
            } else {
                todo.extend(index.iter().filter(|x| b.slaves.contains(&x.name)));
            }
        }
        out
    }

    /// Names of disks backing any mounted filesystem.
    pub fn disks_in_use(&self) -> Result<BTreeSet<String>, Error> {
        let index = self.block_devices()?;
        let mut used = BTreeSet::new();
        for m in self.mounts()? {
            used.extend(self.backing(&index, m.dev).into_iter().map(|b| b.disk));
        }
        Ok(used)
    }

    /// The disk and partition the running `/usr` lives on (the partition behind dm-verity or
    /// a plain mount; `/` when `/usr` is not a separate mount).
    pub fn locate_usr(&self) -> Result<(String, Option<u32>), Error> {
        let mounts = self.mounts()?;
        let m = mounts
            .iter()
            .rev()
            .find(|m| m.mount_point == "/usr")
            .or_else(|| mounts.iter().rev().find(|m| m.mount_point == "/"))
            .ok_or_else(|| Error::DetectOsDisk { reason: "neither /usr nor / is mounted".into() })?;
        let index = self.block_devices()?;
        let backing = self.backing(&index, m.dev);
        match backing.as_slice() {
            [one] => Ok((one.disk.clone(), one.partition)),
            [] => Err(Error::DetectOsDisk {
                reason: format!("{} ({}:{}) is not on a block device in sysfs", m.mount_point, m.dev.0, m.dev.1),
            }),
            _ => Err(Error::DetectOsDisk { reason: format!("{} spans several devices", m.mount_point) }),
        }
    }

    /// The device number of a disk or partition name, from sysfs.
    pub fn dev_of(&self, name: &str) -> Result<Option<DevNum>, Error> {
        Ok(self.block_devices()?.into_iter().find(|b| b.name == name).map(|b| b.dev))
    }
}

fn list_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Reads one required sysfs attribute.
pub fn read_required(dir: &Path, name: &str) -> Result<String, Error> {
    read_sysfs(&dir.join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape("/x\\"), "/x\\");
        assert_eq!(unescape("/x\\04"), "/x\\04");
    }

    #[test]
    fn parses_dev_numbers() {
        assert_eq!(parse_dev("254:0\n"), Some((254, 0)));
        assert_eq!(parse_dev("x:0"), None);
    }
}
