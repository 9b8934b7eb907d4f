// SPDX-License-Identifier: Apache-2.0
//! The capabilities the broker keeps, declared once. `systemd/piccolo-broker.service`'s
//! `CapabilityBoundingSet=` must list exactly these (a test checks it).

use caps::{CapSet, Capability};

/// Kept capabilities, each with the verb that needs it.
pub const KEEP: &[(Capability, &str)] = &[
    (Capability::CAP_CHOWN, "give the socket, audit log and volume mountpoints their owners"),
    (Capability::CAP_DAC_OVERRIDE, "open block devices, efivars and state files whatever their mode"),
    (Capability::CAP_FOWNER, "chmod and set inode flags on files root does not own"),
    (Capability::CAP_LINUX_IMMUTABLE, "clear and restore the immutable flag on efivarfs variables"),
    (Capability::CAP_SYS_ADMIN, "mount and unmount FUSE volumes, loop and dm devices, re-read partition tables"),
    (Capability::CAP_SYS_BOOT, "reboot(2)"),
    (
        Capability::CAP_SETUID,
        "gocryptfs (run as root with -allow_other) creates each file as the calling user: per-thread setreuid",
    ),
    (Capability::CAP_SETGID, "the same for gocryptfs's per-thread setregid and setgroups"),
];

/// Error from dropping capabilities.
#[derive(Debug, thiserror::Error)]
#[error("cannot drop capabilities ({step})")]
pub struct DropCapsError {
    step: &'static str,
    #[source]
    source: caps::errors::CapsError,
}

/// Drops every capability not in [`KEEP`] from the bounding, inheritable, permitted,
/// effective and ambient sets.
///
/// Order matters: the bounding set can only shrink while CAP_SETPCAP is still effective,
/// so it goes first; permitted/effective last, which also drops CAP_SETPCAP.
pub fn drop_to_kept() -> Result<(), DropCapsError> {
    let keep: caps::CapsHashSet = KEEP.iter().map(|(c, _)| *c).collect();
    let err = |step| move |source| DropCapsError { step, source };
    for cap in caps::all() {
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(err("bounding"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(err("inheritable"))?;
    let permitted: caps::CapsHashSet =
        keep.intersection(&caps::read(None, CapSet::Permitted).map_err(err("read permitted"))?).copied().collect();
    caps::set(None, CapSet::Effective, &permitted).map_err(err("effective"))?;
    caps::set(None, CapSet::Permitted, &permitted).map_err(err("permitted"))?;
    Ok(())
}

/// The names systemd uses, for comparing with the unit file.
pub fn kept_names() -> Vec<String> {
    KEEP.iter().map(|(c, _)| c.to_string()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_bounding_set_matches_keep() {
        let unit = include_str!("../../systemd/piccolo-broker.service");
        let line = unit
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .expect("unit has CapabilityBoundingSet=");
        let mut in_unit: Vec<&str> = line.split_whitespace().collect();
        in_unit.sort_unstable();
        let mut kept = super::kept_names();
        kept.sort();
        assert_eq!(in_unit, kept);
        let ambient =
            unit.lines().any(|l| l.starts_with("AmbientCapabilities=") && l.len() > "AmbientCapabilities=".len());
        assert!(!ambient, "the broker needs no ambient capabilities");
    }
}
