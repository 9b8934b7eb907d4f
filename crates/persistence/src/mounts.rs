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

/// Whether the mount in use at `path` (canonical) in this namespace is a FUSE mount.
pub(crate) fn is_fuse_mount_here(path: &Path) -> io::Result<bool> {
    let table = piccolo_mountinfo::read_self()?;
    Ok(piccolo_mountinfo::top_mount_on(&table, path).is_some_and(|m| m.is_fuse()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_no_fuse_mount() {
        assert!(!is_fuse_mount_here(Path::new("/")).unwrap());
        assert!(!is_fuse_mount_here(Path::new("/no/such/mount")).unwrap());
    }
}
