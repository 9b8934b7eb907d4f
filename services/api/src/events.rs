// SPDX-License-Identifier: Apache-2.0
//! Events pushed to `GET /api/v1/events` subscribers (server-sent events): `lock`, `boot`,
//! `update`.

use serde::Serialize;
use utoipa::ToSchema;

use crate::backend::LockState;
use crate::boot::BootStateView;
use crate::updates::UpdateStatus;

/// One event; the SSE `event:` field is its `type`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The control store's lock state changed.
    Lock {
        /// The new state.
        state: LockState,
    },
    /// The A/B boot state changed (polled from the broker).
    Boot {
        /// The new boot state.
        boot: BootStateView,
    },
    /// The update worker's status changed (phase, version, download progress, message),
    /// from its WatchStatus stream; also sent once when the stream (re)connects with a status
    /// that differs from the last one sent.
    Update {
        /// The new status.
        update: UpdateStatus,
    },
}

impl Event {
    /// A lock-state event.
    pub fn lock(state: LockState) -> Event {
        Event::Lock { state }
    }

    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Lock { .. } => "lock",
            Event::Boot { .. } => "boot",
            Event::Update { .. } => "update",
        }
    }
}
