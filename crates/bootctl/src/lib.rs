// SPDX-License-Identifier: Apache-2.0
//! Boot control for the broker: the Flatcar-style A/B `/usr` slots selected by GRUB's
//! `gptprio`, writing update payloads into the inactive slot, listing disks, and installing
//! an OS image onto another disk.
//!
//! Owns: the GPT reader/writer ([`gpt`]: both copies and all CRCs, fsynced), the slot state
//! machine ([`slots::BootControl`]), a faithful GRUB `gptprio.next` simulator
//! ([`simulator`]), the reboot backend ([`reboot`]), disk discovery from sysfs ([`disks`],
//! [`host`]) and the installer ([`install`]).
//!
//! Must never: write a table on which GRUB's rule boots no slot; mark a payload verified
//! before its digest matched and it was read back from the disk; write outside the inactive
//! slot's partition when writing a payload; install onto a disk that holds the running
//! system, a partition, or a disk too small; act on an argument before validating it.
//! It does no authorisation: the broker decides who may call what.
//!
//! ## Errors and gRPC codes
//! [`Error::grpc_code`] recommends a code per variant: caller mistakes (bad digest text,
//! payload larger than the slot, bad disk name, partition as target) are `INVALID_ARGUMENT`;
//! unknown disks `NOT_FOUND`; state refusals (slot not prepared, payload not verified, other
//! slot would not boot, system disk, disk in use) `FAILED_PRECONDITION`; data that does not
//! match what was announced (digest, length, read-back) `DATA_LOSS`; a concurrent operation
//! on the same disk `ABORTED`; host interfaces missing (no OS disk, sysfs) `UNAVAILABLE`;
//! io failures on the disk `INTERNAL`.

pub mod attrs;
pub mod disks;
mod error;
pub mod gpt;
pub mod guid;
pub mod host;
pub mod install;
pub mod reboot;
pub mod simulator;
pub mod slots;
mod stream;

pub use attrs::SlotAttrs;
pub use disks::{DiskConfig, DiskInfo, ImageSpec, InstallPlan, OverwrittenPartition, list_disks, plan_install};
pub use error::{Code, Error};
pub use guid::{FLATCAR_USR_TYPE, Guid};
pub use host::Host;
pub use install::{ImageSource, InstallReport, Phase, Progress, install_to_disk};
pub use reboot::{MAX_REBOOT_DELAY, Rebooter, RecordFileRebooter, RecordingRebooter, SystemRebooter};
pub use slots::{BootControl, BootState, BootedSource, SlotId, SlotInfo, WriteReport};
pub use stream::{CHUNK, Sha256Digest, parse_sha256};
