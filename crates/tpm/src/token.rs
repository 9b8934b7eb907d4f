// SPDX-License-Identifier: Apache-2.0
//! The device-token key and device JWTs.
//!
//! The key is an ECC P-256 ECDSA-SHA256 signing primary under the owner hierarchy, created
//! from a fixed template (its `unique` field is a fixed label). A primary is derived from
//! the hierarchy's seed and the template, so the same key comes back after every broker
//! restart and reboot without a persistent handle, and its private half never leaves the
//! TPM. It changes only if the owner hierarchy is cleared (TPM2_Clear).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde_json::json;
use sha2::{Digest as _, Sha256};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, EccScheme, HashScheme, KeyDerivationFunctionScheme, Public, PublicBuilder,
    PublicEccParametersBuilder, Signature, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;

use crate::conn::Scope;
use crate::der;
use crate::error::{Error, Result};

/// The longest token lifetime `sign` accepts, in seconds.
pub const MAX_TTL: u32 = 3600;
/// Bounds on the caller's claims.
pub const MAX_TIER: usize = 64;
/// At most this many features, each at most [`MAX_FEATURE`] bytes.
pub const MAX_FEATURES: usize = 32;
/// See [`MAX_FEATURES`].
pub const MAX_FEATURE: usize = 64;
/// The `iss` claim.
pub const ISSUER: &str = "piccolo-broker";
const LABEL: &[u8] = b"piccolo device token key v1";

/// The public half of the device-token key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenKey {
    /// PEM SubjectPublicKeyInfo.
    pub public_key_pem: String,
    /// JWK (kty, crv, x, y, kid, alg, use) as JSON.
    pub jwk_json: String,
    /// RFC 7638 thumbprint (base64url SHA-256 of the canonical JWK).
    pub kid: String,
}

/// Claims the caller chooses; `device_id`, `iat`, `exp`, `iss` come from the broker.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Subscription tier claim.
    pub subscription_tier: String,
    /// Feature claims.
    pub features: Vec<String>,
    /// Lifetime, 1..=[`MAX_TTL`] seconds.
    pub ttl_seconds: u32,
}

impl TokenRequest {
    /// Validates bounds and characters (printable ASCII).
    pub fn validate(&self) -> Result<()> {
        if self.ttl_seconds == 0 || self.ttl_seconds > MAX_TTL {
            return Err(Error::InvalidArgument(format!("ttl_seconds must be 1..={MAX_TTL}, got {}", self.ttl_seconds)));
        }
        let ok = |s: &str, max: usize| !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic());
        if !ok(&self.subscription_tier, MAX_TIER) {
            return Err(Error::InvalidArgument(format!(
                "subscription_tier must be 1..={MAX_TIER} printable ASCII bytes"
            )));
        }
        if self.features.len() > MAX_FEATURES || !self.features.iter().all(|f| ok(f, MAX_FEATURE)) {
            return Err(Error::InvalidArgument(format!(
                "features: at most {MAX_FEATURES}, each 1..={MAX_FEATURE} printable ASCII bytes"
            )));
        }
        Ok(())
    }
}

/// A signed token.
#[derive(Debug, Clone)]
pub struct SignedToken {
    /// Compact JWS.
    pub token: String,
    /// `exp` (Unix seconds).
    pub expires_at: i64,
}

fn template() -> Result<Public> {
    let attrs = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_sign_encrypt(true)
        .build()
        .map_err(Error::tpm("token key attributes"))?;
    let label = Sha256::digest(LABEL).to_vec();
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attrs)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_restricted(false)
                .build()
                .map_err(Error::tpm("token key parameters"))?,
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(label).map_err(Error::tpm("token key label"))?,
            EccParameter::default(),
        ))
        .build()
        .map_err(Error::tpm("token key template"))
}

fn create(scope: &mut Scope) -> Result<(KeyHandle, TokenKey)> {
    let t = template()?;
    let created = scope
        .ctx
        .execute_with_nullauth_session(|c| c.create_primary(Hierarchy::Owner, t, None, None, None, None))
        .map_err(Error::tpm("CreatePrimary (token key)"))?;
    scope.track(created.key_handle);
    let (x, y) = match &created.out_public {
        Public::Ecc { unique, .. } => (
            der::pad32(unique.x().value()).ok_or(Error::Unexpected("P-256 x"))?,
            der::pad32(unique.y().value()).ok_or(Error::Unexpected("P-256 y"))?,
        ),
        _ => return Err(Error::Unexpected("token key is not ECC")),
    };
    Ok((created.key_handle, public_of(x, y)))
}

fn public_of(x: [u8; 32], y: [u8; 32]) -> TokenKey {
    let (xs, ys) = (B64.encode(x), B64.encode(y));
    // RFC 7638: the required members in lexicographic order, no whitespace.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{xs}","y":"{ys}"}}"#);
    let kid = B64.encode(Sha256::digest(canonical.as_bytes()));
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": xs, "y": ys, "kid": kid, "alg": "ES256", "use": "sig"});
    TokenKey { public_key_pem: der::pem("PUBLIC KEY", &der::p256_spki(&x, &y)), jwk_json: jwk.to_string(), kid }
}

/// The token key's public half.
pub fn key(scope: &mut Scope) -> Result<TokenKey> {
    Ok(create(scope)?.1)
}

/// Signs a JWT for `device_id` with the TPM key; `now` is Unix seconds.
pub fn sign(scope: &mut Scope, device_id: &str, req: &TokenRequest, now: i64) -> Result<SignedToken> {
    req.validate()?;
    let (handle, key) = create(scope)?;
    let exp = now + i64::from(req.ttl_seconds);
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": key.kid});
    let claims = json!({
        "device_id": device_id,
        "subscription_tier": req.subscription_tier,
        "features": req.features,
        "iat": now,
        "exp": exp,
        "iss": ISSUER,
    });
    let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
    let digest = Digest::try_from(Sha256::digest(input.as_bytes()).to_vec()).map_err(Error::tpm("digest"))?;
    let ticket = TPMT_TK_HASHCHECK { tag: TPM2_ST_HASHCHECK, hierarchy: TPM2_RH_NULL, digest: Default::default() };
    let ticket = ticket.try_into().map_err(Error::tpm("hash-check ticket"))?;
    let sig = scope
        .ctx
        .execute_with_nullauth_session(|c| c.sign(handle, digest, SignatureScheme::Null, ticket))
        .map_err(Error::tpm("Sign"))?;
    let (r, s) = match sig {
        Signature::EcDsa(e) => (
            der::pad32(e.signature_r().value()).ok_or(Error::Unexpected("ECDSA r"))?,
            der::pad32(e.signature_s().value()).ok_or(Error::Unexpected("ECDSA s"))?,
        ),
        _ => return Err(Error::Unexpected("signature is not ECDSA")),
    };
    let mut rs = r.to_vec();
    rs.extend_from_slice(&s);
    Ok(SignedToken { token: format!("{input}.{}", B64.encode(rs)), expires_at: exp })
}
