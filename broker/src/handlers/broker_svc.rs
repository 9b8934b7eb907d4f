// SPDX-License-Identifier: Apache-2.0
//! `piccolo.broker.v1.Broker`: GetInfo and WhoAmI. The template for every other service.

use piccolo_proto::Rpc;
use piccolo_proto::v1::{GetInfoRequest, GetInfoResponse, WhoAmIRequest, WhoAmIResponse, broker_server::Broker};
use tonic::{Request, Response, Status};

use crate::guard::{AuditArgs, Shared, guard};

/// The `Broker` service.
pub struct BrokerSvc {
    ctx: Shared,
}

impl BrokerSvc {
    /// Wraps the shared state.
    pub fn new(ctx: Shared) -> Self {
        BrokerSvc { ctx }
    }
}

impl AuditArgs for GetInfoRequest {}
impl AuditArgs for WhoAmIRequest {}

#[tonic::async_trait]
impl Broker for BrokerSvc {
    async fn get_info(&self, req: Request<GetInfoRequest>) -> Result<Response<GetInfoResponse>, Status> {
        guard(&self.ctx, Rpc::GetInfo, req, |ctx, _id, _req| async move {
            Ok(GetInfoResponse {
                version: env!("CARGO_PKG_VERSION").into(),
                uptime_seconds: ctx.started.elapsed().as_secs(),
                backends: ctx.backends.snapshot().await,
                policy_sha256: ctx.policy().sha256().to_owned(),
                audit_seq: ctx.audit.last_seq(),
            })
        })
        .await
    }

    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        guard(&self.ctx, Rpc::WhoAmI, req, |ctx, id, _req| async move {
            let allowed = ctx.policy().allowed_rpcs(&id).into_iter().map(|r| r.name().to_owned()).collect();
            Ok(WhoAmIResponse {
                uid: id.uid,
                gid: id.gid,
                pid: id.pid.unwrap_or(0),
                user: id.user.clone().unwrap_or_default(),
                groups: id.groups.iter().map(|(_, n)| n.clone()).collect(),
                allowed_rpcs: allowed,
            })
        })
        .await
    }
}
