// SPDX-License-Identifier: Apache-2.0
//! The gptprio fields of a GPT attribute word (ChromeOS cgpt / Flatcar GRUB layout).
//!
//! Bits 48–51 priority, 52–55 tries left, 56 successful (`coreos/grub`
//! `include/grub/gpt_partition.h`). Bit 57 is reserved in that layout; piccolo uses it on
//! the `/usr` partitions for "payload verified since the slot was last prepared" (see
//! [`VERIFIED_BIT`]). Every other bit is preserved untouched.

/// First bit of the 4-bit priority field.
pub const PRIORITY_SHIFT: u32 = 48;
/// First bit of the 4-bit tries-left field.
pub const TRIES_SHIFT: u32 = 52;
/// The successful bit.
pub const SUCCESSFUL_BIT: u32 = 56;
/// piccolo's "payload verified" bit on a `/usr` partition.
///
/// Why a GPT bit and not a state file: it lives in the same table write as the slot's other
/// fields, so preparing a slot clears it atomically with making the slot unbootable, and
/// activation consumes it atomically with making the slot bootable; a power cut can never
/// leave "verified" describing a different payload or disk than the one on disk. GRUB's
/// gptprio reads only bits 48–56, `cgpt add` changes only the fields it is given, and the
/// cgptlib layout marks 57–59 reserved (Bottlerocket uses 57 the same way, on another
/// partition). A state file beside the config would be a second source of truth that a
/// restored disk image or a swapped disk silently invalidates.
pub const VERIFIED_BIT: u32 = 57;

const FIELD_MASK: u64 = 0x3ff << PRIORITY_SHIFT; // bits 48..=57

/// The slot fields of one attribute word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotAttrs {
    /// 0–15; 0 never boots.
    pub priority: u8,
    /// 0–15; GRUB decrements it before booting a partition that has tries left.
    pub tries: u8,
    /// The partition has booted successfully (it boots regardless of tries).
    pub successful: bool,
    /// piccolo: the payload in this partition was written and verified since it was prepared.
    pub verified: bool,
}

impl SlotAttrs {
    /// Decodes the fields from an attribute word.
    #[allow(clippy::cast_possible_truncation)] // each value is masked to 4 bits first
    pub fn from_word(word: u64) -> SlotAttrs {
        SlotAttrs {
            priority: ((word >> PRIORITY_SHIFT) & 0xf) as u8,
            tries: ((word >> TRIES_SHIFT) & 0xf) as u8,
            successful: (word >> SUCCESSFUL_BIT) & 1 == 1,
            verified: (word >> VERIFIED_BIT) & 1 == 1,
        }
    }

    /// Encodes the fields into `word`, keeping every other bit. Values above 15 are clamped.
    pub fn to_word(self, word: u64) -> u64 {
        let p = u64::from(self.priority.min(15));
        let t = u64::from(self.tries.min(15));
        (word & !FIELD_MASK)
            | (p << PRIORITY_SHIFT)
            | (t << TRIES_SHIFT)
            | (u64::from(self.successful) << SUCCESSFUL_BIT)
            | (u64::from(self.verified) << VERIFIED_BIT)
    }

    /// GRUB's per-partition condition, before the priority comparison: `tries_left || successful`.
    pub fn has_boot_credit(self) -> bool {
        self.tries > 0 || self.successful
    }

    /// Whether GRUB could pick this partition at all: credit and priority above 0.
    pub fn can_boot(self) -> bool {
        self.has_boot_credit() && self.priority > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_cgpt_examples_in_the_notes() {
        // cgpt -A prints attrs >> 48: 0x101 is P=1 S=1, 0x12 is P=2 T=1.
        let a = SlotAttrs::from_word(0x0101_0000_0000_0000);
        assert_eq!(a, SlotAttrs { priority: 1, tries: 0, successful: true, verified: false });
        let b = SlotAttrs::from_word(0x0012_0000_0000_0000);
        assert_eq!(b, SlotAttrs { priority: 2, tries: 1, successful: false, verified: false });
        assert_eq!(b.to_word(0), 0x0012_0000_0000_0000);
    }

    #[test]
    fn keeps_other_bits() {
        let other = (1u64 << 60) | (1 << 63) | 0b111 | (1 << 58);
        let w = SlotAttrs { priority: 15, tries: 15, successful: true, verified: true }.to_word(other);
        assert_eq!(w & other, other);
        assert_eq!(SlotAttrs::from_word(w).to_word(other), w);
        assert_eq!(SlotAttrs::default().to_word(w), other);
    }

    #[test]
    fn grub_condition() {
        let s = |priority, tries, successful| SlotAttrs { priority, tries, successful, verified: false };
        assert!(!s(0, 1, true).can_boot(), "priority 0 never boots");
        assert!(!s(3, 0, false).can_boot());
        assert!(s(3, 1, false).can_boot() && s(3, 0, true).can_boot());
    }
}
