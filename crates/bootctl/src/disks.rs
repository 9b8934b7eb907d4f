// SPDX-License-Identifier: Apache-2.0
//! Disks from `/sys/block` and the install plan: what an installation would overwrite.
//!
//! A disk "holds the running system" when any mounted filesystem is on it (directly or
//! through dm/md), when anything holds one of its partitions (an open LUKS mapping), or when
//! it is the configured OS disk. Such disks are never install targets.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::gpt;
use crate::host::{BlockDev, Host, read_attr, read_required};

/// What the installer may touch and where it looks.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// sysfs, /dev and mountinfo locations.
    pub host: Host,
    /// Disks (device paths) that count as the running system besides mounted ones.
    pub os_disks: Vec<PathBuf>,
    /// Directories install images may be read from.
    pub image_dirs: Vec<PathBuf>,
}

/// One whole disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Kernel name (`sda`, `nvme0n1`, `loop3`).
    pub name: String,
    /// Device node.
    pub dev_path: PathBuf,
    /// Size in bytes (sysfs `size` is always in 512-byte units).
    pub size_bytes: u64,
    /// `device/model` (or `device/name`), trimmed; empty if the kernel has none.
    pub model: String,
    /// `removable`.
    pub removable: bool,
    /// `queue/rotational`.
    pub rotational: bool,
    /// Bus, from the sysfs device path: usb, nvme, sata, scsi, virtio, mmc, loop, virtual, unknown.
    pub transport: String,
    /// Mounted, held, or the configured OS disk: never an install target.
    pub holds_running_system: bool,
}

/// Kernel names are short and plain; anything else is refused before touching sysfs.
pub fn check_disk_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(()) } else { Err(Error::InvalidDiskName { name: name.to_owned() }) }
}

fn transport_of(name: &str, sysfs_dir: &Path) -> String {
    let real = std::fs::canonicalize(sysfs_dir).unwrap_or_else(|_| sysfs_dir.to_owned());
    let p = real.to_string_lossy();
    let t = if name.starts_with("loop") {
        "loop"
    } else if p.contains("/usb") {
        "usb"
    } else if p.contains("/nvme") {
        "nvme"
    } else if p.contains("/ata") {
        "sata"
    } else if p.contains("/virtio") {
        "virtio"
    } else if p.contains("/mmc") {
        "mmc"
    } else if p.contains("/host") || p.contains("/scsi") {
        "scsi"
    } else if p.contains("/virtual/") {
        "virtual"
    } else {
        "unknown"
    };
    t.to_owned()
}

/// Disk names that hold the running system (see the module doc).
pub fn system_disks(cfg: &DiskConfig, index: &[BlockDev]) -> Result<BTreeSet<String>, Error> {
    let mut out = cfg.host.disks_in_use()?;
    for b in index {
        if !list_dir(&b.sysfs_dir.join("holders")).is_empty() {
            out.insert(b.disk.clone());
        }
    }
    for p in &cfg.os_disks {
        if let Ok(m) = std::fs::metadata(p) {
            let dev = (nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()));
            let dev = (u32::try_from(dev.0).unwrap_or(u32::MAX), u32::try_from(dev.1).unwrap_or(u32::MAX));
            if m.rdev() != 0 {
                out.extend(index.iter().filter(|b| b.dev == dev).map(|b| b.disk.clone()));
            }
        }
        if let Some(n) = p.file_name().and_then(|n| n.to_str())
            && p.parent() == Some(cfg.host.dev_root.as_path())
        {
            out.insert(n.to_owned());
        }
    }
    Ok(out)
}

fn list_dir(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn info_of(cfg: &DiskConfig, b: &BlockDev, system: &BTreeSet<String>) -> Result<DiskInfo, Error> {
    let dir = &b.sysfs_dir;
    let sectors: u64 = read_required(dir, "size")?.parse().unwrap_or(0);
    let model = read_attr(dir, "device/model").or_else(|| read_attr(dir, "device/name")).unwrap_or_default();
    Ok(DiskInfo {
        name: b.name.clone(),
        dev_path: cfg.host.dev_path(&b.name),
        size_bytes: sectors * 512,
        model,
        removable: read_attr(dir, "removable").as_deref() == Some("1"),
        rotational: read_attr(dir, "queue/rotational").as_deref() == Some("1"),
        transport: transport_of(&b.name, dir),
        holds_running_system: system.contains(&b.name),
    })
}

/// Devices that are never disks to install onto: RAM disks and stacked devices (dm, md).
fn is_virtual(b: &BlockDev) -> bool {
    b.name.starts_with("ram") || b.name.starts_with("zram") || !b.slaves.is_empty()
}

/// Whole disks, sorted by name. Left out, since they can never be install targets: empty
/// devices (size 0, e.g. unused loop devices), RAM disks (`ram*`, `zram*`) and stacked
/// devices (dm, md: their underlying disks are listed instead).
pub fn list_disks(cfg: &DiskConfig) -> Result<Vec<DiskInfo>, Error> {
    let index = cfg.host.block_devices()?;
    let system = system_disks(cfg, &index)?;
    let mut out = Vec::new();
    for b in index.iter().filter(|b| b.partition.is_none()) {
        if is_virtual(b) {
            continue;
        }
        let d = info_of(cfg, b, &system)?;
        if d.size_bytes > 0 {
            out.push(d);
        }
    }
    Ok(out)
}

/// Resolves an install target: a whole disk that does not hold the running system.
pub fn resolve_target(cfg: &DiskConfig, name: &str) -> Result<DiskInfo, Error> {
    check_disk_name(name)?;
    let index = cfg.host.block_devices()?;
    let b = index.iter().find(|b| b.name == name).ok_or_else(|| Error::UnknownDisk { name: name.to_owned() })?;
    if b.partition.is_some() || is_virtual(b) {
        return Err(Error::NotWholeDisk { name: name.to_owned() });
    }
    let system = system_disks(cfg, &index)?;
    let d = info_of(cfg, b, &system)?;
    if d.holds_running_system {
        return Err(Error::SystemDisk { name: name.to_owned() });
    }
    check_node(&d.dev_path, b.dev, name)?;
    Ok(d)
}

/// The device node must be the block device sysfs describes (a stale or replaced node
/// would send the write elsewhere). Regular files stand in for devices in test trees.
fn check_node(path: &Path, dev: crate::host::DevNum, name: &str) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    let unknown = || Error::UnknownDisk { name: name.to_owned() };
    let m = std::fs::symlink_metadata(path).map_err(|_| unknown())?;
    let ft = m.file_type();
    if ft.is_block_device() {
        let rdev = (nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()));
        if rdev == (u64::from(dev.0), u64::from(dev.1)) {
            return Ok(());
        }
    } else if ft.is_file() {
        return Ok(());
    }
    Err(unknown())
}

/// A partition the install will destroy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverwrittenPartition {
    /// 1-based number.
    pub number: u32,
    /// GPT name (empty when unnamed or when the table is not GPT).
    pub name: String,
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entirely inside the written range (else its data past the image end survives, but
    /// the partition table that described it is replaced).
    pub fully_overwritten: bool,
}

/// What an installation would do, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallPlan {
    /// The target.
    pub target: DiskInfo,
    /// Bytes `[0, image_bytes)` of the target are overwritten; nothing after.
    pub image_bytes: u64,
    /// The image file, for file installs.
    pub image_path: Option<PathBuf>,
    /// The target's current partitions (from its GPT, else from sysfs), all of which are lost.
    pub partitions: Vec<OverwrittenPartition>,
    /// Whether the target currently has a valid GPT.
    pub has_gpt: bool,
    /// `(offset, length)` past the image that is zeroed too: the disk's last MiB, where its
    /// old backup GPT lives (left alone it would resurrect the old table).
    pub wiped_after_image: Option<(u64, u64)>,
}

/// Size of the regions at each end of a disk that hold the GPT copies (and are handled last).
pub const GPT_REGION: u64 = 1 << 20;

/// Where an install image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSpec {
    /// A file inside one of [`DiskConfig::image_dirs`].
    File(PathBuf),
    /// Streamed by the caller, with its announced length.
    Stream {
        /// Announced length in bytes.
        len: u64,
    },
}

/// An image file path resolved inside an allowed directory, with its size.
pub(crate) fn resolve_image(cfg: &DiskConfig, path: &Path) -> Result<(PathBuf, u64), Error> {
    let refused = || Error::ImageNotAllowed { path: path.to_owned() };
    if !path.is_absolute() {
        return Err(refused());
    }
    // Canonical paths: a symlink or `..` cannot lead out of the allowed directory.
    let real = std::fs::canonicalize(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::OpenImage { path: path.to_owned(), source },
        _ => refused(),
    })?;
    let allowed =
        cfg.image_dirs.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| real.starts_with(&d) && real != d);
    let meta = std::fs::metadata(&real).map_err(|source| Error::OpenImage { path: path.to_owned(), source })?;
    if !allowed || !meta.is_file() {
        return Err(refused());
    }
    if meta.len() == 0 {
        return Err(Error::ImageEmpty);
    }
    Ok((real, meta.len()))
}

/// The dry run: validates target and image exactly as the install would, and lists what
/// would be overwritten. Reads only.
pub fn plan_install(cfg: &DiskConfig, target: &str, image: &ImageSpec) -> Result<InstallPlan, Error> {
    let disk = resolve_target(cfg, target)?;
    let (image_path, image_bytes) = match image {
        ImageSpec::File(p) => {
            let (real, len) = resolve_image(cfg, p)?;
            (Some(real), len)
        }
        ImageSpec::Stream { len: 0 } => return Err(Error::ImageEmpty),
        ImageSpec::Stream { len } => (None, *len),
    };
    if image_bytes > disk.size_bytes {
        return Err(Error::TargetTooSmall { name: disk.name.clone(), need: image_bytes, have: disk.size_bytes });
    }
    let (partitions, has_gpt) = current_partitions(cfg, &disk, image_bytes)?;
    let wipe_from = disk.size_bytes.saturating_sub(GPT_REGION).max(image_bytes);
    let wiped_after_image = (wipe_from < disk.size_bytes).then(|| (wipe_from, disk.size_bytes - wipe_from));
    Ok(InstallPlan { target: disk, image_bytes, image_path, partitions, has_gpt, wiped_after_image })
}

fn current_partitions(
    cfg: &DiskConfig,
    disk: &DiskInfo,
    image_bytes: u64,
) -> Result<(Vec<OverwrittenPartition>, bool), Error> {
    let part = |number, name, start: u64, size: u64| OverwrittenPartition {
        number,
        name,
        start,
        size,
        fully_overwritten: start.saturating_add(size) <= image_bytes,
    };
    let file = gpt::open_ro(&disk.dev_path)?;
    match gpt::read_table(&file, &disk.dev_path) {
        Ok(t) => {
            let ss = t.sector_size;
            let v = t
                .entries()
                .into_iter()
                .map(|e| part(e.number, e.name, e.first_lba * ss, (e.last_lba + 1 - e.first_lba) * ss))
                .collect();
            Ok((v, true))
        }
        Err(Error::NoValidTable { .. } | Error::ReadTable { .. }) => {
            // No GPT: list what the kernel sees (an MBR layout, say).
            let index = cfg.host.block_devices()?;
            let v = index
                .iter()
                .filter(|b| b.disk == disk.name && b.partition.is_some())
                .map(|b| {
                    let n = |a: &str| read_attr(&b.sysfs_dir, a).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                    part(b.partition.unwrap_or(0), String::new(), n("start") * 512, n("size") * 512)
                })
                .collect();
            Ok((v, false))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names() {
        for good in ["sda", "nvme0n1", "loop12", "mmcblk0", "dm-0"] {
            check_disk_name(good).unwrap();
        }
        for bad in ["", ".", "..", "../sda", "sda/..", "SDA", "a b", &"x".repeat(33)] {
            assert!(matches!(check_disk_name(bad), Err(Error::InvalidDiskName { .. })), "{bad:?}");
        }
    }
}
