// SPDX-License-Identifier: Apache-2.0
//! The crate's one error type. Variants are named after the step that failed and keep the
//! path and the io error; messages never repeat the source (print the chain to see it).
//!
//! Recommended gRPC codes ([`Error::grpc_code`]) so the broker maps them in one place.

use std::io;
use std::path::PathBuf;

use crate::slots::SlotId;

/// A gRPC status code name, as recommended for each error (the broker owns the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The caller's argument is wrong (bad name, bad digest text, payload bigger than the slot).
    InvalidArgument,
    /// The named disk or partition does not exist.
    NotFound,
    /// The system is not in the state the operation needs (slot not prepared, not verified...).
    FailedPrecondition,
    /// The caller's data did not match what it announced (digest, length).
    DataLoss,
    /// Another operation holds the disk.
    Aborted,
    /// Hardware or kernel interface failed, or the host lacks what the operation needs.
    Unavailable,
    /// Anything else: a bug or an unexpected io failure.
    Internal,
}

/// Everything that can fail in boot control, disks and the installer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk or image could not be opened.
    #[error("cannot open disk {path}")]
    OpenDisk {
        /// Disk path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Another operation holds the disk's lock.
    #[error("disk {path} is busy with another boot-control operation")]
    DiskBusy {
        /// Disk path.
        path: PathBuf,
    },
    /// Taking the disk's lock failed.
    #[error("cannot lock disk {path}")]
    LockDisk {
        /// Disk path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the partition table failed.
    #[error("cannot read the partition table of {path}")]
    ReadTable {
        /// Disk path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Neither GPT copy is valid (or the layout is unsafe to write).
    #[error("{path} has no valid GPT")]
    NoValidTable {
        /// Disk path.
        path: PathBuf,
    },
    /// Writing the partition table failed.
    #[error("cannot write the partition table of {path}")]
    WriteTable {
        /// Disk path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// fsync of the disk failed.
    #[error("cannot sync {path}")]
    SyncDisk {
        /// Disk path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A partition number names no used entry.
    #[error("partition {number} does not exist")]
    NoSuchPartition {
        /// 1-based partition number.
        number: u32,
    },
    /// The disk does not hold exactly one `USR-A` and one `USR-B` of the Flatcar usr type.
    #[error("{path} is not an A/B OS disk: {reason}")]
    FindSlots {
        /// Disk path.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// Reading the mount table failed.
    #[error("cannot read mount table {path}")]
    ReadMountinfo {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading sysfs failed.
    #[error("cannot read {path}")]
    ReadSysfs {
        /// Path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The running system's OS disk could not be found.
    #[error("cannot find the OS disk: {reason}")]
    DetectOsDisk {
        /// Why.
        reason: String,
    },
    /// The inactive slot is not in the prepared state (priority 0, tries 0, not successful).
    #[error("slot {slot} is not prepared (call PrepareInactiveSlot first)")]
    NotPrepared {
        /// The inactive slot.
        slot: SlotId,
    },
    /// A zero-length payload was announced.
    #[error("payload is empty")]
    PayloadEmpty,
    /// The announced payload does not fit the slot.
    #[error("payload of {len} bytes is larger than slot {slot} ({capacity} bytes)")]
    PayloadTooLarge {
        /// The slot.
        slot: SlotId,
        /// Announced length.
        len: u64,
        /// Partition size.
        capacity: u64,
    },
    /// More bytes arrived than announced.
    #[error("payload is longer than the announced {expected} bytes")]
    PayloadTooLong {
        /// Announced length.
        expected: u64,
    },
    /// The stream ended early.
    #[error("payload ended after {received} of {expected} bytes")]
    PayloadShort {
        /// Announced length.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// Reading the payload stream failed.
    #[error("cannot read the payload")]
    ReadPayload {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Writing the payload to the partition failed.
    #[error("cannot write the payload to {path}")]
    WritePayload {
        /// Disk path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The payload's SHA-256 differs from the one announced.
    #[error("payload SHA-256 {actual} does not match the expected {expected}")]
    DigestMismatch {
        /// Announced digest (hex).
        expected: String,
        /// Computed digest (hex).
        actual: String,
    },
    /// A digest argument is not 64 hex digits.
    #[error("invalid SHA-256 digest: expected 64 hex digits")]
    InvalidDigest,
    /// Reading back what was written failed.
    #[error("cannot read back {path}")]
    ReadBack {
        /// Disk path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// What was read back differs from what was written.
    #[error("read-back of {path} does not match what was written")]
    ReadBackMismatch {
        /// Disk path.
        path: PathBuf,
        /// Offset of the first difference from the start of the write, when compared byte by byte.
        offset: Option<u64>,
    },
    /// Activation was asked for a slot whose payload was not verified.
    #[error("slot {slot} holds no verified payload (write it with WriteInactiveSlot first)")]
    NotVerified {
        /// The inactive slot.
        slot: SlotId,
    },
    /// The booted slot is not marked successful, so it could not be fallen back to.
    #[error("booted slot {slot} is not marked successful; mark it good before starting another update")]
    BootedNotSuccessful {
        /// The booted slot.
        slot: SlotId,
    },
    /// Rollback refused: GRUB would not boot the other slot.
    #[error("slot {slot} would not boot (no tries left and not successful); rollback refused")]
    WouldNotBoot {
        /// The other slot.
        slot: SlotId,
    },
    /// The operation would leave no slot GRUB boots.
    #[error("{operation} refused: afterwards GRUB would boot no slot")]
    NoBootableSlot {
        /// The refused operation.
        operation: &'static str,
    },
    /// The requested reboot delay is above the limit.
    #[error("reboot delay above the limit of {max_secs} s")]
    RebootDelayTooLong {
        /// The limit.
        max_secs: u64,
    },
    /// Scheduling or performing the reboot failed.
    #[error("cannot reboot")]
    Reboot {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Listing `/sys/block` failed.
    #[error("cannot list disks in {path}")]
    ListDisks {
        /// sysfs block directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A disk name is not a plain kernel name.
    #[error("invalid disk name {name:?}")]
    InvalidDiskName {
        /// The name given.
        name: String,
    },
    /// No disk of that name.
    #[error("no disk named {name:?}")]
    UnknownDisk {
        /// The name given.
        name: String,
    },
    /// The name is a partition or a RAM/stacked (dm, md) device, not a whole disk.
    #[error("{name:?} is not a whole disk (a partition, RAM disk or dm/md device)")]
    NotWholeDisk {
        /// The name given.
        name: String,
    },
    /// The disk holds the running system (a mounted filesystem or the configured OS disk).
    #[error("disk {name:?} holds the running system; refusing to overwrite it")]
    SystemDisk {
        /// The disk.
        name: String,
    },
    /// The kernel reports the disk busy (mounted, or held by dm/md/another exclusive opener).
    #[error("disk {name:?} is in use")]
    DiskInUse {
        /// The disk.
        name: String,
    },
    /// Opening the target disk failed.
    #[error("cannot open target disk {path}")]
    OpenTarget {
        /// Device path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image does not fit.
    #[error("disk {name:?} is too small: image needs {need} bytes, disk has {have}")]
    TargetTooSmall {
        /// The disk.
        name: String,
        /// Image size.
        need: u64,
        /// Disk size.
        have: u64,
    },
    /// The image path is not a regular file inside an allowed directory.
    #[error("image {path} is not a regular file in an allowed image directory")]
    ImageNotAllowed {
        /// The path given.
        path: PathBuf,
    },
    /// Opening the image failed.
    #[error("cannot open image {path}")]
    OpenImage {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading the image failed.
    #[error("cannot read the image")]
    ReadImage {
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image is empty.
    #[error("image is empty")]
    ImageEmpty,
    /// Writing the target disk failed.
    #[error("cannot write to disk {path}")]
    WriteDisk {
        /// Device path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The gRPC code the broker should answer with.
    pub fn grpc_code(&self) -> Code {
        use Error::*;
        match self {
            PayloadEmpty
            | PayloadTooLarge { .. }
            | InvalidDigest
            | InvalidDiskName { .. }
            | NotWholeDisk { .. }
            | RebootDelayTooLong { .. } => Code::InvalidArgument,
            ImageNotAllowed { .. } | ImageEmpty | TargetTooSmall { .. } => Code::InvalidArgument,
            UnknownDisk { .. } | NoSuchPartition { .. } => Code::NotFound,
            NotPrepared { .. }
            | NotVerified { .. }
            | BootedNotSuccessful { .. }
            | WouldNotBoot { .. }
            | NoBootableSlot { .. }
            | SystemDisk { .. }
            | DiskInUse { .. }
            | FindSlots { .. }
            | NoValidTable { .. } => Code::FailedPrecondition,
            PayloadTooLong { .. } | PayloadShort { .. } | DigestMismatch { .. } | ReadBackMismatch { .. } => {
                Code::DataLoss
            }
            DiskBusy { .. } => Code::Aborted,
            OpenDisk { .. } | DetectOsDisk { .. } | ReadMountinfo { .. } | ReadSysfs { .. } | ListDisks { .. } => {
                Code::Unavailable
            }
            ReadPayload { .. } | ReadImage { .. } => Code::Aborted,
            LockDisk { .. }
            | ReadTable { .. }
            | WriteTable { .. }
            | SyncDisk { .. }
            | WritePayload { .. }
            | ReadBack { .. }
            | Reboot { .. }
            | OpenTarget { .. }
            | WriteDisk { .. } => Code::Internal,
            OpenImage { source, .. } if source.kind() == io::ErrorKind::NotFound => Code::NotFound,
            OpenImage { .. } => Code::Internal,
        }
    }
}
