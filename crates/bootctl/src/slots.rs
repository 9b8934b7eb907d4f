// SPDX-License-Identifier: Apache-2.0
//! The A/B `/usr` slots on the OS disk and the update sequence over them.
//!
//! The update sequence (each step one durable GPT write unless noted):
//! 1. [`BootControl::prepare_inactive`]: inactive P0 T0 S0, verified cleared.
//! 2. [`BootControl::write_inactive`]: payload streamed into the inactive partition (bounded,
//!    SHA-256 checked, fsynced, read back), then the verified bit set.
//! 3. [`BootControl::activate_inactive`]: inactive T1 P2 (verified consumed), booted P1.
//! 4. reboot: GRUB decrements the new slot's tries and boots it.
//! 5. [`BootControl::mark_boot_successful`]: booted S1 T0. Without it, the next boot falls
//!    back to the old slot, which is still successful with priority 1.
//!
//! Every mutating step checks, on the table it is about to write, that GRUB's rule still
//! boots some slot ([`Error::NoBootableSlot`] otherwise), so no sequence of these calls can
//! leave the disk unbootable, and a power cut between steps leaves either the old or the new
//! table (see [`crate::gpt::GptTable::write_table`]).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::attrs::SlotAttrs;
use crate::error::Error;
use crate::gpt::{self, GptTable};
use crate::guid::{FLATCAR_USR_TYPE, Guid};
use crate::simulator;
use crate::stream::{self, CopyErrors, Dest, Sha256Digest};

/// One of the two `/usr` slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotId {
    /// The partition labelled `USR-A`.
    A,
    /// The partition labelled `USR-B`.
    B,
}

impl SlotId {
    /// The GPT partition name of this slot.
    pub fn label(self) -> &'static str {
        match self {
            SlotId::A => "USR-A",
            SlotId::B => "USR-B",
        }
    }

    /// The other slot.
    pub fn other(self) -> SlotId {
        match self {
            SlotId::A => SlotId::B,
            SlotId::B => SlotId::A,
        }
    }

    /// Parses `A`, `B`, `USR-A` or `USR-B` (case-insensitive).
    pub fn parse(s: &str) -> Option<SlotId> {
        match s.to_ascii_uppercase().as_str() {
            "A" | "USR-A" => Some(SlotId::A),
            "B" | "USR-B" => Some(SlotId::B),
            _ => None,
        }
    }
}

impl fmt::Display for SlotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// How the booted slot was determined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootedSource {
    /// From configuration.
    Configured,
    /// From the partition behind the running `/usr`.
    Detected,
}

/// One slot as it is on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Which slot.
    pub slot: SlotId,
    /// GPT partition name.
    pub label: String,
    /// 1-based partition number.
    pub partition_number: u32,
    /// Unique partition GUID.
    pub partition_guid: Guid,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The gptprio fields and piccolo's verified bit.
    pub attrs: SlotAttrs,
}

/// Both slots and what GRUB will do with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    /// The OS disk.
    pub disk: PathBuf,
    /// Slot A then slot B.
    pub slots: [SlotInfo; 2],
    /// The slot the running system booted from.
    pub booted: SlotId,
    /// How `booted` was determined.
    pub booted_source: BootedSource,
    /// What GRUB's gptprio rule boots next (`None`: nothing, GRUB stops).
    pub next_boot: Option<SlotId>,
    /// What it boots once `next_boot` has used up its tries without being marked successful
    /// (`next_boot` itself if that slot is successful; `None` if nothing would boot).
    pub fallback: Option<SlotId>,
}

impl BootState {
    /// The info of one slot.
    pub fn slot(&self, id: SlotId) -> &SlotInfo {
        &self.slots[id as usize]
    }
}

/// What `write_inactive` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// The slot written.
    pub slot: SlotId,
    /// Bytes written.
    pub bytes: u64,
    /// Their SHA-256, verified again by reading back from the disk.
    pub sha256: Sha256Digest,
}

/// Boot control over one OS disk (a block device or, in tests, a disk image).
#[derive(Debug, Clone)]
pub struct BootControl {
    disk: PathBuf,
    booted: SlotId,
    booted_source: BootedSource,
}

/// An open, exclusively locked disk and its slots.
struct Session {
    file: Flock<File>,
    table: GptTable,
    numbers: [u32; 2],
}

impl BootControl {
    /// Boot control of `disk` whose running system booted from `booted`.
    pub fn new(disk: impl Into<PathBuf>, booted: SlotId, booted_source: BootedSource) -> BootControl {
        BootControl { disk: disk.into(), booted, booted_source }
    }

    /// Finds the booted slot from the running `/usr` (see [`crate::host::Host::locate_usr`]):
    /// the OS disk is `disk` if given, else the disk behind `/usr`.
    pub fn from_running_system(host: &crate::host::Host, disk: Option<PathBuf>) -> Result<BootControl, Error> {
        let (disk_name, part) = host.locate_usr()?;
        let running_disk = host.dev_path(&disk_name);
        let disk = disk.unwrap_or_else(|| running_disk.clone());
        if !same_device(&disk, &running_disk) {
            return Err(Error::DetectOsDisk {
                reason: format!("the running /usr is on {}, not on {}", running_disk.display(), disk.display()),
            });
        }
        let part =
            part.ok_or_else(|| Error::DetectOsDisk { reason: format!("/usr is on the whole disk {disk_name}") })?;
        let file = gpt::open_ro(&disk)?;
        let table = gpt::read_table(&file, &disk)?;
        let numbers = find_slots(&table, &disk)?;
        let booted = match numbers.iter().position(|n| *n == part) {
            Some(0) => SlotId::A,
            Some(_) => SlotId::B,
            None => {
                return Err(Error::DetectOsDisk { reason: format!("/usr is on partition {part}, not USR-A or USR-B") });
            }
        };
        Ok(BootControl { disk, booted, booted_source: BootedSource::Detected })
    }

    /// The OS disk.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The booted slot.
    pub fn booted(&self) -> SlotId {
        self.booted
    }

    /// Both slots, the booted one, and what GRUB boots next and falls back to. Takes no lock:
    /// a read racing a table write sees either copy whole, because each copy's CRCs cover it.
    pub fn boot_state(&self) -> Result<BootState, Error> {
        let file = gpt::open_ro(&self.disk)?;
        let table = gpt::read_table(&file, &self.disk)?;
        let numbers = find_slots(&table, &self.disk)?;
        self.state_of(&table, numbers)
    }

    fn state_of(&self, table: &GptTable, numbers: [u32; 2]) -> Result<BootState, Error> {
        let info = |slot: SlotId| {
            let number = numbers[slot as usize];
            let e = table.entry(number).ok_or(Error::NoSuchPartition { number })?;
            Ok::<_, Error>(SlotInfo {
                slot,
                label: e.name.clone(),
                partition_number: number,
                partition_guid: e.guid,
                size_bytes: (e.last_lba + 1 - e.first_lba) * table.sector_size,
                attrs: SlotAttrs::from_word(e.attributes),
            })
        };
        let to_slot = |n: Option<u32>| n.and_then(|n| slot_of(numbers, n));
        let cands = simulator::candidates(table);
        Ok(BootState {
            disk: self.disk.clone(),
            slots: [info(SlotId::A)?, info(SlotId::B)?],
            booted: self.booted,
            booted_source: self.booted_source,
            next_boot: to_slot(simulator::select(&cands)),
            fallback: to_slot(simulator::fallback(&cands)),
        })
    }

    fn open(&self) -> Result<Session, Error> {
        let file = gpt::open_rw(&self.disk)?;
        let file = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
            nix::errno::Errno::EWOULDBLOCK => Error::DiskBusy { path: self.disk.clone() },
            e => Error::LockDisk { path: self.disk.clone(), source: e.into() },
        })?;
        let table = gpt::read_table(&file, &self.disk)?;
        let numbers = find_slots(&table, &self.disk)?;
        Ok(Session { file, table, numbers })
    }

    /// Writes new slot fields, refusing if GRUB would then boot nothing.
    fn commit(
        &self,
        s: &mut Session,
        operation: &'static str,
        new: &[(SlotId, SlotAttrs)],
    ) -> Result<BootState, Error> {
        for (slot, a) in new {
            let n = s.numbers[*slot as usize];
            let word = s.table.entry(n).ok_or(Error::NoSuchPartition { number: n })?.attributes;
            s.table.set_attributes(n, a.to_word(word))?;
        }
        if simulator::select(&simulator::candidates(&s.table)).is_none() {
            return Err(Error::NoBootableSlot { operation });
        }
        s.table.write_table(&s.file, &self.disk)?;
        self.state_of(&s.table, s.numbers)
    }

    fn attrs(s: &Session, slot: SlotId) -> SlotAttrs {
        s.table.entry(s.numbers[slot as usize]).map(|e| SlotAttrs::from_word(e.attributes)).unwrap_or_default()
    }

    /// Makes the inactive slot unbootable before it is written: priority 0, tries 0, not
    /// successful, not verified.
    pub fn prepare_inactive(&self) -> Result<BootState, Error> {
        let mut s = self.open()?;
        self.commit(&mut s, "PrepareInactiveSlot", &[(self.booted.other(), SlotAttrs::default())])
    }

    /// Streams exactly `expected_len` bytes from `payload` into the prepared inactive slot,
    /// checks their SHA-256 against `expected_sha256`, fsyncs, reads them back, and only then
    /// sets the slot's verified bit. Any failure leaves the slot prepared (unbootable) and
    /// unverified; the partition's contents are then undefined, nothing else is touched.
    pub fn write_inactive(
        &self,
        payload: &mut dyn Read,
        expected_len: u64,
        expected_sha256: &Sha256Digest,
    ) -> Result<WriteReport, Error> {
        let mut s = self.open()?;
        let slot = self.booted.other();
        let a = Self::attrs(&s, slot);
        if a.priority != 0 || a.tries != 0 || a.successful {
            return Err(Error::NotPrepared { slot });
        }
        let number = s.numbers[slot as usize];
        let e = s.table.entry(number).ok_or(Error::NoSuchPartition { number })?;
        let ss = s.table.sector_size;
        let capacity = (e.last_lba + 1 - e.first_lba) * ss;
        if expected_len == 0 {
            return Err(Error::PayloadEmpty);
        }
        if expected_len > capacity {
            return Err(Error::PayloadTooLarge { slot, len: expected_len, capacity });
        }
        if a.verified {
            // Invalidate the old verification durably before the first payload byte changes.
            self.commit(&mut s, "WriteInactiveSlot", &[(slot, SlotAttrs::default())])?;
        }
        let dest = Dest { file: &s.file, path: &self.disk, offset: e.first_lba * ss, len: expected_len };
        let errs = CopyErrors {
            read: |source| Error::ReadPayload { source },
            write: |p, source| Error::WritePayload { path: p.to_owned(), source },
        };
        let (digest, _) = stream::copy_exact(payload, &dest, (0, 0), &errs, &mut |_| {})?;
        if &digest != expected_sha256 {
            return Err(Error::DigestMismatch { expected: hex::encode(expected_sha256), actual: hex::encode(digest) });
        }
        if stream::hash_back(&s.file, &self.disk, dest.offset, expected_len)? != digest {
            return Err(Error::ReadBackMismatch { path: self.disk.clone(), offset: None });
        }
        self.commit(&mut s, "WriteInactiveSlot", &[(slot, SlotAttrs { verified: true, ..SlotAttrs::default() })])?;
        Ok(WriteReport { slot, bytes: expected_len, sha256: digest })
    }

    /// Makes the verified inactive slot boot next, once: tries 1, priority 2 (above the
    /// booted slot, set to 1), verified consumed. Refused unless the payload was verified and
    /// the booted slot is marked successful (so it is a fallback GRUB will take).
    pub fn activate_inactive(&self) -> Result<BootState, Error> {
        let mut s = self.open()?;
        let (new, old) = (self.booted.other(), self.booted);
        let a = Self::attrs(&s, new);
        if a.priority != 0 || a.tries != 0 || a.successful {
            return Err(Error::NotPrepared { slot: new });
        }
        if !a.verified {
            return Err(Error::NotVerified { slot: new });
        }
        let b = Self::attrs(&s, old);
        if !b.successful {
            return Err(Error::BootedNotSuccessful { slot: old });
        }
        let activated = SlotAttrs { priority: 2, tries: 1, successful: false, verified: false };
        self.commit(&mut s, "ActivateInactiveSlot", &[(new, activated), (old, SlotAttrs { priority: 1, ..b })])
    }

    /// Abandons a pending update: the inactive slot back to unbootable and unverified; the
    /// booted slot keeps its fields (priority raised to 1 if it was 0).
    pub fn cancel_update(&self) -> Result<BootState, Error> {
        let mut s = self.open()?;
        let b = Self::attrs(&s, self.booted);
        self.commit(
            &mut s,
            "CancelUpdate",
            &[
                (self.booted.other(), SlotAttrs::default()),
                (self.booted, SlotAttrs { priority: b.priority.max(1), ..b }),
            ],
        )
    }

    /// Makes the other slot boot next (priority 2, booted slot 1), keeping tries and
    /// successful. Refused unless GRUB would boot that slot (tries left or successful).
    pub fn rollback_to_other(&self) -> Result<BootState, Error> {
        let mut s = self.open()?;
        let (other, cur) = (self.booted.other(), self.booted);
        let o = Self::attrs(&s, other);
        if !o.has_boot_credit() {
            return Err(Error::WouldNotBoot { slot: other });
        }
        let b = Self::attrs(&s, cur);
        self.commit(
            &mut s,
            "RollbackToOtherSlot",
            &[(other, SlotAttrs { priority: 2, ..o }), (cur, SlotAttrs { priority: 1, ..b })],
        )
    }

    /// Marks the booted slot good: successful, tries 0 (priorities untouched, so a pending
    /// activation of the other slot stays pending).
    pub fn mark_boot_successful(&self) -> Result<BootState, Error> {
        let mut s = self.open()?;
        let b = Self::attrs(&s, self.booted);
        self.commit(&mut s, "MarkBootSuccessful", &[(self.booted, SlotAttrs { successful: true, tries: 0, ..b })])
    }
}

fn slot_of(numbers: [u32; 2], n: u32) -> Option<SlotId> {
    if n == numbers[0] {
        Some(SlotId::A)
    } else if n == numbers[1] {
        Some(SlotId::B)
    } else {
        None
    }
}

/// The partition numbers of `USR-A` and `USR-B`: exactly two Flatcar usr-type entries with
/// exactly those names, so every partition GRUB's rule could boot is a known slot.
pub fn find_slots(table: &GptTable, path: &Path) -> Result<[u32; 2], Error> {
    let usr: Vec<_> = table.entries().into_iter().filter(|e| e.type_guid == FLATCAR_USR_TYPE).collect();
    let err = |reason: String| Error::FindSlots { path: path.to_owned(), reason };
    if usr.len() != 2 {
        return Err(err(format!("{} partitions of the Flatcar usr type, expected 2", usr.len())));
    }
    let number_of = |id: SlotId| {
        usr.iter()
            .find(|e| e.name == id.label())
            .map(|e| e.number)
            .ok_or_else(|| err(format!("no usr-type partition named {}", id.label())))
    };
    Ok([number_of(SlotId::A)?, number_of(SlotId::B)?])
}

/// Whether two paths name the same file or device (by rdev for devices, inode otherwise).
fn same_device(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            if x.rdev() != 0 || y.rdev() != 0 {
                x.rdev() == y.rdev()
            } else {
                (x.dev(), x.ino()) == (y.dev(), y.ino())
            }
        }
        _ => a == b,
    }
}
