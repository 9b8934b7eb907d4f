// SPDX-License-Identifier: Apache-2.0
//! The broker's Boot service, as the updater uses it. One connection per call: the broker may
//! restart between calls, and Unix-socket connects are cheap.

use std::path::PathBuf;

use piccolo_proto::v1::boot_client::BootClient;
use piccolo_proto::v1::{
    ActivateInactiveSlotRequest, BootState, CancelUpdateRequest, GetBootStateRequest, MarkBootSuccessfulRequest,
    PrepareInactiveSlotRequest, RebootRequest, RollbackToOtherSlotRequest, Slot, SlotState, WriteInactiveSlotRequest,
    WriteInactiveSlotResponse,
};
use tonic::transport::Channel;

use crate::error::Error;

/// Client of the broker's Boot service.
#[derive(Debug, Clone)]
pub struct BrokerBoot {
    socket: PathBuf,
}

/// `USR-A`, `USR-B` or `none`.
pub fn slot_label(s: i32) -> &'static str {
    match Slot::try_from(s) {
        Ok(Slot::A) => "USR-A",
        Ok(Slot::B) => "USR-B",
        _ => "none",
    }
}

/// The slot entry of `st` with this label.
pub fn slot_by_label<'a>(st: &'a BootState, label: &str) -> Option<&'a SlotState> {
    st.slots.iter().find(|s| s.label == label)
}

/// The slot that is not booted.
pub fn inactive(st: &BootState) -> Option<&SlotState> {
    st.slots.iter().find(|s| s.slot != st.booted)
}

impl BrokerBoot {
    /// Talks to the broker at `socket`.
    pub fn new(socket: PathBuf) -> BrokerBoot {
        BrokerBoot { socket }
    }

    async fn client(&self) -> Result<BootClient<Channel>, Error> {
        Ok(BootClient::new(piccolo_proto::client::connect_unix(&self.socket).await?)
            .max_decoding_message_size(piccolo_proto::paths::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(piccolo_proto::paths::MAX_MESSAGE_BYTES))
    }

    /// GetBootState.
    pub async fn state(&self) -> Result<BootState, Error> {
        let r = self.client().await?.get_boot_state(GetBootStateRequest {}).await;
        need(r.map_err(|s| Error::broker("GetBootState", s))?.into_inner().state, "GetBootState")
    }

    /// PrepareInactiveSlot.
    pub async fn prepare(&self) -> Result<BootState, Error> {
        let r = self.client().await?.prepare_inactive_slot(PrepareInactiveSlotRequest {}).await;
        need(r.map_err(|s| Error::broker("PrepareInactiveSlot", s))?.into_inner().state, "PrepareInactiveSlot")
    }

    /// WriteInactiveSlot with these messages (header first).
    pub async fn write(
        &self,
        msgs: impl tokio_stream::Stream<Item = WriteInactiveSlotRequest> + Send + 'static,
    ) -> Result<WriteInactiveSlotResponse, Error> {
        let r = self.client().await?.write_inactive_slot(msgs).await;
        Ok(r.map_err(|s| Error::broker("WriteInactiveSlot", s))?.into_inner())
    }

    /// ActivateInactiveSlot.
    pub async fn activate(&self) -> Result<BootState, Error> {
        let r = self.client().await?.activate_inactive_slot(ActivateInactiveSlotRequest {}).await;
        need(r.map_err(|s| Error::broker("ActivateInactiveSlot", s))?.into_inner().state, "ActivateInactiveSlot")
    }

    /// CancelUpdate.
    pub async fn cancel(&self) -> Result<BootState, Error> {
        let r = self.client().await?.cancel_update(CancelUpdateRequest {}).await;
        need(r.map_err(|s| Error::broker("CancelUpdate", s))?.into_inner().state, "CancelUpdate")
    }

    /// RollbackToOtherSlot.
    pub async fn rollback(&self) -> Result<BootState, Error> {
        let r = self.client().await?.rollback_to_other_slot(RollbackToOtherSlotRequest {}).await;
        need(r.map_err(|s| Error::broker("RollbackToOtherSlot", s))?.into_inner().state, "RollbackToOtherSlot")
    }

    /// MarkBootSuccessful.
    pub async fn mark_good(&self) -> Result<BootState, Error> {
        let r = self.client().await?.mark_boot_successful(MarkBootSuccessfulRequest {}).await;
        need(r.map_err(|s| Error::broker("MarkBootSuccessful", s))?.into_inner().state, "MarkBootSuccessful")
    }

    /// Reboot after `delay_seconds`.
    pub async fn reboot(&self, delay_seconds: u32) -> Result<(), Error> {
        let r = self.client().await?.reboot(RebootRequest { delay_seconds }).await;
        r.map_err(|s| Error::broker("Reboot", s)).map(|_| ())
    }
}

fn need(st: Option<BootState>, rpc: &'static str) -> Result<BootState, Error> {
    st.ok_or(Error::Broker { rpc, code: tonic::Code::Internal, message: "no boot state in the answer".into() })
}
