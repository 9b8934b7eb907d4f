// SPDX-License-Identifier: Apache-2.0
//! The efivarfs file format: a little-endian `u32` attribute word followed by the data.
//!
//! The kernel takes the whole variable in one `write()` and refuses fewer than 4 bytes or
//! attribute bits outside `EFI_VARIABLE_MASK` with `EINVAL`; [`encode`] refuses the same
//! (and RUNTIME without BOOTSERVICE, UEFI 2.10 §8.2.3) before anything is opened.

use std::fmt;

use crate::Error;

/// Largest variable data accepted for writing and returned by reads, in bytes.
pub const MAX_DATA_BYTES: usize = 64 << 10;

/// The attribute word of a variable.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Attributes(pub u32);

impl Attributes {
    /// `EFI_VARIABLE_NON_VOLATILE`.
    pub const NON_VOLATILE: u32 = 0x1;
    /// `EFI_VARIABLE_BOOTSERVICE_ACCESS`.
    pub const BOOTSERVICE_ACCESS: u32 = 0x2;
    /// `EFI_VARIABLE_RUNTIME_ACCESS`.
    pub const RUNTIME_ACCESS: u32 = 0x4;
    /// `EFI_VARIABLE_HARDWARE_ERROR_RECORD`.
    pub const HARDWARE_ERROR_RECORD: u32 = 0x8;
    /// `EFI_VARIABLE_AUTHENTICATED_WRITE_ACCESS`.
    pub const AUTHENTICATED_WRITE_ACCESS: u32 = 0x10;
    /// `EFI_VARIABLE_TIME_BASED_AUTHENTICATED_WRITE_ACCESS`.
    pub const TIME_BASED_AUTHENTICATED_WRITE_ACCESS: u32 = 0x20;
    /// `EFI_VARIABLE_APPEND_WRITE`.
    pub const APPEND_WRITE: u32 = 0x40;
    /// `EFI_VARIABLE_ENHANCED_AUTHENTICATED_ACCESS` (reported by firmware; the kernel's
    /// write mask does not include it).
    pub const ENHANCED_AUTHENTICATED_ACCESS: u32 = 0x80;
    /// The kernel's `EFI_VARIABLE_MASK`: the bits a write may carry.
    pub const WRITE_MASK: u32 = 0x7f;
    /// NV|BS|RT, what boot variables (`BootNext`, `BootOrder`, `LoaderEntry*`) use.
    pub const BOOT_VARIABLE: Attributes = Attributes(0x7);

    /// Whether every bit of `bits` is set.
    pub fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }

    /// Checks the word is one a write may carry: only bits in [`Self::WRITE_MASK`], and
    /// RUNTIME_ACCESS only together with BOOTSERVICE_ACCESS.
    pub fn check_writable(self) -> Result<(), Error> {
        if self.0 & !Self::WRITE_MASK != 0 {
            return Err(Error::InvalidAttributes { attributes: self.0, reason: "bits outside EFI_VARIABLE_MASK" });
        }
        if self.has(Self::RUNTIME_ACCESS) && !self.has(Self::BOOTSERVICE_ACCESS) {
            return Err(Error::InvalidAttributes {
                attributes: self.0,
                reason: "RUNTIME_ACCESS requires BOOTSERVICE_ACCESS",
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Attributes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Attributes({:#x})", self.0)
    }
}

/// A variable's content: attributes and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// The attribute word.
    pub attributes: Attributes,
    /// The data after the attribute word.
    pub data: Vec<u8>,
}

/// The bytes of one efivarfs write: attributes (LE) ‖ data. Refuses what the kernel would
/// (see [`Attributes::check_writable`]), empty data (a zero-length write deletes a variable:
/// deleting is [`crate::Efivars::delete`]'s job) and data over [`MAX_DATA_BYTES`].
pub fn encode(attributes: Attributes, data: &[u8]) -> Result<Vec<u8>, Error> {
    attributes.check_writable()?;
    if data.is_empty() {
        return Err(Error::EmptyData);
    }
    if data.len() > MAX_DATA_BYTES {
        return Err(Error::DataTooLarge { len: data.len(), max: MAX_DATA_BYTES });
    }
    let mut buf = Vec::with_capacity(4 + data.len());
    buf.extend_from_slice(&attributes.0.to_le_bytes());
    buf.extend_from_slice(data);
    Ok(buf)
}

/// Splits a file's content into attributes and data; fewer than 4 bytes is malformed.
/// Any attribute word is accepted (firmware reports bits a write may not set).
pub fn decode(bytes: &[u8]) -> Result<Variable, Error> {
    match bytes.split_first_chunk::<4>() {
        Some((attrs, data)) => Ok(Variable { attributes: Attributes(u32::from_le_bytes(*attrs)), data: data.to_vec() }),
        None => Err(Error::Malformed { len: bytes.len() }),
    }
}

/// `BootNext`, `BootCurrent` and one `Boot####` number: a little-endian `u16`.
pub fn encode_u16(v: u16) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// Decodes a `u16` variable; anything but exactly 2 bytes is malformed.
pub fn decode_u16(data: &[u8]) -> Result<u16, Error> {
    let b: [u8; 2] = data.try_into().map_err(|_| Error::MalformedValue { kind: "u16", len: data.len() })?;
    Ok(u16::from_le_bytes(b))
}

/// `BootOrder`: little-endian `u16`s, no header.
pub fn encode_u16_list(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|n| n.to_le_bytes()).collect()
}

/// Decodes a `u16` list; an odd length is malformed.
pub fn decode_u16_list(data: &[u8]) -> Result<Vec<u16>, Error> {
    if !data.len().is_multiple_of(2) {
        return Err(Error::MalformedValue { kind: "u16 list", len: data.len() });
    }
    Ok(data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
}

/// systemd-boot's string variables (`LoaderEntryOneShot`, ...): UTF-16LE with a NUL.
/// A string containing NUL is refused (the reader would cut it there).
pub fn encode_utf16(s: &str) -> Result<Vec<u8>, Error> {
    if s.contains('\0') {
        return Err(Error::MalformedValue { kind: "UTF-16 string (contains NUL)", len: s.len() });
    }
    Ok(s.encode_utf16().chain(std::iter::once(0)).flat_map(|u| u.to_le_bytes()).collect())
}

/// Decodes UTF-16LE up to the first NUL; an odd length, a missing NUL, data after the NUL
/// or invalid UTF-16 is malformed.
pub fn decode_utf16(data: &[u8]) -> Result<String, Error> {
    let bad = || Error::MalformedValue { kind: "NUL-terminated UTF-16LE string", len: data.len() };
    let units = decode_u16_list(data).map_err(|_| bad())?;
    let nul = units.iter().position(|u| *u == 0).ok_or_else(bad)?;
    if nul + 1 != units.len() {
        return Err(bad());
    }
    String::from_utf16(&units[..nul]).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_bytes() {
        let v = encode(Attributes::BOOT_VARIABLE, &encode_u16(0x0102)).unwrap();
        assert_eq!(v, [7, 0, 0, 0, 0x02, 0x01]);
        assert_eq!(encode_u16_list(&[1, 0x20]), [1, 0, 0x20, 0]);
        assert_eq!(encode_utf16("ab").unwrap(), [b'a', 0, b'b', 0, 0, 0]);
        assert_eq!(decode_utf16(&[b'a', 0, 0, 0]).unwrap(), "a");
        assert_eq!(
            decode(&[0x07, 0, 0, 0x80]).unwrap(),
            Variable { attributes: Attributes(0x8000_0007), data: vec![] }
        );
    }

    #[test]
    fn malformed() {
        for n in 0..4 {
            assert!(matches!(decode(&vec![7; n]), Err(Error::Malformed { len }) if len == n));
        }
        assert!(decode_u16(&[1]).is_err() && decode_u16(&[1, 2, 3]).is_err());
        assert!(decode_u16_list(&[1, 2, 3]).is_err());
        assert!(decode_utf16(&[b'a', 0]).is_err(), "no NUL");
        assert!(decode_utf16(&[b'a', 0, 0]).is_err(), "odd length");
        assert!(decode_utf16(&[0, 0, b'a', 0]).is_err(), "data after the NUL");
        assert!(decode_utf16(&[0x00, 0xd8, 0, 0]).is_err(), "lone surrogate");
        assert!(encode_utf16("a\0b").is_err());
    }

    #[test]
    fn attribute_rules() {
        for ok in [0x1, 0x2, 0x3, 0x6, 0x7, 0x27, 0x47, 0x7f] {
            assert!(Attributes(ok).check_writable().is_ok(), "{ok:#x}");
        }
        for bad in [0x4, 0x5, 0x80, 0x87, 0x100, 0x8000_0007] {
            assert!(matches!(encode(Attributes(bad), b"x"), Err(Error::InvalidAttributes { .. })), "{bad:#x}");
        }
        assert!(matches!(encode(Attributes::BOOT_VARIABLE, b""), Err(Error::EmptyData)));
        assert!(encode(Attributes::BOOT_VARIABLE, &vec![0; MAX_DATA_BYTES]).is_ok());
        assert!(matches!(
            encode(Attributes::BOOT_VARIABLE, &vec![0; MAX_DATA_BYTES + 1]),
            Err(Error::DataTooLarge { len, max: MAX_DATA_BYTES }) if len == MAX_DATA_BYTES + 1
        ));
    }

    fn writable_attrs() -> impl Strategy<Value = Attributes> {
        (0u32..=0x7f).prop_filter("RT needs BS", |a| a & 0x4 == 0 || a & 0x2 != 0).prop_map(Attributes)
    }

    proptest! {
        #[test]
        fn variable_round_trip(a in writable_attrs(), data in proptest::collection::vec(any::<u8>(), 1..512)) {
            let bytes = encode(a, &data).unwrap();
            prop_assert_eq!(bytes.len(), data.len() + 4);
            prop_assert_eq!(decode(&bytes).unwrap(), Variable { attributes: a, data });
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match decode(&bytes) {
                Ok(v) => {
                    prop_assert!(bytes.len() >= 4);
                    prop_assert_eq!(&v.data[..], &bytes[4..]);
                    prop_assert_eq!(v.attributes.0.to_le_bytes(), [bytes[0], bytes[1], bytes[2], bytes[3]]);
                }
                Err(_) => prop_assert!(bytes.len() < 4),
            }
            let _ = decode_utf16(&bytes);
            let _ = decode_u16_list(&bytes);
        }

        #[test]
        fn u16_round_trip(v in any::<u16>()) {
            prop_assert_eq!(decode_u16(&encode_u16(v)).unwrap(), v);
        }

        #[test]
        fn boot_order_round_trip(v in proptest::collection::vec(any::<u16>(), 0..64)) {
            prop_assert_eq!(decode_u16_list(&encode_u16_list(&v)).unwrap(), v);
        }

        #[test]
        fn utf16_round_trip(s in "[^\u{0}]{0,64}") {
            let bytes = encode_utf16(&s).unwrap();
            prop_assert_eq!(&bytes[bytes.len() - 2..], &[0, 0]);
            prop_assert_eq!(decode_utf16(&bytes).unwrap(), s);
        }
    }
}
