// SPDX-License-Identifier: Apache-2.0
//! TPM 2.0 backend for the broker (tss-esapi): identity, PCRs, sealing, device-token key,
//! disk enrollment. Runs in the `piccolo-broker-tpm` helper ([`helper`]), one process per
//! broker call, so the long-lived broker never links the TPM stack.
//!
//! Owns: every TPM command the broker sends (through one configurable TCTI, one operation
//! at a time), the sealed-blob format, the device-token key template and the JWT encoding,
//! and the `systemd-cryptenroll` invocations for LUKS2 TPM2 slots.
//! Must never: let a private key leave the TPM, return or log a secret on a PCR mismatch,
//! put a secret, unsealed plaintext or unlock key in an error, log, argv or environment,
//! take a device path from a caller, or wait on an absent TPM for more than a bounded time.
//!
//! Status codes ([`Error::code`]): INVALID_ARGUMENT for bad input (sizes, PCR indices,
//! corrupt or foreign blobs, a TTL over an hour, bad names, a rejected unlock key);
//! FAILED_PRECONDITION for "no TPM", "PCR policy mismatch", a partition that is not LUKS2
//! and PCR values systemd 252 cannot bind; NOT_FOUND for a missing partition; UNAVAILABLE
//! for lockout and TPM resource shortage; INTERNAL otherwise.

mod conn;
mod der;
pub mod disk;
mod error;
pub mod helper;
mod identity;
pub mod pcr;
pub mod seal;
pub mod token;

use std::sync::Mutex;

pub use conn::CONNECT_TIMEOUT;
pub use disk::{DiskConfig, Enrolled};
pub use error::{Code, Error, Result};
pub use identity::Identity;
pub use pcr::Bank;
pub use token::{SignedToken, TokenKey, TokenRequest};
use zeroize::Zeroizing;

use crate::conn::{Scope, probe};

/// The TPM behind one TCTI. Operations are serialised: swtpm serves one connection at a
/// time, and a TPM has few session and object slots.
pub struct Tpm {
    tcti: String,
    lock: Mutex<Option<Identity>>,
}

impl Tpm {
    /// A TPM reached through `tcti` (`device:/dev/tpmrm0`, `swtpm:host=..,port=..`, ...).
    /// Nothing is opened until the first operation.
    pub fn new(tcti: impl Into<String>) -> Tpm {
        Tpm { tcti: tcti.into(), lock: Mutex::new(None) }
    }

    /// A TPM whose identity is already known (read by an earlier process from this TPM),
    /// so that signing does not have to re-create the EK.
    pub fn with_identity(tcti: impl Into<String>, identity: Identity) -> Tpm {
        Tpm { tcti: tcti.into(), lock: Mutex::new(Some(identity)) }
    }

    /// The identity, if an operation has read it (or it was given).
    pub fn known_identity(&self) -> Option<Identity> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The TCTI string.
    pub fn tcti(&self) -> &str {
        &self.tcti
    }

    fn with<T>(&self, f: impl FnOnce(&mut Scope, &mut Option<Identity>) -> Result<T>) -> Result<T> {
        // A panic inside an earlier operation leaves only a cached identity behind.
        let mut cache = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut scope = Scope::open(&self.tcti)?;
        f(&mut scope, &mut cache)
    }

    fn identity_in(scope: &mut Scope, cache: &mut Option<Identity>) -> Result<Identity> {
        if let Some(id) = cache {
            return Ok(id.clone());
        }
        let id = identity::read(scope)?;
        *cache = Some(id.clone());
        Ok(id)
    }

    /// The EK-derived device identity (cached after the first read).
    pub fn identity(&self) -> Result<Identity> {
        self.with(Self::identity_in)
    }

    /// PCR values of `indices` (validated here; empty: all 24) in `bank`.
    pub fn read_pcrs(&self, bank: Bank, indices: &[u32]) -> Result<Vec<(u32, Vec<u8>)>> {
        let all: Vec<u32> = (0..pcr::PCR_COUNT).collect();
        let idx = pcr::indices(indices, &all)?;
        self.with(|s, _| pcr::read(s, bank, &idx))
    }

    /// Seals `secret` (1..=128 bytes) to the current sha256 values of `pcrs` (empty: [7]).
    pub fn seal(&self, secret: &[u8], pcrs: &[u32]) -> Result<Vec<u8>> {
        if secret.is_empty() || secret.len() > seal::MAX_SECRET {
            return Err(Error::InvalidArgument(format!(
                "secret must be 1..={} bytes, got {}",
                seal::MAX_SECRET,
                secret.len()
            )));
        }
        let idx = pcr::indices(pcrs, pcr::DEFAULT_PCRS)?;
        self.with(|s, _| seal::seal_current(s, secret, &idx))
    }

    /// Unseals a blob made by [`Tpm::seal`] on this TPM.
    pub fn unseal(&self, blob: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        seal::blob_pcrs(blob)?;
        self.with(|s, _| seal::unseal(s, blob))
    }

    /// Unseals under today's PCRs and seals to `expected` (index → sha256 value).
    pub fn reseal(&self, blob: &[u8], expected: &[(u32, Vec<u8>)]) -> Result<Vec<u8>> {
        seal::blob_pcrs(blob)?;
        let idx: Vec<u32> = expected.iter().map(|(i, _)| *i).collect();
        pcr::indices(&idx, &[])?;
        self.with(|s, _| seal::reseal(s, blob, expected))
    }

    /// The device-token key's public half.
    pub fn token_key(&self) -> Result<TokenKey> {
        self.with(|s, _| token::key(s))
    }

    /// A device JWT signed in the TPM; `device_id` comes from the EK, never the caller.
    pub fn sign_token(&self, req: &TokenRequest, now: i64) -> Result<SignedToken> {
        req.validate()?;
        self.with(|s, cache| {
            let id = Self::identity_in(s, cache)?;
            token::sign(s, &id.device_id, req, now)
        })
    }

    /// Enrolls a LUKS2 TPM2 keyslot on partition `name` bound to `pcrs` (empty: [7]).
    pub fn enroll_disk(&self, cfg: &DiskConfig, name: &str, pcrs: &[u32], unlock_key: &[u8]) -> Result<Enrolled> {
        let idx = pcr::indices(pcrs, pcr::DEFAULT_PCRS)?;
        disk::resolve(cfg, name)?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        probe(&self.tcti)?;
        disk::enroll(cfg, &self.tcti, name, &idx, unlock_key)
    }

    /// Enrolls a new TPM2 keyslot bound to `expected` (index → sha256 value) and wipes
    /// the old TPM2 keyslots (see [`disk::reseal`]).
    pub fn reseal_disk(
        &self,
        cfg: &DiskConfig,
        name: &str,
        expected: &[(u32, Vec<u8>)],
        unlock_key: &[u8],
    ) -> Result<Enrolled> {
        let idx: Vec<u32> = expected.iter().map(|(i, _)| *i).collect();
        if idx.is_empty() {
            return Err(Error::InvalidArgument("expected: name at least one PCR".into()));
        }
        pcr::indices(&idx, &[])?;
        let values = expected
            .iter()
            .map(|(i, v)| {
                <[u8; 32]>::try_from(v.as_slice())
                    .map(|a| (*i, a))
                    .map_err(|_| Error::InvalidArgument(format!("expected value of PCR {i} must be 32 bytes (sha256)")))
            })
            .collect::<Result<Vec<_>>>()?;
        disk::resolve(cfg, name)?;
        self.with(|scope, _| {
            let mut seal = |secret: &[u8], values: &[(u32, [u8; 32])]| {
                let (public, private) = seal::create_sealed(scope, secret, values)?;
                seal::systemd_blob(&public, &private)
            };
            disk::reseal(cfg, name, &values, unlock_key, &mut seal)
        })
    }
}
