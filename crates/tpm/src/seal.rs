// SPDX-License-Identifier: Apache-2.0
//! PCR-sealed secrets: a KeyedHash object under the owner hierarchy's storage key whose only
//! authorisation is a PolicyPCR over sha256 PCRs, and the versioned blob that carries it.
//!
//! Blob v1 (big-endian), at most [`MAX_BLOB`] bytes:
//! `"PCSB" | version=1 | bank=1 (sha256) | pcr mask (u32) | len | TPMT_PUBLIC | len |
//! TPM2B_PRIVATE contents | SHA-256 of everything before`.
//! The checksum only catches corruption; the TPM's integrity check on load is what
//! rejects blobs made elsewhere.

use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::SessionType;
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::handles::{KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::PolicySession;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, KeyDerivationFunctionScheme, KeyedHashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use zeroize::Zeroizing;

use crate::conn::Scope;
use crate::error::{Error, Result, kind};
use crate::pcr::{self, Bank};

/// The largest secret [`seal`] accepts.
pub const MAX_SECRET: usize = 128;
/// The largest blob [`unseal`] looks at.
pub const MAX_BLOB: usize = 2048;
const MAGIC: &[u8; 4] = b"PCSB";
const VERSION: u8 = 1;
const BANK_SHA256: u8 = 1;

/// The storage root key template: systemd's ECC P-256 SRK template (restricted decrypt,
/// AES-128-CFB, empty unique), so the same primary serves sealed secrets and LUKS tokens.
pub(crate) fn srk_template() -> Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(Error::tpm("SRK attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                .with_ecc_scheme(EccScheme::Null)
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_decryption_key(true)
                .with_restricted(true)
                .build()
                .map_err(Error::tpm("SRK parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
        .map_err(Error::tpm("SRK template"))
}

/// Creates the SRK (deterministic: same template, same owner seed, same key) for this scope.
pub(crate) fn srk(scope: &mut Scope) -> Result<KeyHandle> {
    if let Some(h) = scope.srk {
        return Ok(h);
    }
    let t = srk_template()?;
    let h = scope
        .ctx
        .execute_with_nullauth_session(|c| c.create_primary(Hierarchy::Owner, t, None, None, None, None))
        .map_err(Error::tpm("CreatePrimary (SRK)"))?
        .key_handle;
    scope.track(h);
    scope.srk = Some(h);
    Ok(h)
}

fn sealed_template(policy: &[u8; 32]) -> Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_admin_with_policy(true)
        .with_user_with_auth(false)
        .build()
        .map_err(Error::tpm("sealed object attributes"))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_auth_policy(Digest::try_from(policy.to_vec()).map_err(Error::tpm("policy digest"))?)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(Error::tpm("sealed object template"))
}

/// A parsed blob.
#[derive(Debug)]
struct Blob {
    mask: u32,
    public: Public,
    private: Private,
}

fn encode(mask: u32, public: &Public, private: &Private) -> Result<Vec<u8>> {
    let pubm = public.marshall().map_err(Error::tpm("marshal public"))?;
    let mut v = Vec::with_capacity(16 + pubm.len() + private.value().len() + 32);
    v.extend_from_slice(MAGIC);
    v.push(VERSION);
    v.push(BANK_SHA256);
    v.extend_from_slice(&mask.to_be_bytes());
    for part in [&pubm[..], private.value()] {
        v.extend_from_slice(
            &u16::try_from(part.len()).map_err(|_| Error::Unexpected("oversized TPM object"))?.to_be_bytes(),
        );
        v.extend_from_slice(part);
    }
    let sum = Sha256::digest(&v);
    v.extend_from_slice(&sum);
    Ok(v)
}

fn decode(b: &[u8]) -> Result<Blob> {
    let bad = |m: &str| Error::CorruptBlob(m.to_owned());
    if b.len() > MAX_BLOB {
        return Err(Error::InvalidArgument(format!("sealed blob of {} bytes exceeds {MAX_BLOB}", b.len())));
    }
    if b.len() < 4 + 2 + 4 + 2 + 2 + 32 || &b[..4] != MAGIC {
        return Err(bad("no PCSB header"));
    }
    if b[4] != VERSION {
        return Err(Error::CorruptBlob(format!("unsupported version {}", b[4])));
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if Sha256::digest(body)[..] != *sum {
        return Err(bad("checksum mismatch"));
    }
    if b[5] != BANK_SHA256 {
        return Err(bad("unknown PCR bank"));
    }
    let mask = u32::from_be_bytes([b[6], b[7], b[8], b[9]]);
    if mask == 0 || mask >> pcr::PCR_COUNT != 0 {
        return Err(bad("PCR mask out of range"));
    }
    let mut rest = &body[10..];
    let mut part = || -> Result<&[u8]> {
        if rest.len() < 2 {
            return Err(bad("truncated"));
        }
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        if rest.len() < 2 + n {
            return Err(bad("truncated"));
        }
        let (p, r) = rest[2..].split_at(n);
        rest = r;
        Ok(p)
    };
    let pubm = part()?;
    let privm = part()?.to_vec();
    if !rest.is_empty() {
        return Err(bad("trailing bytes"));
    }
    let public = Public::unmarshall(pubm).map_err(|_| bad("public area does not parse"))?;
    let private = Private::try_from(privm).map_err(|_| bad("private area too large"))?;
    // Only sealed-data objects that nothing but the PCR policy can open.
    match &public {
        Public::KeyedHash { object_attributes: a, .. }
            if a.fixed_tpm()
                && a.fixed_parent()
                && !a.user_with_auth()
                && a.admin_with_policy()
                && !a.sign_encrypt() =>
        {
            Ok(Blob { mask, public, private })
        }
        _ => Err(bad("not a PCR-sealed data object")),
    }
}

/// The PCR indices a blob is bound to (validates the blob's format, not its origin).
pub fn blob_pcrs(blob: &[u8]) -> Result<Vec<u32>> {
    Ok(pcr::from_mask(decode(blob)?.mask))
}

/// Seals `secret` to the current sha256 values of `pcrs` (validated by the caller).
pub fn seal_current(scope: &mut Scope, secret: &[u8], pcrs: &[u32]) -> Result<Vec<u8>> {
    let values = current32(scope, pcrs)?;
    seal_to(scope, secret, &values)
}

/// Current sha256 values as fixed-size arrays.
fn current32(scope: &mut Scope, pcrs: &[u32]) -> Result<Vec<(u32, [u8; 32])>> {
    pcr::read(scope, Bank::Sha256, pcrs)?
        .into_iter()
        .map(|(i, v)| Ok((i, <[u8; 32]>::try_from(v.as_slice()).map_err(|_| Error::Unexpected("sha256 PCR size"))?)))
        .collect()
}

/// Seals `secret` to the given sha256 PCR values.
pub fn seal_to(scope: &mut Scope, secret: &[u8], values: &[(u32, [u8; 32])]) -> Result<Vec<u8>> {
    if secret.is_empty() || secret.len() > MAX_SECRET {
        return Err(Error::InvalidArgument(format!("secret must be 1..={MAX_SECRET} bytes, got {}", secret.len())));
    }
    let indices: Vec<u32> = values.iter().map(|(i, _)| *i).collect();
    let (public, private) = create_sealed(scope, secret, values)?;
    encode(pcr::mask(&indices), &public, &private)
}

/// Creates a sealed-data object under the SRK whose only authorisation is PolicyPCR over
/// `values`; returns its public and private areas (nothing stays loaded).
pub(crate) fn create_sealed(scope: &mut Scope, secret: &[u8], values: &[(u32, [u8; 32])]) -> Result<(Public, Private)> {
    let policy = pcr::policy_digest(values);
    let parent = srk(scope)?;
    let template = sealed_template(&policy)?;
    let data = SensitiveData::try_from(secret.to_vec()).map_err(Error::tpm("sensitive data"))?;
    let created = scope
        .ctx
        .execute_with_nullauth_session(|c| c.create(parent, template, None, Some(data), None, None))
        .map_err(Error::tpm("Create (sealed object)"))?;
    Ok((created.out_public, created.out_private))
}

/// systemd's `tpm2-blob` encoding of a sealed object: TPM2B_PRIVATE then TPM2B_PUBLIC.
pub(crate) fn systemd_blob(public: &Public, private: &Private) -> Result<Vec<u8>> {
    let pubm = public.marshall().map_err(Error::tpm("marshal public"))?;
    let mut v = Vec::new();
    for part in [private.value(), &pubm[..]] {
        v.extend_from_slice(
            &u16::try_from(part.len()).map_err(|_| Error::Unexpected("oversized TPM object"))?.to_be_bytes(),
        );
        v.extend_from_slice(part);
    }
    Ok(v)
}

/// Unseals under today's PCR values. A mismatch is [`Error::PcrPolicyMismatch`] and
/// returns nothing.
pub fn unseal(scope: &mut Scope, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    let b = decode(blob)?;
    let parent = srk(scope)?;
    let obj = scope
        .ctx
        .execute_with_nullauth_session(|c| c.load(parent, b.private.clone(), b.public.clone()))
        .map_err(|e| match kind(&e) {
            Some(
                Tss2ResponseCodeKind::Integrity
                | Tss2ResponseCodeKind::Size
                | Tss2ResponseCodeKind::Value
                | Tss2ResponseCodeKind::Key
                | Tss2ResponseCodeKind::Attributes
                | Tss2ResponseCodeKind::Type
                | Tss2ResponseCodeKind::Hash
                | Tss2ResponseCodeKind::Symmetric
                | Tss2ResponseCodeKind::Insufficient
                | Tss2ResponseCodeKind::Scheme
                | Tss2ResponseCodeKind::Policy
                | Tss2ResponseCodeKind::Kdf
                | Tss2ResponseCodeKind::KeySize
                | Tss2ResponseCodeKind::Selector,
            ) => Error::ForeignBlob(e),
            _ => Error::tpm("Load (sealed object)")(e),
        })?;
    scope.track(obj);
    let session = scope
        .ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(Error::tpm("StartAuthSession (policy)"))?
        .ok_or(Error::Unexpected("no policy session handle"))?;
    scope.track(ObjectHandle::from(SessionHandle::from(session)));
    let ps = PolicySession::try_from(session).map_err(Error::tpm("policy session"))?;
    let sel = pcr::selection(Bank::Sha256, &pcr::from_mask(b.mask))?;
    // An empty digest makes the TPM use today's values; a mismatch shows at Unseal.
    scope.ctx.policy_pcr(ps, Digest::default(), sel).map_err(Error::tpm("PolicyPCR"))?;
    let r = scope.ctx.execute_with_session(Some(session), |c| c.unseal(obj.into()));
    // Free the slots now: a reseal creates an object next (swtpm has only three).
    scope.flush(ObjectHandle::from(SessionHandle::from(session)));
    scope.flush(obj);
    match r {
        Ok(data) => Ok(Zeroizing::new(data.value().to_vec())),
        Err(e) if matches!(kind(&e), Some(Tss2ResponseCodeKind::PolicyFail)) => Err(Error::PcrPolicyMismatch),
        Err(e) => Err(Error::tpm("Unseal")(e)),
    }
}

/// Unseals under today's PCRs and seals again to `expected` (index → sha256 value); PCRs
/// the blob is bound to but not in `expected` keep their current values.
pub fn reseal(scope: &mut Scope, blob: &[u8], expected: &[(u32, Vec<u8>)]) -> Result<Vec<u8>> {
    let bound = blob_pcrs(blob)?;
    let mut seen = Vec::new();
    for (i, v) in expected {
        if !bound.contains(i) {
            return Err(Error::InvalidArgument(format!("PCR {i} is not bound by this blob (bound: {bound:?})")));
        }
        if v.len() != 32 {
            return Err(Error::InvalidArgument(format!("expected value of PCR {i} must be 32 bytes (sha256)")));
        }
        if seen.contains(i) {
            return Err(Error::InvalidArgument(format!("PCR {i} given twice")));
        }
        seen.push(*i);
    }
    let secret = unseal(scope, blob)?;
    let mut values = current32(scope, &bound)?;
    for (i, v) in expected {
        if let Some(slot) = values.iter_mut().find(|(j, _)| j == i) {
            slot.1.copy_from_slice(v);
        }
    }
    seal_to(scope, &secret, &values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_corrupt_not_a_panic() {
        for b in [&b""[..], b"PCSB", &[0u8; 100], b"PCSB\x02\x01\x00\x00\x00\x80"] {
            let e = decode(b).unwrap_err();
            assert!(matches!(e, Error::CorruptBlob(_)), "{e}");
        }
        assert!(matches!(decode(&vec![0u8; MAX_BLOB + 1]).unwrap_err(), Error::InvalidArgument(_)));
    }
}
