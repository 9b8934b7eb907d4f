// SPDX-License-Identifier: Apache-2.0
//! What the kernel says: gocryptfs mounts in `/proc/self/mountinfo` and the gocryptfs
//! processes serving them (found by their command line in `/proc/<pid>/cmdline`).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Filesystem type gocryptfs mounts show.
pub const FSTYPE: &str = "fuse.gocryptfs";

pub use piccolo_mountinfo::MountEntry;

/// Every mount on `mount_point` in this process's mount namespace (stacked mounts repeat).
pub fn mounts_on(mount_point: &Path) -> Vec<MountEntry> {
    let table = piccolo_mountinfo::read_self().unwrap_or_default();
    table.into_iter().filter(|m| m.mount_point == mount_point).collect()
}

/// A live gocryptfs process whose last two arguments are `cipher_dir mount_point`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// Its pid.
    pub pid: u32,
    /// The uid from its `-force_owner uid:gid`, if given.
    pub owner_uid: Option<u32>,
}

/// Parses a NUL-separated command line; `Some(owner)` if it is gocryptfs serving
/// `cipher_dir` on `mount_point`.
pub fn match_cmdline(cmdline: &[u8], cipher_dir: &Path, mount_point: &Path) -> Option<Option<u32>> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).collect();
    let prog = Path::new(OsStr::from_bytes(args.first()?));
    if prog.file_name()? != "gocryptfs" || args.len() < 3 {
        return None;
    }
    let n = args.len();
    if args[n - 1] != mount_point.as_os_str().as_bytes() || args[n - 2] != cipher_dir.as_os_str().as_bytes() {
        return None;
    }
    let owner = args
        .windows(2)
        .find(|w| w[0] == b"-force_owner")
        .and_then(|w| std::str::from_utf8(w[1]).ok())
        .and_then(|s| s.split(':').next())
        .and_then(|u| u.parse().ok());
    Some(owner)
}

/// The process state letter from `/proc/<pid>/stat` (after the parenthesised name).
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Live (not zombie or dead) gocryptfs processes serving `cipher_dir` on `mount_point`.
pub fn daemons(cipher_dir: &Path, mount_point: &Path) -> Vec<Daemon> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found: Vec<Daemon> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let owner_uid = match_cmdline(&cmdline, cipher_dir, mount_point)?;
            matches!(proc_state(pid), Some(s) if s != 'Z' && s != 'X').then_some(Daemon { pid, owner_uid })
        })
        .collect();
    found.sort_by_key(|d| d.pid);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdlines() {
        let c = Path::new("/s/ciphertext/x/data");
        let m = Path::new("/s/mounts/x");
        let good =
            b"/usr/bin/gocryptfs\0-fg\0-notifypid=12\0-q\0-force_owner\0998:997\0/s/ciphertext/x/data\0/s/mounts/x\0";
        assert_eq!(match_cmdline(good, c, m), Some(Some(998)));
        let no_owner = b"gocryptfs\0/s/ciphertext/x/data\0/s/mounts/x\0";
        assert_eq!(match_cmdline(no_owner, c, m), Some(None));
        assert_eq!(match_cmdline(b"gocryptfs\0/s/ciphertext/y/data\0/s/mounts/y\0", c, m), None);
        assert_eq!(match_cmdline(b"/bin/cat\0/s/ciphertext/x/data\0/s/mounts/x\0", c, m), None);
        assert_eq!(match_cmdline(b"", c, m), None);
    }

    #[test]
    fn live_process_states() {
        assert!(matches!(proc_state(std::process::id()), Some('R' | 'S')));
    }
}
