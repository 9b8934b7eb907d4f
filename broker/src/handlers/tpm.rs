// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Tpm`: device identity, PCRs, PCR-sealed secrets, the device-token
//! key and device JWTs, LUKS2 TPM2 enrollment.
//!
//! Thin handlers: the guard, then one exchange with the TPM helper (`crate::tpm_helper`,
//! which validates every argument before it opens the TPM). Audit arguments are sizes,
//! indices and digests of blobs: never a secret, unsealed plaintext or unlock key (nor a
//! digest of one: a short secret's digest could be guessed).
//!
//! Status codes: INVALID_ARGUMENT (bad sizes, PCR index > 23, corrupt or foreign blob,
//! TTL outside 1..=3600, bad partition name, unlock key rejected); FAILED_PRECONDITION
//! "no TPM" (no TPM behind the configured TCTI: fails within 2 s) and "PCR policy
//! mismatch" (no data returned), or a partition that is not LUKS2; NOT_FOUND (no such
//! partition); UNAVAILABLE (TPM lockout or out of TPM resources, or the audit log);
//! PERMISSION_DENIED (policy, including the `partitions` allow-list); INTERNAL otherwise,
//! including a TPM helper that is missing, crashed or overran `tpm_helper::DEADLINE`.

use std::sync::Arc;

use piccolo_proto::Rpc;
use piccolo_proto::v1::tpm_helper_request::Op;
use piccolo_proto::v1::tpm_helper_response::Result as Answer;
use piccolo_proto::v1::tpm_server::Tpm;
use piccolo_proto::v1::{
    EnrollDiskTpmRequest, EnrollDiskTpmResponse, GetDeviceIdentityRequest, GetDeviceIdentityResponse,
    GetDeviceTokenKeyRequest, GetDeviceTokenKeyResponse, PcrValue, ReadPcrsRequest, ReadPcrsResponse,
    ResealDiskTpmRequest, ResealDiskTpmResponse, ResealSecretRequest, ResealSecretResponse, SealSecretRequest,
    SealSecretResponse, SignDeviceTokenRequest, SignDeviceTokenResponse, UnsealSecretRequest, UnsealSecretResponse,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::guard::{AuditArgs, Shared, guard};
use crate::tpm_helper::TpmHelper;

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

/// The `Tpm` service.
pub struct TpmSvc {
    ctx: Shared,
    helper: Arc<TpmHelper>,
}

impl TpmSvc {
    /// The TPM behind `[tpm] tcti`, reached through `[tpm] helper`; nothing runs until the
    /// first call.
    pub fn new(ctx: Shared) -> Self {
        let cfg = &ctx.config.file.tpm;
        let helper = Arc::new(TpmHelper::new(cfg.helper.clone(), cfg.tcti.clone()));
        TpmSvc { ctx, helper }
    }
}

/// Runs `op` in the helper and takes the answer of the kind `variant` names.
macro_rules! on_tpm {
    ($helper:expr, $op:expr, $variant:ident) => {
        match $helper.run($op).await? {
            Answer::$variant(r) => Ok(r),
            _ => Err(Error::Backend {
                code: tonic::Code::Internal,
                message: concat!("the TPM helper answered ", stringify!($variant), " with another kind").into(),
            }),
        }
    };
}

#[tonic::async_trait]
impl Tpm for TpmSvc {
    async fn get_device_identity(
        &self,
        req: Request<GetDeviceIdentityRequest>,
    ) -> Result<Response<GetDeviceIdentityResponse>, Status> {
        let helper = self.helper.clone();
        guard(&self.ctx, Rpc::GetDeviceIdentity, req, |_, _, r| async move {
            on_tpm!(helper, Op::GetDeviceIdentity(r), GetDeviceIdentity)
        })
        .await
    }

    async fn read_pcrs(&self, req: Request<ReadPcrsRequest>) -> Result<Response<ReadPcrsResponse>, Status> {
        let helper = self.helper.clone();
        guard(&self.ctx, Rpc::ReadPcrs, req, |_, _, r| async move { on_tpm!(helper, Op::ReadPcrs(r), ReadPcrs) }).await
    }

    async fn seal_secret(&self, req: Request<SealSecretRequest>) -> Result<Response<SealSecretResponse>, Status> {
        let helper = self.helper.clone();
        guard(&self.ctx, Rpc::SealSecret, req, |_, _, r| async move { on_tpm!(helper, Op::SealSecret(r), SealSecret) })
            .await
    }

    async fn unseal_secret(&self, req: Request<UnsealSecretRequest>) -> Result<Response<UnsealSecretResponse>, Status> {
        let helper = self.helper.clone();
        guard(
            &self.ctx,
            Rpc::UnsealSecret,
            req,
            |_, _, r| async move { on_tpm!(helper, Op::UnsealSecret(r), UnsealSecret) },
        )
        .await
    }

    async fn reseal_secret(&self, req: Request<ResealSecretRequest>) -> Result<Response<ResealSecretResponse>, Status> {
        let helper = self.helper.clone();
        guard(
            &self.ctx,
            Rpc::ResealSecret,
            req,
            |_, _, r| async move { on_tpm!(helper, Op::ResealSecret(r), ResealSecret) },
        )
        .await
    }

    async fn get_device_token_key(
        &self,
        req: Request<GetDeviceTokenKeyRequest>,
    ) -> Result<Response<GetDeviceTokenKeyResponse>, Status> {
        let helper = self.helper.clone();
        guard(&self.ctx, Rpc::GetDeviceTokenKey, req, |_, _, r| async move {
            on_tpm!(helper, Op::GetDeviceTokenKey(r), GetDeviceTokenKey)
        })
        .await
    }

    async fn sign_device_token(
        &self,
        req: Request<SignDeviceTokenRequest>,
    ) -> Result<Response<SignDeviceTokenResponse>, Status> {
        let helper = self.helper.clone();
        guard(&self.ctx, Rpc::SignDeviceToken, req, |_, _, r| async move {
            on_tpm!(helper, Op::SignDeviceToken(r), SignDeviceToken)
        })
        .await
    }

    async fn enroll_disk_tpm(
        &self,
        req: Request<EnrollDiskTpmRequest>,
    ) -> Result<Response<EnrollDiskTpmResponse>, Status> {
        let helper = self.helper.clone();
        guard(&self.ctx, Rpc::EnrollDiskTpm, req, |_, _, r| async move {
            on_tpm!(helper, Op::EnrollDiskTpm(r), EnrollDiskTpm)
        })
        .await
    }

    async fn reseal_disk_tpm(
        &self,
        req: Request<ResealDiskTpmRequest>,
    ) -> Result<Response<ResealDiskTpmResponse>, Status> {
        let helper = self.helper.clone();
        guard(&self.ctx, Rpc::ResealDiskTpm, req, |_, _, r| async move {
            on_tpm!(helper, Op::ResealDiskTpm(r), ResealDiskTpm)
        })
        .await
    }
}
