// SPDX-License-Identifier: Apache-2.0
//! Whether a volume's mount is visible in *this* process's mount namespace.
//!
//! The broker mounts in its own namespace and says where. The worker runs in a sandboxed
//! unit with its own namespace (a slave of the host's, so mounts propagate), and a broken
//! propagation would leave it looking at the bare `mounts/<id>` directory on the state file
//! system: opening the store there would write the control database in plaintext. So every
//! mount the broker reports is checked here before anything is written through it.

use std::io;
use std::path::Path;

/// Whether `/proc/self/mountinfo` has a FUSE mount (`fuse` or `fuse.*`) whose mount point is
/// `path` (compared canonicalised; the caller passes the canonical expected path).
pub(crate) fn is_fuse_mount_here(path: &Path) -> io::Result<bool> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(fuse_mount_in(&table, path))
}

fn fuse_mount_in(table: &str, path: &Path) -> bool {
    let want = path.to_string_lossy();
    // Later lines are later mounts: the last mount on a point is the one in use.
    table.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let mount_point = unescape(fields.nth(4)?);
        if mount_point != want {
            return None;
        }
        // Optional fields end at "-"; the file system type follows.
        let fstype = fields.skip_while(|f| *f != "-").nth(1)?;
        Some(fstype == "fuse" || fstype.starts_with("fuse."))
    }) == Some(true)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 0:50 / /var/lib/piccolo/mounts/control rw,nosuid,nodev,relatime shared:40 - fuse.gocryptfs /var/lib/piccolo/ciphertext/control/data rw,user_id=0,group_id=0
91 22 0:51 / /srv/with\\040space rw,relatime - fuse.gocryptfs x rw
92 22 253:0 /x /var/lib/piccolo/mounts/app-a rw - ext4 /dev/vda rw
";

    #[test]
    fn finds_fuse_mounts_and_nothing_else() {
        assert!(fuse_mount_in(TABLE, Path::new("/var/lib/piccolo/mounts/control")));
        assert!(fuse_mount_in(TABLE, Path::new("/srv/with space")));
        assert!(!fuse_mount_in(TABLE, Path::new("/var/lib/piccolo/mounts/app-a")), "a bind mount of ext4");
        assert!(!fuse_mount_in(TABLE, Path::new("/var/lib/piccolo/mounts/app-b")), "not mounted");
        assert!(!fuse_mount_in(TABLE, Path::new("/")));
        assert!(!fuse_mount_in(TABLE, Path::new("/var/lib/piccolo/mounts")));
    }

    #[test]
    fn the_last_mount_on_a_point_wins() {
        let over = format!("{TABLE}93 90 253:0 / /var/lib/piccolo/mounts/control rw - tmpfs tmpfs rw\n");
        assert!(!fuse_mount_in(&over, Path::new("/var/lib/piccolo/mounts/control")));
    }

    #[test]
    fn reads_this_process_table() {
        assert!(!is_fuse_mount_here(Path::new("/")).unwrap());
    }
}
