// SPDX-License-Identifier: Apache-2.0
//! A minimal GPT reader/writer: enough to read the partition entries and rewrite their
//! attribute words with both copies (primary and backup) and all four CRC32s kept right.
//!
//! Reading validates each copy (signature, header CRC, location, entry-array CRC) and uses
//! the primary when it is valid, else the backup, as GRUB and cgpt do. Writing always
//! rewrites both copies from the table in memory, which also repairs a damaged copy.
//! Only the bytes of the entry arrays and the first `header_size` bytes of each header
//! sector are written; the protective MBR and everything else are left alone.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::guid::Guid;

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// Bound on the entry array we accept (the usual one is 128 × 128 bytes = 16 KiB).
const MAX_ENTRY_ARRAY: u64 = 1 << 20;
/// Byte offset of the 64-bit attribute word inside an entry (after type, guid, start, end).
pub const ATTR_OFFSET: usize = 48;

/// One GPT entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based partition number (index in the array + 1), as `sgdisk`/`cgpt -i` count.
    pub number: u32,
    /// Partition type GUID.
    pub type_guid: Guid,
    /// Unique partition GUID (`PARTUUID`).
    pub guid: Guid,
    /// First LBA (inclusive).
    pub first_lba: u64,
    /// Last LBA (inclusive).
    pub last_lba: u64,
    /// The 64-bit attribute word.
    pub attributes: u64,
    /// Partition name (UTF-16LE, up to 36 units, NUL-terminated).
    pub name: String,
}

/// Which on-disk copy a table was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// LBA 1.
    Primary,
    /// The last LBA (or wherever the primary says).
    Backup,
}

/// A GPT read from a disk or image, with where both copies live.
#[derive(Debug, Clone)]
pub struct GptTable {
    /// Logical sector size the table was found with (512 or 4096).
    pub sector_size: u64,
    /// Size of the disk or image in bytes.
    pub disk_bytes: u64,
    /// The copy the table was read from.
    pub source: Copy,
    /// Whether the other copy was also valid and identical in its entries.
    pub copies_agree: bool,
    header: Vec<u8>,
    entries: Vec<u8>,
    entry_size: usize,
    primary_entries_lba: u64,
    backup_lba: u64,
    backup_entries_lba: u64,
}

/// CRC-32 (IEEE 802.3, reflected), as the UEFI spec requires for GPT.
pub fn crc32(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i: u32 = 0;
        while i < 256 {
            let mut c = i;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            t[i as usize] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for b in data {
        c = TABLE[((c ^ u32::from(*b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn guid_at(b: &[u8], o: usize) -> Guid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[o..o + 16]);
    Guid(a)
}

/// A validated header and its entry array.
struct Found {
    header: Vec<u8>,
    entries: Vec<u8>,
}

/// Reads and validates the header at `lba`; `None` if that copy is not valid.
fn read_copy(file: &File, path: &Path, ss: u64, disk_bytes: u64, lba: u64) -> Result<Option<Found>, Error> {
    let read = |off: u64, len: usize| -> Result<Vec<u8>, Error> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, off).map_err(|source| Error::ReadTable { path: path.to_owned(), source })?;
        Ok(buf)
    };
    if lba.checked_add(1).and_then(|e| e.checked_mul(ss)).is_none_or(|end| end > disk_bytes) {
        return Ok(None);
    }
    let sector = read(lba * ss, usize::try_from(ss).unwrap_or(512))?;
    if &sector[..8] != SIGNATURE {
        return Ok(None);
    }
    let hsize = u32_at(&sector, 12) as usize;
    if hsize < 92 || hsize as u64 > ss {
        return Ok(None);
    }
    let mut header = sector[..hsize].to_vec();
    let stored = u32_at(&header, 16);
    header[16..20].fill(0);
    if crc32(&header) != stored || u64_at(&header, 24) != lba {
        return Ok(None);
    }
    header[16..20].copy_from_slice(&stored.to_le_bytes());
    let entries_lba = u64_at(&header, 72);
    let count = u64::from(u32_at(&header, 80));
    let esize = u64::from(u32_at(&header, 84));
    let total = count * esize;
    if esize < 128 || esize % 8 != 0 || total == 0 || total > MAX_ENTRY_ARRAY {
        return Ok(None);
    }
    let Some(start) = entries_lba.checked_mul(ss) else { return Ok(None) };
    if start.checked_add(total).is_none_or(|end| end > disk_bytes) {
        return Ok(None);
    }
    // `total` ≤ 1 MiB was checked above, so it fits in usize.
    let entries = read(start, usize::try_from(total).unwrap_or(0))?;
    if crc32(&entries) != u32_at(&header, 88) {
        return Ok(None);
    }
    Ok(Some(Found { header, entries }))
}

/// Size in bytes of a file or block device (lseek to the end works for both).
pub fn device_bytes(file: &File, path: &Path) -> Result<u64, Error> {
    let mut f = file;
    f.seek(SeekFrom::End(0)).map_err(|source| Error::ReadTable { path: path.to_owned(), source })
}

/// Reads the GPT of `file` (opened at least for reading).
pub fn read_table(file: &File, path: &Path) -> Result<GptTable, Error> {
    let disk_bytes = device_bytes(file, path)?;
    for ss in [512u64, 4096] {
        if disk_bytes < ss * 4 {
            continue;
        }
        let last = disk_bytes / ss - 1;
        let primary = read_copy(file, path, ss, disk_bytes, 1)?;
        let backup_at = primary.as_ref().map_or(last, |p| u64_at(&p.header, 32));
        let backup = read_copy(file, path, ss, disk_bytes, backup_at)?;
        let (chosen, source) = match (&primary, &backup) {
            (Some(p), _) => (p, Copy::Primary),
            (None, Some(b)) => (b, Copy::Backup),
            (None, None) => continue,
        };
        let copies_agree = match (&primary, &backup) {
            (Some(p), Some(b)) => p.entries == b.entries && same_fields(&p.header, &b.header),
            _ => false,
        };
        let entries_sectors = (chosen.entries.len() as u64).div_ceil(ss);
        let primary_entries_lba = primary.as_ref().map_or(2, |p| u64_at(&p.header, 72));
        let backup_entries_lba = match &backup {
            Some(b) => u64_at(&b.header, 72),
            None => backup_at.saturating_sub(entries_sectors),
        };
        let table = GptTable {
            sector_size: ss,
            disk_bytes,
            source,
            copies_agree,
            entry_size: u32_at(&chosen.header, 84) as usize,
            header: chosen.header.clone(),
            entries: chosen.entries.clone(),
            primary_entries_lba,
            backup_lba: backup_at,
            backup_entries_lba,
        };
        table.check_layout(path)?;
        return Ok(table);
    }
    Err(Error::NoValidTable { path: path.to_owned() })
}

/// Headers agree in everything but their own location fields and CRC.
fn same_fields(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a[40..72] == b[40..72] && a[80..92] == b[80..92]
}

impl GptTable {
    /// Refuses a table whose copies would overlap the usable area (a write could clobber data).
    fn check_layout(&self, path: &Path) -> Result<(), Error> {
        let ss = self.sector_size;
        let entries_sectors = (self.entries.len() as u64).div_ceil(ss);
        let first_usable = u64_at(&self.header, 40);
        let last_usable = u64_at(&self.header, 48);
        let ok = self.primary_entries_lba >= 2
            && self.primary_entries_lba + entries_sectors <= first_usable
            && self.backup_entries_lba > last_usable
            && self.backup_entries_lba + entries_sectors <= self.backup_lba
            && (self.backup_lba + 1) * ss <= self.disk_bytes;
        if ok { Ok(()) } else { Err(Error::NoValidTable { path: path.to_owned() }) }
    }

    /// The disk GUID.
    pub fn disk_guid(&self) -> Guid {
        guid_at(&self.header, 56)
    }

    /// Number of entry slots in the array (used or not).
    pub fn entry_count(&self) -> u32 {
        u32_at(&self.header, 80)
    }

    /// First and last usable LBA.
    pub fn usable_lbas(&self) -> (u64, u64) {
        (u64_at(&self.header, 40), u64_at(&self.header, 48))
    }

    fn raw_entry(&self, number: u32) -> Option<&[u8]> {
        let i = usize::try_from(number.checked_sub(1)?).ok()?;
        self.entries.get(i * self.entry_size..(i + 1) * self.entry_size)
    }

    /// Decodes entry `number` (1-based); `None` if out of range or unused.
    pub fn entry(&self, number: u32) -> Option<Entry> {
        let e = self.raw_entry(number)?;
        let type_guid = guid_at(e, 0);
        if type_guid.is_zero() {
            return None;
        }
        let units: Vec<u16> =
            e[56..128].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|u| *u != 0).collect();
        Some(Entry {
            number,
            type_guid,
            guid: guid_at(e, 16),
            first_lba: u64_at(e, 32),
            last_lba: u64_at(e, 40),
            attributes: u64_at(e, ATTR_OFFSET),
            name: String::from_utf16_lossy(&units),
        })
    }

    /// Every used entry, in table order.
    pub fn entries(&self) -> Vec<Entry> {
        (1..=self.entry_count()).filter_map(|n| self.entry(n)).collect()
    }

    /// Replaces the attribute word of used entry `number` in memory; `write_table` makes it durable.
    pub fn set_attributes(&mut self, number: u32, attributes: u64) -> Result<(), Error> {
        let es = self.entry_size;
        if self.entry(number).is_none() {
            return Err(Error::NoSuchPartition { number });
        }
        let i = (number - 1) as usize;
        self.entries[i * es + ATTR_OFFSET..i * es + ATTR_OFFSET + 8].copy_from_slice(&attributes.to_le_bytes());
        Ok(())
    }

    fn header_for(&self, my_lba: u64, alternate: u64, entries_lba: u64) -> Vec<u8> {
        let mut h = self.header.clone();
        h[24..32].copy_from_slice(&my_lba.to_le_bytes());
        h[32..40].copy_from_slice(&alternate.to_le_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[88..92].copy_from_slice(&crc32(&self.entries).to_le_bytes());
        h[16..20].fill(0);
        let c = crc32(&h);
        h[16..20].copy_from_slice(&c.to_le_bytes());
        h
    }

    /// Writes both copies (primary first, each entries-then-header) and fsyncs after each copy.
    ///
    /// A crash mid-copy leaves that copy's CRCs wrong, so readers use the other, intact copy:
    /// the table on disk is always either the old one or the new one.
    pub fn write_table(&self, file: &File, path: &Path) -> Result<(), Error> {
        let ss = self.sector_size;
        let w = |off: u64, data: &[u8]| {
            file.write_all_at(data, off).map_err(|source| Error::WriteTable { path: path.to_owned(), source })
        };
        let sync = || file.sync_all().map_err(|source| Error::SyncDisk { path: path.to_owned(), source });
        w(self.primary_entries_lba * ss, &self.entries)?;
        w(ss, &self.header_for(1, self.backup_lba, self.primary_entries_lba))?;
        sync()?;
        w(self.backup_entries_lba * ss, &self.entries)?;
        w(self.backup_lba * ss, &self.header_for(self.backup_lba, 1, self.backup_entries_lba))?;
        sync()
    }

    /// Byte ranges holding the two tables (headers and entry arrays), for before/after comparisons.
    pub fn table_ranges(&self) -> Vec<(u64, u64)> {
        let ss = self.sector_size;
        let n = self.entries.len() as u64;
        vec![
            (ss, ss),
            (self.primary_entries_lba * ss, n),
            (self.backup_lba * ss, ss),
            (self.backup_entries_lba * ss, n),
        ]
    }
}

/// Opens `path` read-write for table updates, with a clear error.
pub fn open_rw(path: &Path) -> Result<File, Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::OpenDisk { path: PathBuf::from(path), source })
}

/// Opens `path` read-only.
pub fn open_ro(path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::OpenDisk { path: PathBuf::from(path), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_vectors() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
    }
}
