// SPDX-License-Identifier: Apache-2.0
//! `/proc/<pid>/mountinfo` (proc(5)), parsed once for everyone who asks the kernel what is
//! mounted: the broker's volume code (is a gocryptfs mount on `mounts/<id>`?), the
//! persistence owner (is the broker's mount visible in *my* namespace?) and the API worker's
//! start-up check (does `mounts/` receive mounts from the host?).
//!
//! **Owns:** the line format and its octal escapes. **Must never:** touch the file system
//! beyond reading the table; decide policy (callers do).

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One mount: `id parent maj:min root mount_point opts [optional...] - fstype source superopts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point (unescaped).
    pub mount_point: PathBuf,
    /// File system type, e.g. `fuse.gocryptfs`.
    pub fstype: String,
    /// Mount source (unescaped; for gocryptfs the ciphertext dir).
    pub source: String,
    /// Whether it receives mounts made elsewhere: a `shared:` or `master:` optional field.
    pub propagates: bool,
}

impl MountEntry {
    /// A FUSE mount (`fuse` or `fuse.*`).
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype.starts_with("fuse.")
    }
}

/// Parses mountinfo text; lines that do not have the shape are skipped. Order is kept: of
/// several mounts on one point, the later is on top.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mut pre = pre.split(' ');
            let mount_point = pre.nth(4)?;
            let propagates = pre.skip(1).any(|f| f.starts_with("shared:") || f.starts_with("master:"));
            let mut post = post.split(' ');
            let fstype = post.next()?.to_owned();
            let source = String::from_utf8_lossy(&unescape(post.next().unwrap_or(""))).into_owned();
            let mount_point = PathBuf::from(OsStr::from_bytes(&unescape(mount_point)));
            Some(MountEntry { mount_point, fstype, source, propagates })
        })
        .collect()
}

/// This process's mount table.
pub fn read_self() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount in use at `mount_point` (the last one stacked there), if any.
pub fn top_mount_on<'a>(table: &'a [MountEntry], mount_point: &Path) -> Option<&'a MountEntry> {
    table.iter().rev().find(|m| m.mount_point == mount_point)
}

/// The mount `path` resolves to: the deepest mount point above it, the last of several there.
pub fn holding_mount<'a>(table: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    let mut best: Option<&MountEntry> = None;
    for m in table.iter().filter(|m| path.starts_with(&m.mount_point)) {
        if best.is_none_or(|b| m.mount_point.components().count() >= b.mount_point.components().count()) {
            best = Some(m);
        }
    }
    best
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c))) {
            Some(d) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 22 0:40 / /var/lib/piccolo/mounts/app-a rw,nosuid,nodev,relatime - fuse.gocryptfs /var/lib/piccolo/ciphertext/app-a/data rw,user_id=0
46 22 0:41 / /tmp/a\\040b rw master:3 - fuse.gocryptfs /tmp/c\\134d rw
47 22 253:0 /x /var/lib/piccolo/mounts/app-b rw - ext4 /dev/vda rw
garbage
";

    #[test]
    fn fields_escapes_and_propagation() {
        let m = parse(TABLE);
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].mount_point, Path::new("/var/lib/piccolo/mounts/app-a"));
        assert_eq!(m[1].fstype, "fuse.gocryptfs");
        assert_eq!(m[1].source, "/var/lib/piccolo/ciphertext/app-a/data");
        assert!(m[1].is_fuse() && !m[1].propagates);
        assert_eq!(m[2].mount_point, Path::new("/tmp/a b"));
        assert_eq!(m[2].source, "/tmp/c\\d");
        assert!(m[0].propagates && m[2].propagates);
        assert!(!m[3].is_fuse());
    }

    #[test]
    fn top_and_holding_mounts() {
        let over = format!("{TABLE}48 45 0:9 / /var/lib/piccolo/mounts/app-a rw - tmpfs tmpfs rw\n");
        let m = parse(&over);
        assert_eq!(top_mount_on(&m, Path::new("/var/lib/piccolo/mounts/app-a")).unwrap().fstype, "tmpfs");
        assert!(top_mount_on(&m, Path::new("/var/lib/piccolo/mounts")).is_none());
        let h = holding_mount(&m, Path::new("/var/lib/piccolo/mounts/app-b/data")).unwrap();
        assert_eq!(h.mount_point, Path::new("/var/lib/piccolo/mounts/app-b"));
        assert_eq!(holding_mount(&m, Path::new("/srv")).unwrap().mount_point, Path::new("/"));
        assert!(holding_mount(&m, Path::new("relative")).is_none());
    }

    #[test]
    fn reads_this_process_table() {
        let m = read_self().unwrap();
        assert!(holding_mount(&m, Path::new("/proc/self")).is_some());
    }
}
