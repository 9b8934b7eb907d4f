// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Tpm`: device identity, PCRs, PCR-sealed secrets, the device-token
//! key and device JWTs, LUKS2 TPM2 enrollment.
//!
//! Thin handlers: the guard, one `piccolo_tpm` call on a blocking thread, and one `From`
//! impl choosing the status code. Audit arguments are sizes, indices and digests of
//! blobs: never a secret, unsealed plaintext or unlock key (nor a digest of one: a short
//! secret's digest could be guessed).
//!
//! Status codes: INVALID_ARGUMENT (bad sizes, PCR index > 23, corrupt or foreign blob,
//! TTL outside 1..=3600, bad partition name, unlock key rejected); FAILED_PRECONDITION
//! "no TPM" (no TPM behind the configured TCTI: fails within 2 s) and "PCR policy
//! mismatch" (no data returned), or a partition that is not LUKS2; NOT_FOUND (no such
//! partition); UNAVAILABLE (TPM lockout or out of TPM resources, or the audit log);
//! PERMISSION_DENIED (policy, including the `partitions` allow-list); INTERNAL otherwise.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use piccolo_proto::Rpc;
use piccolo_proto::v1::tpm_server::Tpm;
use piccolo_proto::v1::{
    EnrollDiskTpmRequest, EnrollDiskTpmResponse, GetDeviceIdentityRequest, GetDeviceIdentityResponse,
    GetDeviceTokenKeyRequest, GetDeviceTokenKeyResponse, PcrValue, ReadPcrsRequest, ReadPcrsResponse,
    ResealDiskTpmRequest, ResealDiskTpmResponse, ResealSecretRequest, ResealSecretResponse, SealSecretRequest,
    SealSecretResponse, SignDeviceTokenRequest, SignDeviceTokenResponse, UnsealSecretRequest, UnsealSecretResponse,
};
use piccolo_tpm as tpm;
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::boot::blocking;
use crate::error::Error;
use crate::guard::{AuditArgs, Shared, guard};

impl From<tpm::Error> for Error {
    /// The one mapping of TPM errors to gRPC codes (see the module doc).
    fn from(e: tpm::Error) -> Error {
        use tonic::Code;
        let code = match e.code() {
            tpm::Code::InvalidArgument => return Error::InvalidArgument(e.to_string()),
            tpm::Code::FailedPrecondition => Code::FailedPrecondition,
            tpm::Code::NotFound => Code::NotFound,
            tpm::Code::Unavailable => Code::Unavailable,
            tpm::Code::Internal => Code::Internal,
        };
        // The chain holds TSS response codes and tool stderr tails, never secrets.
        let message = crate::error::chain_message(&e);
        if code == Code::Internal {
            tracing::error!(error = %message, "TPM operation failed");
        }
        Error::Backend { code, message }
    }
}

fn bounded(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Indices as given (at most 32 listed), so a bad call's audit record shows what was asked.
fn indices_arg(v: &[u32]) -> serde_json::Value {
    json!(v.iter().take(32).collect::<Vec<_>>())
}

fn blob_arg(b: &[u8]) -> serde_json::Value {
    json!({ "bytes": b.len(), "sha256": hex::encode(Sha256::digest(b)) })
}

fn expected_arg(v: &[PcrValue]) -> serde_json::Value {
    json!(v.iter().take(32).map(|p| json!({ "index": p.index, "bytes": p.digest.len() })).collect::<Vec<_>>())
}

impl AuditArgs for GetDeviceIdentityRequest {}
impl AuditArgs for GetDeviceTokenKeyRequest {}
impl AuditArgs for ReadPcrsRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "bank": bounded(&self.bank, 16), "indices": indices_arg(&self.indices) })
    }
}
impl AuditArgs for SealSecretRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "secret_bytes": self.secret.len(), "pcrs": indices_arg(&self.pcrs) })
    }
}
impl AuditArgs for UnsealSecretRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "sealed_blob": blob_arg(&self.sealed_blob) })
    }
}
impl AuditArgs for ResealSecretRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({ "sealed_blob": blob_arg(&self.sealed_blob), "expected": expected_arg(&self.expected) })
    }
}
impl AuditArgs for SignDeviceTokenRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({
            "subscription_tier": bounded(&self.subscription_tier, 64),
            "features": self.features.iter().take(32).map(|f| bounded(f, 64)).collect::<Vec<_>>(),
            "ttl_seconds": self.ttl_seconds,
        })
    }
}
impl AuditArgs for EnrollDiskTpmRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({
            "partition": bounded(&self.partition, 64),
            "pcrs": indices_arg(&self.pcrs),
            "unlock_key_bytes": self.unlock_key.len(),
        })
    }
    fn constraint(&self) -> Option<String> {
        Some(self.partition.clone())
    }
}
impl AuditArgs for ResealDiskTpmRequest {
    fn audit_args(&self) -> serde_json::Value {
        json!({
            "partition": bounded(&self.partition, 64),
            "expected": expected_arg(&self.expected),
            "unlock_key_bytes": self.unlock_key.len(),
        })
    }
    fn constraint(&self) -> Option<String> {
        Some(self.partition.clone())
    }
}

fn pairs(v: &[PcrValue]) -> Vec<(u32, Vec<u8>)> {
    v.iter().map(|p| (p.index, p.digest.clone())).collect()
}

/// Bounds checked before the TPM is touched (and before anything is queued for it).
fn check_secret(s: &[u8]) -> Result<(), Error> {
    if s.is_empty() || s.len() > tpm::seal::MAX_SECRET {
        return Err(Error::InvalidArgument(format!(
            "secret must be 1..={} bytes, got {}",
            tpm::seal::MAX_SECRET,
            s.len()
        )));
    }
    Ok(())
}

/// The `Tpm` service.
pub struct TpmSvc {
    ctx: Shared,
    tpm: Arc<tpm::Tpm>,
    disks: tpm::DiskConfig,
}

impl TpmSvc {
    /// The TPM behind `[tpm] tcti`; nothing is opened until the first call.
    pub fn new(ctx: Shared) -> Self {
        let tpm = Arc::new(tpm::Tpm::new(ctx.config.file.tpm.tcti.clone()));
        TpmSvc { ctx, tpm, disks: tpm::DiskConfig::default() }
    }
}

/// Runs one TPM operation on the blocking pool.
async fn on_tpm<T, F>(tpm: &Arc<tpm::Tpm>, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(&tpm::Tpm) -> Result<T, tpm::Error> + Send + 'static,
{
    let tpm = tpm.clone();
    blocking(move || f(&tpm).map_err(Error::from)).await
}

#[tonic::async_trait]
impl Tpm for TpmSvc {
    async fn get_device_identity(
        &self,
        req: Request<GetDeviceIdentityRequest>,
    ) -> Result<Response<GetDeviceIdentityResponse>, Status> {
        let tpm = self.tpm.clone();
        guard(&self.ctx, Rpc::GetDeviceIdentity, req, |_, _, _| async move {
            let id = on_tpm(&tpm, |t| t.identity()).await?;
            Ok(GetDeviceIdentityResponse { device_id: id.device_id, ek_public_pem: id.ek_public_pem })
        })
        .await
    }

    async fn read_pcrs(&self, req: Request<ReadPcrsRequest>) -> Result<Response<ReadPcrsResponse>, Status> {
        let tpm = self.tpm.clone();
        guard(&self.ctx, Rpc::ReadPcrs, req, |_, _, r| async move {
            let bank = tpm::Bank::parse(&r.bank)?;
            let values = on_tpm(&tpm, move |t| t.read_pcrs(bank, &r.indices)).await?;
            Ok(ReadPcrsResponse {
                bank: bank.name().into(),
                pcrs: values.into_iter().map(|(index, digest)| PcrValue { index, digest }).collect(),
            })
        })
        .await
    }

    async fn seal_secret(&self, req: Request<SealSecretRequest>) -> Result<Response<SealSecretResponse>, Status> {
        let tpm = self.tpm.clone();
        guard(&self.ctx, Rpc::SealSecret, req, |_, _, r| async move {
            check_secret(&r.secret)?;
            let secret = zeroize::Zeroizing::new(r.secret);
            let blob = on_tpm(&tpm, move |t| t.seal(&secret, &r.pcrs)).await?;
            Ok(SealSecretResponse { sealed_blob: blob })
        })
        .await
    }

    async fn unseal_secret(&self, req: Request<UnsealSecretRequest>) -> Result<Response<UnsealSecretResponse>, Status> {
        let tpm = self.tpm.clone();
        guard(&self.ctx, Rpc::UnsealSecret, req, |_, _, r| async move {
            let secret = on_tpm(&tpm, move |t| t.unseal(&r.sealed_blob)).await?;
            Ok(UnsealSecretResponse { secret: secret.to_vec() })
        })
        .await
    }

    async fn reseal_secret(&self, req: Request<ResealSecretRequest>) -> Result<Response<ResealSecretResponse>, Status> {
        let tpm = self.tpm.clone();
        guard(&self.ctx, Rpc::ResealSecret, req, |_, _, r| async move {
            if r.expected.is_empty() {
                return Err(Error::InvalidArgument("expected: name at least one PCR value".into()));
            }
            let expected = pairs(&r.expected);
            let blob = on_tpm(&tpm, move |t| t.reseal(&r.sealed_blob, &expected)).await?;
            Ok(ResealSecretResponse { sealed_blob: blob })
        })
        .await
    }

    async fn get_device_token_key(
        &self,
        req: Request<GetDeviceTokenKeyRequest>,
    ) -> Result<Response<GetDeviceTokenKeyResponse>, Status> {
        let tpm = self.tpm.clone();
        guard(&self.ctx, Rpc::GetDeviceTokenKey, req, |_, _, _| async move {
            let k = on_tpm(&tpm, |t| t.token_key()).await?;
            Ok(GetDeviceTokenKeyResponse { public_key_pem: k.public_key_pem, jwk_json: k.jwk_json, kid: k.kid })
        })
        .await
    }

    async fn sign_device_token(
        &self,
        req: Request<SignDeviceTokenRequest>,
    ) -> Result<Response<SignDeviceTokenResponse>, Status> {
        let tpm = self.tpm.clone();
        guard(&self.ctx, Rpc::SignDeviceToken, req, |_, _, r| async move {
            let req = tpm::TokenRequest {
                subscription_tier: r.subscription_tier,
                features: r.features,
                ttl_seconds: r.ttl_seconds,
            };
            req.validate()?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_err(|_| Error::Internal("clock before 1970".into()))?
                .as_secs();
            let now = i64::try_from(now).map_err(|_| Error::Internal("clock out of range".into()))?;
            let t = on_tpm(&tpm, move |t| t.sign_token(&req, now)).await?;
            Ok(SignDeviceTokenResponse { token: t.token, expires_at: t.expires_at })
        })
        .await
    }

    async fn enroll_disk_tpm(
        &self,
        req: Request<EnrollDiskTpmRequest>,
    ) -> Result<Response<EnrollDiskTpmResponse>, Status> {
        let (tpm, disks) = (self.tpm.clone(), self.disks.clone());
        guard(&self.ctx, Rpc::EnrollDiskTpm, req, |_, _, r| async move {
            let key = zeroize::Zeroizing::new(r.unlock_key);
            let e = on_tpm(&tpm, move |t| t.enroll_disk(&disks, &r.partition, &r.pcrs, &key)).await?;
            Ok(EnrollDiskTpmResponse { keyslot: e.keyslot })
        })
        .await
    }

    async fn reseal_disk_tpm(
        &self,
        req: Request<ResealDiskTpmRequest>,
    ) -> Result<Response<ResealDiskTpmResponse>, Status> {
        let (tpm, disks) = (self.tpm.clone(), self.disks.clone());
        guard(&self.ctx, Rpc::ResealDiskTpm, req, |_, _, r| async move {
            let key = zeroize::Zeroizing::new(r.unlock_key);
            let expected = pairs(&r.expected);
            let e = on_tpm(&tpm, move |t| t.reseal_disk(&disks, &r.partition, &expected, &key)).await?;
            Ok(ResealDiskTpmResponse { keyslot: e.keyslot, wiped_keyslots: e.wiped })
        })
        .await
    }
}
