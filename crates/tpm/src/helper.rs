// SPDX-License-Identifier: Apache-2.0
//! The TPM helper's side of the broker ↔ `piccolo-broker-tpm` exchange: one
//! `TpmHelperRequest` in, one `TpmHelperResponse` out (see `tpm.proto`).
//!
//! The broker has already authorised and audited the call; this side validates every
//! argument again through [`Tpm`] (nothing reaches the TPM unvalidated whoever sent it) and
//! answers every failure as a `TpmHelperError` with the [`Code`] class and the error chain.
//! Unsealed secrets are wiped from this process's buffers once encoded.

use piccolo_proto::v1::tpm_helper_request::Op;
use piccolo_proto::v1::tpm_helper_response::Result as Answer;
use piccolo_proto::v1::{
    EnrollDiskTpmResponse, GetDeviceIdentityResponse, GetDeviceTokenKeyResponse, PcrValue, ReadPcrsResponse,
    ResealDiskTpmResponse, ResealSecretResponse, SealSecretResponse, SignDeviceTokenResponse, TpmErrorCode,
    TpmHelperError, TpmHelperRequest, TpmHelperResponse, UnsealSecretResponse,
};
use prost::Message;
use zeroize::Zeroizing;

use crate::{Bank, Code, DiskConfig, Error, Identity, Result, TokenRequest, Tpm};

/// Decodes one request, runs it and encodes the answer. Never fails: a bad request is an
/// INVALID_ARGUMENT answer. The returned buffer is wiped when dropped (it may hold a secret).
pub fn serve(input: &[u8]) -> Zeroizing<Vec<u8>> {
    let response = match TpmHelperRequest::decode(input) {
        Ok(req) => run(req),
        Err(e) => error_response(&Error::InvalidArgument(format!("undecodable TPM helper request: {e}"))),
    };
    Zeroizing::new(response.encode_to_vec())
}

fn run(req: TpmHelperRequest) -> TpmHelperResponse {
    let tpm = match req.identity {
        Some(id) => Tpm::with_identity(req.tcti, Identity { device_id: id.device_id, ek_public_pem: id.ek_public_pem }),
        None => Tpm::new(req.tcti),
    };
    let answer = match req.op {
        Some(op) => dispatch(&tpm, op, req.now),
        None => Err(Error::InvalidArgument("TPM helper request names no operation".into())),
    };
    let mut response = match answer {
        Ok(a) => TpmHelperResponse { identity: None, result: Some(a) },
        Err(e) => error_response(&e),
    };
    response.identity = tpm.known_identity().map(identity_message);
    response
}

fn dispatch(tpm: &Tpm, op: Op, now: i64) -> Result<Answer> {
    let disks = DiskConfig::default();
    Ok(match op {
        Op::GetDeviceIdentity(_) => Answer::GetDeviceIdentity(identity_message(tpm.identity()?)),
        Op::ReadPcrs(r) => {
            let bank = Bank::parse(&r.bank)?;
            let pcrs = tpm.read_pcrs(bank, &r.indices)?;
            Answer::ReadPcrs(ReadPcrsResponse {
                bank: bank.name().into(),
                pcrs: pcrs.into_iter().map(|(index, digest)| PcrValue { index, digest }).collect(),
            })
        }
        Op::SealSecret(r) => {
            let secret = Zeroizing::new(r.secret);
            Answer::SealSecret(SealSecretResponse { sealed_blob: tpm.seal(&secret, &r.pcrs)? })
        }
        Op::UnsealSecret(r) => {
            // Moved into the response, which serve() wipes after encoding.
            let secret = tpm.unseal(&r.sealed_blob)?;
            Answer::UnsealSecret(UnsealSecretResponse { secret: secret.to_vec() })
        }
        Op::ResealSecret(r) => {
            if r.expected.is_empty() {
                return Err(Error::InvalidArgument("expected: name at least one PCR value".into()));
            }
            let blob = tpm.reseal(&r.sealed_blob, &pairs(r.expected))?;
            Answer::ResealSecret(ResealSecretResponse { sealed_blob: blob })
        }
        Op::GetDeviceTokenKey(_) => {
            let k = tpm.token_key()?;
            Answer::GetDeviceTokenKey(GetDeviceTokenKeyResponse {
                public_key_pem: k.public_key_pem,
                jwk_json: k.jwk_json,
                kid: k.kid,
            })
        }
        Op::SignDeviceToken(r) => {
            let req = TokenRequest {
                subscription_tier: r.subscription_tier,
                features: r.features,
                ttl_seconds: r.ttl_seconds,
            };
            let t = tpm.sign_token(&req, now)?;
            Answer::SignDeviceToken(SignDeviceTokenResponse { token: t.token, expires_at: t.expires_at })
        }
        Op::EnrollDiskTpm(r) => {
            let key = Zeroizing::new(r.unlock_key);
            let e = tpm.enroll_disk(&disks, &r.partition, &r.pcrs, &key)?;
            Answer::EnrollDiskTpm(EnrollDiskTpmResponse { keyslot: e.keyslot })
        }
        Op::ResealDiskTpm(r) => {
            let key = Zeroizing::new(r.unlock_key);
            let e = tpm.reseal_disk(&disks, &r.partition, &pairs(r.expected), &key)?;
            Answer::ResealDiskTpm(ResealDiskTpmResponse { keyslot: e.keyslot, wiped_keyslots: e.wiped })
        }
    })
}

fn pairs(v: Vec<PcrValue>) -> Vec<(u32, Vec<u8>)> {
    v.into_iter().map(|p| (p.index, p.digest)).collect()
}

fn identity_message(id: Identity) -> GetDeviceIdentityResponse {
    GetDeviceIdentityResponse { device_id: id.device_id, ek_public_pem: id.ek_public_pem }
}

fn error_response(e: &Error) -> TpmHelperResponse {
    let code = match e.code() {
        Code::InvalidArgument => TpmErrorCode::InvalidArgument,
        Code::FailedPrecondition => TpmErrorCode::FailedPrecondition,
        Code::NotFound => TpmErrorCode::NotFound,
        Code::Unavailable => TpmErrorCode::Unavailable,
        Code::Internal => TpmErrorCode::Internal,
    };
    // Invalid arguments are answered as they are; other failures carry their causes (TSS
    // response codes, tool exit statuses), which never include a secret.
    let message = if e.code() == Code::InvalidArgument { e.to_string() } else { chain(e) };
    TpmHelperResponse { identity: None, result: Some(Answer::Error(TpmHelperError { code: code.into(), message })) }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        message.push_str(": ");
        message.push_str(&s.to_string());
        src = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use piccolo_proto::v1::{SealSecretRequest, UnsealSecretRequest};

    fn answer(req: &TpmHelperRequest) -> TpmHelperResponse {
        TpmHelperResponse::decode(serve(&req.encode_to_vec()).as_slice()).unwrap()
    }

    fn error_of(r: TpmHelperResponse) -> TpmHelperError {
        match r.result {
            Some(Answer::Error(e)) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn garbage_and_empty_requests_are_invalid_arguments() {
        let r = TpmHelperResponse::decode(serve(b"\xff\xff\xff").as_slice()).unwrap();
        let e = error_of(r);
        assert_eq!(e.code(), TpmErrorCode::InvalidArgument);
        assert!(e.message.starts_with("undecodable TPM helper request"), "{}", e.message);

        let e = error_of(answer(&TpmHelperRequest::default()));
        assert_eq!(
            (e.code(), e.message.as_str()),
            (TpmErrorCode::InvalidArgument, "TPM helper request names no operation")
        );
    }

    #[test]
    fn arguments_are_validated_before_the_tpm_is_opened() {
        // No TPM behind this TCTI: only validation can produce these answers.
        let tcti = "device:/nonexistent/tpmrm9".to_owned();
        let seal = |secret: Vec<u8>, pcrs: Vec<u32>| TpmHelperRequest {
            tcti: tcti.clone(),
            op: Some(Op::SealSecret(SealSecretRequest { secret, pcrs })),
            ..Default::default()
        };
        let e = error_of(answer(&seal(vec![], vec![])));
        assert_eq!(
            (e.code(), e.message.as_str()),
            (TpmErrorCode::InvalidArgument, "secret must be 1..=128 bytes, got 0")
        );
        assert_eq!(error_of(answer(&seal(vec![1], vec![24]))).code(), TpmErrorCode::InvalidArgument);
        let unseal = TpmHelperRequest {
            tcti: tcti.clone(),
            op: Some(Op::UnsealSecret(UnsealSecretRequest { sealed_blob: b"not a blob".to_vec() })),
            ..Default::default()
        };
        assert_eq!(error_of(answer(&unseal)).code(), TpmErrorCode::InvalidArgument);

        // A valid request then finds no TPM, and says where it looked.
        let e = error_of(answer(&seal(vec![1], vec![7])));
        assert_eq!(e.code(), TpmErrorCode::FailedPrecondition);
        assert_eq!(e.message, "no TPM (/nonexistent/tpmrm9 not present)");
    }

    #[test]
    fn a_given_identity_is_returned_for_caching() {
        let id = GetDeviceIdentityResponse { device_id: "tpm-ek-00".into(), ek_public_pem: "PEM".into() };
        let r = answer(&TpmHelperRequest {
            tcti: "device:/nonexistent/tpmrm9".into(),
            identity: Some(id.clone()),
            op: Some(Op::GetDeviceIdentity(Default::default())),
            ..Default::default()
        });
        // The TPM is still opened (an identity is only reported while its TPM answers)...
        assert_eq!(error_of(r.clone()).code(), TpmErrorCode::FailedPrecondition);
        // ...and the identity travels back, so the broker's cache does not depend on success.
        assert_eq!(r.identity, Some(id));
    }
}
