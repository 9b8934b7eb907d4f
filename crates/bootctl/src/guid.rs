// SPDX-License-Identifier: Apache-2.0
//! GPT GUIDs: the on-disk mixed-endian 16 bytes and the usual text form.

use std::fmt;
use std::str::FromStr;

/// A GUID as stored in a GPT (first three fields little-endian, the rest as bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid(pub [u8; 16]);

/// Flatcar's `/usr` partition type (`USR-A`/`USR-B`); the only type GRUB's gptprio considers.
pub const FLATCAR_USR_TYPE: Guid = Guid::from_text_const("5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6");

impl Guid {
    /// The all-zero GUID marks an unused GPT entry.
    pub const ZERO: Guid = Guid([0; 16]);

    /// Whether this is the unused-entry GUID.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` at compile time; panics (at compile time) on bad input.
    const fn from_text_const(s: &str) -> Guid {
        match parse(s.as_bytes()) {
            Some(g) => g,
            None => panic!("bad GUID literal"),
        }
    }
}

const fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Text order of the 16 bytes: the first three groups are byte-swapped on disk.
const DISK_INDEX: [usize; 16] = [3, 2, 1, 0, 5, 4, 7, 6, 8, 9, 10, 11, 12, 13, 14, 15];

const fn parse(s: &[u8]) -> Option<Guid> {
    if s.len() != 36 || s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
        return None;
    }
    let mut out = [0u8; 16];
    let mut i = 0; // position in text
    let mut n = 0; // byte number in text order
    while n < 16 {
        if s[i] == b'-' {
            i += 1;
        }
        let (Some(hi), Some(lo)) = (hex_val(s[i]), hex_val(s[i + 1])) else {
            return None;
        };
        out[DISK_INDEX[n]] = (hi << 4) | lo;
        i += 2;
        n += 1;
    }
    Some(Guid(out))
}

/// The text was not a GUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuidParseError;

impl fmt::Display for GuidParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a GUID (expected xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)")
    }
}

impl std::error::Error for GuidParseError {}

impl FromStr for Guid {
    type Err = GuidParseError;
    fn from_str(s: &str) -> Result<Guid, GuidParseError> {
        parse(s.as_bytes()).ok_or(GuidParseError)
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, idx) in DISK_INDEX.iter().enumerate() {
            if matches!(n, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{:02x}", self.0[*idx])?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_disk_order() {
        let g: Guid = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6".parse().unwrap();
        assert_eq!(g, FLATCAR_USR_TYPE);
        assert_eq!(&g.0[..4], &[0xf4, 0xf5, 0xfb, 0x5d], "first group little-endian on disk");
        assert_eq!(&g.0[8..10], &[0xaa, 0x5e], "fourth group as bytes");
        assert_eq!(g.to_string(), "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6");
        assert_eq!("5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6".parse::<Guid>().unwrap(), g);
        assert!("5dfbf5f4-2848-4bac-aa5e-0d9a20b745a".parse::<Guid>().is_err());
        assert!("5dfbf5f4x2848-4bac-aa5e-0d9a20b745a6".parse::<Guid>().is_err());
        assert!("5dfbf5f4-2848-4bac-aa5e-0d9a20b745ag".parse::<Guid>().is_err());
        assert!(Guid::ZERO.is_zero() && !g.is_zero());
    }
}
