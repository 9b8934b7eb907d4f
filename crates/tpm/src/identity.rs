// SPDX-License-Identifier: Apache-2.0
//! Device identity: the RSA-2048 endorsement key from the TCG default EK template.
//!
//! `device_id = "tpm-ek-" + hex(SHA-256(DER SubjectPublicKeyInfo of the EK))`, the same
//! value `tpm2_createek -G rsa -f pem` and `openssl pkey -pubin -outform DER | sha256sum`
//! give on the same TPM.

use sha2::{Digest as _, Sha256};
use tss_esapi::abstraction::ek;
use tss_esapi::interface_types::algorithm::AsymmetricAlgorithm;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::Public;

use crate::conn::Scope;
use crate::der;
use crate::error::{Error, Result};

/// The device's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `tpm-ek-<hex sha256 of the EK's DER SPKI>`.
    pub device_id: String,
    /// The EK public key as a PEM SubjectPublicKeyInfo.
    pub ek_public_pem: String,
}

/// Creates the EK primary (deterministic), exports its public key and flushes it.
pub fn read(scope: &mut Scope) -> Result<Identity> {
    let template = ek::create_ek_public_from_default_template(AsymmetricAlgorithm::Rsa, None)
        .map_err(Error::tpm("EK template"))?;
    let created = scope
        .ctx
        .execute_with_nullauth_session(|c| c.create_primary(Hierarchy::Endorsement, template, None, None, None, None))
        .map_err(Error::tpm("CreatePrimary (EK)"))?;
    scope.track(created.key_handle);
    let spki = match &created.out_public {
        Public::Rsa { parameters, unique, .. } => {
            let e = match parameters.exponent().value() {
                0 => 65537,
                e => e,
            };
            der::rsa_spki(unique.value(), e)
        }
        _ => return Err(Error::Unexpected("EK is not an RSA key")),
    };
    scope.flush(created.key_handle);
    Ok(Identity {
        device_id: format!("tpm-ek-{}", hex::encode(Sha256::digest(&spki))),
        ek_public_pem: der::pem("PUBLIC KEY", &spki),
    })
}
