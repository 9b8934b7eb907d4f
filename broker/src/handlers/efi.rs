// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Efi`: get, set and delete EFI variables under the configured
//! efivarfs root (`[efi] efivars_root`).
//!
//! The policy's `efi_variables` constraint is checked against `<Name>-<guid>` (the GUID
//! lowercased), exactly the efivarfs file name the call touches. Handlers validate the
//! name, GUID and attributes before opening anything, then make one `piccolo_efivars` call
//! on a blocking thread. Audit records carry the name, GUID, and for writes the data's size
//! and SHA-256, never the data.

use piccolo_efivars::{self as efivars, Attributes, Efivars, MAX_NAME_BYTES, VarId};
use piccolo_proto::Rpc;
use piccolo_proto::v1::efi_server::Efi;
use piccolo_proto::v1::{
    DeleteEfiVariableRequest, DeleteEfiVariableResponse, GetEfiVariableRequest, GetEfiVariableResponse,
    SetEfiVariableRequest, SetEfiVariableResponse,
};
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::boot::blocking;
use crate::error::Error;
use crate::guard::{AuditArgs, Shared, guard};

/// Attribute bits a caller may set: NON_VOLATILE, BOOTSERVICE_ACCESS, RUNTIME_ACCESS.
/// Authenticated writes need signed payloads the broker does not build; append writes and
/// hardware error records belong to the firmware and the kernel.
const SETTABLE: u32 = Attributes::NON_VOLATILE | Attributes::BOOTSERVICE_ACCESS | Attributes::RUNTIME_ACCESS;

impl From<efivars::Error> for Error {
    /// The one mapping of EFI-variable errors to gRPC codes (recommended by the crate).
    fn from(e: efivars::Error) -> Error {
        use tonic::Code;
        let code = match e.grpc_code() {
            efivars::Code::InvalidArgument => Code::InvalidArgument,
            efivars::Code::NotFound => Code::NotFound,
            efivars::Code::FailedPrecondition => Code::FailedPrecondition,
            efivars::Code::Aborted => Code::Aborted,
            efivars::Code::DataLoss => Code::DataLoss,
            efivars::Code::ResourceExhausted => Code::ResourceExhausted,
            efivars::Code::Internal => Code::Internal,
        };
        // The whole chain: paths and io errors; the crate never puts data in a message.
        let message = crate::error::chain_message(&e);
        if code == Code::Internal {
            tracing::error!(error = %message, "EFI variable access failed");
        }
        Error::Backend { code, message }
    }
}

/// The policy value: `<Name>-<guid>` as given, the GUID lowercased. Invalid input still
/// gets a value (so a rule allowing it lets the handler answer INVALID_ARGUMENT); an exact
/// allow-list never matches it.
fn constraint(name: &str, guid: &str) -> String {
    format!("{name}-{}", guid.to_ascii_lowercase())
}

/// Name and GUID for the audit record, bounded (they are validated only afterwards).
fn id_args(name: &str, guid: &str) -> serde_json::Value {
    json!({
        "name": name.chars().take(MAX_NAME_BYTES).collect::<String>(),
        "guid": guid.chars().take(64).collect::<String>(),
    })
}

impl AuditArgs for GetEfiVariableRequest {
    fn audit_args(&self) -> serde_json::Value {
        id_args(&self.name, &self.vendor_guid)
    }
    fn constraint(&self) -> Option<String> {
        Some(constraint(&self.name, &self.vendor_guid))
    }
}

impl AuditArgs for SetEfiVariableRequest {
    fn audit_args(&self) -> serde_json::Value {
        let mut v = id_args(&self.name, &self.vendor_guid);
        v["size"] = json!(self.data.len());
        v["sha256"] = json!(hex::encode(Sha256::digest(&self.data)));
        v
    }
    fn constraint(&self) -> Option<String> {
        Some(constraint(&self.name, &self.vendor_guid))
    }
}

impl AuditArgs for DeleteEfiVariableRequest {
    fn audit_args(&self) -> serde_json::Value {
        id_args(&self.name, &self.vendor_guid)
    }
    fn constraint(&self) -> Option<String> {
        Some(constraint(&self.name, &self.vendor_guid))
    }
}

/// The attributes of a set request: absent means NV|BS|RT; only [`SETTABLE`] bits, and
/// RUNTIME only with BOOTSERVICE.
fn settable(attributes: Option<u32>) -> Result<Attributes, Error> {
    let a = Attributes(attributes.unwrap_or(Attributes::BOOT_VARIABLE.0));
    if a.0 & !SETTABLE != 0 {
        return Err(Error::InvalidArgument(format!(
            "attributes {:#x}: only NON_VOLATILE|BOOTSERVICE_ACCESS|RUNTIME_ACCESS (0x7) may be set",
            a.0
        )));
    }
    a.check_writable()?;
    Ok(a)
}

/// The `Efi` service.
pub struct EfiSvc {
    ctx: Shared,
}

impl EfiSvc {
    /// Wraps the shared state.
    pub fn new(ctx: Shared) -> Self {
        EfiSvc { ctx }
    }
}

#[tonic::async_trait]
impl Efi for EfiSvc {
    async fn get_efi_variable(
        &self,
        req: Request<GetEfiVariableRequest>,
    ) -> Result<Response<GetEfiVariableResponse>, Status> {
        guard(&self.ctx, Rpc::GetEfiVariable, req, |ctx, _, r| async move {
            let id = VarId::parse(&r.name, &r.vendor_guid)?;
            let root = ctx.config.file.efi.efivars_root.clone();
            let v = blocking(move || Ok(Efivars::open(&root)?.get(&id)?)).await?;
            Ok(GetEfiVariableResponse { attributes: v.attributes.0, data: v.data })
        })
        .await
    }

    async fn set_efi_variable(
        &self,
        req: Request<SetEfiVariableRequest>,
    ) -> Result<Response<SetEfiVariableResponse>, Status> {
        guard(&self.ctx, Rpc::SetEfiVariable, req, |ctx, _, r| async move {
            let id = VarId::parse(&r.name, &r.vendor_guid)?;
            let attributes = settable(r.attributes)?;
            let root = ctx.config.file.efi.efivars_root.clone();
            blocking(move || Ok(Efivars::open(&root)?.set(&id, attributes, &r.data)?)).await?;
            Ok(SetEfiVariableResponse {})
        })
        .await
    }

    async fn delete_efi_variable(
        &self,
        req: Request<DeleteEfiVariableRequest>,
    ) -> Result<Response<DeleteEfiVariableResponse>, Status> {
        guard(&self.ctx, Rpc::DeleteEfiVariable, req, |ctx, _, r| async move {
            let id = VarId::parse(&r.name, &r.vendor_guid)?;
            let root = ctx.config.file.efi.efivars_root.clone();
            blocking(move || Ok(Efivars::open(&root)?.delete(&id)?)).await?;
            Ok(DeleteEfiVariableResponse {})
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settable_attributes() {
        assert_eq!(settable(None).unwrap(), Attributes(7));
        for ok in [1, 2, 3, 6, 7] {
            assert_eq!(settable(Some(ok)).unwrap(), Attributes(ok));
        }
        for bad in [0x4, 0x5, 0x8, 0x10, 0x20, 0x27, 0x40, 0x47, 0x80, 0x1_0007] {
            let s = Status::from(settable(Some(bad)).unwrap_err());
            assert_eq!(s.code(), tonic::Code::InvalidArgument, "{bad:#x}");
        }
    }

    #[test]
    fn constraint_is_the_file_name() {
        let r = SetEfiVariableRequest {
            name: "BootNext".into(),
            vendor_guid: "8BE4DF61-93CA-11D2-AA0D-00E098032B8C".into(),
            attributes: None,
            data: vec![1, 0],
        };
        assert_eq!(r.constraint().as_deref(), Some("BootNext-8be4df61-93ca-11d2-aa0d-00e098032b8c"));
        let a = r.audit_args();
        assert_eq!(a["size"], 2);
        assert_eq!(a["sha256"], hex::encode(Sha256::digest([1u8, 0])));
        assert_eq!(a.as_object().unwrap().len(), 4, "name, guid, size, sha256: {a}");
    }
}
