// SPDX-License-Identifier: Apache-2.0
//! Boot state through the broker's Boot service (`GetBootState`), as JSON.

use std::path::Path;
use std::time::Duration;

use piccolo_proto::v1::boot_client::BootClient;
use piccolo_proto::v1::{self as pb, GetBootStateRequest};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;

/// One A/B slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct SlotView {
    /// `a` or `b`.
    pub slot: String,
    /// GPT partition name.
    pub label: String,
    /// 1-based partition number.
    pub partition_number: u32,
    /// PARTUUID.
    pub partition_guid: String,
    /// gptprio priority.
    pub priority: u32,
    /// Tries left.
    pub tries: u32,
    /// Marked successful.
    pub successful: bool,
    /// A payload was written and verified since the slot was prepared.
    pub verified: bool,
    /// Partition size.
    pub size_bytes: u64,
}

/// The A/B boot state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct BootStateView {
    /// The OS disk.
    pub disk: String,
    /// Slot A, then slot B.
    pub slots: Vec<SlotView>,
    /// The booted slot (`a`, `b` or `none`).
    pub booted: String,
    /// `configured` or `detected`.
    pub booted_source: String,
    /// What GRUB boots next (`none`: nothing bootable).
    pub next_boot: String,
    /// What GRUB falls back to.
    pub fallback: String,
}

fn slot_name(v: i32) -> String {
    match pb::Slot::try_from(v) {
        Ok(pb::Slot::A) => "a",
        Ok(pb::Slot::B) => "b",
        _ => "none",
    }
    .to_string()
}

impl From<pb::BootState> for BootStateView {
    fn from(s: pb::BootState) -> BootStateView {
        BootStateView {
            disk: s.disk,
            slots: s
                .slots
                .into_iter()
                .map(|x| SlotView {
                    slot: slot_name(x.slot),
                    label: x.label,
                    partition_number: x.partition_number,
                    partition_guid: x.partition_guid,
                    priority: x.priority,
                    tries: x.tries,
                    successful: x.successful,
                    verified: x.verified,
                    size_bytes: x.size_bytes,
                })
                .collect(),
            booted: slot_name(s.booted),
            booted_source: s.booted_source,
            next_boot: slot_name(s.next_boot),
            fallback: slot_name(s.fallback),
        }
    }
}

/// Asks the broker for the boot state (5 s timeout).
pub async fn fetch(socket: &Path) -> Result<BootStateView, ApiError> {
    let call = async {
        let ch = piccolo_proto::client::connect_unix(socket).await.map_err(|e| {
            tracing::warn!(error = %e, "broker unreachable");
            ApiError::Unavailable("the broker is unreachable".into())
        })?;
        let resp = BootClient::new(ch).get_boot_state(GetBootStateRequest {}).await.map_err(|s| {
            tracing::warn!(code = ?s.code(), message = s.message(), "GetBootState failed");
            ApiError::Unavailable(format!("boot state unavailable: {}", s.message()))
        })?;
        resp.into_inner().state.map(BootStateView::from).ok_or_else(|| ApiError::Unavailable("empty boot state".into()))
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap_or_else(|_| Err(ApiError::Unavailable("the broker did not answer in time".into())))
}
