// SPDX-License-Identifier: Apache-2.0
//! `piccoloctl boot status|rollback|mark-good`: the A/B slots as the broker sees them.

use std::path::Path;

use clap::Subcommand;
use piccolo_proto::v1::boot_client::BootClient;
use piccolo_proto::v1::{
    BootState, GetBootStateRequest, MarkBootSuccessfulRequest, RollbackToOtherSlotRequest, Slot, SlotState,
};

use crate::Failure;
use crate::broker::channel;
use crate::output::{status_failure, table};

/// `piccoloctl boot ...`
#[derive(Subcommand)]
pub enum BootCmd {
    /// Both slots, the booted one, and what GRUB boots next and falls back to.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make the other slot boot next (refused unless GRUB would boot it).
    Rollback,
    /// Mark the booted slot good (successful, no tries left).
    MarkGood,
}

fn slot_name(s: i32) -> &'static str {
    match Slot::try_from(s) {
        Ok(Slot::A) => "USR-A",
        Ok(Slot::B) => "USR-B",
        _ => "none",
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

fn slot_json(s: &SlotState) -> serde_json::Value {
    serde_json::json!({
        "slot": slot_name(s.slot), "label": s.label, "partition_number": s.partition_number,
        "partition_guid": s.partition_guid, "priority": s.priority, "tries": s.tries,
        "successful": s.successful, "verified": s.verified, "size_bytes": s.size_bytes,
    })
}

fn print_state(st: &BootState, json: bool) {
    if json {
        let v = serde_json::json!({
            "disk": st.disk, "booted": slot_name(st.booted), "booted_source": st.booted_source,
            "next_boot": slot_name(st.next_boot), "fallback": slot_name(st.fallback),
            "slots": st.slots.iter().map(slot_json).collect::<Vec<_>>(),
        });
        println!("{v}");
        return;
    }
    println!("disk       {}", st.disk);
    println!("booted     {} ({})", slot_name(st.booted), st.booted_source);
    println!("next boot  {}", slot_name(st.next_boot));
    println!("fallback   {}", slot_name(st.fallback));
    println!();
    let rows: Vec<Vec<String>> = st
        .slots
        .iter()
        .map(|s| {
            vec![
                s.label.clone(),
                s.partition_number.to_string(),
                s.priority.to_string(),
                s.tries.to_string(),
                yes_no(s.successful),
                yes_no(s.verified),
                s.partition_guid.clone(),
            ]
        })
        .collect();
    table(&["SLOT", "PART", "PRIORITY", "TRIES", "SUCCESSFUL", "VERIFIED", "PARTUUID"], &rows);
}

/// Runs a `boot` subcommand.
pub async fn run(socket: &Path, cmd: BootCmd) -> Result<(), Failure> {
    let mut c = BootClient::new(channel(socket).await?);
    let (state, json) = match cmd {
        BootCmd::Status { json } => {
            (c.get_boot_state(GetBootStateRequest {}).await.map_err(|s| status_failure(&s))?.into_inner().state, json)
        }
        BootCmd::Rollback => {
            let r = c.rollback_to_other_slot(RollbackToOtherSlotRequest {}).await;
            (r.map_err(|s| status_failure(&s))?.into_inner().state, false)
        }
        BootCmd::MarkGood => {
            let r = c.mark_boot_successful(MarkBootSuccessfulRequest {}).await;
            (r.map_err(|s| status_failure(&s))?.into_inner().state, false)
        }
    };
    let state = state.ok_or_else(|| Failure::new(1, "the broker sent no boot state"))?;
    print_state(&state, json);
    Ok(())
}
