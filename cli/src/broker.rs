// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl info` and `piccoloctl whoami`.

use std::path::Path;

use piccolo_proto::v1::broker_client::BrokerClient;
use piccolo_proto::v1::{GetInfoRequest, WhoAmIRequest};
use tonic::transport::Channel;

use crate::Failure;
use crate::output::{connect_failure, status_failure, table};

/// Connects a typed client to the broker socket.
pub async fn channel(socket: &Path) -> Result<Channel, Failure> {
    piccolo_proto::client::connect_unix(socket).await.map_err(|e| connect_failure(&e))
}

pub async fn info(socket: &Path, json: bool) -> Result<(), Failure> {
    let mut c = BrokerClient::new(channel(socket).await?);
    let i = c.get_info(GetInfoRequest {}).await.map_err(|s| status_failure(&s))?.into_inner();
    if json {
        let backends: Vec<_> = i
            .backends
            .iter()
            .map(|b| serde_json::json!({"name": b.name, "available": b.available, "detail": b.detail}))
            .collect();
        let v = serde_json::json!({
            "version": i.version, "uptime_seconds": i.uptime_seconds, "policy_sha256": i.policy_sha256,
            "audit_seq": i.audit_seq, "backends": backends,
        });
        println!("{v}");
        return Ok(());
    }
    println!("version        {}", i.version);
    println!("uptime         {}s", i.uptime_seconds);
    println!("policy sha256  {}", i.policy_sha256);
    println!("audit seq      {}", i.audit_seq);
    println!();
    let rows: Vec<Vec<String>> = i
        .backends
        .iter()
        .map(|b| vec![b.name.clone(), if b.available { "yes" } else { "no" }.into(), b.detail.clone()])
        .collect();
    table(&["BACKEND", "AVAILABLE", "DETAIL"], &rows);
    Ok(())
}

pub async fn whoami(socket: &Path, json: bool) -> Result<(), Failure> {
    let mut c = BrokerClient::new(channel(socket).await?);
    let w = c.who_am_i(WhoAmIRequest {}).await.map_err(|s| status_failure(&s))?.into_inner();
    if json {
        let v = serde_json::json!({
            "uid": w.uid, "gid": w.gid, "pid": w.pid, "user": w.user, "groups": w.groups, "allowed_rpcs": w.allowed_rpcs,
        });
        println!("{v}");
        return Ok(());
    }
    println!("user     {} (uid {}, gid {})", w.user, w.uid, w.gid);
    println!("groups   {}", w.groups.join(", "));
    println!("allowed  {}", w.allowed_rpcs.join(", "));
    Ok(())
}
