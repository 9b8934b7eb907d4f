// SPDX-License-Identifier: Apache-2.0
//! The recovery key: 128 bits from the OS RNG plus a 32-bit checksum, written as 32 symbols of
//! Crockford base32 in eight groups of four (`7K3Q-...`).
//!
//! Each symbol is exactly 5 bits of the 160-bit string, so every symbol is uniform over the
//! 32-letter alphabet: there is no modulo reduction and no bias. Parsing forgives case, spaces,
//! dashes and the look-alikes `O`->`0`, `I`/`L`->`1`; any other deviation, a wrong length or a
//! checksum mismatch is reported as mistyped, which is distinct from a well-formed but wrong key.

use std::fmt;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::secret::fill_random;

/// Random bytes in a recovery key.
pub const RECOVERY_ENTROPY_BYTES: usize = 16;
const CHECKSUM_BYTES: usize = 4;
const RAW_BYTES: usize = RECOVERY_ENTROPY_BYTES + CHECKSUM_BYTES;
/// Symbols in a recovery key (160 bits / 5).
pub const RECOVERY_SYMBOLS: usize = RAW_BYTES * 8 / 5;
const GROUP: usize = 4;
/// Crockford's base32 alphabet: digits and letters without I, L, O, U.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Longest input `parse` looks at; more is mistyped without further work.
const MAX_INPUT_BYTES: usize = 128;

/// A recovery key. Shown to the admin once, at generation; only its wrap is stored.
pub struct RecoveryKey {
    entropy: Zeroizing<[u8; RECOVERY_ENTROPY_BYTES]>,
    text: Zeroizing<String>,
}

impl RecoveryKey {
    /// Draws a new recovery key from the OS random number generator.
    pub(crate) fn generate() -> Result<RecoveryKey> {
        let mut entropy = Zeroizing::new([0u8; RECOVERY_ENTROPY_BYTES]);
        fill_random(&mut entropy[..])?;
        Ok(RecoveryKey::from_entropy(entropy))
    }

    fn from_entropy(entropy: Zeroizing<[u8; RECOVERY_ENTROPY_BYTES]>) -> RecoveryKey {
        let mut raw = Zeroizing::new([0u8; RAW_BYTES]);
        raw[..RECOVERY_ENTROPY_BYTES].copy_from_slice(&entropy[..]);
        raw[RECOVERY_ENTROPY_BYTES..].copy_from_slice(&checksum(&entropy[..]));
        let mut text = Zeroizing::new(String::with_capacity(RECOVERY_SYMBOLS + RECOVERY_SYMBOLS / GROUP));
        for i in 0..RECOVERY_SYMBOLS {
            if i > 0 && i % GROUP == 0 {
                text.push('-');
            }
            text.push(char::from(ALPHABET[usize::from(symbol_at(&raw, i))]));
        }
        RecoveryKey { entropy, text }
    }

    /// Parses a typed recovery key. A wrong length, a character outside the alphabet or a
    /// checksum mismatch is [`Error::RecoveryKeyMistyped`].
    pub fn parse(input: &str) -> Result<RecoveryKey> {
        if input.len() > MAX_INPUT_BYTES {
            return Err(Error::RecoveryKeyMistyped { reason: "too long" });
        }
        let mut raw = Zeroizing::new([0u8; RAW_BYTES]);
        let mut n = 0usize;
        for c in input.chars() {
            if c == '-' || c.is_whitespace() {
                continue;
            }
            let value = decode_symbol(c)
                .ok_or(Error::RecoveryKeyMistyped { reason: "character outside the recovery-key alphabet" })?;
            if n >= RECOVERY_SYMBOLS {
                return Err(Error::RecoveryKeyMistyped { reason: "too many characters" });
            }
            set_symbol(&mut raw, n, value);
            n += 1;
        }
        if n != RECOVERY_SYMBOLS {
            return Err(Error::RecoveryKeyMistyped { reason: "too few characters" });
        }
        let mut entropy = Zeroizing::new([0u8; RECOVERY_ENTROPY_BYTES]);
        entropy.copy_from_slice(&raw[..RECOVERY_ENTROPY_BYTES]);
        if checksum(&entropy[..])[..] != raw[RECOVERY_ENTROPY_BYTES..] {
            return Err(Error::RecoveryKeyMistyped { reason: "checksum mismatch" });
        }
        Ok(RecoveryKey::from_entropy(entropy))
    }

    /// The key as the admin must write it down. Show it once; never log or store it.
    pub fn expose_secret(&self) -> &str {
        &self.text
    }

    pub(crate) fn entropy(&self) -> &[u8] {
        &self.entropy[..]
    }
}

impl fmt::Debug for RecoveryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecoveryKey(<redacted>)")
    }
}

fn checksum(entropy: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let digest = Sha256::new().chain_update(b"piccolo-keyset v1 recovery-checksum\0").chain_update(entropy).finalize();
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&digest[..CHECKSUM_BYTES]);
    out
}

/// The 5-bit symbol `i` of `raw`, most significant bit first.
fn symbol_at(raw: &[u8; RAW_BYTES], i: usize) -> u8 {
    let mut v = 0u8;
    for bit in i * 5..i * 5 + 5 {
        v = (v << 1) | ((raw[bit / 8] >> (7 - bit % 8)) & 1);
    }
    v
}

fn set_symbol(raw: &mut [u8; RAW_BYTES], i: usize, value: u8) {
    for (k, bit) in (i * 5..i * 5 + 5).enumerate() {
        if (value >> (4 - k)) & 1 == 1 {
            raw[bit / 8] |= 1 << (7 - bit % 8);
        }
    }
}

fn decode_symbol(c: char) -> Option<u8> {
    let c = match c.to_ascii_uppercase() {
        'O' => '0',
        'I' | 'L' => '1',
        other => other,
    };
    let pos = ALPHABET.iter().position(|&a| char::from(a) == c)?;
    // pos < 32 by construction of ALPHABET.
    u8::try_from(pos).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_shape() {
        let key = RecoveryKey::generate().unwrap();
        let text = key.expose_secret();
        assert_eq!(text.len(), RECOVERY_SYMBOLS + RECOVERY_SYMBOLS / GROUP - 1);
        assert_eq!(text.split('-').count(), RECOVERY_SYMBOLS / GROUP);
        let parsed = RecoveryKey::parse(text).unwrap();
        assert_eq!(parsed.entropy(), key.entropy());
        // Forgiving input: lower case, spaces instead of dashes.
        let sloppy = text.to_ascii_lowercase().replace('-', " ");
        assert_eq!(RecoveryKey::parse(&sloppy).unwrap().entropy(), key.entropy());
    }

    #[test]
    fn lookalikes_map_to_digits() {
        let key = RecoveryKey::from_entropy(Zeroizing::new([0u8; RECOVERY_ENTROPY_BYTES]));
        let text = key.expose_secret().to_string();
        assert!(text.starts_with("0000"), "{text}");
        let with_o = text.replacen("0000", "oOoO", 1);
        assert_eq!(RecoveryKey::parse(&with_o).unwrap().entropy(), key.entropy());
    }

    #[test]
    fn every_single_symbol_substitution_is_mistyped() {
        let key = RecoveryKey::generate().unwrap();
        let symbols: Vec<char> = key.expose_secret().chars().filter(|c| *c != '-').collect();
        for i in 0..symbols.len() {
            for &alt in ALPHABET.iter() {
                let alt = char::from(alt);
                if alt == symbols[i] {
                    continue;
                }
                let mut typo = symbols.clone();
                typo[i] = alt;
                let typo: String = typo.into_iter().collect();
                assert!(
                    matches!(RecoveryKey::parse(&typo), Err(Error::RecoveryKeyMistyped { .. })),
                    "substitution at {i} not caught"
                );
            }
        }
    }

    #[test]
    fn malformed_inputs_are_mistyped() {
        let key = RecoveryKey::generate().unwrap();
        let text = key.expose_secret();
        for bad in [
            &text[..text.len() - 1],
            &format!("{text}0"),
            &text.replacen(|c: char| c.is_ascii_alphanumeric(), "U", 1),
            "",
            &"A".repeat(500),
        ] {
            assert!(matches!(RecoveryKey::parse(bad), Err(Error::RecoveryKeyMistyped { .. })), "{bad:?}");
        }
    }

    #[test]
    fn symbols_are_uniform_enough() {
        // 2000 keys x 25 entropy-only symbols: each of 32 symbols expected ~1560 times.
        let mut counts = [0u32; 32];
        for _ in 0..2000 {
            let key = RecoveryKey::generate().unwrap();
            for c in key.expose_secret().chars().filter(|c| *c != '-').take(25) {
                counts[usize::from(decode_symbol(c).unwrap())] += 1;
            }
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 1300 && *max < 1900, "{counts:?}");
    }
}
