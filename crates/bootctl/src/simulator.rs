// SPDX-License-Identifier: Apache-2.0
//! GRUB's `gptprio.next` (`coreos/grub grub-core/commands/gptprio.c`), exactly:
//!
//! - only partitions of the Flatcar `/usr` type are considered, in table order;
//! - a partition is chosen iff `(tries_left || successful) && priority > best`, with `best`
//!   starting at 0, so priority 0 never boots and the first of equal priorities wins;
//! - if the chosen partition has tries left, they are decremented and the GPT (both copies,
//!   CRCs updated) is written **before** booting.
//!
//! [`select`] and [`fallback`] are pure and used by [`crate::slots`] to report what GRUB
//! will do; [`boot_image`] performs one simulated boot on a real disk image for tests.

use std::path::Path;

use crate::attrs::SlotAttrs;
use crate::error::Error;
use crate::gpt;
use crate::guid::{FLATCAR_USR_TYPE, Guid};

/// The partition number GRUB would boot from these `(number, type, attributes)` entries.
pub fn select(parts: &[(u32, Guid, SlotAttrs)]) -> Option<u32> {
    let mut best: u8 = 0;
    let mut chosen = None;
    for (number, type_guid, a) in parts {
        if *type_guid == FLATCAR_USR_TYPE && a.has_boot_credit() && a.priority > best {
            best = a.priority;
            chosen = Some(*number);
        }
    }
    chosen
}

/// What GRUB boots once the partition it would boot next has used up its tries in failed
/// (never marked successful) boots. A successful partition keeps booting: then it is itself.
pub fn fallback(parts: &[(u32, Guid, SlotAttrs)]) -> Option<u32> {
    let next = select(parts)?;
    let spent: Vec<_> =
        parts.iter().map(|(n, t, a)| (*n, *t, if *n == next { SlotAttrs { tries: 0, ..*a } } else { *a })).collect();
    select(&spent)
}

/// The `(number, type, attributes)` view of a table's used entries.
pub fn candidates(table: &gpt::GptTable) -> Vec<(u32, Guid, SlotAttrs)> {
    table.entries().into_iter().map(|e| (e.number, e.type_guid, SlotAttrs::from_word(e.attributes))).collect()
}

/// One simulated boot of a disk image: select, decrement tries and write the GPT, as GRUB
/// does before handing over. Returns the booted entry, or `None` when nothing is bootable
/// (GRUB stops with "no such partition" and the table is not written).
pub fn boot_image(path: &Path) -> Result<Option<gpt::Entry>, Error> {
    let file = gpt::open_rw(path)?;
    let mut table = gpt::read_table(&file, path)?;
    let Some(number) = select(&candidates(&table)) else {
        return Ok(None);
    };
    let entry = table.entry(number).ok_or(Error::NoSuchPartition { number })?;
    let a = SlotAttrs::from_word(entry.attributes);
    if a.tries > 0 {
        let word = SlotAttrs { tries: a.tries - 1, ..a }.to_word(entry.attributes);
        table.set_attributes(number, word)?;
        table.write_table(&file, path)?;
    }
    Ok(table.entry(number))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(priority: u8, tries: u8, successful: bool) -> SlotAttrs {
        SlotAttrs { priority, tries, successful, verified: false }
    }

    fn usr(n: u32, a: SlotAttrs) -> (u32, Guid, SlotAttrs) {
        (n, FLATCAR_USR_TYPE, a)
    }

    #[test]
    fn grub_rule() {
        // Priority 0 never boots, even when successful.
        assert_eq!(select(&[usr(3, s(0, 0, true)), usr(4, s(0, 5, false))]), None);
        // No credit: not chosen, whatever the priority.
        assert_eq!(select(&[usr(3, s(1, 0, true)), usr(4, s(9, 0, false))]), Some(3));
        // Highest priority wins; ties go to the first in table order.
        assert_eq!(select(&[usr(3, s(1, 0, true)), usr(4, s(2, 1, false))]), Some(4));
        assert_eq!(select(&[usr(3, s(2, 0, true)), usr(4, s(2, 1, false))]), Some(3));
        assert_eq!(select(&[usr(4, s(2, 1, false)), usr(3, s(2, 0, true))]), Some(4));
        // Other partition types are ignored.
        let other: Guid = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b".parse().unwrap();
        assert_eq!(select(&[(1, other, s(15, 15, true)), usr(3, s(1, 0, true))]), Some(3));
    }

    #[test]
    fn fallback_rule() {
        // Fresh update: B boots next with one try, then A.
        assert_eq!(fallback(&[usr(3, s(1, 0, true)), usr(4, s(2, 1, false))]), Some(3));
        // A successful partition keeps booting.
        assert_eq!(fallback(&[usr(3, s(1, 0, true)), usr(4, s(2, 0, true))]), Some(4));
        // Nothing else bootable.
        assert_eq!(fallback(&[usr(3, s(0, 0, false)), usr(4, s(2, 1, false))]), None);
    }
}
