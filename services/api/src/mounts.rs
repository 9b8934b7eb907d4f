// SPDX-License-Identifier: Apache-2.0
//! Start-up check: will the gocryptfs mounts the broker makes under `<state dir>/mounts`
//! reach this process? The broker mounts in PID 1's mount namespace; under systemd this
//! worker has its own (`ProtectSystem=` and friends), which receives those mounts only if
//! the mount holding `mounts/` propagates (systemd makes it a slave of the host's). If it is
//! private (e.g. `MountFlags=private`), the broker reports a volume mounted while this
//! process sees the bare directory, and the control store would be created there in
//! plaintext. `tests/sd-boot/run-api.sh` boots both cases.
//!
//! Only checked when systemd started the worker (`INVOCATION_ID` set, parent PID 1): outside systemd
//! (development, tests) the worker shares the broker's namespace, where propagation does
//! not matter, and hosts without systemd often mount `/` private.

use std::path::Path;

use crate::listen::ListenError;

/// Refuses to start if systemd runs this worker and `dir` sits on a private mount.
pub fn check(dir: &Path) -> Result<(), ListenError> {
    // A system service's main process is a child of the manager (PID 1); INVOCATION_ID alone
    // is also inherited by anything a unit starts, e.g. a test run under a CI service.
    if std::env::var_os("INVOCATION_ID").is_none() || std::os::unix::process::parent_id() != 1 {
        return Ok(());
    }
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(ListenError::MountInfo)?;
    check_table(&table, dir)
}

/// [`check`] on a given mount table (`/proc/PID/mountinfo` format).
pub fn check_table(mountinfo: &str, dir: &Path) -> Result<(), ListenError> {
    let table = piccolo_mountinfo::parse(mountinfo);
    match piccolo_mountinfo::holding_mount(&table, dir) {
        Some(m) if !m.propagates => {
            Err(ListenError::MountsNotPropagated { dir: dir.to_path_buf(), mountpoint: m.mount_point.clone() })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = "/var/lib/piccolo/mounts";

    // Shapes taken from tests/sd-boot/run-api.sh: the shipped unit (slave + shared copies of
    // the ReadWritePaths= bind mount) and the same unit with MountFlags=private.
    const SHIPPED: &str = "\
321 300 0:45 / / ro,relatime shared:120 master:1 - overlay overlay rw
368 321 0:45 /var/lib/piccolo/mounts /var/lib/piccolo/mounts rw,nosuid,relatime shared:126 master:1 - overlay overlay rw
384 321 0:67 / /var/lib/piccolo/mounts/control rw,nosuid shared:133 master:132 - fuse.gocryptfs /var/lib/piccolo/ciphertext/control/data rw
";
    const PRIVATE: &str = "\
321 300 0:45 / / ro,relatime - overlay overlay rw
368 321 0:45 /var/lib/piccolo/mounts /var/lib/piccolo/mounts rw,nosuid,relatime - overlay overlay rw
";

    #[test]
    fn the_shipped_namespace_passes_a_private_one_is_refused() {
        assert!(check_table(SHIPPED, Path::new(DIR)).is_ok());
        let err = check_table(PRIVATE, Path::new(DIR)).unwrap_err();
        assert!(
            matches!(&err, ListenError::MountsNotPropagated { mountpoint, .. } if mountpoint == Path::new(DIR)),
            "{err:?}"
        );
        // Below a propagating root, but on a private bind mount of its own: refused.
        let mixed = format!(
            "{}368 321 0:45 /x /var/lib/piccolo rw - ext4 /dev/vda rw\n",
            &SHIPPED[..SHIPPED.find("368").unwrap()]
        );
        assert!(check_table(&mixed, Path::new(DIR)).is_err());
        // A path no mount covers (cannot happen with /) is left alone.
        assert!(check_table("", Path::new(DIR)).is_ok());
    }

    #[test]
    fn the_last_of_stacked_mounts_decides_and_escapes_are_decoded() {
        let stacked = format!("{SHIPPED}400 368 0:45 / /var/lib/piccolo/mounts rw - tmpfs tmpfs rw\n");
        assert!(check_table(&stacked, Path::new(DIR)).is_err(), "a private mount on top hides the shared one");
        let spaced = "1 0 0:1 / / rw - ext4 x rw\n2 1 0:2 / /srv/my\\040state rw shared:5 - ext4 y rw\n";
        assert!(check_table(spaced, Path::new("/srv/my state/mounts")).is_ok(), "escaped path, shared mount");
        assert!(check_table(spaced, Path::new("/srv/my")).is_err(), "falls back to the private root");
    }
}
