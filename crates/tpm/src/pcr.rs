// SPDX-License-Identifier: Apache-2.0
//! PCR indices, reads, and the PolicyPCR digest computed in software (so a secret can be
//! sealed to values the PCRs will have after a planned change).

use sha2::{Digest as _, Sha256};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::structures::{PcrSelectionList, PcrSelectionListBuilder, PcrSlot};

use crate::conn::Scope;
use crate::error::{Error, Result};

/// PCR indices are 0..=23 (the PC client profile's 24 PCRs).
pub const PCR_COUNT: u32 = 24;
/// Seal and enroll to PCR 7 (Secure Boot state) when the caller names none.
pub const DEFAULT_PCRS: &[u32] = &[7];

/// A PCR bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bank {
    /// SHA-256 (the default, and the only bank sealing uses).
    Sha256,
    /// SHA-1 (read only).
    Sha1,
}

impl Bank {
    /// Parses `"sha256"` (also the empty string) or `"sha1"`.
    pub fn parse(s: &str) -> Result<Bank> {
        match s {
            "" | "sha256" => Ok(Bank::Sha256),
            "sha1" => Ok(Bank::Sha1),
            other => Err(Error::InvalidArgument(format!("unknown PCR bank {:?} (sha256 or sha1)", trunc(other)))),
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Bank::Sha256 => "sha256",
            Bank::Sha1 => "sha1",
        }
    }

    fn alg(self) -> HashingAlgorithm {
        match self {
            Bank::Sha256 => HashingAlgorithm::Sha256,
            Bank::Sha1 => HashingAlgorithm::Sha1,
        }
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(32).collect()
}

/// Validates indices (each 0..=23, no duplicates, at most 24); sorts them. Empty: `default`.
pub fn indices(given: &[u32], default: &[u32]) -> Result<Vec<u32>> {
    if given.len() > PCR_COUNT as usize {
        return Err(Error::InvalidArgument(format!("at most {PCR_COUNT} PCR indices")));
    }
    let mut v = if given.is_empty() { default.to_vec() } else { given.to_vec() };
    if let Some(bad) = v.iter().find(|i| **i >= PCR_COUNT) {
        return Err(Error::InvalidArgument(format!("PCR index {bad} out of range 0..=23")));
    }
    v.sort_unstable();
    let before = v.len();
    v.dedup();
    if v.len() != before {
        return Err(Error::InvalidArgument("duplicate PCR index".into()));
    }
    Ok(v)
}

/// The 24-bit mask of `indices` (bit i = PCR i).
pub fn mask(indices: &[u32]) -> u32 {
    indices.iter().fold(0, |m, i| m | (1 << i))
}

/// The indices in a mask, ascending.
pub fn from_mask(mask: u32) -> Vec<u32> {
    (0..PCR_COUNT).filter(|i| mask & (1 << i) != 0).collect()
}

/// The TPM selection of `indices` in `bank`.
pub fn selection(bank: Bank, indices: &[u32]) -> Result<PcrSelectionList> {
    let slots = indices
        .iter()
        .map(|i| PcrSlot::try_from(1u32 << i).map_err(|_| Error::InvalidArgument(format!("PCR index {i}"))))
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new().with_selection(bank.alg(), &slots).build().map_err(Error::tpm("build PCR selection"))
}

/// Reads `indices` from `bank`, in the order given.
pub fn read(scope: &mut Scope, bank: Bank, indices: &[u32]) -> Result<Vec<(u32, Vec<u8>)>> {
    let mut out = Vec::with_capacity(indices.len());
    // One PCR per command: a TPM returns at most 8 digests per PCR_Read and may return
    // fewer than asked; one at a time keeps the pairing of index and value obvious.
    for &i in indices {
        let (_, _, digests) = scope.ctx.pcr_read(selection(bank, &[i])?).map_err(Error::tpm("PCR_Read"))?;
        let d =
            digests.value().first().ok_or(Error::Unexpected("PCR_Read returned no digest (bank not allocated?)"))?;
        out.push((i, d.value().to_vec()));
    }
    Ok(out)
}

/// The TPML_PCR_SELECTION of sha256 `mask`, as the TPM marshals it.
fn marshalled_selection(mask: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(10);
    v.extend_from_slice(&1u32.to_be_bytes()); // count
    v.extend_from_slice(&0x000bu16.to_be_bytes()); // TPM_ALG_SHA256
    v.push(3); // sizeofSelect
    v.extend_from_slice(&[(mask & 0xff) as u8, ((mask >> 8) & 0xff) as u8, ((mask >> 16) & 0xff) as u8]);
    v
}

/// The policy digest of a single `TPM2_PolicyPCR(sha256 selection, H(values))` starting
/// from an empty policy: `H(0^32 || TPM_CC_PolicyPCR || selection || H(v_1 || ... || v_n))`,
/// with the values in ascending index order (TPM 2.0 Part 3, 23.7).
pub fn policy_digest(values: &[(u32, [u8; 32])]) -> [u8; 32] {
    let mut sorted = values.to_vec();
    sorted.sort_by_key(|(i, _)| *i);
    let mut pcr_hash = Sha256::new();
    for (_, v) in &sorted {
        pcr_hash.update(v);
    }
    let indices: Vec<u32> = sorted.iter().map(|(i, _)| *i).collect();
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(0x0000_017fu32.to_be_bytes()); // TPM_CC_PolicyPCR
    h.update(marshalled_selection(mask(&indices)));
    h.update(pcr_hash.finalize());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_are_validated() {
        assert_eq!(indices(&[], DEFAULT_PCRS).unwrap(), vec![7]);
        assert_eq!(indices(&[11, 0, 7], DEFAULT_PCRS).unwrap(), vec![0, 7, 11]);
        assert!(indices(&[24], DEFAULT_PCRS).unwrap_err().to_string().contains("PCR index 24 out of range"));
        assert!(indices(&[7, 7], DEFAULT_PCRS).is_err());
        assert_eq!(from_mask(mask(&[0, 7, 23])), vec![0, 7, 23]);
        assert_eq!(marshalled_selection(mask(&[7])), vec![0, 0, 0, 1, 0, 0x0b, 3, 0x80, 0, 0]);
    }

    #[test]
    fn policy_digest_matches_systemd_for_pcr7_all_zero() {
        // systemd-cryptenroll --tpm2-pcrs=7 on a fresh swtpm (PCR 7 = 0^32) recorded
        // tpm2-policy-hash 8b5682d8...130a8b in the LUKS2 token (see tests/disk.rs).
        let d = policy_digest(&[(7, [0u8; 32])]);
        assert_eq!(hex::encode(d), "8b5682d81b29435d08d79278150611dc7e5923b2fefcce684a09577b40130a8b");
    }
}
